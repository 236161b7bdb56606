"""The allocate stage (``compress=auto``): sensitivity and allocation inside a run, on the validation split only,
written into the run folder, read back on a resume, shortened by smoke runs, refused in one line when it cannot work."""
from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from compress import PruneTechnique, QuantizeTechnique, build_stages, mask_sparsity
from compress.base import find_parametrization
from compress.quantization import WeightQuantizer
from data import Loaders
from models import create_model
from tests.conftest import TINY, compose_config, run_train
from tests.train.test_plan import _plan
from tests.train.test_session import _Watched
from train import distributed
from train.build import build_model
from train.config import ConfigError, reported_as_config_error
from train.search.allocate import main as allocate_main
from train.search.formats import ALLOCATION_JSON, SENSITIVITY_DIR, read_sensitivity
from train.search.grid import Setting
from train.search.solve import UNLIMITED, allocate
from train.search.stage import template_setting
from train.preflight import check_allocate_stage
from train.session import Session
from train.smoke import smoke_config

#: The grid of every run here: 2 bit widths x 2 sparsities, 4 settings per layer of digits_cnn's 4.
GRID = ("compress.stages.0.allocate.bits=[float,4]", "compress.stages.0.allocate.sparsity=[0.0,0.5]")
#: 64 validation and 4 scored examples keep a measurement (4 layers x 4 settings: 19 evaluations, 27 counts) to seconds.
AUTO = ("compress=auto", "data.val_split=64", *GRID, "score.examples=4")


def _config(*overrides: str):
    """A tiny ``compress=auto`` run config (the tiny_config fixture's, usable by a module-scoped fixture)."""
    return compose_config(*TINY, *AUTO, *overrides)


def _allocate(cfg, run_dir: Path) -> tuple[Session, list, list]:
    """Run the allocate stage of an untrained digits_cnn (seeded: deterministic) in ``run_dir``, with a test loader
    that records every read; returns the session, the reads and the stages (the later ones built by the stage)."""
    session = Session(cfg, distributed.Context(torch.device("cpu")), run_dir)
    reads: list[str] = []
    loaders = session.loaders
    session.loaders = Loaders(loaders.train, loaders.val, _Watched(loaders.test, reads))  # shadows the cached one
    stages = build_stages(session.config["compress"], load_teacher=session.load_teacher)
    torch.manual_seed(0)
    model = build_model(cfg)
    planned = [stage.techniques for stage in stages[1:]]
    with session:
        check_allocate_stage(session, model)
        done, later = session.allocate(stages[0], model, later=stages[1:], should_stop=lambda: False)
    assert done and [stage.name for stage in later] == [stage.name for stage in stages[1:]]
    # built anew: the planned stages are left as the template built them
    assert [stage.techniques for stage in stages[1:]] == planned and not set(map(id, later)) & set(map(id, stages))
    return session, reads, [stages[0], *later]


@pytest.fixture(scope="module")
def allocated(tmp_path_factory):
    """The stage under an unlimited budget: every layer takes its grid's cheapest setting (slow tests only use it)."""
    run_dir = tmp_path_factory.mktemp("auto")
    return (run_dir, *_allocate(_config(f"compress.stages.0.allocate.budget={UNLIMITED}"), run_dir))


@pytest.mark.slow  # measures (seconds on an idle 2-core CPU)
def test_the_stage_measures_on_validation_allocates_and_sets_the_later_stages(allocated):
    run_dir, session, reads, stages = allocated
    assert reads == []  # the test split is not read by the stage
    out = run_dir / SENSITIVITY_DIR
    assert sorted(p.name for p in out.iterdir()) == [ALLOCATION_JSON, "conf", "sensitivity.json", "sensitivity.md",
                                                    "sensitivity.png"]
    record = json.loads((out / ALLOCATION_JSON).read_text())
    # 4-bit 50% is the cheapest of the 4 settings of every layer, and no budget limits it
    assert record["layers"] == {name: {"bits": 4, "sparsity": 0.5} for name in ("conv1.0", "conv2.0", "conv3.0", "fc")}
    assert record["split"] == "val" and record["val_split"] == 64 and record["validation_examples"] == 64
    assert record["counted"]["score"] == pytest.approx(record["predicted"]["score"], rel=1e-12)  # costs add up
    assert record["sensitivity"] == "sensitivity/sensitivity.json"
    assert session.allocation["layers"] == record["layers"] and "config" not in session.allocation
    # the same measurement the command makes, and the same solver: the command reproduces the choice from it
    sensitivity = read_sensitivity(run_dir)
    assert [len(layer["settings"]) for layer in sensitivity["layers"]] == [4, 4, 4, 4]
    assert sensitivity["run"] == str(run_dir / "checkpoints" / "0_train")  # where the baseline is, for sweeps
    solved = allocate(sensitivity, loss_budget=UNLIMITED)
    assert solved.settings == {name: Setting(4, 0.5) for name in record["layers"]}
    # the later stages train that allocation: the prune stage prunes every layer to 50%, QAT quantizes all at 4 bits
    prune, qat = stages[1].techniques[0], stages[2].techniques[0]
    assert isinstance(prune, PruneTechnique) and isinstance(qat, QuantizeTechnique)
    model = build_model(session.cfg)
    for technique in (prune, qat):
        technique.configure(steps_per_epoch=10)
        technique.attach(model)
    for step in range(10 * 2):  # the stage's 2 epochs: the schedule ends at 0.6 of them, at the final sparsity
        prune.on_step_end(model, step)
    assert {name: round(value, 2) for name, value in mask_sparsity(model).items()} == \
        {"conv1.0": 0.5, "conv2.0": 0.5, "conv3.0": 0.5, "fc": 0.5}
    quantizers = {name: find_parametrization(model.get_submodule(name), WeightQuantizer) for name in record["layers"]}
    assert {name: q.micronet_bits for name, q in quantizers.items()} == {name: 4 for name in record["layers"]}


