"""The entry format: the trained model as a contestant submits it and an organizer rebuilds it.

An entry is a folder with two files:

* the weights: ``model.safetensors`` (format version 1, what a run writes) — the final state dict (pruning masks
  applied, quantization parameters included) in safetensors, a format that holds only tensors, so loading it can
  never run code; or ``model.packed`` (format version 2, what the exporter writes) — every tensor at the width the
  scorer counts it (:mod:`scoring.entry.packed`);
* ``entry.json`` — the resolved run config, the compression state (the structure that masks and
  quantizers add to the registry model), the model name and class count, the sha256 of the weights file
  (and a packed file's layout) and the versions that wrote it.

Nothing here unpickles. :func:`load_entry` checks that the weights file *is* safetensors (or packed: its magic)
before any parser touches it, so a planted pickle is refused with one line, reads its safetensors header only up to
:data:`~scoring.entry.files.MAX_HEADER_BYTES` (from its 8-byte length, before any parser runs), and checks the
recorded sha256; a packed file is read whole (at most :data:`~scoring.entry.files.MAX_BUNDLE_BYTES`), its layout
and streams checked before anything is decoded (:mod:`scoring.entry.packed`). entry.json is plain data
(:mod:`scoring.entry.files`), and no string in it holds ``${`` or equals ``???`` (what OmegaConf would interpolate,
e.g. ``${oc.env:HOME}``, or read as missing): a resolved config has none.

:func:`build_model_from_entry` is the one place that composes models and compress to rebuild an entry; the
exporter, the verifier and the scoring CLI all go through it. It checks the model's keyword arguments
(``models.check_model_kwargs``: no argument that reads files), builds the architecture first on the ``meta``
device (no memory) with at most :data:`~scoring.entry.files.MAX_MODULES` modules and compares its tensor shapes
with the weights file, so no tensor is allocated that the file does not hold; the compression state is
range-checked before anything is built (``compress.check_compression_state``) and input quantizers must have
been calibrated. Each refusal is an :class:`~scoring.entry.files.EntryError`.

This module may import data/, models/, compress/ and scoring core, never train/.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import reprlib
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load, save_file

from scoring.entry.files import MAX_BUNDLE_BYTES, MAX_HEADER_BYTES, MAX_JSON_BYTES, MAX_MODULES, EntryError, \
    atomic_write, open_regular, plain_json, read_regular, sha256_file
from scoring.entry.packed import PACKED_FILE, check_declared_widths, check_magic, pack_state, unpack_state, \
    weights_storage

ENTRY_JSON = "entry.json"
WEIGHTS_FILE = "model.safetensors"
#: Version of the entry.json layout; bumped when a reader could misread an older entry.
FORMAT_VERSION = 1
#: The version of an entry whose weights are packed (``model.packed``, its layout in entry.json).
PACKED_FORMAT_VERSION = 2
#: The weights file of each format version this kit reads.
_WEIGHTS_FILES = {FORMAT_VERSION: WEIGHTS_FILE, PACKED_FORMAT_VERSION: PACKED_FILE}


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


def _refuse_interpolation(document: Any, path: Path) -> None:
    """Refuse any key or string value that OmegaConf would not read as plain text: ``${...}`` (an interpolation;
    resolvers read the environment) or ``???`` (a missing value). A resolved config holds neither."""
    # Iterative, one generator per level: memory grows with the nesting, never with the size of a list.
    levels: list[Iterator[tuple[str, Any]]] = [iter([("", document)])]
    while levels:
        item = next(levels[-1], None)
        if item is None:
            levels.pop()
            continue
        where, value = item
        if isinstance(value, (dict, list)):
            levels.append(_children(where, value))
        elif isinstance(value, str) and ("${" in value or value == "???"):
            raise EntryError(f"{path} holds {reprlib.repr(value)} at {reprlib.repr(where)}, which a config reader "
                             "would interpolate; entry data is plain data (a resolved config has no ${...} and no "
                             "???) — re-export the run")


def _children(where: str, value: dict | list) -> Iterator[tuple[str, Any]]:
    """(path, item) of a JSON container's keys and values, or items."""
    if isinstance(value, list):
        yield from ((f"{where}[{index}]", item) for index, item in enumerate(value))
        return
    for key, item in value.items():
        inside = f"{where}.{key}" if where else key
        yield inside, key
        yield inside, item


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


