"""What ``train/run.py`` refuses, and how: one line, exit status 2, nothing written, and before the data loads
wherever the data is not needed to tell (issue 23's probe): a model that does not fit its task, a key the config
does not have, a bad ``init=`` or stage, a run folder that cannot be made, a damaged or foreign checkpoint."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

import models
from tests.conftest import TINY, compose_config, run_train
from train import checkpoint, distributed
from train.build import restore_model
from train.checkpoint import RUN_STATE, CheckpointError, latest_checkpoint, save_checkpoint
from train.cli import accept_command_line
from train.config import ConfigError, check_added_keys, validate
from train.rundir import LOCK_FILE, discard_unaccepted, prepare_run_dir
from train.session import Session
from train.stages import run_stage


def _refused(argv: list[str], cwd: Path, monkeypatch, capsys) -> str:
    """The one line ``train/run.py ARGV`` prints when it refuses the command line (exit status 2) in ``cwd``."""
    monkeypatch.chdir(cwd)
    with pytest.raises(SystemExit) as stopped:
        accept_command_line(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("argv, message", [
    (["task.num_classes=5"], "error: task.num_classes=5 but the digits data has num_classes=10 (conf/task/digits.yaml)"
                             " ; fix: remove the task.num_classes override"),
    (["+model.kwargs.in_chans=3"], "error: model.kwargs.in_chans=3 but task digits gives its models in_chans=1"),
    (["task=wikitext_demo", "model=digits_cnn"],
     "error: model=digits_cnn cannot run on the input of task wikitext_demo (language_model, a batch of shape"),
    (["model=lstm_lm"], "error: model=lstm_lm cannot be built for task digits: LSTMLanguageModel.__init__() got an "
                        "unexpected keyword argument 'in_chans'"),
    (["model=resnet18_cifar", "+model.kwargs.num_classes=3"], "error: model=resnet18_cifar cannot be built for task "
                                                              "digits: model argument 'num_classes' is not allowed"),
])
def test_a_model_that_does_not_fit_its_task_is_one_line_before_the_run_folder(tmp_path, monkeypatch, capsys, argv,
                                                                               message):
    """They used to fail at the first training step, with a traceback, in a run folder made and recorded."""
    assert _refused(argv, tmp_path, monkeypatch, capsys).startswith(message)
    assert list(tmp_path.iterdir()) == []


def test_every_shipped_model_fits_the_tasks_it_is_made_for():
    from train.upfront import check_without_data

    for task, model in [("digits", "digits_cnn"), ("digits", "resnet18_cifar"), ("cifar100", "wrn28_10"),
                        ("imagenet", "mixnet_s"), ("wikitext_demo", "lstm_lm"), ("wikitext103", "txl_micronet")]:
        check_without_data(compose_config(f"task={task}", f"model={model}", "data.root=/data"))


@pytest.mark.parametrize("argv, message", [
    (["+train.epoch=5"], "error: +train.epoch=5: train.epoch is not a key of the config, so nothing would read it ; "
                         "fix: did you mean train.epochs=5?"),
    (["+compres=prune_q8"], "error: +compres=prune_q8: compres is not a key of the config, so nothing would read it ; "
                            "fix: did you mean compress=prune_q8?"),
    (["train.epoch=5"], "error: train.epoch is not a key of the config ; fix: did you mean train.epochs=5?"),
    (["+data.rot=/data"], "error: +data.rot=/data: data.rot is not a key of the config, so nothing would read it ; fix: "
                          "did you mean data.root=/data?"),
])
def test_a_key_the_config_does_not_have_is_refused_with_the_closest_one(tmp_path, monkeypatch, capsys, argv, message):
    """``+key`` used to add any key, which nothing read; Hydra's own message suggests that ``+`` for a typo."""
    line = _refused(argv, tmp_path, monkeypatch, capsys)
    assert line.startswith(message) and "+train.epoch" not in line.partition(" ; fix: ")[2]
    assert list(tmp_path.iterdir()) == []


