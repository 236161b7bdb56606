"""Stop signals of a run: SIGTERM (a cluster's preemption) and SIGINT (Ctrl-C) ask it to stop at its next
checkpoint instead of killing it. Imports nothing of ours."""
from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from typing import Any, Iterator


class StopRequest:
    """Set by SIGTERM or SIGINT while :func:`stop_signals` is active; calling it says whether a stop was asked."""

    def __init__(self) -> None:
        #: Name of the first stop signal received ("SIGTERM", "SIGINT"), or None.
        self.signal: str | None = None

    def __call__(self) -> bool:
        return self.signal is not None


@contextmanager
def stop_signals() -> Iterator[StopRequest]:
    """While active, SIGTERM (cluster preemption) and SIGINT (Ctrl-C) ask the loop to checkpoint and stop, instead
    of killing the process; a second SIGINT interrupts at once (KeyboardInterrupt), for whoever will not wait.
    (DataLoader workers ignore both: see data/workers.py.)"""
    request = StopRequest()

    def handle(signum: int, frame: Any) -> None:
        if request() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not request():
            request.signal = signal.Signals(signum).name
            if os.environ.get("RANK", "0") == "0":  # once, not from every process of a torchrun
                _notice(f"{request.signal} received: stopping at the next checkpoint (after the current training step "
                        "or measured layer)" + ("; Ctrl-C again stops at once, without it" if signum == signal.SIGINT
                                                else ""))

    previous = {signum: signal.signal(signum, handle) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield request
    finally:  # once stopped, the process is on its way out: a late signal has nothing left to ask
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_IGN if request() else handler)


def _notice(line: str) -> None:
    """``line`` on stdout at once, where the run's log goes: the stop may be a whole step (or an allocate stage's
    layer) away, and a Ctrl-C that shows nothing gets pressed again. Written to the file descriptor: a handler runs
    between two bytecodes, maybe inside a write to sys.stdout, which is not reentrant."""
    try:
        os.write(1, f"\n{line}\n".encode())
    except OSError:  # stdout closed (a pipe whose reader left): the stop goes on, unannounced
        pass
