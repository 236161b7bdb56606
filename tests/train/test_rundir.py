"""The run folder: names that do not collide, the lock, the record written once, one-line write failures."""
from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import REPO, run_dir_for
from train.config import ConfigError, to_container
from train.rundir import LOCK_FILE, RunDirError, finished_report, lock_run_dir, run_tag, write_problem, write_record


def _run_dir(*overrides: str) -> str:
    return str(run_dir_for(*overrides))


def test_the_readme_lines_get_folders_of_their_own():
    base = "outputs/digits/digits_cnn/prune_q8/seed0"
    assert _run_dir() == "outputs/digits/digits_cnn/none/seed0"
    assert _run_dir("compress=prune_q8") == base
    # The README's `init=... compress=prune_q8` line used to land in (and be refused by) the line above's folder.
    init = _run_dir("init=outputs/digits/digits_cnn/none/seed0", "compress=prune_q8")
    assert init.startswith(base + "-") and len(init) == len(base) + 9
    assert _run_dir("train.lr=0.05") != _run_dir("train.lr=0.02") != _run_dir()
    assert _run_dir("smoke=true") != _run_dir()


def test_the_folder_ignores_what_does_not_define_the_run():
    plain = _run_dir()
    # Where data lives, how it is loaded, how it is watched or scored: the same run, resumable with either.
    for override in ("data.root=/data", "data.num_workers=0", "train.log_every=3", "train.compile=true",
                     "score.examples=16", "device=cpu", "model=digits_cnn", "task=digits", "seed=0"):
        assert _run_dir(override) == plain, override
    assert run_tag(["train.lr=0.05", "train.epochs=3"]) == run_tag(["train.epochs=3", "+train.lr=0.05"])
    assert run_tag(["~train.ema_decay"]) != run_tag([]) == ""


def test_a_lock_is_refused_to_another_process_and_freed_when_its_holder_ends(tmp_path: Path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from train.rundir import lock_run_dir; lock_run_dir(Path(sys.argv[1])); "
                               "print('locked', flush=True); time.sleep(600)", str(tmp_path)],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match=rf"{tmp_path} is in use by another run \(pid {holder.pid}\); nothing "
                                              r"was written ; fix: wait for that run to end"):
            lock_run_dir(tmp_path)
    finally:
        holder.kill()  # like kill -9: the kernel drops the lock with the process
        holder.wait(timeout=60)
    lock_run_dir(tmp_path)
    lock_run_dir(tmp_path)  # the holder may ask again (main() and run() both do)
    assert [p.name for p in tmp_path.iterdir()] == [LOCK_FILE] and (tmp_path / LOCK_FILE).stat().st_size == 0


def test_the_record_is_written_once_by_the_first_accepted_command(tmp_path: Path):
    write_record(tmp_path, ["train.epochs=3"], {"train": {"epochs": 3}})
    write_record(tmp_path, ["train.lr=0.05"], {"train": {"epochs": 3, "lr": 0.05}})  # a later command
    assert OmegaConf.to_container(OmegaConf.load(tmp_path / ".hydra" / "overrides.yaml")) == ["train.epochs=3"]
    assert OmegaConf.to_container(OmegaConf.load(tmp_path / ".hydra" / "config.yaml")) == {"train": {"epochs": 3}}


def test_a_finished_run_is_recognised_by_its_entry_and_refuses_another_config(tmp_path: Path, tiny_config):
    config = to_container(tiny_config())
    assert finished_report(tmp_path, config) is None
    (tmp_path / "entry").mkdir()
    (tmp_path / "entry" / "entry.json").write_text('{"config": ' + __import__("json").dumps(config) + "}")
    assert finished_report(tmp_path, config) is None  # the report is missing: not finished
    (tmp_path / "report.json").write_text('{"gate_passed": true}')
    assert finished_report(tmp_path, config) == {"gate_passed": True}
    with pytest.raises(ConfigError, match=r"holds a run with train.lr=0.1 but this command has train.lr=0.05"):
        finished_report(tmp_path, to_container(tiny_config("train.lr=0.05")))


@pytest.mark.parametrize("code, message", [
    (errno.ENOSPC, "the disk is full (/r/report.json): No space left on device ; free space"),
    (errno.EDQUOT, "the disk is full (/r/report.json): Disk quota exceeded ; free space"),
    (errno.EROFS, "cannot write (/r/report.json): Read-only file system ; make the run folder writable"),
    (errno.EACCES, "cannot write (/r/report.json): Permission denied ; make the run folder writable"),
])
def test_write_failures_a_user_can_fix_are_named(code, message):
    problem, fix = write_problem(OSError(code, "ignored", "/r/report.json"))
    assert f"{problem} ; {fix}".startswith(message)
    assert write_problem(OSError(errno.EIO, "I/O error")) is None  # not the user's to fix: a traceback
    assert write_problem(ValueError("no")) is None


def test_safetensors_write_failures_are_recognised_by_their_os_error_code(tmp_path: Path):
    """safetensors' writer (Rust) reports the OS error inside its own exception type. A real one, made by a file
    size limit in a child process, shows the format; a full disk reads the same with errno 28."""
    from safetensors import SafetensorError

    child = subprocess.run([sys.executable, "-c", "import resource, signal, sys, torch; from safetensors.torch "
                            "import save_file; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
                            "resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000)); "
                            "save_file({'w': torch.ones(10000)}, sys.argv[1])", str(tmp_path / "w.safetensors")],
                           capture_output=True, text=True, timeout=600)
    assert "SafetensorError: Error while serializing: I/O error: File too large (os error 27)" in child.stderr
    full = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert write_problem(full) == write_problem(OSError(errno.ENOSPC, "No space left on device"))