def save_entry(directory: str | os.PathLike, model: nn.Module, *, config: dict[str, Any], packed: bool = False
               ) -> Path:
    """Write ``model`` as an entry into ``directory`` (created if needed) and return the folder; ``packed`` writes
    ``model.packed`` (format version 2) instead of ``model.safetensors``.

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
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if packed:
        layout, data = pack_state(exported)
        atomic_write(directory / PACKED_FILE, lambda tmp: tmp.write_bytes(data))
        document.update(format_version=PACKED_FORMAT_VERSION, weights={
            "file": PACKED_FILE, "sha256": sha256_file(directory / PACKED_FILE), "tensors": layout})
    else:
        tensors = _storable(exported.state_dict())
        atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp)))
        document["weights"] = {"file": WEIGHTS_FILE, "sha256": sha256_file(directory / WEIGHTS_FILE)}
    text = json.dumps(document, indent=2) + "\n"
    atomic_write(directory / ENTRY_JSON, lambda tmp: tmp.write_text(text))
    return directory


def entry_storage(path: str | os.PathLike, entry: Entry, model: nn.Module, counted_bits: int) -> dict[str, Any]:
    """The parameter bytes ``entry`` (loaded from ``path``, ``model`` rebuilt from it) is counted at, beside the bytes
    of its weights file and, for a packed entry, what makes the difference
    (:func:`scoring.entry.packed.weights_storage`)."""
    weights = entry.meta["weights"]
    size = (find_entry_dir(path) / weights["file"]).stat().st_size
    return weights_storage(model, weights, size, counted_bits)


def find_entry_dir(path: str | os.PathLike) -> Path:
    """The entry folder for ``path``: an entry itself, or a run dir / bundle holding ``entry/``."""
    path = Path(path)
    for candidate in (path, path / "entry"):
        if os.path.lexists(candidate / ENTRY_JSON):  # not followed: reading it refuses anything but a regular file
            return candidate
    if not path.exists():
        raise EntryError(f"{path} does not exist")
    raise EntryError(f"{path} holds no {ENTRY_JSON} (nor entry/{ENTRY_JSON}); a run writes its entry when it "
                     "finishes: run `python train/run.py …` to the end, or export a bundle with "
                     "`python -m scoring.export RUN_DIR --out BUNDLE`")


def _read_safetensors(path: Path, within: Path) -> bytes:
    """The bytes of a weights file, refused unless it starts like safetensors, before any parser runs on it.

    safetensors starts with an 8-byte little-endian header length followed by a JSON object; a pickle
    starts with an opcode (``0x80``), a ``torch.save`` archive with ``PK``. The header length is checked
    against :data:`MAX_HEADER_BYTES` before the rest of the file is read.
    """
    with open_regular(path, within=within, limit=MAX_BUNDLE_BYTES) as f:
        head = f.read(9)
        size = os.fstat(f.fileno()).st_size
        header_len = struct.unpack("<Q", head[:8])[0] if len(head) == 9 else 0
        if not (0 < header_len <= size - 8 and head[8:9] == b"{"):
            raise EntryError(f"{path} is not a safetensors file (it starts with {head[:4]!r}); entries are "
                             "never unpickled — re-export the run with `python -m scoring.export`")
        if header_len > MAX_HEADER_BYTES:
            raise EntryError(f"{path} has a safetensors header of {header_len:,} bytes, over the limit of "
                             f"{MAX_HEADER_BYTES:,} (a real entry's is under 200 kB); re-export the run")
        return head + f.read(MAX_BUNDLE_BYTES)


def _read_packed(path: Path, within: Path) -> bytes:
    """The bytes of a packed weights file (at most :data:`MAX_BUNDLE_BYTES`), refused unless it starts as one."""
    data = read_regular(path, within=within, limit=MAX_BUNDLE_BYTES)
    check_magic(data, path)
    return data


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


#: Sections of the resolved run config that the readers of an entry use.
_CONFIG_SECTIONS = ("task", "model", "train", "compress", "data", "score")


def _check_document(document: dict[str, Any], path: Path) -> None:
    """The types of entry.json's fields, before anything reads them."""
    model, weights, config = document["model"], document["weights"], document["config"]
    expected = _WEIGHTS_FILES[document["format_version"]]
    if not (isinstance(weights, dict) and weights.get("file") == expected and isinstance(weights.get("sha256"), str)):
        raise EntryError(f"{path} lacks weights.file / weights.sha256 (the file is {expected}); re-export the run")
    if not (isinstance(model, dict) and isinstance(model.get("name"), str) and _is_count(model.get("num_classes"))
            and isinstance(model.get("kwargs", {}), dict)):
        raise EntryError(f"{path}: model is {reprlib.repr(model)}, not {{name: str, num_classes: int >= 1, kwargs: "
                         "mapping}; re-export the run")
    sections = [key for key in _CONFIG_SECTIONS
                if not isinstance(config, dict) or not isinstance(config.get(key), dict)]
    if sections or not isinstance(config["task"].get("name"), str):
        raise EntryError(f"{path}: config lacks the mapping(s) {', '.join(sections) or 'task.name'} of a resolved "
                         "run config; re-export the run")
    if not isinstance(document["compression_state"], dict):
        raise EntryError(f"{path}: compression_state is not a mapping; re-export the run")


