"""Entries: the trained model as a contestant submits it and an organizer reloads it.

An entry is a folder with two files:

* ``model.safetensors`` — the final state dict (pruning masks applied, quantization parameters included),
  in safetensors: a format that holds only tensors, so loading it can never run code;
* ``entry.json`` — the resolved run config, the compression state (the structure that masks and
  quantizers add to the registry model), the model name and class count, the sha256 of the weights file
  and the versions that wrote it.

Nothing here unpickles. :func:`load_entry` checks that the weights file *is* safetensors before any parser
touches it, so a planted pickle is refused with one line, and checks the recorded sha256.
:func:`build_model_from_entry` is the one place that composes models and compress to rebuild an entry;
the exporter, the verifier and the scoring CLI all go through it.

A bundle (``python -m scoring.export``) is sealed by a ``SHA256SUMS`` manifest: one ``<sha256>  <path>``
line per file, in the format ``sha256sum -c`` reads. :func:`write_manifest` writes it and
:func:`check_manifest` compares a folder with it, file by file. An entry folder inside a run dir has no
manifest of its own: entry.json already pins the weights, and the bundle's manifest covers entry.json.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import struct
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any, Callable

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from scoring.report import REPORT_JSON

ENTRY_JSON = "entry.json"
WEIGHTS_FILE = "model.safetensors"
#: The bundle's manifest: sha256 of every other file of the bundle, in ``sha256sum`` format.
MANIFEST_FILE = "SHA256SUMS"
#: A manifest line: hex digest, a space, then " " (text mode, what we write) or "*" (``sha256sum -b``), the path.
_MANIFEST_LINE = re.compile(r"([0-9a-fA-F]{64}) [ *](.+)")
#: Version of the entry.json layout; bumped when a reader could misread an older entry.
FORMAT_VERSION = 1
#: safetensors refuses headers above 100 MB; anything larger is not a safetensors file.
_MAX_HEADER_BYTES = 100_000_000


class EntryError(ValueError):
    """An entry cannot be written, read or rebuilt; the message says what to do."""


@dataclass
class Entry:
    """A loaded entry: everything needed to rebuild the model, without having run any stored code."""

    #: The resolved run config (task, model, compress, train, score, ...).
    config: dict[str, Any]
    #: Structure added by compression, for :func:`compress.apply_compression_state`.
    compression_state: dict[str, Any]
    #: The weights, as loaded from ``model.safetensors`` (CPU tensors).
    state_dict: dict[str, torch.Tensor]
    #: The rest of entry.json: format_version, model {name, num_classes, kwargs}, weights {file, sha256},
    #: versions {torch, micronet_kit}.
    meta: dict[str, Any]

    @property
    def task(self) -> str:
        """Name of the task the entry was trained for."""
        return self.config["task"]["name"]


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it over ``path``, durably.

    A crash, a power loss or a full disk leaves either the old file or the new one, never a torn one:
    the data is synced before the rename, and the folder after it (POSIX makes a rename durable only then).
    """
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync(path.parent)


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class FileCheck:
    """One file of a folder compared with the folder's manifest."""

    #: Path relative to the folder, with ``/`` separators (as in the manifest).
    path: str
    #: sha256 the manifest records; None when the file is not listed.
    listed: str | None
    #: sha256 of the file on disk; None when it is missing or not a plain file.
    found: str | None
    #: "ok", "CHANGED", "MISSING", "NOT LISTED" or "NOT A PLAIN FILE".
    status: str

    @property
    def ok(self) -> bool:
        """Whether the file is on disk, listed, and has the listed content."""
        return self.status == "ok"


def _folder_files(folder: Path) -> dict[str, Path]:
    """Every file under ``folder`` but its top-level manifest, by relative POSIX path.

    Symlinks (to files or folders) are listed, not followed, so that a check can refuse them.
    """
    found: dict[str, Path] = {}
    for root, dirs, files in os.walk(folder):
        for name in files + [d for d in dirs if Path(root, d).is_symlink()]:
            path = Path(root, name)
            found[path.relative_to(folder).as_posix()] = path
    found.pop(MANIFEST_FILE, None)
    return found


def write_manifest(folder: Path) -> Path:
    """Write ``folder/SHA256SUMS`` covering every other file under ``folder``, atomically; return its path.

    Call it last: a file written after it is reported as not listed.
    """
    lines = []
    for name, path in sorted(_folder_files(folder).items()):
        if path.is_symlink() or not path.is_file():
            raise EntryError(f"{path} is not a plain file; a bundle holds plain files only — remove it")
        if "\\" in name or "\n" in name:  # sha256sum would escape such names; nothing we write has them
            raise EntryError(f"{path}: bundle file names must not contain backslashes or newlines — rename it")
        lines.append(f"{sha256_file(path)}  {name}\n")
    manifest = folder / MANIFEST_FILE
    atomic_write(manifest, lambda tmp: tmp.write_text("".join(lines)))
    return manifest


