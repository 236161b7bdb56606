"""The error boundary of every command: train/run.py, the search commands, export, verify and the scoring CLI.

A user error, whatever package raised it, becomes one line on stderr and exit status 2; anything else is a bug
and keeps its traceback. The types come from the packages below the commands: data/ and models/ import nothing
of ours, so their errors are named here rather than derived from :class:`scoring.errors.UserError`.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from data.datasets import DatasetError
from models.registry import ModelArgumentError, UnknownModelError
from scoring.errors import USER_ERROR_EXIT, UserError, fail

#: Every error a user can fix, printed as one line.
USER_ERRORS: tuple[type[Exception], ...] = (UserError, DatasetError, UnknownModelError, ModelArgumentError)


@contextmanager
def command(status: int = USER_ERROR_EXIT) -> Iterator[None]:
    """Around a command's body: a user error prints one line (``error: …``) and exits with ``status``."""
    try:
        yield
    except USER_ERRORS as err:
        fail(str(err), status)
