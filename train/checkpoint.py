"""Training checkpoints: written atomically, verified on load, never able to run code.

A stage's folder holds ``step<global step>.pt`` files, each with a ``.sha256`` sidecar (digest and size)
written after it. A checkpoint counts only when both exist and agree, so a write cut short by a crash, a
full disk or ``kill -9`` leaves at most an unverifiable newest file, and loading falls back to the
previous one. Before the sidecar is written, the new file is read back from disk and hashed: a write the
disk or filesystem silently corrupted gets no sidecar and raises, so it can never count towards the
newest :data:`KEEP` checkpoints that are kept (the older ones were checked the same way when written).

Files are loaded with ``torch.load(weights_only=True)``: a planted pickle is refused, not executed. So
everything stored is tensors and plain Python (RNG states are converted, see :func:`rng_state`).
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scoring.entry import atomic_write, sha256_file

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

    Raises :class:`CheckpointError` when the write fails (e.g. disk full) or the file read back from disk differs
    from what was written; either way the checkpoints on disk before are intact, and none of them is deleted.
    """
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getbuffer()
    digest = hashlib.sha256(payload).hexdigest()
    path = directory / checkpoint_name(global_step)
    try:
        atomic_write(path, lambda tmp: tmp.write_bytes(payload))
        if _sha256_on_disk(path) != digest:
            path.unlink()  # garbage; a stale sidecar of an earlier file of this step would vouch for nothing
            _sidecar(path).unlink(missing_ok=True)
            raise CheckpointError(f"checkpoint {path} read back differs from what was written (a disk or filesystem "
                                  "fault); it was removed and the previous checkpoints are intact ; fix: check the "
                                  "disk (or move the run to another), then re-run the same command to resume")
        record = f"{digest} {len(payload)}\n".encode()
        atomic_write(_sidecar(path), lambda tmp: tmp.write_bytes(record))
    except OSError as err:
        raise CheckpointError(f"could not write checkpoint {path} ({err}); the previous checkpoint is intact ; "
                              "fix: free disk space, then re-run the same command to resume") from None
    keep = [p for p in sorted(directory.glob(_PATTERN), reverse=True) if _sidecar(p).is_file()][:KEEP]
    for old in set(directory.glob(_PATTERN)) - set(keep):  # older ones, and leftovers of interrupted writes
        old.unlink(missing_ok=True)
        _sidecar(old).unlink(missing_ok=True)
    return path


def _sha256_on_disk(path: Path) -> str:
    """sha256 of ``path`` as the disk holds it: its (already synced) pages are dropped from the cache first,
    where the OS allows, so the read-back is not just the memory that was written."""
    if hasattr(os, "posix_fadvise"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:  # only a hint: a filesystem that refuses it is still read back, from the cache
            pass
        finally:
            os.close(fd)
    return sha256_file(path)


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
    """RNG states of python, numpy and torch (CPU and every CUDA device) in a form ``weights_only`` loading accepts.

    Every device, not only the current one: a single process may train on ``cuda:N`` without making it the
    current device, and a CUDA generator's state is a few bytes. Under torchrun the trainer gathers this from
    every rank into the checkpoint, and each rank restores its own on resume.
    """
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured.

    CUDA states are restored for the devices this machine has: a checkpoint from a machine with more GPUs
    (or any GPU, resumed on a CPU-only machine) resumes, and a log line says which states were dropped.
    """
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["gauss"]))
    torch.set_rng_state(state["torch"])
    saved = state["cuda"]
    devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if len(saved) > devices:
        log.warning("the checkpoint holds CUDA RNG states of %d devices and this machine has %d: restoring the "
                    "first %d, dropping the other %d", len(saved), devices, devices, len(saved) - devices)
    for index, device_state in enumerate(saved[:devices]):
        torch.cuda.set_rng_state(device_state, index)
