"""Training checkpoints: written atomically, verified on load, never able to run code.

A stage's folder holds ``step<global step>.pt`` files, each with a ``.sha256`` sidecar (digest and size)
written after it. A checkpoint counts only when both exist and agree, so a write cut short by a crash, a
full disk or ``kill -9`` leaves at most an unverifiable newest file, and loading falls back to the
previous one. The newest :data:`KEEP` verified checkpoints are kept.

Files are loaded with ``torch.load(weights_only=True)``: a planted pickle is refused, not executed. So
everything stored is tensors and plain Python (RNG states are converted, see :func:`rng_state`).
"""
from __future__ import annotations

import hashlib
import io
import logging
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scoring.entry import atomic_write

log = logging.getLogger(__name__)

#: Verified checkpoints kept per stage: the newest, and the previous good one.
KEEP = 2
_PATTERN = "step*.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or used; the message says what to do."""


def checkpoint_name(global_step: int) -> str:
    """File name of the checkpoint taken after ``global_step`` optimizer steps (sorts chronologically)."""
    return f"step{global_step:010d}.pt"


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".sha256")


def save_checkpoint(directory: Path, global_step: int, state: dict[str, Any]) -> Path:
    """Write ``state`` as the checkpoint of ``global_step`` in ``directory``; keep the previous good one.

    Raises :class:`CheckpointError` when the write fails (e.g. disk full); what was on disk before is intact.
    """
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getbuffer()
    path = directory / checkpoint_name(global_step)
    try:
        atomic_write(path, lambda tmp: tmp.write_bytes(payload))
        record = f"{hashlib.sha256(payload).hexdigest()} {len(payload)}\n".encode()
        atomic_write(_sidecar(path), lambda tmp: tmp.write_bytes(record))
    except OSError as err:
        raise CheckpointError(f"could not write checkpoint {path} ({err}); the previous checkpoint is intact ; "
                              "fix: free disk space, then re-run the same command to resume") from None
    keep = [p for p in sorted(directory.glob(_PATTERN), reverse=True) if _sidecar(p).is_file()][:KEEP]
    for old in set(directory.glob(_PATTERN)) - set(keep):  # older ones, and leftovers of interrupted writes
        old.unlink(missing_ok=True)
        _sidecar(old).unlink(missing_ok=True)
    return path


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load one checkpoint after checking its size and sha256; :class:`CheckpointError` if unusable."""
    sidecar = _sidecar(path)
    if not sidecar.is_file():
        raise CheckpointError(f"{path} has no {sidecar.name} (its write was interrupted)")
    try:
        digest, size = sidecar.read_text().split()
        data = path.read_bytes()
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} or its checksum cannot be read ({err})") from None
    if len(data) != int(size):
        raise CheckpointError(f"{path} is truncated ({len(data)} of {size} bytes)")
    if hashlib.sha256(data).hexdigest() != digest:
        raise CheckpointError(f"{path} is corrupted (sha256 differs from {sidecar.name})")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} was refused by torch.load(weights_only=True): {first_line}") from None


def load_latest(directory: Path) -> dict[str, Any] | None:
    """The newest usable checkpoint in ``directory``, falling back past unusable ones; None if there is none.

    Raises :class:`CheckpointError` when checkpoints exist but none of them is usable.
    """
    candidates = sorted(directory.glob(_PATTERN), reverse=True)
    for path in candidates:
        try:
            state = read_checkpoint(path)
        except CheckpointError as err:
            log.warning("%s; falling back to the previous checkpoint", err)
            continue
        log.info("resuming from %s", path)
        return state
    if candidates:
        raise CheckpointError(f"no usable checkpoint in {directory} ({len(candidates)} found, all damaged) ; "
                              f"fix: delete {directory} to restart that stage")
    return None


def rng_state() -> dict[str, Any]:
    """RNG states of python, numpy and torch (CPU and CUDA) in a form ``weights_only`` loading accepts."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