def test_keys_added_to_open_dictionaries_and_groups_are_accepted():
    check_added_keys(["+model.kwargs.drop_rate=0.1", "+compress.stages.1.quantize.layer_bits={conv2.0:4}",
                      "+compress.stages.0.prune.layer_sparsity={fc:0.5}", "+experiment=cifar100_densenet_micronet",
                      "++train.epochs=3", "+hydra.job.env_set.X=1"])


@pytest.mark.parametrize("argv, message", [
    (["init=/no/such/run"], "error: /no/such/run does not exist ; fix: point to a finished run dir"),
    (["compress=prune", "compress.stages.0.epochs=-1"],
     "error: compress.stages[0].epochs=-1: expected an integer >= 1 ; fix: edit conf/compress/prune.yaml"),
    (["compress=prune_q8", "+compress.stages.0.lr=-1"], "error: stage prune: train.lr=-1.0 must be > 0"),
    (["compress=prune_q8", "+compress.stages.1.batch_size=8"], "error: stage q8: batch_size=8 cannot be set per stage"),
    (["hydra.run.dir=/dev/null"], "error: run folder /dev/null cannot be made: /dev/null is not a folder ; fix: pass "
                                  "hydra.run.dir=<a folder path>"),
])
def test_what_needs_no_data_is_refused_before_the_run_folder(tmp_path, monkeypatch, capsys, argv, message):
    """These used to be refused after the data loaded, leaving a run folder holding .lock (or, for a run folder
    that is a file, with a traceback)."""
    assert _refused(argv, tmp_path, monkeypatch, capsys).startswith(message)
    assert list(tmp_path.iterdir()) == []


def test_a_run_folder_under_a_file_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("")
    line = _refused([f"hydra.run.dir={tmp_path / 'file' / 'run'}"], tmp_path, monkeypatch, capsys)
    assert line == f"error: run folder {tmp_path / 'file' / 'run'} cannot be made: {tmp_path / 'file'} is not a " \
                   "folder ; fix: pass hydra.run.dir=<a folder path>"


