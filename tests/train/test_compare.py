"""``train.search.compare``: a tree of run folders as one table, seeds aggregated, the front drawn, HParams written."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import compose_config
from train.search.compare import main
from train.search.formats import find_runs
from train.search.render import write_hparams
from train.search.solve import front, group_runs
from train.config import ConfigError, to_container


@pytest.fixture(scope="module")
def base_config() -> dict:
    return to_container(compose_config("compress=prune_q4"))


def _run(root: Path, config: dict, *, compress: str, seed: int, test: float, val: float | None, score: float,
         hydra: bool = True, lacks: str = "", **changes) -> Path:
    """A finished run folder as train/run.py leaves it: report.json and .hydra/config.yaml (or the entry's config);
    ``lacks``: a top-level setting its config does not have (the run was written before the setting existed)."""
    config = copy.deepcopy(config)
    config.pop(lacks, None)
    config.update(seed=seed, init=f"outputs/base/seed{seed}")
    config["compress"]["name"] = compress
    for key, value in changes.items():
        section, name = key.split("__")
        config[section][name] = value
    folder = root / "digits_cnn" / compress / f"seed{seed}" if hydra else root / "bundles" / f"{compress}{seed}"
    correct = round(test * 360)
    report = {"task": "digits", "model": "digits_cnn", "compress": compress, "seed": seed, "top1": correct / 360,
              "correct": correct, "total": 360, "gate_passed": correct >= 342, "params": 1000 * score,
              "ops": 2000 * score, "score": score, "gate": {"metric": "top1"},
              "validation": None if val is None else {"split": "val", "top1": val}}
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps(report))
    if hydra:
        (folder / ".hydra").mkdir()
        OmegaConf.save(OmegaConf.create(config), folder / ".hydra" / "config.yaml")
    else:
        (folder / "entry").mkdir()
        (folder / "entry" / "entry.json").write_text(json.dumps({"config": config}))
        (folder / "entry" / "report.json").write_text(json.dumps(report))  # a copy inside the entry: not a run
    return folder


@pytest.fixture
def runs_dir(tmp_path: Path, base_config: dict) -> Path:
    for seed, (test, score) in enumerate([(350, 0.1150), (345, 0.1140), (355, 0.1160)]):
        _run(tmp_path, base_config, compress="prune_q4", seed=seed, test=test / 360, val=0.98, score=score,
             lacks="smoke" if seed == 0 else "")
    for seed, (test, score) in enumerate([(344, 0.080), (341, 0.082), (347, 0.078)]):
        _run(tmp_path, base_config, compress="auto", seed=seed, test=test / 360, val=0.97, score=score, hydra=seed != 2)
    _run(tmp_path, base_config, compress="q8", seed=0, test=358 / 360, val=None, score=0.5, train__epochs=2)
    _run(tmp_path, base_config, compress="q8", seed=1, test=357 / 360, val=None, score=0.5)
    return tmp_path


def test_runs_are_grouped_by_configuration_with_seeds_aggregated(runs_dir: Path):
    runs = find_runs(runs_dir)
    assert len(runs) == 8  # the report.json copy inside an entry folder is not a run
    groups = group_runs(runs)
    assert [(g.compress, len(g.runs)) for g in groups] == [("auto", 3), ("prune_q4", 3), ("q8", 1), ("q8", 1)]
    auto, prune = groups[0], groups[1]
    # prune_q4 seed 0 lacks `smoke` (None where the others have False): still one configuration
    assert [r.seed for r in auto.runs] == [0, 1, 2] and auto.variant == "" and prune.variant == ""
    assert prune.runs[0].settings["smoke"] is None and prune.runs[1].settings["smoke"] is False
    # a setting that differs inside (task, model, compress) splits it, and is named
    assert (groups[2].variant, groups[3].variant) == ("train.epochs=2", "train.epochs=15")
    assert auto.worst().seed == 1 and auto.worst().gate_passed is False  # 341/360 < 342
    assert prune.values("score") == [0.1150, 0.1140, 0.1160] and prune.values("val") == [0.98] * 3
    assert [g.compress for g in front(groups)] == ["auto", "prune_q4", "q8"]


def test_the_printed_tables_and_the_front_png(runs_dir: Path, tmp_path: Path, capsys):
    png = tmp_path / "front.png"
    assert main([str(runs_dir), "--png", str(png), "--json", str(tmp_path / "c.json")]) == 0
    out = capsys.readouterr().out
    # auto: scores 0.080, 0.082, 0.078 -> mean 0.080, sample std 0.002; test 344, 341, 347 of 360 -> mean 344/360,
    # std 3/360; prune_q4: 350, 345, 355 -> 350/360 ± 5/360
    assert ("| digits | digits_cnn | auto | – | 3 | 2/3 | 0.9700 ± 0.0000 | 0.9556 ± 0.0083 | 0.080000 ± 0.002000 "
            "| seed 1: 0.9472 (FAIL 341/360) |") in out
    assert "| digits | digits_cnn | prune_q4 | – | 3 | 3/3 | 0.9800 ± 0.0000 | 0.9722 ± 0.0139 | 0.115000 ± 0.001000" in out
    assert "| digits | digits_cnn | auto | – | 1 | 0.9700 | 0.9472 | 82 | 164 | 0.082000 | FAIL 341/360 |" in out
    assert out.index("## Configurations") > out.index("| prune_q4 | – | 2 |")  # runs first, then configurations
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(json.loads((tmp_path / "c.json").read_text())["runs"]) == 8


def test_hparams_for_tensorboard_are_written_once(runs_dir: Path, tmp_path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = write_hparams(find_runs(runs_dir), tmp_path / "board")
    run = board / "digits_cnn" / "auto" / "seed1"
    events = EventAccumulator(str(run)).Reload()
    assert events.Scalars("hparam/score")[0].value == pytest.approx(0.082)
    assert events.Scalars("hparam/gate_passed")[0].value == 0.0
    with pytest.raises(ConfigError, match="already holds TensorBoard event files"):
        write_hparams(find_runs(runs_dir), board)


def test_a_folder_without_runs_is_one_line(tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main([str(tmp_path)])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no report.json below") and " ; fix: " in err and err.count("\n") == 1


def test_a_collapsed_run_is_named_off_the_axis_instead_of_squashing_the_front(runs_dir: Path, base_config: dict):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from train.search.render import _limit_metric_axis

    _run(runs_dir, base_config, compress="q8", seed=2, test=36 / 360, val=None, score=0.5)  # collapsed to 36/360
    groups = group_runs(find_runs(runs_dir))
    figure, axis = plt.subplots()
    _limit_metric_axis(axis, groups, 0.95)
    # means: auto 344/360, prune_q4 350/360, q8 [epochs 2] 358/360, q8 [epochs 15] (357 + 36)/2/360 = 196.5/360;
    # the worst, 196.5/360, is the bottom, the best run 358/360 the top, padded by 8% of the difference
    low, high = 196.5 / 360, 358 / 360
    assert axis.get_ylim() == pytest.approx((low - 0.08 * (high - low), high + 0.08 * (high - low)))
    assert [t.get_text() for t in axis.texts] == ["off the axis: q8 [train.epochs=15] seed 2: 0.1"]
    plt.close(figure)


def _measured(folder: Path, entry_ms: float, dense_ms: float) -> None:
    """A measured.json as ``python -m scoring measure`` writes into a run dir (the fields the comparison reads)."""
    rows = [{"role": "dense", "name": "digits_cnn dense float32", "measured": {"latency_ms": dense_ms}},
            {"role": "entry", "dense": "digits_cnn dense float32", "measured": {"latency_ms": entry_ms}}]
    (folder / "measured.json").write_text(json.dumps({"format": 1, "models": rows}))


def test_the_score_against_measured_latency_png(runs_dir: Path, tmp_path: Path, capsys):
    _measured(runs_dir / "digits_cnn" / "prune_q4" / "seed0", 0.09, 0.05)
    _measured(runs_dir / "digits_cnn" / "auto" / "seed1", 0.07, 0.06)
    runs = {(run.compress, run.seed): run for run in find_runs(runs_dir)}
    assert (runs["prune_q4", 0].latency_ms, runs["prune_q4", 0].dense_latency_ms) == (0.09, 0.05)
    assert runs["auto", 1].latency_ms == 0.07 and runs["q8", 0].latency_ms is None
    png = tmp_path / "latency.png"
    assert main([str(runs_dir), "--latency-png", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"score against latency drawn in {png} (2 of 8 runs measured)" in capsys.readouterr().out


def test_a_latency_png_without_measured_runs_is_one_line(runs_dir: Path, tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main([str(runs_dir), "--latency-png", str(tmp_path / "latency.png")])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no run has a measured.json ; fix: measure the runs first") and err.count("\n") == 1
    assert not (tmp_path / "latency.png").exists()