@pytest.mark.slow  # measures (seconds on an idle 2-core CPU)
def test_the_written_compress_config_composes_and_the_command_sweeps_the_same_measurement(allocated, capsys):
    run_dir, *_ = allocated
    conf_dir = run_dir / SENSITIVITY_DIR / "conf"
    text = (conf_dir / "compress" / "auto_allocated.yaml").read_text()
    assert text.startswith("# Written by `python train/run.py") and "conv1.0 4-bit 50%, conv2.0 4-bit 50%" in text
    cfg = compose_config(f"hydra.searchpath=[file://{conf_dir}]", "compress=auto_allocated")
    assert [s.name for s in cfg.compress.stages] == ["prune", "qat"]
    assert dict(cfg.compress.stages[0].prune.layer_sparsity) == {"conv1.0": 0.5, "conv2.0": 0.5, "conv3.0": 0.5,
                                                                "fc": 0.5}
    assert allocate_main([str(run_dir), "--budget", "0", "--name", "sweep", "--no-check"]) == 0
    assert (conf_dir / "compress" / "sweep.yaml").is_file() and "| sweep | validation loss increase <= 0 |" in \
        capsys.readouterr().out
    # The stage records what its costs assume besides each layer's setting: here nothing the template does not do.
    measured = json.loads((run_dir / SENSITIVITY_DIR / "sensitivity.json").read_text())
    assert measured["template"] == {"kept_layers": [], "quantize": {"method": "lsq"}}


@pytest.mark.slow  # measures (seconds on an idle 2-core CPU)
@pytest.mark.parametrize("assumed, said", [
    ({"kept_layers": ["conv1.0", "fc"], "quantize": {"method": "lsq"}}, "2 layer(s) at its template's settings "
     "(conv1.0, fc)"),
    ({"kept_layers": [], "quantize": {"method": "lsq", "other_ops": "fp16"}},
     "quantize keys {'method': 'lsq', 'other_ops': 'fp16'} (--template has {'method': 'lsq'})")])
def test_the_command_refuses_a_stage_measurement_whose_costs_assume_another_template(allocated, tmp_path, capsys,
                                                                                    assumed, said):
    run_dir, *_ = allocated
    measured = json.loads((run_dir / SENSITIVITY_DIR / "sensitivity.json").read_text())
    path = tmp_path / "sensitivity.json"
    path.write_text(json.dumps({**measured, "template": assumed}))
    with pytest.raises(SystemExit) as exit_status:
        allocate_main([str(path), "--budget", "0", "--no-check", "--config-dir", str(tmp_path / "conf")])
    assert exit_status.value.code == 2 and not (tmp_path / "conf").exists()
    assert capsys.readouterr().err == (
        f"error: {path} was measured by an allocate stage with {said}: its costs do not hold for the config this "
        "command would write ; fix: allocate in the run (re-run it with another compress.stages[N].allocate budget, "
        "target_metric or max_score), or measure the run anew with `python -m train.search.sensitivity RUN`\n")


