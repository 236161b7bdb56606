"""How a run stops (issue 23's probe): a stop request read at every step and between the layers an allocate stage
measures (which resumes from them), a run folder deleted under a running run, and what a distillation stage logs."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from compress import build_stages
from compress.base import Technique
from tests.conftest import HANG, REPO, RUN_PY, TINY
from tests.train.test_allocate_stage import _config as _auto_config
from tests.train.test_language_model import VOCAB, _lm_config, _loaders as _lm_loaders, tiny_corpus  # noqa: F401
from tests.train.test_loop import CPU, _setup, _trainer
from train import distributed
from train.build import build_model
from train.config import to_container
from train.loop import Trainer, make_deterministic
from train.objectives import build_objective
from train.rundir import LOCK_FILE, RunDirError, check_run_dir, prepare_run_dir
from train.search.formats import ALLOCATION_JSON, PARTIAL_SENSITIVITY_JSON, SENSITIVITY_DIR
from train.session import Session


def test_a_stop_is_read_at_every_step(tiny_config):
    """It was read only every train.log_every steps: an epoch's worth of steps here."""
    cfg = tiny_config("train.log_every=1000")
    model, train_loader, _ = _setup(cfg)
    trainer = _trainer(cfg, model, train_loader)
    asked = []
    assert trainer.train_epoch(should_stop=lambda: asked.append(1) or len(asked) >= 3) is False
    assert trainer.batches_done == trainer.global_step == 3 < len(train_loader)


class _Adds(Technique):
    """A technique whose term of the loss is a constant (as distillation adds its own term)."""

    name = "adds"

    def loss(self, loss, outputs, inputs, targets):
        return loss + 50.0


def test_the_logged_perplexity_is_the_tasks_not_of_the_loss_a_technique_adds_to(tiny_config, tiny_corpus):
    """A distillation stage's ``ppl`` was exp of the task's loss plus distillation's."""
    cfg = _lm_config(tiny_config, "train.epochs=1")
    make_deterministic(cfg.seed, CPU.device)
    from models import create_model

    model = create_model("lstm_lm", num_classes=VOCAB, embed_dim=16, hidden_size=16, cutoffs=[8, 20])
    trainer = Trainer(model, cfg.train, techniques=[_Adds()], loader=_lm_loaders(cfg).train, ctx=CPU,
                      objective=build_objective(cfg.train, to_container(cfg)["task"]))
    trainer.train_epoch()
    metrics = trainer.epoch_metrics
    assert metrics["loss"] < math.log(VOCAB) + 1 and metrics["ppl"] == pytest.approx(math.exp(metrics["loss"]))


def test_a_run_whose_folder_is_deleted_stops_in_one_line_and_leaves_the_folder_to_the_next_run(tmp_path: Path):
    """A deleted folder took the lock file with it: a second run locked the folder anew and shared it with the
    first one, which went on writing there (its next checkpoint's write made the folder again)."""
    run_dir = tmp_path / "run"
    process = subprocess.Popen([sys.executable, RUN_PY, *TINY, "train.epochs=30", f"hydra.run.dir={run_dir}"],
                               cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = run_dir / "checkpoints" / "0_train"
    deadline = time.monotonic() + HANG
    while not list(first.glob("*.sha256")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before its folder could be deleted"
    while run_dir.exists():  # files written meanwhile make a first try fail
        shutil.rmtree(run_dir, ignore_errors=True)
    prepare_run_dir(run_dir)  # what a second run does first: the lock of the folder, made anew, is its own
    stderr = process.communicate(timeout=HANG)[1]
    assert process.returncode == 2 and stderr.strip().splitlines()[-1].startswith(
        f"error: run folder {run_dir} was deleted or replaced while this run was using it; the run stopped without "
        "writing there again ; fix: re-run the same command"), stderr[-3000:]
    assert [path.name for path in run_dir.iterdir()] == [LOCK_FILE]  # the first run wrote nothing there since


def test_a_second_run_locks_a_deleted_folder_anew_and_the_first_one_notices(tmp_path: Path):
    run_dir = tmp_path / "run"
    prepare_run_dir(run_dir)
    check_run_dir(run_dir)
    shutil.rmtree(run_dir)
    second = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                             "from train.rundir import prepare_run_dir; prepare_run_dir(Path(sys.argv[1]))",
                             str(run_dir)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    with pytest.raises(RunDirError, match="was deleted or replaced while this run was using it"):
        check_run_dir(run_dir)


def _allocate(cfg, run_dir: Path, should_stop, caplog) -> tuple[bool, str]:
    """The allocate stage of ``cfg`` on a seeded untrained digits_cnn in ``run_dir``; (finished, the log)."""
    session = Session(cfg, distributed.Context(torch.device("cpu")), run_dir)
    stages = build_stages(session.config["compress"], load_teacher=session.load_teacher)
    torch.manual_seed(0)
    caplog.clear()
    with session, caplog.at_level("INFO"):
        done, _ = session.allocate(stages[0], build_model(cfg), later=stages[1:], should_stop=should_stop)
    return done, caplog.text


@pytest.mark.slow  # measures 4 layers (seconds on an idle 2-core CPU)
def test_a_stop_during_the_allocate_stage_keeps_the_layers_measured_and_the_next_start_measures_the_rest(
        tmp_path: Path, caplog):
    """A stop used to wait for the whole stage (minutes under load), and a kill lost every layer measured."""
    cfg = _auto_config("compress.stages.0.allocate.budget=1000000000")
    asked = []
    done, log = _allocate(cfg, tmp_path, lambda: asked.append(1) or len(asked) >= 2, caplog)
    out = tmp_path / SENSITIVITY_DIR
    assert not done and "conv1.0: 4 settings" in log and "conv2.0: 4 settings" not in log
    kept = json.loads((out / PARTIAL_SENSITIVITY_JSON).read_text())
    assert [layer["name"] for layer in kept["layers"]] == ["conv1.0"] and not (out / ALLOCATION_JSON).exists()
    done, log = _allocate(cfg, tmp_path, lambda: False, caplog)
    assert done and "conv1.0: 4 settings" not in log and "fc: 4 settings" in log
    assert not (out / PARTIAL_SENSITIVITY_JSON).exists()
    measured = json.loads((out / "sensitivity.json").read_text())["layers"]
    assert [layer["name"] for layer in measured] == ["conv1.0", "conv2.0", "conv3.0", "fc"]
    assert measured[0] == kept["layers"][0]
    straight = tmp_path / "straight"
    assert _allocate(cfg, straight, lambda: False, caplog)[0]  # deterministic: the same measurement in one go
    assert json.loads((straight / SENSITIVITY_DIR / "sensitivity.json").read_text())["layers"] == measured