def _read_manifest(manifest: Path) -> dict[str, str]:
    """The manifest's ``{path: sha256}``; :class:`EntryError` for any line that is not a safe relative path."""
    try:
        text = manifest.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise EntryError(f"{manifest} cannot be read ({err}); get an intact copy of the bundle") from None
    listed: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        match = _MANIFEST_LINE.fullmatch(line)
        name = match.group(2) if match else ""
        pure = PurePosixPath(name)
        # Only normalized paths inside the folder: no "/abs", "../x", "./x", "a//b".
        if not match or pure.is_absolute() or ".." in pure.parts or pure.as_posix() != name or name in listed:
            raise EntryError(f"{manifest} line {number} is not '<sha256>  <relative path>' (or repeats a path): "
                             f"{line[:80]!r}; get an intact copy of the bundle or re-export it")
        listed[name] = match.group(1).lower()
    return listed


def check_manifest(folder: Path) -> list[FileCheck] | None:
    """Compare every file under ``folder`` with ``folder/SHA256SUMS``, sorted by path; None without a manifest.

    Each listed file must be on disk, a plain file, with the listed sha256; each file on disk must be listed.
    Raises :class:`EntryError` when ``folder`` is not a folder or the manifest is malformed.
    """
    if not folder.is_dir():
        raise EntryError(f"{folder} is not a folder" if folder.exists() else f"{folder} does not exist")
    manifest = folder / MANIFEST_FILE
    if not manifest.exists():
        return None
    listed = _read_manifest(manifest)
    on_disk = _folder_files(folder)
    checks = []
    for name in sorted(listed.keys() | on_disk.keys()):
        path, recorded = on_disk.get(name), listed.get(name)
        if path is None:
            checks.append(FileCheck(name, recorded, None, "MISSING"))
        elif path.is_symlink() or not path.is_file():  # never hashed: a FIFO would block, a link points anywhere
            checks.append(FileCheck(name, recorded, None, "NOT A PLAIN FILE"))
        else:
            digest = sha256_file(path)
            status = "NOT LISTED" if recorded is None else "ok" if digest == recorded else "CHANGED"
            checks.append(FileCheck(name, recorded, digest, status))
    return checks


def _storable(state_dict: dict[str, Any]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors that own their storage, as safetensors requires.

    Tied weights and views (e.g. a shared embedding, a transposed buffer) are cloned, so each key keeps
    its own copy; load_state_dict copies them back into the shared parameter either way.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise EntryError(f"state dict entry {key!r} is a {type(value).__name__}, not a tensor; "
                             "entries hold tensors only (move that state into a buffer)")
        tensor = value.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage()
        if tensor.nbytes and (storage.data_ptr() in seen or storage.nbytes() != tensor.nbytes):
            tensor = tensor.clone()
        if tensor.nbytes:
            seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out


def model_spec(config: dict[str, Any]) -> dict[str, Any]:
    """Registry name, class count and keyword arguments of a run's model, from its resolved config: the
    task's input (``data.tasks.Task.model_kwargs``, e.g. ``in_chans``) and then the config's ``model.kwargs``.
    Training builds its model, and an entry records it, from this one spec."""
    from data.tasks import build_task

    try:
        task = build_task(config["task"])
        return {"name": config["model"]["name"], "num_classes": task.num_classes,
                "kwargs": {**task.model_kwargs(), **dict(config["model"].get("kwargs") or {})}}
    except (KeyError, TypeError, ValueError) as err:
        raise EntryError(f"config lacks or mistypes {err}; pass the resolved run config "
                         "(OmegaConf.to_container(cfg, resolve=True))") from None


def _versions() -> dict[str, str]:
    try:
        kit = metadata.version("micronet-kit")
    except metadata.PackageNotFoundError:  # running from a checkout that was never pip-installed
        kit = "unknown"
    return {"torch": torch.__version__, "micronet_kit": kit}


def save_entry(directory: str | os.PathLike, model: nn.Module, *, config: dict[str, Any]) -> Path:
    """Write ``model`` as an entry into ``directory`` (created if needed) and return the folder.

    The model is finalized for export on a copy (the caller's model is left as it is):
    masks are baked into the weights, so pruned weights are exact zeros of the stored tensors, and
    quantizers keep their (frozen) parameters. entry.json records the structure of that finalized
    copy, which is what a rebuild needs. Each file is written atomically, the weights first, so
    entry.json never names weights that are not on disk.
    """
    from compress import compression_state as describe, finalize_for_export

    exported = copy.deepcopy(model).cpu()
    finalize_for_export(exported)
    document = {"format_version": FORMAT_VERSION, "model": model_spec(config), "weights": {},
                "versions": _versions(), "config": config, "compression_state": describe(exported)}
    try:  # checked before anything is written
        json.dumps(document, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise EntryError(f"config or compression state is not plain JSON ({err}); "
                         "pass resolved containers of str/int/float/bool/list/dict") from None
    tensors = _storable(exported.state_dict())

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp)))
    document["weights"] = {"file": WEIGHTS_FILE, "sha256": sha256_file(directory / WEIGHTS_FILE)}
    text = json.dumps(document, indent=2) + "\n"
    atomic_write(directory / ENTRY_JSON, lambda tmp: tmp.write_text(text))
    return directory


