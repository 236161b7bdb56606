"""``python train/run.py`` end to end, as a user runs it: digits (default), CIFAR-100 and ImageNet fixtures,
resume after kill -9 with bit-identical weights, a NaN stop, and a 2-process DDP run; exit status 0
for an entry that passes its gate, 3 for one that does not. (Faults: tests/train/test_faults.py.)"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from compress import Stage, Technique
from scoring.entry import export, verify
from tests.conftest import HANG, RUN_PY, TINY, run_train
from tests.fixtures import make_cifar100, make_imagenet
from tests.train.test_loop import _PoisonAt
from train import distributed
from train.build import build_model
from train.checkpoint import CheckpointError, load_latest
from train.loop import NonFiniteLossError
from train.objectives import build_objective
from train.session import Session
from train.stages import run_stage

pytestmark = pytest.mark.slow


def _report(run_dir: Path) -> dict:
    return json.loads((run_dir / "report.json").read_text())


def _assert_finished(result: subprocess.CompletedProcess, run_dir: Path) -> None:
    """A finished run exits 0 when its entry passes the gate and 3 when it does not."""
    assert result.returncode in (0, 3), result.stderr[-3000:]
    assert result.returncode == (0 if _report(run_dir)["gate_passed"] else 3)


def _final_weights(run_dir: Path, stage: str = "0_train") -> dict[str, torch.Tensor]:
    state = load_latest(run_dir / "checkpoints" / stage)
    assert state["finished"]
    return state["model"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The README's command, `python train/run.py`, run once in a fresh folder."""
    cwd = tmp_path_factory.mktemp("digits")
    result = run_train(f"hydra.run.dir={cwd / 'run'}", cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd / "run", result


def test_default_digits_run_passes_the_gate_with_a_full_report(digits_run):
    run_dir, result = digits_run
    report = _report(run_dir)
    assert report["task"] == "digits" and report["total"] == 360 and report["correct"] / report["total"] >= 0.95
    assert report["gate_passed"] is True and report["top1"] == report["correct"] / report["total"]
    assert report["params"] > 0 and report["ops"] > 0 and report["score"] > 0 and report["layers"]
    assert report["model"] == "digits_cnn" and report["compress"] == "none"
    assert f"{report['correct']}/{report['total']}" in result.stdout
    assert (run_dir / "entry" / "entry.json").is_file() and (run_dir / "entry" / "model.safetensors").is_file()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_rerunning_a_finished_run_only_reprints_its_summary(digits_run):
    run_dir, _ = digits_run
    before = {path: path.stat().st_mtime_ns for path in run_dir.rglob("*")}
    again = run_train(f"hydra.run.dir={run_dir}", cwd=run_dir.parent)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "run already finished" in again.stdout and "epoch 1/" not in again.stdout
    assert f"{_report(run_dir)['correct']}/360" in again.stdout
    # It used to rewrite report and entry and add a TensorBoard file.
    assert {path: path.stat().st_mtime_ns for path in run_dir.rglob("*")} == before


def test_an_entry_that_fails_its_gate_exits_3(tmp_path: Path):
    """Zero epochs: an untrained model, scored and reported, that cannot pass the 95% gate."""
    result = run_train(*TINY, "train.epochs=0", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 3, result.stderr[-3000:]
    assert _report(tmp_path / "run")["gate_passed"] is False and "gate FAILED" in result.stdout
    assert (tmp_path / "run" / "entry" / "entry.json").is_file()  # written, so it can be inspected


def test_too_many_score_examples_are_refused_before_training(tmp_path: Path):
    result = run_train(*TINY, "score.examples=100000", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: score.examples=100000 but the digits test split has 360 examples ; fix: pass score.examples=360 "
        "or fewer"]  # it used to count 360 without a word
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_cifar_model_trains_on_digits(tmp_path: Path):
    """The task's input (in_chans=1) reaches every registry model, not only the task's default."""
    result = run_train(*TINY, "model=resnet18_cifar", "train.epochs=1", f"hydra.run.dir={tmp_path / 'run'}",
                       cwd=tmp_path)
    _assert_finished(result, tmp_path / "run")
    report = _report(tmp_path / "run")
    assert report["model"] == "resnet18_cifar" and report["total"] == 360
    assert json.loads((tmp_path / "run" / "entry" / "entry.json").read_text())["model"]["kwargs"] == {"in_chans": 1}


def test_init_from_a_run_of_another_task_is_one_line(digits_run, tmp_path: Path):
    baseline_dir, _ = digits_run
    make_cifar100(tmp_path / "cifar", train_per_class=1, test_per_class=1)
    result = run_train("task=cifar100", f"data.root={tmp_path / 'cifar'}", f"init={baseline_dir}", *TINY,
                       f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [  # it used to be a 47-line traceback
        f"error: init={baseline_dir} was trained on task digits, and this run is task=cifar100 ; fix: pass "
        "task=digits, or an init= run of task cifar100"]


def test_init_from_a_finished_run_then_distill_prune_and_quantize(digits_run, tmp_path: Path):
    baseline_dir, _ = digits_run
    run_dir = tmp_path / "compressed"
    result = run_train(f"init={baseline_dir}", "compress=distill_prune_q8", *TINY, "train.epochs=1",
                       f"hydra.run.dir={run_dir}", cwd=tmp_path)
    _assert_finished(result, run_dir)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["1_prune", "2_q8"]
    # Loading the teacher says so; it used to log "resuming from …", as if the run had resumed.
    assert f"distillation teacher: the model in {baseline_dir}" in result.stdout and "resuming" not in result.stdout
    state = load_latest(run_dir / "checkpoints" / "2_q8")
    assert state["finished"] and state["compression"]  # the structure needed to rebuild the model
    report = _report(run_dir)
    assert report["compress"] == "distill_prune_q8" and report["params"] < _report(baseline_dir)["params"]
    assert any(layer["weight_bits"] == 8 for layer in report["layers"])


def _interrupt(run_dir: Path, how: signal.Signals, args: tuple[str, ...], stage: str = "0_train") -> int:
    """Start a run, send ``how`` once the first checkpoint of ``stage`` exists, return its exit status."""
    process = subprocess.Popen([sys.executable, RUN_PY, *args, f"hydra.run.dir={run_dir}"], cwd=run_dir.parent,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stage = run_dir / "checkpoints" / stage
    deadline = time.monotonic() + HANG
    while not list(stage.glob("*.sha256")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be interrupted"
    process.send_signal(how)
    return process.wait(timeout=HANG)


def test_kill9_in_training_then_in_the_qat_stage_resumes_to_identical_weights_and_a_finished_run_reprints(
        tmp_path: Path):
    """Killed twice: in the baseline's first epoch, then (resumed) in the QAT stage, whose checkpoints describe masks
    + quantizers while the model resumed from the prune stage already carries the masks: each resume must extend
    that structure (it used to refuse it). (SIGTERM and SIGINT, which checkpoint before they exit:
    tests/train/test_faults.py.)"""
    args = (*TINY, "train.epochs=3", "train.log_every=1", "compress=prune_q8")
    reference = run_train(*args, f"hydra.run.dir={tmp_path / 'reference'}", cwd=tmp_path)
    _assert_finished(reference, tmp_path / "reference")
    run_dir = tmp_path / "killed"
    assert _interrupt(run_dir, signal.SIGKILL, args) == -9
    assert not (run_dir / "report.json").exists()
    assert _interrupt(run_dir, signal.SIGKILL, args, stage="2_q8") == -9
    assert not (run_dir / "report.json").exists()
    resumed = run_train(*args, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    _assert_finished(resumed, run_dir)
    assert "stage 'prune' already finished" in resumed.stdout + resumed.stderr
    assert "resuming from" in resumed.stdout + resumed.stderr
    for stage in ("0_train", "2_q8"):
        expected, weights = _final_weights(tmp_path / "reference", stage), _final_weights(run_dir, stage)
        assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in expected)
    again = run_train(*args, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    _assert_finished(again, run_dir)
    assert "run already finished" in again.stdout + again.stderr and "q8 epoch 1/" not in again.stdout
    assert _report(run_dir)["score"] == _report(tmp_path / "reference")["score"]
    assert _report(run_dir)["correct"] == _report(tmp_path / "reference")["correct"]
    assert f"{_report(run_dir)['correct']}/360" in again.stdout


def test_a_layer_pattern_matching_nothing_stops_the_run_before_training(tmp_path: Path):
    result = run_train(*TINY, "compress=prune_q8", "+compress.stages.1.quantize.layer_bits={conv9:4}",
                       f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: compress.stages[1].quantize: per-layer pattern 'conv9' matches no Conv/Linear/Embedding layer; layers are: "
        "conv1.0, conv2.0, conv3.0, fc ; fix: edit conf/compress/prune_q8.yaml or the compress.* override"]
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained first


class _OverflowBatchNormAt(Technique):
    """From global step ``step`` on, the first batch norm's running variance is inf while the loss stays finite
    (training normalises with batch statistics): what the loss guard alone cannot see."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, model, step):
        if step + 1 >= self.step:
            next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)).running_var.fill_(float("inf"))


@pytest.mark.parametrize("fault, error", [(_PoisonAt, NonFiniteLossError), (_OverflowBatchNormAt, CheckpointError)])
def test_a_nan_or_inf_stops_the_stage_and_keeps_the_last_good_checkpoint(tiny_config, tmp_path: Path, fault, error):
    cfg = tiny_config("train.epochs=3")
    session = Session(cfg, distributed.Context(torch.device("cpu")), tmp_path)
    steps_per_epoch = len(session.loaders.train)
    poisoned = Stage(name="train", epochs=3, overrides={}, techniques=[fault(steps_per_epoch + 3)])
    objective = build_objective(cfg.train, session.config["task"])
    with session, pytest.raises(error, match="NaN/inf"):
        run_stage(session, poisoned, cfg.train, objective, build_model(cfg), should_stop=lambda: False)
    kept = load_latest(tmp_path / "checkpoints" / "0_train")
    assert kept["epoch"] == 1 and kept["global_step"] == steps_per_epoch and not kept["finished"]
    assert all(torch.isfinite(t).all() for t in kept["model"].values() if t.is_floating_point())


def test_cifar100_from_an_on_disk_fixture(tmp_path: Path):
    make_cifar100(tmp_path / "cifar", train_per_class=1, test_per_class=1)
    result = run_train("task=cifar100", f"data.root={tmp_path / 'cifar'}", "model=resnet18_cifar", *TINY,
                       "train.epochs=1", "train.batch_size=50", "train.eval_batch_size=100",
                       f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 3, result.stderr[-3000:]  # 1 epoch on 100 images: far from the gate
    report = _report(tmp_path / "run")
    assert report["task"] == "cifar100" and report["total"] == 100 and report["model"] == "resnet18_cifar"
    assert report["gate_passed"] is False and 0 <= report["correct"] <= 100


def test_imagenet_from_an_on_disk_fixture(tmp_path: Path):
    make_imagenet(tmp_path / "imagenet", classes=3, train_per_class=4, val_per_class=2)
    result = run_train("task=imagenet", f"data.root={tmp_path / 'imagenet'}", "model=mixnet_s", *TINY,
                       "train.epochs=1", "train.batch_size=4", "train.eval_batch_size=6", "train.ema_decay=null",
                       "score.examples=2", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    _assert_finished(result, tmp_path / "run")
    report = _report(tmp_path / "run")
    assert report["task"] == "imagenet" and report["total"] == 6 and report["model"] == "mixnet_s"


def test_a_two_process_ddp_run_on_cpu_makes_an_official_entry(tmp_path: Path, capsys):
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    # The official score.examples (256) over TINY's 16: rank 0 counts the first 256 of the whole test split.
    result = run_train(*TINY, "train.epochs=1", "score.examples=256", "data.val_split=137",
                       f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, launcher=launcher)
    assert result.returncode in (0, 1), result.stderr[-3000:]  # torchrun reports a rank's status 3 as 1
    assert result.returncode == (0 if _report(tmp_path / "run")["gate_passed"] else 1)
    report = _report(tmp_path / "run")
    assert (report["total"], report["examples"]) == (360, 256)  # the whole test split, evaluated by rank 0
    assert report["validation"]["total"] == 137  # the ranks' shares (69 + 68) summed
    state = load_latest(tmp_path / "run" / "checkpoints" / "0_train")
    assert state["finished"] and state["global_step"] == -(-(1437 - 137) // 2) // 64  # 650 per rank: 10 steps
    # Each rank seeded on its own (seed + rank), and each one's RNG state saved for its resume.
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    # Its entry verifies as official: one process recounts exactly what rank 0 counted.
    assert export.main([str(tmp_path / "run"), "--out", str(tmp_path / "bundle"), "--allow-gate-failure"]) == 0
    capsys.readouterr()
    assert verify.main([str(tmp_path / "bundle"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "NOT AN OFFICIAL SCORE" not in out and out.splitlines()[-1].startswith("verified: all")
