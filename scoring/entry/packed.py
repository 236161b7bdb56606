"""The packed weights format: every stored tensor at the width the scorer counts it, in ``model.packed``.

An entry's safetensors file holds every weight as a 32-bit float. A packed entry holds what an integer
accelerator would load instead:

* a quantized weight or bias (a conv / linear / embedding weight under a ``WeightQuantizer``, a conv / linear bias
  under a ``BiasQuantizer``) as its integer codes, packed densely at the quantizer's width: code ``q`` in
  ``[-(2^(b-1)-1), 2^(b-1)-1]`` is stored as the b-bit unsigned ``q + 2^(b-1)-1`` in a little-endian bit stream
  (value i in bits ``[i·b, (i+1)·b)``, least significant bit first). Its scales (one per output channel, or one
  per tensor) are a tensor of their own;
* a sparse tensor (quantized or float) as the scorer counts it: a bitmap of one bit per element (1 = nonzero), then
  its nonzeros only, whenever that is smaller than storing it dense (:func:`scoring.rules.weight_storage_bits`);
* every quantizer's scales at the width it declares to the scorer (:func:`scoring.protocol.quantizer_scales`, the
  one place widths are read): 32 bits as float32, 16 bits as IEEE half, 8 bits as the int8 exponent ``e`` of a
  power of two ``2^e``; the stored value must be exactly the scale (``compress.finalize_for_export`` rounds every
  scale to its width, which is the value the quantizer computes with);
* other float tensors (unquantized weights and biases, batch-norm statistics) as little-endian float32. Under the
  freebie the scorer counts them at 16 bits; they stay float32 anyway, since rounding them to float16 would change
  the model, so a freebie entry's file is larger than its count;
* bool tensors (quantizer flags) at 1 bit per element, integer tensors (counters) at their own width.

``model.packed`` is an 8-byte magic (:data:`MAGIC`) followed by each tensor's streams, each starting on a byte
(bitmap first, then values). The layout — each tensor's name, dtype, shape, encoding, width, nonzeros, offset and
length — is a list in entry.json (``weights.tensors``): it is what the architecture and the compression state
already imply, so it costs the weights file nothing. Loading decodes the codes back to ``q · scale`` in float32,
which the quantizer maps to exactly the fake-quantized weight the entry was evaluated with (the exporter checks
it, tensor by tensor: :func:`check_round_trip`).

Reading one is bounded and checked before anything is decoded: the layout's types and ranges, every stream's
length against what its width, count and sparsity imply, the streams contiguous and filling the file exactly (a
truncated or padded file is refused), at most :data:`MAX_DECODED_BYTES` decoded; then, decoding, every bitmap's
count against the nonzeros the layout records, every code within its width's symmetric range, unused padding bits
zero, floats finite, scales positive. Each refusal is one :class:`~scoring.entry.files.EntryError` line. Nothing is
unpickled; numpy reads the bytes.

This module may import compress/ and scoring core; the entry format (:mod:`scoring.entry.bundle`) calls it.
"""
from __future__ import annotations

import math
import reprlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from scoring.entry.files import MAX_BUNDLE_BYTES, EntryError

#: The packed weights file of an entry.
PACKED_FILE = "model.packed"
#: The first bytes of a packed weights file: its name and format version.
MAGIC = b"MNPACK\x00\x01"
#: Bytes the decoded tensors of one entry may take (what a weights file of the float format may hold).
MAX_DECODED_BYTES = MAX_BUNDLE_BYTES
#: Tensors in one layout, and dimensions of one tensor.
MAX_TENSORS, MAX_DIMS = 100_000, 8

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
           "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32, "int16": torch.int16,
           "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool}
#: numpy's little-endian type holding each dtype's bits (bfloat16 through its 16-bit pattern).
_NUMPY = {"float32": "<f4", "float64": "<f8", "float16": "<f2", "bfloat16": "<i2", "int64": "<i8", "int32": "<i4",
          "int16": "<i2", "int8": "i1", "uint8": "u1"}
