"""Training checkpoints: written atomically, verified on load, never able to run code.

A stage's folder holds ``step<global step>.pt`` files, each with a ``.sha256`` sidecar (digest and size).
The sidecar is the commit record: it is written, atomically, only after the ``.pt`` is on disk and has been
read back from disk and hashed, and any older sidecar of the same name is removed before its ``.pt`` is
replaced. So the two states a checkpoint can be found in mean different things:

* a ``.pt`` without a sidecar was never committed: its write was cut short (a crash, a full disk, ``kill -9``
  between the two files) or failed its read-back. It is not damage and never counted; loading skips it (a
  stage whose only file is one of these starts over) and the next save removes it;
* a ``.pt`` whose sidecar disagrees with it (size or sha256), or that ``torch.load`` refuses, is damage: the
  file changed after it was committed. Loading falls back to the previous committed checkpoint, and refuses
  with a fix when every committed one is damaged.

A checkpoint is good only when every floating-point tensor in it is finite: :func:`save_checkpoint` refuses
a state with a NaN or inf anywhere (weights, batch-norm statistics, optimizer moments), so the newest
:data:`KEEP` checkpoints that are kept are always ones a run can continue from.

Files are loaded with ``torch.load(weights_only=True)``: a planted pickle is refused, not executed. So
everything stored is tensors and plain Python (RNG states are converted, see :func:`rng_state`).

Every checkpoint records the :data:`FORMAT_VERSION` of its layout under ``format_version``, so that a reader can
tell a layout it does not know from damage; a checkpoint without the key is version 1.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from scoring.entry import atomic_write, sha256_file
from scoring.errors import UserError
from train.rundir import write_problem

log = logging.getLogger(__name__)

#: Verified checkpoints kept per stage: the newest, and the previous good one.
KEEP = 2
#: Version of the checkpoint layout (the keys a state holds and what they mean); bumped when a reader could
#: misread a checkpoint of the previous layout.
FORMAT_VERSION = 1
_PATTERN = "step*.pt"
#: The keys a checkpoint must hold, each with the type (or types) of its value.
Layout = Mapping[str, type | tuple[type, ...]]
#: What a run's checkpoint holds (train/stages.py writes it: the trainer's state, whether the stage finished, the
#: run's config and the model's compression structure), by key: the type of its value. A committed file without
#: them is damage, whatever its checksum says.
RUN_STATE: Layout = {
    "model": dict, "optimizer": dict, "scheduler": dict, "epoch": int, "batches_done": int, "global_step": int,
    "sums": torch.Tensor, "rng": (dict, list), "finished": bool, "config": dict, "compression": dict}


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be written or used; the message says what to do."""


class NonFiniteStateError(CheckpointError):
    """A training state with NaN or inf values, refused as a checkpoint."""


class CheckpointVersionError(CheckpointError):
    """A checkpoint of a layout this code does not read: not damage, so no older checkpoint replaces it."""


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
    bad = nonfinite_tensors(state)
    if bad:
        raise NonFiniteStateError(
            f"the training state after step {global_step} holds NaN/inf in {', '.join(bad[:3])}"
            f"{f' and {len(bad) - 3} more tensors' if len(bad) > 3 else ''}; it was not saved and the last good "
            "checkpoint is kept ; fix: lower train.lr or set train.grad_clip (e.g. 5.0): a new value runs in a new "
            "folder (a checkpoint resumes only with the settings that wrote it, and would reach the same values)")
    buffer = io.BytesIO()
    torch.save({**state, "format_version": FORMAT_VERSION}, buffer)
    payload = buffer.getbuffer()
    digest = hashlib.sha256(payload).hexdigest()
    path = directory / checkpoint_name(global_step)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _sidecar(path).unlink(missing_ok=True)  # a sidecar vouches only for the file written before it
        atomic_write(path, lambda tmp: tmp.write_bytes(payload))
        if _sha256_on_disk(path) != digest:
            path.unlink()  # garbage (uncommitted: it has no sidecar)
            raise CheckpointError(f"checkpoint {path} read back differs from what was written (a disk or filesystem "
                                  "fault); it was removed and the previous checkpoints are intact ; fix: check the "
                                  "disk (or move the run to another), then re-run the same command to resume")
        record = f"{digest} {len(payload)}\n".encode()
        atomic_write(_sidecar(path), lambda tmp: tmp.write_bytes(record))
    except OSError as err:
        problem, fix = write_problem(err) or (str(err), "re-run the same command to resume")
        raise CheckpointError(f"could not write checkpoint {path}: {problem}; the previous checkpoint is intact ; "
                              f"fix: {fix}") from None
    keep = [p for p in sorted(directory.glob(_PATTERN), reverse=True) if _sidecar(p).is_file()][:KEEP]
    for old in set(directory.glob(_PATTERN)) - set(keep):  # older ones, and uncommitted leftovers
        _sidecar(old).unlink(missing_ok=True)  # the commit record first: a crash here leaves an uncommitted .pt
        old.unlink(missing_ok=True)
    # Temporary files of writes killed mid-way, and sidecars whose .pt is gone.
    for stale in [*directory.glob(".step*.tmp"), *(p for p in directory.glob("step*.sha256")
                                                     if not p.with_suffix(".pt").exists())]:
        stale.unlink(missing_ok=True)
    return path