@pytest.mark.slow  # measures (seconds on an idle 2-core CPU)
def test_a_restart_reads_the_allocation_back_and_one_cut_short_measures_again(allocated, tmp_path, caplog):
    run_dir, session, _, stages = allocated
    out = run_dir / SENSITIVITY_DIR
    before = {path.name: path.stat().st_mtime_ns for path in out.iterdir() if path.is_file()}
    with caplog.at_level("INFO"):
        again, reads, restarted = _allocate(session.cfg, run_dir)
    assert "allocation read back from" in caplog.text and "measuring every layer" not in caplog.text
    assert {path.name: path.stat().st_mtime_ns for path in out.iterdir() if path.is_file()} == before
    assert again.allocation == session.allocation and reads == []
    assert restarted[1].techniques[0].layer_sparsity == stages[1].techniques[0].layer_sparsity
    # killed during the stage: its outputs but allocation.json were written; the next start measures again
    cut = tmp_path / "cut"
    (cut / SENSITIVITY_DIR).mkdir(parents=True)
    (cut / SENSITIVITY_DIR / "sensitivity.json").write_text("{}")
    caplog.clear()
    with caplog.at_level("INFO"):
        remeasured, _, _ = _allocate(session.cfg, cut)
    assert "measuring every layer" in caplog.text and remeasured.allocation["layers"] == session.allocation["layers"]
    assert json.loads((cut / SENSITIVITY_DIR / "sensitivity.json").read_text())["layers"] == \
        json.loads((out / "sensitivity.json").read_text())["layers"]  # deterministic: the same measurement
    # an allocation.json of another configuration is refused, not used
    with pytest.raises(ConfigError, match=r"allocation.json holds a run with compress.stages\[0\].allocate.budget="
                                          r"1000000000.0 but this command has compress.stages\[0\].allocate.budget=2"):
        _allocate(_config("compress.stages.0.allocate.budget=2"), run_dir)


#: ``max_score: template`` on conv2.0 alone (the other layers keep prune_q4's settings), the grid holding its template
#: setting (4-bit 90%), and the QAT stage storing step sizes and biases at 16 bits, with the other ops in fp16.
CAPPED = ("compress=auto", "data.val_split=64", "score.examples=4", "compress.stages.0.allocate.budget=null",
          "+compress.stages.0.allocate.max_score=template", "compress.stages.0.allocate.bits=[8,4]",
          "compress.stages.0.allocate.sparsity=[0.0,0.9]", "compress.stages.0.allocate.layers=[conv2.0]",
          "+compress.stages.2.quantize.scale_bits=16", "+compress.stages.2.quantize.bias_bits=16",
          "+compress.stages.2.quantize.other_ops=fp16")


def test_a_template_cap_allocates_within_the_templates_count_as_the_qat_stage_stores_it_and_the_plan_says_so(
        tmp_path: Path):
    _allocate(compose_config(*TINY, *CAPPED), tmp_path / "run")
    record = json.loads((tmp_path / "run" / SENSITIVITY_DIR / ALLOCATION_JSON).read_text())
    cap, predicted = record["max_score"], record["predicted"]["score"]
    # counted with the QAT stage's 16-bit step sizes and biases and fp16 other ops, as the measurement costed it
    assert record["counted"]["score"] == pytest.approx(predicted, rel=1e-9) and predicted <= cap * (1 + 1e-12)
    measured = read_sensitivity(tmp_path / "run")
    rest = measured["reference"]["rest"]
    assert list(rest) == ["freebie_off"]  # the layers left to the template are quantized: the freebie is lost
    template = next(s for s in measured["layers"][0]["settings"] if (s["bits"], s["sparsity"]) == (4, 0.9))
    # the cap is the count of the template as written: the rest plus conv2.0 at prune_q4's 4-bit 90%, exactly
    assert cap == pytest.approx(rest["freebie_off"]["score"] + template["cost"]["freebie_off"]["score"], rel=1e-9)
    assert record["constraint"] == (f"predicted score <= {cap:.6f}, the count of the stages after it as written "
                                    "(max_score: template)")
    plan = _plan(tmp_path / "plan", *CAPPED)
    assert plan["allocation"]["cap"] == {"max_score": "template", "score": plan["score"],
                                         "template_score": plan["score"]}
    assert plan["allocation"]["summary"].endswith(f"capped at this planned score (max_score: template): the run's "
                                                  f"predicted score stays <= {plan['score']:.6f}")
    assert plan["score"] == pytest.approx(cap, rel=1e-9)  # the same initial weights (seed 0): the same count