def load_entry(path: str | os.PathLike) -> Entry:
    """Read an entry (or the entry inside a run dir / bundle) without unpickling anything.

    Refused with :class:`EntryError`: a missing or malformed entry.json (not plain JSON, interpolations,
    fields of the wrong type), an unknown format version, a file that is not a regular file inside ``path`` or
    is over its size cap, a weights file that is not safetensors or whose header is over
    :data:`MAX_HEADER_BYTES`, and weights whose sha256 differs from the recorded one.
    """
    top = Path(path)
    directory = find_entry_dir(top)
    where = directory / ENTRY_JSON
    document = plain_json(read_regular(where, within=top, limit=MAX_JSON_BYTES), where)
    version = document.get("format_version") if isinstance(document, dict) else None
    if type(version) is not int or version not in _WEIGHTS_FILES:
        raise EntryError(f"{where} has format_version {reprlib.repr(version)}; this micronet-kit reads "
                         f"versions {', '.join(map(str, _WEIGHTS_FILES))} — use the micronet-kit version that "
                         "wrote it")
    missing = [key for key in ("model", "weights", "config", "compression_state") if key not in document]
    if missing:
        raise EntryError(f"{where} lacks {', '.join(missing)}; re-export the run")
    _refuse_interpolation(document, where)
    _check_document(document, where)

    packed = version == PACKED_FORMAT_VERSION
    weights = directory / _WEIGHTS_FILES[version]
    if not os.path.lexists(weights):
        raise EntryError(f"{weights} is missing; the entry is incomplete — re-export the run")
    data = _read_packed(weights, top) if packed else _read_safetensors(weights, top)
    actual, recorded = hashlib.sha256(data).hexdigest(), document["weights"]["sha256"]
    if actual != recorded:
        raise EntryError(f"{weights} has sha256 {actual[:16]}…, entry.json records {recorded[:16]}…: "
                         "the weights were changed after export")
    if packed:
        state_dict = unpack_state(data, document["weights"].get("tensors"), weights)
    else:
        try:
            state_dict = load(data)
        except SafetensorError as err:
            raise EntryError(f"{weights} is a damaged safetensors file ({err})") from None

    config = document.pop("config")
    compression_state = document.pop("compression_state")
    return Entry(config=config, compression_state=compression_state, state_dict=state_dict, meta=document)