_FLOATS = ("float32", "float64", "float16", "bfloat16")
#: Encodings: integer codes of a quantized weight, raw floats, bits of a bool tensor, raw integers.
CODES, FLOAT, BOOL, INT = "codes", "float", "bool", "int"
_RECORD_KEYS = {"name", "dtype", "shape", "encoding", "bits", "sparse", "nonzeros", "offset", "bytes"}
_CODE_KEYS = _RECORD_KEYS | {"scale"}
#: numpy's type of a float32 scale stored narrower, by its declared width: IEEE half, or the exponent e of 2^e.
_SCALE_FORMATS = {16: "<f2", 8: "i1"}
#: The exponents of a power-of-two scale stored in 8 bits.
_EXPONENTS = (-128, 127)
#: The tensors of a layer that a quantizer may hold as codes, each under ``parametrizations.<tensor>.original``.
_QUANTIZED_TENSORS = ("weight", "bias")


def dtype_name(dtype: torch.dtype) -> str:
    """The layout's name of a torch dtype (``torch.float32`` → ``float32``)."""
    return str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------------------------------------------------------
# Bit streams
# ------------------------------------------------------------------------------------------------------------------

def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Unsigned ``values`` (each below 2^bits) as a little-endian bit stream, padded with zero bits to a byte."""
    values = values.astype(np.uint64).reshape(-1)
    if bits == 8:
        return values.astype("<u1").tobytes()
    if bits == 16:
        return values.astype("<u2").tobytes()
    planes = (values[:, None] >> np.arange(bits, dtype=np.uint64)) & np.uint64(1)
    return np.packbits(planes.astype(np.uint8).reshape(-1), bitorder="little").tobytes()


def unpack_bits(data: bytes, offset: int, count: int, bits: int) -> np.ndarray:
    """``count`` unsigned ``bits``-bit values (int64) from the bit stream at byte ``offset`` of ``data``; ValueError
    when the stream's padding bits are not zero."""
    length = stream_bytes(count, bits)
    if bits in (8, 16):
        return np.frombuffer(data, "<u1" if bits == 8 else "<u2", count, offset).astype(np.int64)
    raw = np.frombuffer(data, np.uint8, length, offset)
    used = count * bits
    if used % 8 and raw[-1] >> (used % 8):
        raise ValueError("its padding bits are not zero")
    planes = np.unpackbits(raw, count=used, bitorder="little").reshape(count, bits)
    values = np.zeros(count, np.int64)
    for plane in range(bits):
        values |= planes[:, plane].astype(np.int64) << plane
    return values


