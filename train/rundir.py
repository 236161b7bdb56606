"""The run folder: its name, its lock, its record, and the write failures a user can fix.

**Name.** ``outputs/<task>/<model>/<compress>/seed<seed>`` plus, when the command line sets anything else that
defines the run (``init=``, ``train.*``, ``compress.*``, ``smoke=true``, ...: :data:`train.config.RUN_DEFINING`),
``-<tag>``: 8 hex digits of a hash of those overrides (:func:`run_tag`, the ``run_tag`` resolver of
``conf/config.yaml``). Re-running the same command finds the same folder; a different recipe gets its own.

**Lock.** A run holds an exclusive ``flock`` on ``<run dir>/.lock`` while it may write there
(:func:`lock_run_dir`). The kernel drops the lock when the process ends, however it ends (kill -9 included), so a
crashed run never leaves a stale lock; a second run into a busy folder is refused before it writes anything. A run
refused before it was accepted removes the lock file and the folders it created (:func:`discard_unaccepted`). A
folder deleted while its run uses it takes the lock file with it: the run notices at its next checkpoint (the file
it locked is not the folder's lock any more, :func:`check_run_dir`) and stops, instead of sharing the folder with a
run started there since.

**Record.** Once a run is accepted (every check passed, the folder locked) it writes ``.hydra/overrides.yaml``
(the command-line overrides, Hydra's format) and ``.hydra/config.yaml`` (the resolved config), once: a later
command into the same folder, refused or resuming, never rewrites them, so the reproduction command an export
prints is the one that started the run. Hydra itself writes nothing into the folder (``hydra.output_subdir:
null`` and console-only job logging in ``conf/``).

**Write failures.** A full disk (``ENOSPC``, ``EDQUOT``), a read-only or forbidden folder: :func:`write_problem`
turns the error into the one line the run prints (exit status 2). Every file is written atomically, so what was
on disk before the failure is intact.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import sys
import threading
from pathlib import Path
from typing import Any, Iterable

from omegaconf import OmegaConf

from scoring.errors import fail
from train.config import ConfigError, check_same_run, is_run_defining

#: The lock file of a run dir.
LOCK_FILE = ".lock"
#: Where the record of the accepted command lives (Hydra's folder name, which export reads).
RECORD_DIR = ".hydra"
#: The run's log file, written once the run is accepted.
LOG_FILE = "run.log"
#: Overrides whose values the folder path already shows.
_IN_PATH = frozenset({"task", "model", "compress", "seed"})
#: errno values that mean "the disk is full" and "this place cannot be written".
_FULL = {errno.ENOSPC, errno.EDQUOT}
_FORBIDDEN = {errno.EROFS, errno.EACCES, errno.EPERM}
#: The OS error inside the message of a SafetensorError: "I/O error: File too large (os error 27)".
_RUST_IO_CODE = re.compile(r"\(os error (\d+)\)")

#: The run dirs this process holds the lock of (resolved), with the lock file's descriptor.
_held: dict[Path, int] = {}
#: For each of them, the folders :func:`prepare_run_dir` created (deepest first) and whether it created the lock file.
_created: dict[Path, tuple[list[Path], bool]] = {}


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def run_tag(overrides: Iterable[str]) -> str:
    """``-<8 hex>`` of the run-defining overrides the folder path does not show ("" when there are none).

    Order does not matter; a ``+``/``++`` prefix does not either (``+a=1`` and ``a=1`` set the same value)."""
    defining = sorted(o.lstrip("+") for o in overrides if _key(o) not in _IN_PATH and is_run_defining(_key(o)))
    if not defining:
        return ""
    return "-" + hashlib.sha256("\n".join(defining).encode()).hexdigest()[:8]


# Hydra's convention: resolvers are registered at import, like the schema in train/config.py.
if not OmegaConf.has_resolver("run_tag"):
    OmegaConf.register_new_resolver("run_tag", lambda overrides: run_tag(overrides or []))


class RunDirError(ConfigError):
    """The run folder cannot be used now (busy, unwritable, full); one line with the fix."""


def write_problem(err: BaseException) -> tuple[str, str] | None:
    """``(problem, fix)`` for a write that failed because the disk is full, the place is read-only or forbidden,
    or the run folder was deleted under the run; None for any other error (a bug, not the user's to fix)."""
    code = err.errno if isinstance(err, OSError) else None
    deleted = next((run_dir for run_dir, fd in _held.items() if not _is_lock_of(fd, run_dir)), None) \
        if code == errno.ENOENT else None
    if deleted is not None:  # TensorBoard's writer, which opens its file for each write, tells first
        return _deleted_problem(deleted)
    if code is None and type(err).__name__ == "SafetensorError":  # safetensors' writer wraps the OS error
        match = _RUST_IO_CODE.search(str(err))
        code = int(match.group(1)) if match else None
    if isinstance(err, FileNotFoundError) and str(err.strerror).startswith("No usable temporary directory"):
        # tempfile.gettempdir() could write a file into none of its folders (torch asks for one as it compiles)
        return (f"{err.strerror}: no file could be written there (a full or read-only disk)",
                "free space there, or set TMPDIR to a writable folder, then re-run the same command")
    where = getattr(err, "filename", None)
    where = f" ({os.fsdecode(where)})" if where else ""
    if code in _FULL:
        return (f"the disk is full{where}: {os.strerror(code)}",
                "free space (or raise the quota) there, then re-run the same command: it resumes from the last "
                "checkpoint, and every file written before is intact")
    if code in _FORBIDDEN:
        return (f"cannot write{where}: {os.strerror(code)}",
                "make the run folder writable, or pass hydra.run.dir=<a writable folder> (a new folder starts a "
                "new run)")
    return None


def fail_on_write_problem(err: BaseException) -> None:
    """Exit with status 2 and the one line of :func:`write_problem` when ``err`` is such a write failure; return
    for any other error (the caller re-raises it: a bug, not the user's to fix)."""
    problem = write_problem(err)
    if problem is not None:
        fail(f"{problem[0]} ; fix: {problem[1]}")


def quiet_thread_write_errors() -> None:
    """Drop the traceback a helper thread prints when a write fails for :func:`write_problem`'s reasons
    (TensorBoard's writer thread): the error also reaches the main thread, which reports it as one line."""
    default = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if write_problem(args.exc_value) is None:
            default(args)
    threading.excepthook = hook


def prepare_run_dir(run_dir: Path) -> None:
    """Create ``run_dir`` (and its parents) and take its lock; :class:`RunDirError` when that is impossible."""
    missing = []  # the folders mkdir creates, deepest first: a refused run removes them again
    for folder in (run_dir, *run_dir.parents):
        if folder.exists() or folder.is_symlink():
            break
        missing.append(folder)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock_run_dir(run_dir, created=missing)
    except (FileExistsError, NotADirectoryError):
        in_the_way = next(folder for folder in (run_dir, *run_dir.parents) if folder.exists())
        raise RunDirError(f"run folder {run_dir} cannot be made: {in_the_way} is not a folder",
                          "pass hydra.run.dir=<a folder path>") from None
    except OSError as err:
        problem = write_problem(err)
        if problem is None:
            raise
        raise RunDirError(f"run folder {run_dir}: {problem[0]}", problem[1]) from None


def lock_run_dir(run_dir: Path, created: list[Path] | None = None) -> None:
    """Hold ``run_dir``'s lock until this process ends (when this process holds it already, only check that it is
    still its lock: :func:`check_run_dir`). ``created``: the folders this process just made for it (deepest first),
    which :func:`discard_unaccepted` may remove again.

    Raises :class:`RunDirError` when another process holds it. The lock file is never written, and removed only
    by :func:`discard_unaccepted`; a run that locked a file removed meanwhile finds it is not the path's any more
    and refuses, so two runs never hold two different locks of one folder."""
    key = run_dir.resolve()
    if key in _held:
        check_run_dir(run_dir)
        return
    lock = run_dir / LOCK_FILE
    lock_created = not lock.exists()
    fd = os.open(lock, os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        holder = _lock_holder(lock)
        raise RunDirError(f"{run_dir} is in use by another run{f' (pid {holder})' if holder else ''}; nothing was "
                          "written", "wait for that run to end, or pass hydra.run.dir=<another folder> for a "
                          "separate run") from None
    if not _is_lock_of(fd, run_dir):
        os.close(fd)
        raise RunDirError(f"{run_dir} was removed while this run was locking it", "re-run the same command")
    _held[key] = fd
    _created[key] = (created or [], lock_created)


def _is_lock_of(fd: int, run_dir: Path) -> bool:
    """Whether the open file ``fd`` is ``run_dir``'s lock file (and not one deleted since it was opened)."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(run_dir / LOCK_FILE))
    except OSError:
        return False


def check_run_dir(run_dir: Path) -> None:
    """Raise :class:`RunDirError` when the lock this process holds on ``run_dir`` is no longer the folder's lock
    file: the folder was deleted (or replaced) while the run used it, and another run may use it now, so this one
    must not write there again. A no-op for a folder this process does not hold (the other ranks under torchrun)."""
    fd = _held.get(run_dir.resolve())
    if fd is not None and not _is_lock_of(fd, run_dir):
        raise RunDirError(*_deleted_problem(run_dir))


def _deleted_problem(run_dir: Path) -> tuple[str, str]:
    return (f"run folder {run_dir} was deleted or replaced while this run was using it; the run stopped without "
            "writing there again", "re-run the same command to start the run again (its checkpoints went with the "
            "folder)")


def discard_unaccepted(run_dir: Path) -> None:
    """Remove what :func:`prepare_run_dir` created for ``run_dir`` (its lock file, and the folders it made) when the
    run was refused before it was accepted, so that the folder holds nothing else: a refused command leaves
    nothing behind. What existed before it is kept; a folder something else was written into is kept."""
    key = run_dir.resolve()
    fd, (created, lock_created) = _held.get(key), _created.get(key, ([], False))
    if fd is None or not lock_created or not _is_lock_of(fd, run_dir) \
            or [path.name for path in run_dir.iterdir()] != [LOCK_FILE]:
        return
    (run_dir / LOCK_FILE).unlink()  # while still locked: a run that opened it meanwhile finds it removed
    os.close(fd)
    del _held[key], _created[key]
    for folder in created:
        try:
            folder.rmdir()
        except OSError:  # not empty: another run's, or made by someone else meanwhile
            break


def _lock_holder(path: Path) -> str:
    """The pid holding the flock on ``path``, from Linux's /proc/locks ("" where the OS does not say)."""
    try:
        inode = str(path.stat().st_ino)
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()  # e.g. "3: FLOCK  ADVISORY  WRITE 4242 fd:01:1573 0 EOF"
            if "FLOCK" in fields and "->" not in fields:
                at = fields.index("FLOCK")
                if fields[at + 4].rsplit(":", 1)[-1] == inode:
                    return fields[at + 3]
    except (OSError, IndexError):
        pass
    return ""


def write_record(run_dir: Path, overrides: list[str], config: dict[str, Any]) -> None:
    """Record the accepted command (``.hydra/overrides.yaml``) and its resolved config (``.hydra/config.yaml``),
    unless the folder has a record already: the first accepted command of a folder is the one it keeps."""
    from scoring.entry import atomic_write

    folder = run_dir / RECORD_DIR
    if (folder / "overrides.yaml").is_file():
        return
    folder.mkdir(exist_ok=True)
    # config.yaml first: overrides.yaml is the marker that the record is complete.
    for name, content in (("config.yaml", config), ("overrides.yaml", list(overrides))):
        text = OmegaConf.to_yaml(OmegaConf.create(content))
        atomic_write(folder / name, lambda tmp, text=text: tmp.write_text(text))


def finished_report(run_dir: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """The report of the finished run in ``run_dir``, None when it has not finished. A run has finished when
    ``entry/entry.json`` (what it writes last) and ``report.json`` exist. :class:`ConfigError` when the finished
    run was trained by a configuration that differs from ``config`` in what defines a run."""
    from scoring.entry import ENTRY_JSON, REPORT_JSON, read_report

    entry = run_dir / "entry" / ENTRY_JSON
    if not (entry.is_file() and (run_dir / REPORT_JSON).is_file()):
        return None
    try:
        trained = json.loads(entry.read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{entry} cannot be read ({type(err).__name__}: {err})",
                          f"delete {run_dir / 'entry'} and re-run the same command: the final evaluation runs "
                          "again from the finished stages' checkpoints") from None
    check_same_run(trained, config, run_dir)
    return read_report(run_dir)


class RunLogHandler(logging.FileHandler):
    """``run.log``: a file handler whose write errors propagate (a full disk then stops the run with one line)
    instead of logging's default of printing a traceback per record and carrying on."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(run_dir / LOG_FILE, encoding="utf-8")
        # The console's format (conf/hydra/job_logging/micronet.yaml), so both read alike.
        self.setFormatter(next((h.formatter for h in logging.getLogger().handlers if h.formatter), None))

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            raise error
        super().handleError(record)
