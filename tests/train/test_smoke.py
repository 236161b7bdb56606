"""``smoke=true``: every stage of a recipe shortened, so that it runs end to end in minutes (here: on fixtures)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import compose_config, run_train
from tests.fixtures import make_imagenet
from train import smoke
from train.checkpoint import load_latest
from train.cli import accept_command_line
from train.smoke import smoke_config


def test_every_stage_and_the_scorer_are_shortened():
    cfg = compose_config("+experiment=cifar100_densenet_micronet", "data.root=/data", "smoke=true")
    short = smoke_config(cfg)
    assert (cfg.train.epochs, [s.epochs for s in cfg.compress.stages]) == (300, [300, 300])  # the recipe as written
    assert (short.train.epochs, [s.epochs for s in short.compress.stages]) == (1, [1, 1])
    assert short.compress.stages[0].prune.end == 150 / 300 and short.compress.stages[0].prune.unit == "fraction"
    assert short.score.examples == smoke.EXAMPLES == 8 and short.train.batch_size == cfg.train.batch_size


def test_a_recipe_that_cannot_be_shortened_is_one_line(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_status:
        accept_command_line(["compress=prune", "smoke=true", "compress.stages.0.prune.unit=step",
                             "compress.stages.0.prune.start=0", "compress.stages.0.prune.end=100",
                             "compress.stages.0.prune.frequency=10"])
    assert exit_status.value.code == 2
    assert capsys.readouterr().err == (
        "error: smoke=true: compress.stages[0].prune.unit='step': a shortened stage cannot rescale positions "
        "counted in steps; write them with unit fraction or epoch ; fix: edit conf/compress/prune.yaml or the "
        "compress.* override\n")
    assert list(tmp_path.iterdir()) == []


def _stage_steps(run_dir: Path) -> dict[str, tuple[int, int]]:
    """(epochs, optimizer steps) of every stage's final checkpoint."""
    states = {d.name: load_latest(d) for d in sorted((run_dir / "checkpoints").iterdir())}
    assert all(state["finished"] for state in states.values())
    return {name: (state["epoch"], state["global_step"]) for name, state in states.items()}


@pytest.mark.slow
def test_the_imagenet_recipe_runs_end_to_end_as_a_smoke_run(tmp_path: Path):
    """Baseline, the allocation capped at the template's count (one layer, at its template setting), pruning and QAT."""
    make_imagenet(tmp_path / "imagenet", classes=3, train_per_class=4, val_per_class=2)
    # the fixture's 12 training images cannot hold out the recipe's 10,000: 4 of them, for the allocate stage
    result = run_train("+experiment=imagenet_mixnet_micronet", f"data.root={tmp_path / 'imagenet'}", "smoke=true",
                       "data.val_split=4", "train.batch_size=4", "train.eval_batch_size=6", "score.examples=4",
                       "data.num_workers=0", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode in (0, 3), result.stderr[-3000:]
    assert _stage_steps(tmp_path / "run") == {"0_train": (1, 2), "2_prune": (1, 2), "3_q4": (1, 2)}
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    allocation = report["allocation"]
    assert report["examples"] == 4 and list(allocation["layers"]) == ["blocks.0.0.conv_dw"]
    assert allocation["counted"]["score"] == pytest.approx(allocation["predicted"]["score"], rel=1e-9)
    assert allocation["predicted"]["score"] <= allocation["max_score"] * (1 + 1e-12)  # under the template's count


@pytest.mark.slow
def test_a_language_model_recipe_runs_as_a_smoke_run_on_the_first_windows_of_its_streams(tmp_path: Path):
    result = run_train("task=wikitext_demo", "compress=lm_prune_q8", "smoke=true", "data.num_workers=0",
                       f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode in (0, 3), result.stderr[-3000:]
    assert _stage_steps(tmp_path / "run") == {"0_train": (1, 2), "1_prune": (1, 2), "2_q8": (1, 2)}
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    # The first 8 evaluation windows (as many as the scorer's 8 examples at eval batch size 1) of 256 tokens
    # (conf/task/wikitext_demo.yaml) of each stream, state carried: not the whole 30,336-token test stream.
    assert report["total"] == 8 * 256 and report["validation"]["total"] == 8 * 256 and report["examples"] == 8
