"""``python tests/train/faults.py FAULT [run.py overrides]``: ``python train/run.py`` with one fault injected.

The faults are the ones a user's machine delivers at awkward moments, made deterministic by patching the Python
functions every write goes through (``open``, ``os.open``, ``os.fsync``, ``os.mkdir``, the checkpoint writer),
so that a test can place them exactly and they need neither root nor a special filesystem:

    kill_before_sidecar      SIGKILL this process between a stage's first .pt and its .sha256
    disk_full_after:STAGE    ENOSPC for every file of the run folder opened or synced for writing after STAGE's
                             final checkpoint
    disk_full_at_start:WHAT  ENOSPC from the start, for files whose name contains WHAT ("" = every file)
    read_only:PATH           EROFS for creating or writing anything under PATH
"""
from __future__ import annotations

import builtins
import errno
import io
import os
import runpy
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from train import checkpoint  # noqa: E402

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_TRUNC


def _failing_writes(code: int, applies) -> None:
    """From now on, raise ``OSError(code)`` for every open for writing (and fsync) of a path ``applies`` to."""
    real_io_open, real_os_open, real_fsync, real_mkdir = io.open, os.open, os.fsync, os.mkdir
    paths_of_fds: dict[int, str] = {}

    def error(path) -> OSError:
        return OSError(code, os.strerror(code), os.fsdecode(path))

    def io_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+") \
                and applies(os.fsdecode(file)):
            raise error(file)
        return real_io_open(file, mode, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        # Like the kernel: O_CREAT alone needs no write access when the file exists.
        writes = flags & _WRITE_FLAGS or flags & os.O_CREAT and not os.path.exists(path)
        if writes and applies(os.fsdecode(path)):
            raise error(path)
        fd = real_os_open(path, flags, *args, **kwargs)
        paths_of_fds[fd] = os.fsdecode(path)
        return fd

    def fsync(fd):
        if applies(paths_of_fds.get(fd, "")):
            raise error(paths_of_fds.get(fd))
        return real_fsync(fd)

    def mkdir(path, *args, **kwargs):
        # Like the kernel: a missing parent is ENOENT first (Path.mkdir(parents=True) then makes the parent).
        if applies(os.fsdecode(path)) and os.path.isdir(os.path.dirname(os.path.abspath(path))) \
                and not os.path.isdir(path):
            raise error(path)
        return real_mkdir(path, *args, **kwargs)

    io.open = builtins.open = io_open
    os.open, os.fsync, os.mkdir = os_open, fsync, mkdir


def install(fault: str) -> None:
    kind, _, argument = fault.partition(":")
    if kind == "kill_before_sidecar":
        real_write = checkpoint.atomic_write

        def write(path: Path, writer) -> None:
            if path.suffix == ".sha256":
                os.kill(os.getpid(), signal.SIGKILL)
            real_write(path, writer)
        checkpoint.atomic_write = write
    elif kind == "disk_full_after":
        real_save = checkpoint.save_checkpoint

        def save(directory: Path, global_step: int, state: dict) -> Path:
            path = real_save(directory, global_step, state)
            if state["finished"] and directory.name == argument:  # the run folder's disk is full from now on
                run_dir = str(directory.resolve().parents[1])
                _failing_writes(errno.ENOSPC, lambda path: os.path.abspath(path).startswith(run_dir))
            return path
        checkpoint.save_checkpoint = save  # before run.py imports it
    elif kind == "disk_full_at_start":
        _failing_writes(errno.ENOSPC, lambda path: argument in Path(path).name)
    elif kind == "read_only":
        root = os.path.abspath(argument)
        _failing_writes(errno.EROFS, lambda path: os.path.abspath(path).startswith(root))
    else:
        raise SystemExit(f"unknown fault {fault!r}")


if __name__ == "__main__":
    install(sys.argv[1])
    sys.argv = [str(REPO / "train" / "run.py"), *sys.argv[2:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