def find_entry_dir(path: str | os.PathLike) -> Path:
    """The entry folder for ``path``: an entry itself, or a run dir / bundle holding ``entry/``."""
    path = Path(path)
    for candidate in (path, path / "entry"):
        if (candidate / ENTRY_JSON).is_file():
            return candidate
    if not path.exists():
        raise EntryError(f"{path} does not exist")
    raise EntryError(f"{path} holds no {ENTRY_JSON} (nor entry/{ENTRY_JSON}); a run writes its entry when it "
                     "finishes: run `python train/run.py …` to the end, or export a bundle with "
                     "`python -m scoring.export RUN_DIR --out BUNDLE`")


def read_report(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``report.json`` of a run dir or bundle; :class:`EntryError` with what to run when absent."""
    path = Path(directory) / REPORT_JSON
    if not path.is_file():
        raise EntryError(f"{directory} has no report.json; a run writes it when it finishes: "
                         "run `python train/run.py …` to the end first")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EntryError(f"{path} is not valid JSON ({err})") from None


def check_safetensors(path: Path) -> None:
    """Refuse a file that is not safetensors, reading only its first bytes (no parser runs on it).

    safetensors starts with an 8-byte little-endian header length followed by a JSON object; a pickle
    starts with an opcode (``0x80``), a ``torch.save`` archive with ``PK``.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
    header_len = struct.unpack("<Q", head[:8])[0] if len(head) == 9 else 0
    if not (0 < header_len <= min(size - 8, _MAX_HEADER_BYTES) and head[8:9] == b"{"):
        raise EntryError(f"{path} is not a safetensors file (it starts with {head[:4]!r}); entries are "
                         "never unpickled — re-export the run with `python -m scoring.export`")


def load_entry(path: str | os.PathLike) -> Entry:
    """Read an entry (or the entry inside a run dir / bundle) without unpickling anything.

    Refused with :class:`EntryError`: a missing or malformed entry.json, an unknown format version, a
    weights file that is not safetensors, and weights whose sha256 differs from the recorded one.
    """
    directory = find_entry_dir(path)
    try:
        document = json.loads((directory / ENTRY_JSON).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EntryError(f"{directory / ENTRY_JSON} is not valid JSON ({err})") from None
    version = document.get("format_version") if isinstance(document, dict) else None
    if version != FORMAT_VERSION:
        raise EntryError(f"{directory / ENTRY_JSON} has format_version {version!r}; this micronet-kit reads "
                         f"version {FORMAT_VERSION} — use the micronet-kit version that wrote it")
    missing = [key for key in ("model", "weights", "config", "compression_state") if key not in document]
    if missing:
        raise EntryError(f"{directory / ENTRY_JSON} lacks {', '.join(missing)}; re-export the run")

    try:
        weights = directory / Path(document["weights"]["file"]).name  # a bare file name: never outside the entry
        recorded = str(document["weights"]["sha256"])
    except (KeyError, TypeError):
        raise EntryError(f"{directory / ENTRY_JSON} lacks weights.file / weights.sha256; re-export the run") from None
    if not weights.is_file():
        raise EntryError(f"{weights} is missing; the entry is incomplete — re-export the run")
    check_safetensors(weights)
    actual = sha256_file(weights)
    if actual != recorded:
        raise EntryError(f"{weights} has sha256 {actual[:16]}…, entry.json records {recorded[:16]}…: "
                         "the weights were changed after export")
    try:
        state_dict = load_file(str(weights))
    except SafetensorError as err:
        raise EntryError(f"{weights} is a damaged safetensors file ({err})") from None

    config = document.pop("config")
    compression_state = document.pop("compression_state")
    return Entry(config=config, compression_state=compression_state, state_dict=state_dict, meta=document)


def build_model_from_entry(entry: Entry) -> nn.Module:
    """The entry's model: registry architecture + compression structure + the stored weights (strict), in eval mode."""
    from compress import apply_compression_state
    from models import create_model

    spec = entry.meta["model"]
    model = create_model(spec["name"], num_classes=spec["num_classes"], **spec.get("kwargs", {}))
    apply_compression_state(model, entry.compression_state)
    try:
        result = model.load_state_dict(entry.state_dict, strict=False)
    except RuntimeError as err:  # shape mismatches; torch's message spans many lines
        first = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
        raise EntryError(f"the weights do not fit the model rebuilt from entry.json: {first}") from None
    if result.missing_keys or result.unexpected_keys:
        raise EntryError("the weights do not fit the model rebuilt from entry.json: "
                         f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    return model.eval()
