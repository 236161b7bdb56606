"""DataLoader worker processes that belong to their run: they leave stop signals to it, and end with it.

How a worker ends, on every path of its main process (the parent):

* The parent drops its loaders: torch's iterator tells its workers to stop and joins them.
* The parent exits (it returned, raised, or turned a stop signal into a clean exit) with loaders still alive
  (persistent workers, loaders in a global or a reference cycle): torch leaves its workers to
  multiprocessing's exit handler, which sends each a SIGTERM and then joins it without a timeout. So a worker
  must die of its parent's SIGTERM, or the finished run hangs in that join forever.
* The parent dies (``kill -9`` included): on Linux the kernel kills the workers at once (PR_SET_PDEATHSIG);
  elsewhere torch's workers notice within seconds (they poll their parent).

SIGINT and SIGTERM also go to the whole process group (Ctrl-C; a scheduler preempting the job). The parent
turns them into a checkpoint and a clean exit; a worker must not die of them first, or its loader would fail
the run ("worker killed by signal") before that checkpoint. So a worker ignores SIGINT, and tells SIGTERMs
apart by their sender (:func:`_exit_on_sigterm_from`): its parent's ends it, anyone else's is ignored. (torch's
own worker handler exits on its parent's SIGTERM too, but dies of anyone else's.)
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from types import TracebackType
from typing import Callable

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def worker_init(parent_pid: int, worker_id: int) -> None:
    """``worker_init_fn`` of every loader (bind the parent with ``functools.partial(worker_init, os.getpid())``):
    the signal handling of the module doc, and no traceback from a lost parent (:func:`quiet_lost_parent`)."""
    sys.excepthook = quiet_lost_parent(sys.excepthook)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_on_sigterm_from(parent_pid)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
    if os.getppid() != parent_pid:  # the parent died before prctl took effect: nothing would kill us now
        os._exit(0)


def _exit_on_sigterm_from(parent_pid: int) -> None:
    """End this worker on a SIGTERM from ``parent_pid``; ignore everyone else's.

    A Python signal handler is not told who sent the signal, so SIGTERM is blocked instead and a thread takes
    each one with ``sigwaitinfo``, which is. Blocked here, in the worker's main thread, before any other thread
    exists: every thread started later inherits the mask, so no SIGTERM reaches the default action. Without
    ``sigwaitinfo`` (macOS) torch's handler stays: it ends the worker on any SIGTERM, which at least never
    outlives the parent's exit.
    """
    if not hasattr(signal, "sigwaitinfo"):
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not ignored: an ignored signal is discarded, never waited for
    threading.Thread(target=_await_sigterm_from, args=(parent_pid,), name="sigterm-from-parent", daemon=True).start()


def _await_sigterm_from(parent_pid: int) -> None:
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent_pid:
        pass
    os._exit(0)  # as torch's handler does for its parent's SIGTERM: a clean exit, not "killed by signal"


ExceptHook = Callable[[type[BaseException], BaseException, TracebackType | None], object]


def quiet_lost_parent(default: ExceptHook) -> ExceptHook:
    """``default`` but silent on a lost connection: multiprocessing's resource sharer (which hands a batch's
    file descriptors to the main process) reports its errors through ``sys.excepthook``, and a main process
    stopping at once (a second Ctrl-C) resets that connection; the run's own one-line message says why."""
    def hook(kind: type[BaseException], value: BaseException, traceback: TracebackType | None) -> object:
        return None if issubclass(kind, (ConnectionError, EOFError)) else default(kind, value, traceback)
    return hook