def build_model_from_entry(entry: Entry) -> nn.Module:
    """The entry's model: registry architecture + compression structure + the stored weights (strict), in eval mode.

    Refused with :class:`EntryError` before any tensor of the model's size is allocated: keyword arguments the
    model does not take or that read files (``models.check_model_kwargs``), an architecture that does not
    build or has more than :data:`MAX_MODULES` modules, a compression state out of range or naming other layers
    (``compress.check_compression_state``), and a tensor the weights file lacks or holds in another shape.
    Then, after loading: keys the model does not have, and input quantizers never calibrated.
    """
    from compress import apply_compression_state, check_restored
    from models import ModelArgumentError, UnknownModelError, check_model_kwargs, create_model

    spec = entry.meta["model"]
    name, num_classes, kwargs = spec["name"], spec["num_classes"], spec.get("kwargs", {})
    try:
        check_model_kwargs(name, kwargs, num_classes)
    except (UnknownModelError, ModelArgumentError) as err:
        raise EntryError(f"entry.json's model: {err}; re-export the run") from None
    _check_architecture(_skeleton(name, num_classes, kwargs), entry)
    if entry.meta["weights"]["file"] == PACKED_FILE:
        check_declared_widths(entry.meta["weights"]["tensors"], entry.compression_state)
    model = create_model(name, num_classes=num_classes, **kwargs)
    apply_compression_state(model, entry.compression_state)  # checked on the skeleton already
    try:
        result = model.load_state_dict(entry.state_dict, strict=False)
    except RuntimeError as err:  # dtype / shape problems; torch's message spans many lines
        first = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
        raise EntryError(f"the weights do not fit the model rebuilt from entry.json: {first}") from None
    if result.missing_keys or result.unexpected_keys:
        raise EntryError("the weights do not fit the model rebuilt from entry.json: "
                         f"missing {result.missing_keys[:5]}, unexpected {reprlib.repr(result.unexpected_keys)}")
    try:
        check_restored(model)
    except ValueError as err:
        raise EntryError(f"{err}; re-export the entry of a finished run") from None
    return model.eval()


def _skeleton(name: str, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    """The registry architecture on the ``meta`` device (shapes, no memory), with at most :data:`MAX_MODULES`
    modules (counted as they are created, so an argument that multiplies the depth stops early)."""
    from torch.nn.modules.module import register_module_module_registration_hook

    from models import create_model

    created = 0

    def count(*_: Any) -> None:
        nonlocal created
        created += 1
        if created > MAX_MODULES:
            raise EntryError(f"model {name} with entry.json's arguments {reprlib.repr(kwargs)} has more than "
                             f"{MAX_MODULES:,} modules, the limit for an entry; re-export the run")

    handle = register_module_module_registration_hook(count)
    try:
        with torch.device("meta"):
            return create_model(name, num_classes=num_classes, **kwargs)
    except EntryError:
        raise
    except Exception as err:  # the model function (timm's builders too) runs on the entry's arguments: any failure
        reason = str(err).splitlines()[0] if str(err) else ""
        raise EntryError(f"model {name} cannot be built with entry.json's arguments {reprlib.repr(kwargs)} "
                         f"({type(err).__name__}: {reason[:200]}); re-export the run") from None
    finally:
        handle.remove()


def _check_architecture(skeleton: nn.Module, entry: Entry) -> None:
    """The compression state fits ``skeleton``, and every tensor of ``skeleton`` is in the weights, same shape."""
    from compress import check_compression_state

    try:
        check_compression_state(skeleton, entry.compression_state)
    except ValueError as err:
        raise EntryError(f"entry.json's compression_state: {err}; re-export the run") from None
    state = entry.compression_state  # its quantized biases are parametrized too
    parametrized = {"weight": set(state.get("weights", {})), "bias": set(state.get("biases", {}))}
    for key, tensor in skeleton.state_dict().items():
        layer, _, leaf = key.rpartition(".")
        stored_key = f"{layer}.parametrizations.{leaf}.original" if layer in parametrized.get(leaf, ()) else key
        stored = entry.state_dict.get(stored_key)
        if stored is None or stored.shape != tensor.shape:
            found = "absent" if stored is None else list(stored.shape)
            raise EntryError(f"the weights do not fit the model rebuilt from entry.json: {stored_key} is {found} in "
                             f"{WEIGHTS_FILE}, {list(tensor.shape)} in the model; re-export the run")