def stream_bytes(count: int, bits: int) -> int:
    """Bytes of a stream of ``count`` values of ``bits`` bits."""
    return -(-count * bits // 8)


# ------------------------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------------------------

@dataclass
class _Code:
    """A quantized weight or bias: the key of its quantizer's scales, its width and its codes."""

    scale: str
    bits: int
    codes: torch.Tensor


def quantized_tensors(model: nn.Module) -> dict[str, _Code]:
    """The codes of every quantized weight and bias of ``model`` (a finalized entry model), by state-dict key.

    The codes are those the quantizer computes from the stored original (after a block mask, if one is kept: its
    pruned weights are exact zeros already), on the grid of the stored scales. ``EntryError`` when a quantizer is
    not frozen (its scales would follow the weights) or the codes times the stored scales do not give back the
    executed tensor exactly.
    """
    from compress import WeightQuantizer
    from compress.base import weight_layers

    found = {}
    for name, module in weight_layers(model).items():
        for tensor in _QUANTIZED_TENSORS:
            chain = list(module.parametrizations[tensor]) if parametrize.is_parametrized(module, tensor) else []
            index = next((i for i, p in enumerate(chain) if isinstance(p, WeightQuantizer)), None)  # bias ones too
            if index is not None:
                prefix = f"{name}.parametrizations.{tensor}".removeprefix(".")
                found[f"{prefix}.original"] = _Code(f"{prefix}.{index}.scale", chain[index].micronet_bits,
                                                    _codes(f"layer {name}: its {tensor}", getattr(module, tensor),
                                                           chain[index]))
    return found


def _codes(what: str, executed: torch.Tensor, quantizer: nn.Module) -> torch.Tensor:
    """The integer codes (int64) of the ``executed`` tensor on its frozen ``quantizer``'s grid of stored scales."""
    if not quantizer.is_frozen:
        raise EntryError(f"{what} quantizer is not frozen, so its scales follow the weights; pack the entry of a "
                         "finished run (compress.finalize_for_export freezes them)")
    with torch.no_grad():
        executed = executed.detach()
        step = quantizer.scale.detach().view(-1, *[1] * (executed.dim() - 1))
        codes = torch.round(executed / step)
        if not torch.equal(codes * step, executed) or codes.abs().max() > quantizer.qmax:
            raise EntryError(f"{what} is not on its quantizer's grid of stored scales; pack the entry of a finished "
                             "run (compress.finalize_for_export rounds the scales to their stored width)")
    return codes.to(torch.int64).cpu()


def pack_state(model: nn.Module) -> tuple[list[dict[str, Any]], bytes]:
    """The layout (for entry.json) and the bytes of ``model.packed`` for ``model``'s state dict."""
    codes, widths = quantized_tensors(model), scale_widths(model)
    layout, chunks, offset = [], [MAGIC], len(MAGIC)
    for name, tensor in model.state_dict().items():
        record, data = _encode(name, tensor.detach().cpu(), codes.get(name), widths.get(name))
        record.update(offset=offset, bytes=len(data))
        layout.append(record)
        chunks.append(data)
        offset += len(data)
    return layout, b"".join(chunks)


def scale_widths(model: nn.Module) -> dict[str, int]:
    """The declared width of every quantizer's stored scales, by state-dict key, as the scorer counts them
    (:func:`scoring.protocol.quantizer_scales`, the one place widths are declared)."""
    from scoring.protocol import is_quantizer, quantizer_scales

    return {f"{name}.scale" if name else "scale": quantizer_scales(module)[1]
            for name, module in model.named_modules() if is_quantizer(module) and hasattr(module, "scale")}


def _stored_width(name: str, tensor: torch.Tensor, width: int | None) -> int | None:
    """The width a float tensor is stored at: None (its dtype's) unless it is a float32 scale declared ``width``
    bits wide, stored at 16 (IEEE half) or 8 (exponent of a power of two), which must hold it exactly."""
    if width is None or width == 32 or tensor.dtype != torch.float32:
        return None
    exact = False
    if width == 16:
        exact = torch.equal(tensor.half().float(), tensor)
    elif width == 8:
        mantissa, exponent = torch.frexp(tensor)  # a power of two 2^e is 0.5 · 2^(e+1)
        exact = bool((mantissa == 0.5).all()) and torch.equal((exponent - 1).clamp(*_EXPONENTS), exponent - 1)
    if not exact:
        raise EntryError(f"tensor {name} holds scales declared {width} bits wide that are not exactly values of that "
                         "width; the packed format stores scales as float32, IEEE half (16 bits) or a power of two "
                         "2^-128..2^127 (8 bits), as compress.finalize_for_export rounds them — export the model "
                         "through it, or with --format float")
    return width


def _float_bytes(values: torch.Tensor, stored: int | None) -> bytes:
    """The little-endian bytes of float ``values`` at their stored width (:func:`_stored_width`)."""
    if stored == 16:
        return values.half().numpy().astype(_SCALE_FORMATS[16]).tobytes()
    if stored == 8:
        return (torch.frexp(values).exponent - 1).numpy().astype(_SCALE_FORMATS[8]).tobytes()
    if values.dtype == torch.bfloat16:
        values = values.view(torch.int16)
    return values.numpy().astype(_NUMPY[dtype_name(values.dtype)]).tobytes()


def _encode(name: str, tensor: torch.Tensor, code: _Code | None, width: int | None = None
            ) -> tuple[dict[str, Any], bytes]:
    """One tensor's layout record (without offset and length) and its streams; ``width``: the declared width of a
    quantizer's scales."""
    dtype = dtype_name(tensor.dtype)
    record: dict[str, Any] = {"name": name, "dtype": dtype, "shape": list(tensor.shape), "bits": None,
                              "sparse": False, "nonzeros": None}
    if dtype not in _DTYPES:
        raise EntryError(f"tensor {name} has dtype {dtype}, which the packed format does not store; keep such state "
                         f"in one of {', '.join(_DTYPES)}")
    if dtype == "bool":
        record["encoding"] = BOOL
        return record, pack_bits(tensor.reshape(-1).numpy(), 1)
    if code is None and dtype not in _FLOATS:
        record["encoding"] = INT
        return record, tensor.reshape(-1).numpy().astype(_NUMPY[dtype]).tobytes()
    if code is not None:
        record.update(encoding=CODES, bits=code.bits, scale=code.scale)
        values, bits = code.codes.reshape(-1), code.bits
    else:
        values = tensor.reshape(-1)
        record.update(encoding=FLOAT, bits=_stored_width(name, values, width))
        bits = record["bits"] or values.element_size() * 8
    nonzero = values != 0
    nonzeros = int(nonzero.sum())
    bitmap = b""
    if nonzeros * bits + values.numel() < values.numel() * bits:  # the scorer's cheaper of dense and sparse
        record.update(sparse=True, nonzeros=nonzeros)
        bitmap = pack_bits(nonzero.numpy(), 1)
        values = values[nonzero]
    if code is not None:
        return record, bitmap + pack_bits((values + (2 ** (bits - 1) - 1)).numpy(), bits)
    return record, bitmap + _float_bytes(values, record["bits"])


def check_round_trip(before: nn.Module, after: nn.Module) -> None:
    """``EntryError`` unless ``after`` (rebuilt from a packed entry) executes exactly ``before``'s weights: every
    conv / linear / embedding weight and bias as the layer uses it (the quantized ones through their quantizers) and
    every other tensor of the state dict, bit for bit."""
    from compress.base import weight_layers

    originals = set(quantized_tensors(before))
    theirs = after.state_dict()
    for key, tensor in before.state_dict().items():
        if key not in originals and not (key in theirs and torch.equal(theirs[key], tensor)):
            raise EntryError(f"the packed entry does not give back {key} exactly; this is a bug of the packed format "
                             "— export with --format float meanwhile")
    mine = weight_layers(after)
    with torch.no_grad():
        for name, layer in weight_layers(before).items():
            for tensor in _QUANTIZED_TENSORS:
                executed, rebuilt = getattr(layer, tensor, None), getattr(mine[name], tensor, None)
                if not (executed is rebuilt is None or executed is not None and rebuilt is not None
                        and torch.equal(rebuilt, executed)):
                    raise EntryError(f"the packed entry does not give back the executed {tensor} of layer {name} "
                                     "exactly; this is a bug of the packed format — export with --format float "
                                     "meanwhile")


# ------------------------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------------------------

def unpack_state(data: bytes, layout: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state dict that ``data`` (the bytes of ``path``, a ``model.packed``) holds under ``layout`` (entry.json's
    ``weights.tensors``), every check of the module docstring passed (the widths against the compression state are
    checked once that is: :func:`check_declared_widths`)."""
    check_magic(data, path)
    records = check_layout(layout, len(data), path)
    state: dict[str, torch.Tensor] = {}
    for record in sorted(records, key=lambda r: r["encoding"] == CODES):  # scales before the codes that use them
        try:
            state[record["name"]] = _decode(data, record, state)
        except ValueError as err:
            raise EntryError(f"{path}: tensor {record['name']}: {err}; the file is damaged or was not written by "
                             "`python -m scoring.export` — re-export the run") from None
    return {record["name"]: state[record["name"]] for record in records}


def check_magic(data: bytes, path: Path) -> None:
    """``data`` (the bytes of ``path``) starts as a packed weights file does: anything else (a pickle, a safetensors
    file) is refused before it is parsed."""
    if data[:len(MAGIC)] != MAGIC:
        raise EntryError(f"{path} is not a packed weights file (it starts with {data[:8]!r}, not {MAGIC!r}); "
                         "entries are never unpickled — re-export the run with `python -m scoring.export`")


def check_layout(layout: Any, size: int, path: Path) -> list[dict[str, Any]]:
    """``layout`` as checked records: types and ranges, each stream's length as its width, count and sparsity imply,
    the streams contiguous from the magic to the end of a file of ``size`` bytes, the decoded size bounded."""
    if not isinstance(layout, list) or not 0 < len(layout) <= MAX_TENSORS:
        raise EntryError(f"{path}: entry.json's weights.tensors is not a list of 1 to {MAX_TENSORS:,} tensors; "
                         "re-export the run")
    names: set[str] = set()
    offset, decoded = len(MAGIC), 0
    for record in layout:
        numel = _check_record(record, path)
        if record["name"] in names:
            raise EntryError(f"{path}: tensor {record['name']} appears twice in weights.tensors; re-export the run")
        names.add(record["name"])
        decoded += numel * _DTYPES[record["dtype"]].itemsize
        if decoded > MAX_DECODED_BYTES:
            raise EntryError(f"{path}: the tensors of weights.tensors take over {MAX_DECODED_BYTES:,} bytes decoded, "
                             "the limit of an entry; re-export the run")
        expected = _record_bytes(record, numel)
        if record["bytes"] != expected:
            raise EntryError(f"{path}: tensor {record['name']}: {_describe_stream(record, numel)} take {expected:,} "
                             f"bytes, the layout says {record['bytes']:,}: its width disagrees with its stream — "
                             "re-export the run")
        if record["offset"] != offset:
            raise EntryError(f"{path}: tensor {record['name']} starts at byte {record['offset']:,}, not at "
                             f"{offset:,} where the previous stream ends; re-export the run")
        offset += expected
    if offset != size:
        problem = "truncated" if offset > size else "longer than its streams"
        raise EntryError(f"{path} is {size:,} bytes, its layout needs {offset:,}: the file is {problem} — get an "
                         "intact copy of the bundle or re-export it")
    return layout


def _is_int(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _check_record(record: Any, path: Path) -> int:
    """The element count of one layout record, after checking its fields' types and ranges."""
    name = record.get("name") if isinstance(record, dict) else None
    where = f"{path}: tensor {reprlib.repr(name)}"
    if not isinstance(name, str) or not name or set(record) != (_CODE_KEYS if record.get("encoding") == CODES
                                                                else _RECORD_KEYS):
        raise EntryError(f"{where}: a layout record has exactly the fields {', '.join(sorted(_RECORD_KEYS))} (and "
                         "scale for codes); re-export the run")
    shape, dtype, encoding = record["shape"], record["dtype"], record["encoding"]
    if not (isinstance(shape, list) and len(shape) <= MAX_DIMS and all(_is_int(n, 0, 2**40) for n in shape)):
        raise EntryError(f"{where}: shape {reprlib.repr(shape)} is not a list of at most {MAX_DIMS} sizes; re-export")
    numel = math.prod(shape)
    allowed = {CODES: ("float32",), FLOAT: _FLOATS, BOOL: ("bool",),
               INT: ("int64", "int32", "int16", "int8", "uint8")}.get(encoding, ())
    if dtype not in allowed:
        raise EntryError(f"{where}: encoding {reprlib.repr(encoding)} of dtype {reprlib.repr(dtype)} is not one the "
                         f"packed format writes ({CODES} of float32, {FLOAT}, {BOOL}, {INT}); re-export the run")
    bits_ok = _is_int(record["bits"], 2, 16) and isinstance(record.get("scale"), str) if encoding == CODES \
        else record["bits"] is None or encoding == FLOAT and dtype == "float32" and record["bits"] in _SCALE_FORMATS
    sparse_ok = record["sparse"] is False and record["nonzeros"] is None or (
        record["sparse"] is True and encoding in (CODES, FLOAT) and _is_int(record["nonzeros"], 0, numel))
    if not (bits_ok and sparse_ok and _is_int(record["offset"], 0, 2**62) and _is_int(record["bytes"], 0, 2**62)):
        raise EntryError(f"{where}: bits {reprlib.repr(record['bits'])}, sparse {reprlib.repr(record['sparse'])}, "
                         f"nonzeros {reprlib.repr(record['nonzeros'])}, offset or bytes out of range for encoding "
                         f"{encoding} (codes: bits 2..16 and a scale; float32: none, 16 or 8; sparse: 0 <= nonzeros <= "
                         f"{numel:,}); re-export")
    return numel


def _value_bits(record: Mapping[str, Any]) -> int:
    if record["encoding"] in (CODES, FLOAT) and record["bits"] is not None:
        return record["bits"]
    return 1 if record["encoding"] == BOOL else _DTYPES[record["dtype"]].itemsize * 8


def _record_bytes(record: Mapping[str, Any], numel: int) -> int:
    """Bytes of a record's streams: the bitmap (sparse), then its values at their width."""
    if record["sparse"]:
        return stream_bytes(numel, 1) + stream_bytes(record["nonzeros"], _value_bits(record))
    return stream_bytes(numel, _value_bits(record))


def _describe_stream(record: Mapping[str, Any], numel: int) -> str:
    count = record["nonzeros"] if record["sparse"] else numel
    bitmap = f"a bitmap of {numel:,} bits and " if record["sparse"] else ""
    return f"{bitmap}{count:,} values of {_value_bits(record)} bits"


def check_declared_widths(layout: Sequence[Mapping[str, Any]], compression_state: Mapping[str, Any]) -> None:
    """The codes of every quantized weight and bias of a checked ``layout`` are at the width the (checked)
    compression state declares for its layer's quantizer of that tensor, with that quantizer's scales: the file
    stores what the scorer counts."""
    for record in layout:
        if record["encoding"] == CODES:
            _check_declared_width(record, compression_state, Path(PACKED_FILE))


def _check_declared_width(record: Mapping[str, Any], compression_state: Any, path: Path) -> None:
    """The codes of a quantized tensor are at the width its layer's quantizer declares, with its scales."""
    name = record["name"]
    tensor = next((t for t in _QUANTIZED_TENSORS if f".{name}".endswith(f".parametrizations.{t}.original")), None)
    prefix = name.removesuffix(".original")
    layer = prefix.removesuffix(f"parametrizations.{tensor}").removesuffix(".")
    index, declared = (None, None) if tensor is None else _declared_quantizer(compression_state, layer, tensor)
    if declared != record["bits"] or record["scale"] != f"{prefix}.{index}.scale":
        raise EntryError(f"{path}: tensor {name} holds {record['bits']}-bit codes with scales {record['scale']}, but "
                         f"the compression state declares the {tensor or 'weight'} of layer {layer!r} {declared}-bit: "
                         "its width disagrees with the declared one — re-export the run")


def _declared_quantizer(compression_state: Any, layer: str, tensor: str) -> tuple[int | None, Any]:
    """(position in its chain, bits) of the quantizer the compression state declares on ``tensor`` (weight or bias)
    of ``layer``; (None, None) when it declares none. A bias has one quantizer, not a chain."""
    section, kind = ("weights", "weight_quantizer") if tensor == "weight" else ("biases", "bias_quantizer")
    described = compression_state.get(section) if isinstance(compression_state, dict) else None
    described = described.get(layer) if isinstance(described, dict) else None
    chain = described if tensor == "weight" else [described]
    chain = chain if isinstance(chain, list) else []
    index = next((i for i, p in enumerate(chain) if isinstance(p, dict) and p.get("kind") == kind), None)
    return index, None if index is None else chain[index].get("bits")


def _decode(data: bytes, record: Mapping[str, Any], decoded: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """One tensor from its streams (ValueError names what is wrong)."""
    shape, dtype, offset = record["shape"], record["dtype"], record["offset"]
    numel = math.prod(shape)
    if record["encoding"] == BOOL:
        return torch.from_numpy(unpack_bits(data, offset, numel, 1).astype(bool)).reshape(shape)
    if record["encoding"] == INT:
        return torch.from_numpy(np.frombuffer(data, _NUMPY[dtype], numel, offset).copy()).reshape(shape)
    bitmap, count = None, numel
    if record["sparse"]:
        bitmap = unpack_bits(data, offset, numel, 1).astype(bool)
        if int(bitmap.sum()) != record["nonzeros"]:
            raise ValueError(f"its bitmap marks {int(bitmap.sum()):,} nonzeros, the layout says {record['nonzeros']:,}")
        offset, count = offset + stream_bytes(numel, 1), record["nonzeros"]
    if record["encoding"] == CODES:
        values = _signed_codes(data, offset, count, record["bits"])
    else:
        values = _float_values(data, offset, count, dtype, record["bits"])
        finite = torch.from_numpy(values).view(_DTYPES[dtype]).isfinite()
        if not bool(finite.all()):
            raise ValueError("it holds NaN or infinite values, which a finished run never stores")
    if bitmap is not None:
        if not values.all():
            raise ValueError("it stores a zero among its nonzeros")
        dense = np.zeros(numel, values.dtype)
        dense[bitmap] = values
        values = dense
    tensor = torch.from_numpy(values)
    if record["encoding"] == FLOAT:
        return tensor.view(_DTYPES[dtype]).reshape(shape)
    return tensor.to(torch.float32).reshape(shape) * _scale(record, decoded).view(-1, *[1] * (len(shape) - 1))


def _float_values(data: bytes, offset: int, count: int, dtype: str, stored: int | None) -> np.ndarray:
    """``count`` floats of ``dtype`` (numpy's type of its bits) stored at width ``stored`` (:func:`_stored_width`)."""
    if stored == 8:  # exponents of powers of two: exact in float32, subnormals included
        exponents = np.frombuffer(data, _SCALE_FORMATS[8], count, offset).astype(np.int32)
        return np.ldexp(np.float32(1), exponents).astype(_NUMPY[dtype])
    return np.frombuffer(data, _NUMPY[dtype] if stored is None else _SCALE_FORMATS[stored], count, offset
                         ).astype(_NUMPY[dtype])


def _signed_codes(data: bytes, offset: int, count: int, bits: int) -> np.ndarray:
    """Signed codes of a symmetric ``bits``-bit grid from their offset-binary stream, range-checked."""
    top = 2 ** (bits - 1) - 1
    stored = unpack_bits(data, offset, count, bits)
    if count and int(stored.max()) > 2 * top:
        raise ValueError(f"it holds the {bits}-bit pattern {int(stored.max())}, outside the symmetric grid "
                         f"[-{top}, {top}] (patterns 0..{2 * top})")
    return stored - top


def _scale(record: Mapping[str, Any], decoded: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The scales a quantized tensor's codes are multiplied by: float32, one per output (channel) or one for the
    tensor, finite, > 0."""
    scale, rows = decoded.get(record["scale"]), record["shape"][0] if record["shape"] else 0
    if scale is None or scale.dtype != torch.float32 or tuple(scale.shape) not in ((rows,), (1,)) \
            or not bool((scale > 0).all()):
        raise ValueError(f"its scales {record['scale']} are not {rows} (one per output) or 1 (per tensor) positive "
                         "float32 values of this file")
    return scale


# ------------------------------------------------------------------------------------------------------------------
# Counted bytes against bytes on disk
# ------------------------------------------------------------------------------------------------------------------

#: What each stored tensor is, for the comparison with the count (in the order they are printed).
ROLES = {
    "quantized": "quantized weights: codes at their widths, bitmaps of the sparse ones",
    "float_weights": "float weights (unquantized conv / linear / embedding weights)",
    "biases": "biases (quantized ones as codes at their widths)",
    "scales": "quantization scales, at their declared widths",
    "batch_norm": "batch norm, unfolded: weight, bias, running mean and variance (the scorer folds it into the "
                  "layer before: one bias per channel)",
    "other_floats": "other float tensors (normalization weights, tables)",
    "state": "flags, counters and observer ranges (not needed at inference: not counted)",
}


@dataclass(frozen=True)
class StorageSummary:
    """The parameter bytes the scorer counts beside the bytes of the packed weights file, and where they differ."""

    #: The count's parameter bits / 8.
    counted_bytes: float
    #: Size of ``model.packed``.
    packed_bytes: int
    #: The magic at the start of the file.
    header_bytes: int
    #: Padding of every stream to a whole byte.
    alignment_bytes: float
    #: Bytes of the streams by :data:`ROLES` key (their padding included).
    roles: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """As verify's JSON writes it."""
        return {"counted_bytes": self.counted_bytes, "packed_bytes": self.packed_bytes,
                "difference_bytes": self.packed_bytes - self.counted_bytes, "header_bytes": self.header_bytes,
                "alignment_bytes": self.alignment_bytes, "by_role": dict(self.roles)}

    def describe(self) -> str:
        """Counted and on-disk bytes side by side, then what the file holds, role by role."""
        difference = self.packed_bytes - self.counted_bytes
        lines = [f"parameters counted {self.counted_bytes:,.0f} bytes (param_bits / 8); {PACKED_FILE} "
                 f"{self.packed_bytes:,} bytes on disk: {difference:+,.0f} bytes "
                 f"({difference / self.counted_bytes:+.2%})" if self.counted_bytes else
                 f"{PACKED_FILE} {self.packed_bytes:,} bytes on disk"]
        lines += [f"  {self.roles[key]:>12,} B  {text}" for key, text in ROLES.items() if self.roles.get(key)]
        lines.append(f"  {self.header_bytes:>12,} B  header (magic and format version)")
        lines.append(f"  {self.alignment_bytes:>12,.1f} B  alignment (each stream padded to a whole byte; included "
                     "above)")
        return "\n".join(lines)


def storage_summary(model: nn.Module, layout: Sequence[Mapping[str, Any]], packed_bytes: int,
                    counted_bits: int) -> StorageSummary:
    """The :class:`StorageSummary` of a packed entry: its ``layout`` (checked), the size of its file and the
    parameter bits its count gives; ``model`` (the entry's) says what each tensor is."""
    roles: dict[str, int] = {}
    alignment = 0.0
    for record in layout:
        numel = math.prod(record["shape"])
        count = record["nonzeros"] if record["sparse"] else numel
        alignment += record["bytes"] - (count * _value_bits(record) + (numel if record["sparse"] else 0)) / 8
        role = _role(model, record)
        roles[role] = roles.get(role, 0) + record["bytes"]
    return StorageSummary(counted_bits / 8, packed_bytes, len(MAGIC), alignment, roles)


def _role(model: nn.Module, record: Mapping[str, Any]) -> str:
    """The :data:`ROLES` key of one stored tensor."""
    from compress.base import WEIGHT_LAYER_TYPES

    if record["encoding"] == CODES:
        return "biases" if record["name"].endswith("parametrizations.bias.original") else "quantized"
    if record["encoding"] != FLOAT:
        return "state"
    owner_name, _, leaf = record["name"].replace(".parametrizations.weight.original", ".weight").rpartition(".")
    try:
        owner = model.get_submodule(owner_name)
    except AttributeError:
        return "other_floats"
    if isinstance(owner, nn.modules.batchnorm._BatchNorm):
        return "batch_norm"
    if getattr(owner, "micronet_bits", None) is not None:
        return "scales" if leaf == "scale" else "state"
    if isinstance(owner, WEIGHT_LAYER_TYPES) and leaf == "weight":
        return "float_weights"
    return "biases" if leaf == "bias" else "other_floats"


def weights_storage(model: nn.Module, weights: Mapping[str, Any], size: int, counted_bits: int) -> dict[str, Any]:
    """Verify's ``storage``: the counted parameter bytes beside the bytes of the entry's weights file of ``size``
    bytes (``weights``: entry.json's ``weights``); ``packed_bytes`` is None for a float (safetensors) entry."""
    if weights.get("file") != PACKED_FILE:
        return {"weights_file": weights.get("file"), "weights_file_bytes": size, "counted_bytes": counted_bits / 8,
                "packed_bytes": None}
    summary = storage_summary(model, weights["tensors"], size, counted_bits)
    return {"weights_file": PACKED_FILE, "weights_file_bytes": size, **summary.to_dict()}