@pytest.mark.parametrize("overrides, message", [
    ((), "compress=auto allocates per-layer settings on the validation split, and this run has none ; fix: pass "
         "data.val_split=0.2"),
    (("data.val_split=0.2", "+compress.stages.0.allocate.target_metric=0.9"),
     "compress.stages[0].allocate: expected exactly one of budget (the predicted validation-loss increase allowed, "
     "e.g. 1.5), target_metric (the validation top1 to keep) and max_score (the predicted score allowed, or "
     "template) ; fix: edit conf/compress/auto.yaml"),
    (("data.val_split=0.2", "+compress.stages.0.allocate.max_score=template"), "expected exactly one of budget"),
    (("data.val_split=0.2", "compress.stages.0.allocate.budget=null", "+compress.stages.0.allocate.max_score=0"),
     "compress.stages[0].allocate.max_score=0: expected a number > 0, or template (the score of the stages after it "
     "as written)"),
    (("data.val_split=0.2", "compress.stages.0.allocate.budget=null", "+compress.stages.0.allocate.max_score=plan"),
     "compress.stages[0].allocate.max_score='plan': expected a number > 0, or template"),
    (("data.val_split=0.2", "+compress.stages.2.quantize.exclude=[fc]"),
     "compress.stages[0]: the stages after allocate: stage qat: exclude ['fc'] holds layer(s) fc the allocation "
     "sets; add them to the allocate stage's exclude, or drop them from the stage's"),
    (("data.val_split=0.2", "compress.stages.0.allocate.budget=null", "+compress.stages.0.allocate.target_metric=97"),
     "compress.stages[0].allocate.target_metric=97: expected a number in (0.0, 1.0] or null"),
    (("data.val_split=0.2", "compress.stages.0.allocate.bits=[float,9]"),
     "compress.stages[0].allocate.bits=['float', 9]: 9 is not a bit width: use float or 2..8"),
    (("data.val_split=0.2", "+compress.stages.0.allocate.grid=1"), "compress.stages[0].allocate: unknown key(s) grid"),
    (("data.val_split=0.2", "compress.stages.0.allocate.layers=[conv9]"),
     "compress.stages[0].allocate: layers pattern 'conv9' matches no Conv/Linear/Embedding layer"),
    (("data.val_split=0.2", "~compress.stages.2.quantize"),
     "compress.stages[0]: the stages after allocate needs a stage with prune: and a stage with quantize:"),
    (("data.val_split=0.2", "+compress.stages.1.prune.structure=block", "+compress.stages.1.prune.block_shape=[1,4]"),
     "the stages after allocate prunes with structure=block; the sensitivity measured unstructured"),
])
def test_what_the_stage_cannot_work_with_is_one_line_before_training(tiny_config, tmp_path: Path, overrides, message):
    cfg = tiny_config("compress=auto", *overrides)
    session = Session(cfg, distributed.Context(torch.device("cpu")), tmp_path)
    model = build_model(cfg)
    # as train/preflight.py calls it: a ValueError gets the compress config's fix, a ConfigError keeps its own
    with session, pytest.raises(ConfigError) as error, reported_as_config_error("edit conf/compress/auto.yaml"):
        check_allocate_stage(session, model)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # measures (seconds on an idle 2-core CPU)
def test_a_compressed_init_model_and_a_target_nothing_meets_are_refused(tiny_config, tmp_path: Path):
    cfg = tiny_config(*AUTO)
    session = Session(cfg, distributed.Context(torch.device("cpu")), tmp_path)
    model = build_model(cfg)
    pruned = build_stages(compose_config("compress=prune")["compress"], load_teacher=lambda spec: None)[0]
    pruned.techniques[0].configure(steps_per_epoch=1)
    pruned.techniques[0].attach(model)
    with pytest.raises(ValueError, match=r"compress.stages\[0\]: the allocate stage measures an uncompressed model, "
                                         "but the init= model is compressed"):
        check_allocate_stage(session, model)
    # an untrained model cannot keep 99% top-1 on validation: after measuring (fc only), one line says what it has
    with pytest.raises(ConfigError, match=r"compress.stages\[0\]: no setting of the grid meets target_metric=0.99 "
                                          r"\(the trained model has validation top1 0.\d{4}, calibrated\) ; fix: re-run "
                                          r"with init=.*0_train and a lower compress.stages\[0\].target_metric"):
        _allocate(_config("compress.stages.0.allocate.budget=null", "+compress.stages.0.allocate.target_metric=0.99",
                          "compress.stages.0.allocate.layers=[fc]"), tmp_path / "target")
    assert not (tmp_path / "target" / SENSITIVITY_DIR / ALLOCATION_JSON).exists()  # nothing that looks finished