@pytest.mark.parametrize("override, message", [
    ("score.examples=100000", "error: score.examples=100000 but the digits test split has 360 examples"),
    ("train.batch_size=1000000000", "error: batch_size 1000000000 exceeds the 1437 training examples per rank"),
])
def test_a_refusal_that_needs_the_data_leaves_nothing_behind(tmp_path: Path, override, message):
    """They used to leave the run folder (outputs/...) holding its .lock."""
    result = run_train(*TINY, override, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith(message), result.stderr
    assert list(tmp_path.iterdir()) == []


def test_only_what_a_refused_run_created_is_removed(tmp_path: Path):
    kept = tmp_path / "kept"
    kept.mkdir()
    prepare_run_dir(kept / "a" / "b")
    discard_unaccepted(kept / "a" / "b")
    assert list(tmp_path.iterdir()) == [kept] and list(kept.iterdir()) == []
    prepare_run_dir(kept)  # a folder that existed: its lock file goes, the folder stays
    discard_unaccepted(kept)
    assert kept.is_dir() and list(kept.iterdir()) == []
    accepted = tmp_path / "accepted"
    prepare_run_dir(accepted)
    (accepted / "run.log").write_text("")  # written once accepted: the folder is the run's now
    discard_unaccepted(accepted)
    assert sorted(p.name for p in accepted.iterdir()) == [LOCK_FILE, "run.log"]


def _commit(path: Path, state: dict, sidecar: str | None = None) -> None:
    """``state`` at ``path`` with a sidecar (a matching one unless given), as a planted file would be."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    data = path.read_bytes()
    path.with_suffix(".sha256").write_text(sidecar or f"{hashlib.sha256(data).hexdigest()} {len(data)}\n")


def test_a_sidecar_that_is_not_a_checksum_is_damage(tmp_path: Path, caplog):
    """It used to stop the run with a ValueError traceback."""
    save_checkpoint(tmp_path, 1, {"epoch": 1})
    _commit(tmp_path / checkpoint.checkpoint_name(2), {"epoch": 2}, sidecar="deadbeef notanumber\n")
    assert latest_checkpoint(tmp_path)[1]["epoch"] == 1 and "or its checksum cannot be read" in caplog.text
    (tmp_path / checkpoint.checkpoint_name(1)).with_suffix(".sha256").write_text("deadbeef notanumber\n")
    with pytest.raises(CheckpointError, match="no usable checkpoint .*2 committed, all damaged.* fix: delete"):
        latest_checkpoint(tmp_path)


def test_a_checkpoint_of_another_layout_is_skipped_as_damage_on_every_start(tiny_config, tmp_path: Path):
    """A file with a matching sidecar but not a run's state used to stop every re-run with a KeyError."""
    cfg = tiny_config()
    session = Session(cfg, distributed.Context(torch.device("cpu")), tmp_path)
    _commit(session.stage_dirs["train"] / checkpoint.checkpoint_name(5), {"weights": torch.zeros(2)})
    for _ in range(2):
        with pytest.raises(CheckpointError) as refused:
            run_stage(session, _baseline(cfg), cfg.train, None, models.create_model("digits_cnn", num_classes=10),
                      should_stop=lambda: False)
        assert "1 committed, all damaged) ; fix: delete" in str(refused.value) and "\n" not in str(refused.value)


def test_a_checkpoint_that_does_not_fit_the_model_is_one_line_with_the_fix(tiny_config, tmp_path: Path):
    from compress import compression_state

    cfg = tiny_config()
    session = Session(cfg, distributed.Context(torch.device("cpu")), tmp_path)
    model = models.create_model("digits_cnn", num_classes=10)
    # every key of a run's checkpoint, of its type, but the weights of another model
    state = {"model": {"fc.weight": torch.zeros(3, 3)}, "optimizer": {}, "scheduler": {}, "epoch": 1,
             "batches_done": 0, "global_step": 5, "sums": torch.zeros(4), "rng": {}, "finished": True,
             "config": session.config, "compression": compression_state(model)}
    assert state.keys() == RUN_STATE.keys()
    path = session.stage_dirs["train"] / checkpoint.checkpoint_name(5)
    _commit(path, state)
    with pytest.raises(CheckpointError, match=rf"{path} does not fit this run's model and trainer \(Error\(s\) in "
                                              rf"loading state_dict.*\) ; fix: delete {path} and its "
                                              r"step0000000005.sha256 to resume from the checkpoint before it"):
        run_stage(session, _baseline(cfg), cfg.train, None, model, should_stop=lambda: False)


def _baseline(cfg):
    from compress import Stage

    return Stage(name="train", epochs=cfg.train.epochs, overrides={}, techniques=[])


def test_init_of_a_file_that_is_no_checkpoint_says_so():
    """It said "/etc/passwd has no passwd.sha256 (its write was interrupted)"."""
    with pytest.raises(ConfigError, match=r"^/etc/passwd is neither an entry nor a training checkpoint ; fix: point "):
        restore_model("/etc/passwd")


def test_a_negative_evaluation_window_is_named():
    """It was reported as a BPTT error, after the data loaded."""
    with pytest.raises(ConfigError, match=r"^task.stream.eval_window=-1 must be >= 1 \(tokens fed per evaluation "
                                          r"step\) ; fix: use e.g. task.stream.eval_window=256$"):
        validate(compose_config("task=wikitext_demo", "task.stream.eval_window=-1"), models.list_models())


def test_a_value_the_recipe_leaves_to_the_command_line_is_one_line_and_a_plan_lists_it(tmp_path: Path, monkeypatch,
                                                                                        capsys):
    # conf/experiment/wikitext103_txl_distill_prune_q8.yaml: stage 0's teacher is "???", the later stages' interpolate it
    recipe = ["+experiment=wikitext103_txl_distill_prune_q8", f"data.root={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}"]
    assert _refused(recipe, tmp_path, monkeypatch, capsys) == (
        "error: compress.stages[0].distill.teacher is not set: the recipe leaves it to the command line ; fix: pass "
        "compress.stages.0.distill.teacher=VALUE (the recipe's comment says what it takes)")
    assert not (tmp_path / "run").exists()
    monkeypatch.setattr("train.cli.prepare_run_dir", lambda run_dir: None)  # accepted: nothing else to check here
    accept_command_line([*recipe, "plan=true"])
