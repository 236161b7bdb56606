"""The one kind of error a user can fix, and how every command reports it.

A :class:`UserError` carries the problem and its fix; ``str()`` is the one line a command prints. The judge's own
refusals (an unknown task, an op with no rule) are user errors, and so are every package's that depend on it. The
boundary that turns them into ``error: … ; fix: …`` and exit status 2 is :func:`scoring.entry.boundary.command`;
this module is the judge's part of it and imports nothing of ours.
"""
from __future__ import annotations

import sys
from typing import NoReturn

#: Exit status of a refused command (bad input, missing data, a damaged file): one line on stderr.
USER_ERROR_EXIT = 2


class UserError(Exception):
    """A problem the user can fix; ``str()`` is one line: ``problem ; fix: fix`` (or the problem alone)."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        super().__init__(problem if fix is None else f"{problem} ; fix: {fix}")
        self.problem, self.fix = problem, fix


def fail(message: str, status: int = USER_ERROR_EXIT) -> NoReturn:
    """Print ``message`` as one line to stderr (``error: …``) and exit with ``status``."""
    print("error: " + " ".join(str(message).split()), file=sys.stderr)
    sys.exit(status)