def nonfinite_tensors(state: Any, prefix: str = "") -> list[str]:
    """Dotted paths of the floating-point tensors in ``state`` (nested dicts, lists, tuples) holding a NaN or inf."""
    if isinstance(state, torch.Tensor):
        exact = not (state.is_floating_point() or state.is_complex())
        return [] if exact or bool(torch.isfinite(state).all()) else [prefix or "state"]
    if isinstance(state, dict):
        items = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return []
    return [path for key, value in items for path in nonfinite_tensors(value, f"{prefix}.{key}" if prefix else str(key))]


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


def is_checkpoint_file(path: Path) -> bool:
    """Whether ``path`` is named as a checkpoint (``step*.pt``) or has a checkpoint's sidecar beside it."""
    return path.is_file() and (path.match(_PATTERN) or _sidecar(path).is_file())


def holds_checkpoints(directory: Path) -> bool:
    """Whether ``directory`` holds checkpoint files (committed or not: :func:`latest_checkpoint` tells which)."""
    return any(directory.glob(_PATTERN))


def read_checkpoint(path: Path, layout: Layout | None = None) -> dict[str, Any]:
    """Load one checkpoint after checking its size and sha256 and, given a ``layout`` (e.g. :data:`RUN_STATE`),
    the keys and types it must hold; :class:`CheckpointError` if unusable."""
    sidecar = _sidecar(path)
    if not sidecar.is_file():
        raise CheckpointError(f"{path} has no {sidecar.name} (its write was interrupted)")
    try:
        digest, size = sidecar.read_text().split()
        size = int(size)
        data = path.read_bytes()
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} or its checksum cannot be read ({err})") from None
    if len(data) != size:
        raise CheckpointError(f"{path} is truncated ({len(data)} of {size} bytes)")
    if hashlib.sha256(data).hexdigest() != digest:
        raise CheckpointError(f"{path} is corrupted (sha256 differs from {sidecar.name})")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} was refused by torch.load(weights_only=True): {first_line}") from None
    version = state.get("format_version", 1) if isinstance(state, dict) else None
    if version != FORMAT_VERSION:
        raise CheckpointVersionError(f"{path} has format_version {version!r}; this micronet-kit reads version "
                                     f"{FORMAT_VERSION}", "resume it with the micronet-kit version that wrote it")
    wrong = [key for key, kind in (layout or {}).items() if not isinstance(state.get(key), kind)]
    if wrong:
        raise CheckpointError(f"{path} is not a run's training state: it lacks or mistypes {', '.join(wrong)}")
    return state


def latest_checkpoint(directory: Path, layout: Layout | None = None
                      ) -> tuple[Path, dict[str, Any]] | None:
    """The newest usable checkpoint in ``directory`` and its path, falling back past damaged ones (a ``layout`` it
    lacks included: :func:`read_checkpoint`); None when the folder holds no committed checkpoint (uncommitted
    files, see the module docstring, are skipped).

    Raises :class:`CheckpointError` when committed checkpoints exist but every one of them is damaged.
    """
    committed = []
    for path in sorted(directory.glob(_PATTERN), reverse=True):
        if _sidecar(path).is_file():
            committed.append(path)
        else:
            log.warning("ignoring %s: it has no %s, so its write was interrupted before it was committed (it never "
                        "counted as a checkpoint)", path, _sidecar(path).name)
    for path in committed:
        try:
            return path, read_checkpoint(path, layout)
        except CheckpointVersionError:
            raise
        except CheckpointError as err:
            log.warning("%s; falling back to the previous checkpoint", err)
    if committed:
        raise CheckpointError(f"no usable checkpoint in {directory} ({len(committed)} committed, all damaged) ; "
                              f"fix: delete {directory} to restart that stage")
    return None


def load_latest(directory: Path, layout: Layout | None = None
                ) -> dict[str, Any] | None:
    """The state of :func:`latest_checkpoint` (None when there is none)."""
    found = latest_checkpoint(directory, layout)
    return None if found is None else found[1]


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
