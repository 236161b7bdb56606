"""Runs that never get stuck or mix, under the faults a cluster or a laptop delivers: ``kill -9`` between a
stage's first checkpoint and its checksum, Ctrl-C and SIGTERM to the whole process group (with the default two
DataLoader workers), a second run into a busy folder, a disk that fills after the last checkpoint or at start, a
read-only folder, no network for a download. Each ends with one line and the documented exit status, nothing
on disk lost, and a re-run ending with the weights of an uninterrupted run.

Faults are injected by ``tests/train/faults.py`` (patched write functions: deterministic, no root needed).
Timeouts here only catch hangs; they are minutes, whatever the machine's load.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import HANG, REPO, RUN_PY, run_train
from train.checkpoint import load_latest

pytestmark = pytest.mark.slow

FAULTS_PY = str(REPO / "tests" / "train" / "faults.py")
#: A short run with the default DataLoader workers (2), logging every step so signals land mid-epoch.
ARGS = ("train.epochs=2", "train.warmup_epochs=0.5", "train.log_every=1", "score.examples=16")


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    state = load_latest(run_dir / "checkpoints" / "0_train")
    assert state["finished"]
    return state["model"]


def _assert_same_weights(run_dir: Path, reference: Path) -> None:
    weights, expected = _final_weights(run_dir), _final_weights(reference)
    assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in expected)


def _report(run_dir: Path) -> dict:
    return json.loads((run_dir / "report.json").read_text())


def _assert_finished(result: subprocess.CompletedProcess, run_dir: Path) -> None:
    """A finished run exits 0 when its entry passes the gate and 3 when it does not."""
    assert result.returncode in (0, 3), result.stderr[-3000:]
    assert result.returncode == (0 if _report(run_dir)["gate_passed"] else 3)


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and " ; fix: " in lines[0], stderr[-3000:]
    return lines[0]


def _snapshot(folder: Path) -> dict[str, tuple[int, int, str]]:
    """Every file and folder under ``folder`` (dotfiles included): size, mtime and content hash."""
    found = {}
    for path in sorted(folder.rglob("*")):
        stat = path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
        found[str(path.relative_to(folder))] = (stat.st_size if path.is_file() else 0, stat.st_mtime_ns, digest)
    return found


class _Run:
    """A run in its own process group, its stdout read line by line in the background."""

    def __init__(self, run_dir: Path, *args: str, fault: str | None = None) -> None:
        command = [sys.executable, *([FAULTS_PY, fault] if fault else [RUN_PY]), *args, f"hydra.run.dir={run_dir}"]
        self.process = subprocess.Popen(command, cwd=run_dir.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, start_new_session=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.stdout: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line)

    def wait_for(self, text: str) -> None:
        deadline = time.monotonic() + HANG
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                assert self.process.poll() is None, f"the run ended before printing {text!r}: {self.stdout[-5:]}"
                continue
            self.stdout.append(line)
            if text in line:
                return
        raise AssertionError(f"no {text!r} within {HANG} s")

    def signal_group(self, how: signal.Signals) -> None:
        os.killpg(self.process.pid, how)
        if how == signal.SIGSTOP:  # kill() returns before delivery: wait until no thread of the group can write
            deadline = time.monotonic() + HANG
            while any(fields[0] not in "TtZX" for fields in _processes(threads=True).values()
                      if int(fields[2]) == self.process.pid):
                assert time.monotonic() < deadline, f"the run's processes did not stop within {HANG} s"
                time.sleep(0.01)

    def finish(self) -> tuple[int, str, str]:
        stderr = self.process.stderr.read()
        status = self.process.wait(timeout=HANG)
        time.sleep(0.1)
        while not self.lines.empty():
            self.stdout.append(self.lines.get())
        return status, "".join(self.stdout), stderr


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run of ``ARGS``."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = run_train(*ARGS, f"hydra.run.dir={run_dir}", cwd=run_dir.parent, timeout=HANG)
    _assert_finished(result, run_dir)
    return run_dir


def test_kill9_between_a_stages_first_checkpoint_and_its_checksum_restarts_the_stage(reference, tmp_path: Path):
    run_dir = tmp_path / "run"
    killed = _Run(run_dir, *ARGS, fault="kill_before_sidecar")
    assert killed.finish()[0] == -signal.SIGKILL
    stage = run_dir / "checkpoints" / "0_train"
    assert [p.name for p in stage.iterdir()] == ["step0000000022.pt"]  # written, never committed
    resumed = run_train(*ARGS, f"hydra.run.dir={run_dir}", cwd=tmp_path, timeout=HANG)
    _assert_finished(resumed, run_dir)  # it used to exit 2: "no usable checkpoint (1 found, all damaged)"
    assert "its write was interrupted before it was committed" in resumed.stdout + resumed.stderr
    assert "resuming from" not in resumed.stdout  # the stage started over
    _assert_same_weights(run_dir, reference)


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_to_the_process_group_saves_a_checkpoint_and_exits_143(reference, tmp_path: Path, how):
    """What Ctrl-C (SIGINT to the foreground group) and a scheduler (SIGTERM to the job) deliver: the main process
    and its two DataLoader workers get the signal at once."""
    run_dir = tmp_path / "run"
    run = _Run(run_dir, *ARGS)
    run.wait_for("train epoch 1/2 batch 3/22")
    run.signal_group(how)
    status, stdout, stderr = run.finish()
    assert status == 143, stderr[-3000:]  # SIGINT used to end in a KeyboardInterrupt, SIGTERM in "worker killed"
    said = f"{how.name} received: stopping at the next checkpoint (after the current training step or measured layer)"
    assert said in stdout and (how == signal.SIGINT) == ("Ctrl-C again stops at once" in stdout)  # said at once, once
    assert stdout.count(said) == 1 and stdout.index(said) < stdout.index(f"{how.name}: stopped in stage 'train' with "
                                                                         "its progress checkpointed")
    assert "Traceback" not in stderr and "killed by signal" not in stderr
    saved = load_latest(run_dir / "checkpoints" / "0_train")
    assert saved["epoch"] == 0 and 3 <= saved["batches_done"] < 22 and not saved["finished"]  # mid-epoch
    resumed = run_train(*ARGS, f"hydra.run.dir={run_dir}", cwd=tmp_path, timeout=HANG)
    _assert_finished(resumed, run_dir)
    assert f"resuming from {run_dir / 'checkpoints' / '0_train'}" in resumed.stdout
    _assert_same_weights(run_dir, reference)


def test_a_second_ctrl_c_stops_at_once_in_one_line(tmp_path: Path):
    """For whoever will not wait for the checkpoint: the first Ctrl-C asks for one at the end of the current step,
    and the run says so at once; the second one, sent on that line, stops the run there and then (a ResNet-18 step
    on a CPU and its checkpoint's write leave the time). Sent without waiting for the line, two signals could be
    one under load: a pending signal is a flag, and so is Python's own."""
    run = _Run(tmp_path / "run", *ARGS, "model=resnet18_cifar")
    run.wait_for("stage 'train': 2 epochs of 22 steps")
    run.signal_group(signal.SIGINT)
    run.wait_for("SIGINT received: stopping at the next checkpoint (after the current training step or measured "
                 "layer); Ctrl-C again stops at once, without it")
    run.signal_group(signal.SIGINT)
    status, _, stderr = run.finish()
    assert status == 130
    assert _one_line(stderr).startswith("error: stopped at once by a second Ctrl-C, without a new checkpoint")


def test_a_second_run_into_a_busy_folder_is_refused_and_touches_nothing(reference, tmp_path: Path):
    run_dir = tmp_path / "run"
    first = _Run(run_dir, *ARGS)
    first.wait_for("train epoch 1/2 batch 2/22")
    first.signal_group(signal.SIGSTOP)  # holds still (and keeps its lock) while the second one tries
    try:
        before = _snapshot(run_dir)
        second = run_train(*ARGS, "seed=1", f"hydra.run.dir={run_dir}", cwd=tmp_path, timeout=HANG)
        assert second.returncode == 2
        assert _one_line(second.stderr).startswith(f"error: {run_dir} is in use by another run (pid "
                                                   f"{first.process.pid}); nothing was written ; fix: wait")
        assert _snapshot(run_dir) == before  # not a byte, not a timestamp, .hydra included
    finally:
        first.signal_group(signal.SIGCONT)
    status, _, stderr = first.finish()
    assert status in (0, 3), stderr[-3000:]
    _assert_same_weights(run_dir, reference)  # it trained seed 0 alone: nothing of seed 1 mixed in


def test_a_disk_filling_after_the_last_checkpoint_is_one_line_and_loses_nothing(reference, tmp_path: Path):
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, FAULTS_PY, "disk_full_after:0_train", *ARGS, f"hydra.run.dir={run_dir}"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=HANG)
    assert result.returncode == 2
    assert "the disk is full" in _one_line(result.stderr) and "No space left on device" in result.stderr
    # Nothing torn: no report (it used to be a 0-byte report.json), no temporary file, the checkpoints intact.
    assert not (run_dir / "report.json").exists() and not (run_dir / "report.md").exists()
    assert not [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")]
    assert load_latest(run_dir / "checkpoints" / "0_train")["finished"]
    again = run_train(*ARGS, f"hydra.run.dir={run_dir}", cwd=tmp_path, timeout=HANG)  # space freed
    _assert_finished(again, run_dir)
    _assert_same_weights(run_dir, reference)
    assert {k: _report(run_dir)[k] for k in ("correct", "score", "params", "ops")} == \
        {k: _report(reference)[k] for k in ("correct", "score", "params", "ops")}


@pytest.mark.parametrize("fault, expected", [
    ("disk_full_at_start:tfevents", "the disk is full ({run}/tensorboard/events.out.tfevents."),  # TensorBoard's file
    ("disk_full_at_start:run.log", "the disk is full ({run}/run.log): No space left on device"),  # the log file
    ("disk_full_at_start:parent", "run folder {run}: the disk is full ({parent}): No space left on device"),  # folder
    # anything: the first write is a temporary file (torch imports its compiler to run the model on the meta device
    # before the run folder is made, and asks tempfile for a folder); it used to be a traceback
    ("disk_full_at_start:", "error: No usable temporary directory found in ['/tmp', '/var/tmp', '/usr/tmp', "
                            "'{cwd}']: no file could be written there (a full or read-only disk) ; fix: free space "
                            "there, or set TMPDIR to a writable folder, then re-run the same command"),
    ("read_only:{parent}", "run folder {run}: cannot write ({parent}): Read-only file system"),  # the parent
])
def test_a_full_disk_or_a_read_only_folder_at_start_is_one_line(tmp_path: Path, fault, expected):
    run_dir = tmp_path / "parent" / "run"
    fault, expected = (text.format(run=run_dir, parent=run_dir.parent, cwd=tmp_path) for text in (fault, expected))
    # torch's compiler cache folder, which torch puts into the environment of a test process that compiled
    # something: a run inheriting it asks tempfile for nothing (the outcome would depend on the tests run before)
    env = {key: value for key, value in os.environ.items() if key not in ("TORCHINDUCTOR_CACHE_DIR", "TMPDIR")}
    result = subprocess.run([sys.executable, FAULTS_PY, fault, *ARGS, "data.num_workers=0", f"hydra.run.dir={run_dir}"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=HANG, env=env)
    assert result.returncode == 2
    assert expected in _one_line(result.stderr)


def test_a_read_only_run_folder_is_one_line(reference, tmp_path: Path):
    """The finished reference run, now on a read-only disk: re-running it only reads, so it still reprints; a
    command that must write there is refused in one line."""
    before = _snapshot(reference)
    again = subprocess.run([sys.executable, FAULTS_PY, f"read_only:{reference}", *ARGS, f"hydra.run.dir={reference}"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=HANG)
    _assert_finished(again, reference)
    assert "run already finished" in again.stdout
    fresh = reference.parent / "fresh"
    fresh.mkdir()
    result = subprocess.run([sys.executable, FAULTS_PY, f"read_only:{fresh}", *ARGS, f"hydra.run.dir={fresh}"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=HANG)
    assert result.returncode == 2
    assert f"run folder {fresh}: cannot write ({fresh}/.lock): Read-only file system" in _one_line(result.stderr)
    assert _snapshot(reference) == before


def test_a_refused_command_touches_nothing_of_a_finished_run(reference, tmp_path: Path):
    before = _snapshot(reference)
    changed = run_train(*ARGS, "train.lr=0.05", f"hydra.run.dir={reference}", cwd=tmp_path, timeout=HANG)
    assert changed.returncode == 2
    assert "holds a run with train.lr=0.1 but this command has train.lr=0.05" in _one_line(changed.stderr)
    invalid = run_train(*ARGS, "train.batch_size=0", f"hydra.run.dir={reference}", cwd=tmp_path, timeout=HANG)
    assert _one_line(invalid.stderr) == "error: train.batch_size=0 must be > 0 ; fix: use a positive batch size"
    # Re-running the finished run itself only reprints: no new TensorBoard file, report or entry.
    again = run_train(*ARGS, f"hydra.run.dir={reference}", cwd=tmp_path, timeout=HANG)
    _assert_finished(again, reference)
    assert "run already finished" in again.stdout and f"{_report(reference)['correct']}/360" in again.stdout
    assert _snapshot(reference) == before
    # The entry's reproduction command is the one that trained it, not the refused one's.
    bundle = tmp_path / "bundle"
    export = subprocess.run([sys.executable, "-m", "scoring.export", str(reference), "--out", str(bundle),
                             "--allow-gate-failure"], cwd=REPO, capture_output=True, text=True, timeout=HANG)
    assert export.returncode == 0, export.stderr
    assert f"    python train/run.py {' '.join(ARGS)}\n" in (bundle / "WRITEUP.md").read_text()


def _processes(threads: bool = False) -> dict[int, list[str]]:
    """Every process's (or, with ``threads``, every thread's) /proc stat fields after its command name (state, ppid,
    pgrp, ...), by pid (thread id)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/task/[0-9]*/stat" if threads else "[0-9]*/stat"):
        try:
            found[int(stat.parent.name)] = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
    return found


def _children(pid: int) -> list[int]:
    return [child for child, fields in _processes().items() if int(fields[1]) == pid]


def _alive(pid: int) -> bool:
    """Running or stopped; False once it is gone or a zombie (dead, waiting to be reaped)."""
    fields = _processes().get(pid)
    return fields is not None and fields[0] != "Z"


def test_dataloader_workers_ignore_stop_signals_and_die_with_the_main_process(tmp_path: Path):
    workers: list[int] = []
    main = subprocess.Popen([sys.executable, "-c", "import time; from data import build_loaders; loaders = "
                             "build_loaders('digits', root=None, batch_size=64, eval_batch_size=64, augment=None, "
                             "num_workers=2, pin_memory=False, download=False, seed=0); next(iter(loaders.train)); "
                             "print('loading', flush=True); time.sleep(600)"],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert main.stdout.readline().strip() == "loading"
        workers = _children(main.pid)
        assert len(workers) == 2
        for how in (signal.SIGINT, signal.SIGTERM):  # the run turns these into a checkpoint; workers leave them
            for worker in workers:
                os.kill(worker, how)
        time.sleep(1)
        assert all(_alive(worker) for worker in workers)
        for worker in workers:  # stopped: torch's own check of its parent (a poll every few seconds) cannot run
            os.kill(worker, signal.SIGSTOP)
        main.kill()
        main.wait(timeout=HANG)
        deadline = time.monotonic() + HANG
        while any(_alive(worker) for worker in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(worker) for worker in workers)  # killed with their parent (PR_SET_PDEATHSIG)
    finally:
        main.kill()
        for worker in filter(_alive, workers):
            os.kill(worker, signal.SIGKILL)


def test_a_download_without_network_is_one_line(tmp_path: Path):
    closed = "http://127.0.0.1:9"  # the discard port: connection refused, deterministically, with or without network
    result = run_train("task=cifar100", f"data.root={tmp_path / 'cifar'}", "data.download=true", "data.num_workers=0",
                       f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, timeout=HANG,
                       env={"https_proxy": closed, "http_proxy": closed, "HTTPS_PROXY": closed, "HTTP_PROXY": closed,
                            "no_proxy": "", "NO_PROXY": ""})
    assert result.returncode == 2
    line = _one_line(result.stderr)  # it used to be an 86-line traceback
    assert line.startswith("error: could not download CIFAR-100 from https://www.cs.toronto.edu/") and \
        "fix: check the network connection" in line