def test_smoke_runs_measure_one_layer_at_its_template_setting_without_a_constraint_or_under_the_cap():
    short = smoke_config(compose_config("compress=auto", "data.val_split=0.2", "smoke=true",
                                        "compress.stages.0.allocate.exclude=[conv1.0]"))
    # the first layer allocated (conv1.0 is excluded), at prune_q4's setting for it: 4 bits (weights and inputs),
    # 90% sparse, which the grid holds; the others keep the template's settings
    assert dict(short.compress.stages[0].allocate) == {
        "budget": UNLIMITED, "target_metric": None, "max_score": None, "bits": [4], "sparsity": [0.9],
        "calibration_batches": 1, "layers": ["conv2.0"], "exclude": []}
    assert [s.get("epochs") for s in short.compress.stages] == [None, 1, 1]
    # conv1.0, the first layer: first_last_sparsity 0 and first_last_bits 8, so 8-bit dense
    first = smoke_config(compose_config("compress=auto", "data.val_split=0.2", "smoke=true"))
    assert (first.compress.stages[0].allocate.bits, first.compress.stages[0].allocate.sparsity) == ([8], [0.0])
    # a template setting the grid lacks (90% is not on this grid): the grid's last corner instead
    off_grid = smoke_config(compose_config("compress=auto", "data.val_split=0.2", "smoke=true",
                                           "compress.stages.0.allocate.exclude=[conv1.0]",
                                           "compress.stages.0.allocate.sparsity=[0.5,0.98]"))
    assert (off_grid.compress.stages[0].allocate.bits, off_grid.compress.stages[0].allocate.sparsity) == ([2], [0.98])
    capped = smoke_config(compose_config("compress=auto", "data.val_split=0.2", "smoke=true",
                                         "compress.stages.0.allocate.budget=null",
                                         "+compress.stages.0.allocate.max_score=0.05"))
    assert capped.compress.stages[0].allocate.max_score == 0.05 and capped.compress.stages[0].allocate.budget is None


def test_the_template_setting_of_a_layer_is_what_the_template_attaches_to_it():
    """4-bit weights on 8-bit inputs (the ImageNet classifier's) and 4-bit weights on float inputs have no Setting;
    a layer the template leaves unquantized is float at its sparsity."""
    model = create_model("digits_cnn", num_classes=10)
    later = [{"name": "prune", "epochs": 1, "prune": {"final_sparsity": 0.8, "layer_sparsity": {"fc": 0.5}}},
             {"name": "qat", "epochs": 1, "quantize": {"weight_bits": 4, "activation_bits": 4, "exclude": ["conv3.0"],
                                                       "layer_bits": {"fc": {"weight": 4, "activation": 8}}}}]
    assert template_setting(later, model, "conv1.0") == Setting(8, 0.0)  # first_last defaults: dense, 8 bits
    assert template_setting(later, model, "conv2.0") == Setting(4, 0.8)
    assert template_setting(later, model, "conv3.0") == Setting(None, 0.8)
    assert template_setting(later, model, "fc") is None
    later[1]["quantize"] = {"weight_bits": 4, "activation_bits": None}
    assert template_setting(later, model, "conv2.0") is None


@pytest.mark.slow
def test_kill9_after_the_allocation_resumes_with_it_and_the_report_says_so(tmp_path: Path):
    from tests.train.test_run import _interrupt

    args = (*TINY, *AUTO)
    refused = run_train(*TINY, "compress=auto", f"hydra.run.dir={tmp_path / 'refused'}", cwd=tmp_path)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        "error: compress=auto allocates per-layer settings on the validation split, and this run has none ; fix: "
        "pass data.val_split=0.2"]
    assert not (tmp_path / "refused" / "checkpoints").exists()
    run_dir = tmp_path / "run"
    assert _interrupt(run_dir, signal.SIGKILL, args, stage="2_prune") == -9
    out = run_dir / SENSITIVITY_DIR
    chosen = json.loads((out / ALLOCATION_JSON).read_text())
    measured = (out / "sensitivity.json").stat().st_mtime_ns
    resumed = run_train(*args, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert resumed.returncode in (0, 3), resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    assert "stage 'allocate' already finished: allocation read back" in log and "resuming from" in log
    assert (out / "sensitivity.json").stat().st_mtime_ns == measured
    report = json.loads((run_dir / "report.json").read_text())
    assert report["allocation"]["layers"] == chosen["layers"] and report["allocation"]["split"] == "val"
    assert "per-layer settings allocated on the validation split (64 examples" in resumed.stdout
    rows = {row["name"]: row for row in report["layers"]}
    for name, setting in chosen["layers"].items():  # what the entry holds is what was allocated
        assert rows[name]["weight_bits"] == (setting["bits"] or 32)
        assert rows[name]["sparsity"] == pytest.approx(setting["sparsity"], abs=0.01)
