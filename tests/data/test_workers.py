"""DataLoader workers: a main process that stops at once leaves no traceback from them."""
from __future__ import annotations

import multiprocessing.connection

from data.workers import quiet_lost_parent


def test_a_lost_connection_is_silent_and_every_other_error_reported():
    reported = []
    hook = quiet_lost_parent(lambda kind, value, traceback: reported.append(kind))
    # What multiprocessing's resource sharer raises when the main process resets the hand-over of a batch.
    for lost in (ConnectionResetError(104, "Connection reset by peer"), BrokenPipeError(32, "Broken pipe"),
                 EOFError()):
        hook(type(lost), lost, None)
    assert reported == []
    for other in (ValueError("bad batch"), multiprocessing.connection.AuthenticationError("digest")):
        hook(type(other), other, None)
    assert reported == [ValueError, multiprocessing.connection.AuthenticationError]
