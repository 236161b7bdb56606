"""DataLoader worker processes that belong to their run: they leave stop signals to it, and die with it."""
from __future__ import annotations

import ctypes
import os
import signal
import sys
from types import TracebackType
from typing import Callable

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def worker_init(parent_pid: int, worker_id: int) -> None:
    """``worker_init_fn`` of every loader (bind the parent with ``functools.partial(worker_init, os.getpid())``).

    * SIGINT and SIGTERM go to the whole process group (Ctrl-C; a scheduler preempting the job). The main
      process turns them into a checkpoint and a clean exit; a worker must not die of them first, or its
      loader would fail the run ("worker killed by signal") before that checkpoint.
    * torch's workers notice a dead parent only by polling it every few seconds; on Linux the kernel kills
      them the moment the main process dies (``kill -9`` included), so they never outlive it.
    * A main process that exits while fetching a batch's shared memory from a worker leaves that worker's
      hand-over thread with a lost connection: no traceback for it (:func:`quiet_lost_parent`).
    """
    sys.excepthook = quiet_lost_parent(sys.excepthook)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
    if os.getppid() != parent_pid:  # the parent died before prctl took effect: nothing would kill us now
        os._exit(0)


ExceptHook = Callable[[type[BaseException], BaseException, TracebackType | None], object]


def quiet_lost_parent(default: ExceptHook) -> ExceptHook:
    """``default`` but silent on a lost connection: multiprocessing's resource sharer (which hands a batch's
    file descriptors to the main process) reports its errors through ``sys.excepthook``, and a main process
    stopping at once (a second Ctrl-C) resets that connection; the run's own one-line message says why."""
    def hook(kind: type[BaseException], value: BaseException, traceback: TracebackType | None) -> object:
        return None if issubclass(kind, (ConnectionError, EOFError)) else default(kind, value, traceback)
    return hook
