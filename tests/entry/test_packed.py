"""The packed entry format (scoring/entry/packed.py): dense sub-byte streams, bitmaps of sparse tensors, an exact
rebuild, the counted bytes beside the bytes on disk, and hostile packed files refused in one line each."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from compress import WeightQuantizer, finalize_for_export
from compress.base import find_parametrization, weight_layers
from scoring.entry import ENTRY_JSON, EntryError, build_model_from_entry, load_entry, save_entry, sha256_file
from scoring.entry.packed import MAGIC, PACKED_FILE, pack_bits, pack_state, storage_summary, unpack_bits
from scoring.entry.verify import recount_entry

from .conftest import quantized_digits


@pytest.fixture(scope="module")
def packed_entry(tmp_path_factory: pytest.TempPathFactory, compressed_model, run_config) -> Path:
    """The shared digits model (pruned to half, 4-bit QAT; first and last layer at 8 bits) saved packed."""
    return save_entry(tmp_path_factory.mktemp("packed") / "entry", compressed_model, config=run_config, packed=True)


def layout_of(entry: Path) -> list[dict]:
    return json.loads((entry / ENTRY_JSON).read_text())["weights"]["tensors"]


def record(entry: Path, name: str) -> dict:
    return next(r for r in layout_of(entry) if r["name"] == name)


def test_sub_byte_values_are_packed_densely_least_significant_bit_first():
    # 3 bits each: 1 = 100, 2 = 010, 3 = 110 (LSB first) → bits 100 010 110 | 0000000 → bytes 0b11010001, 0b0.
    assert pack_bits(np.array([1, 2, 3]), 3) == bytes([0b11010001, 0])
    assert unpack_bits(bytes([0b11010001, 0]), 0, 3, 3).tolist() == [1, 2, 3]
    # 4 bits: two values per byte, the first in the low nibble.
    assert pack_bits(np.array([0xA, 0x5]), 4) == bytes([0x5A])


def test_a_packed_entry_rebuilds_the_fake_quantized_weights_bit_for_bit(packed_entry, compressed_model, run_config,
                                                                        tmp_path):
    float_entry = save_entry(tmp_path / "float", compressed_model, config=run_config)
    packed = build_model_from_entry(load_entry(packed_entry))
    reference = build_model_from_entry(load_entry(float_entry))
    mine = weight_layers(packed)
    with torch.no_grad():
        for name, layer in weight_layers(reference).items():
            assert torch.equal(mine[name].weight, layer.weight), name
        inputs = torch.randn(8, 1, 8, 8)
        assert torch.equal(packed(inputs), reference(inputs))


def test_each_quantized_conv_stores_the_bits_the_scorer_counts(packed_entry):
    """Per conv layer, the count's parameter bits are its codes (and bitmap) plus its scales at 32 bits: one per
    output channel and the input quantizer's one. The stream holds the same bits, padded to a whole byte."""
    layers = {row["name"]: row for row in recount_entry(load_entry(packed_entry), device="cpu")["layers"]}
    for name in ("conv1.0", "conv2.0", "conv3.0"):
        stream = record(packed_entry, f"{name}.parametrizations.weight.original")
        channels = stream["shape"][0]
        counted_weight_bits = layers[name]["param_bits"] - 32 * (channels + 1)
        assert 0 <= 8 * stream["bytes"] - counted_weight_bits < 8, name
    # conv2.0 (4 bits, pruned to half): a bitmap of 64·32·3·3 = 18,432 bits, then 4 bits per nonzero.
    conv2 = record(packed_entry, "conv2.0.parametrizations.weight.original")
    assert conv2["bits"] == 4 and conv2["sparse"]
    assert conv2["bytes"] == 18_432 // 8 + math.ceil(conv2["nonzeros"] * 4 / 8)


def test_the_bytes_on_disk_differ_from_the_count_by_what_the_summary_names(packed_entry):
    """model.packed = counted bytes + the batch norms stored unfolded (4 float32 values per channel where the
    count folds them into 1 bias) + flags and counters the count leaves out + the 8-byte magic + padding."""
    entry = load_entry(packed_entry)
    model = build_model_from_entry(entry)
    counted_bits = recount_entry(entry, device="cpu")["param_bits"]
    size = (packed_entry / PACKED_FILE).stat().st_size
    summary = storage_summary(model, layout_of(packed_entry), size, counted_bits)
    channels = 32 + 64 + 128  # the three batch norms of digits_cnn
    assert summary.roles["batch_norm"] == channels * 4 * 4
    codes_padding = sum(r["bytes"] - ((r["nonzeros"] * r["bits"] + math.prod(r["shape"])) if r["sparse"] else
                                      math.prod(r["shape"]) * r["bits"]) / 8
                        for r in layout_of(packed_entry) if r["encoding"] == "codes")
    assert size - summary.counted_bytes == pytest.approx(
        channels * 4 * (4 - 1) + summary.roles["state"] + len(MAGIC) + codes_padding, abs=1e-9)
    assert size <= 1.02 * summary.counted_bytes + 4096
    assert "bytes on disk" in summary.describe() and "batch norm, unfolded" in summary.describe()


NARROW = {"per_tensor_16": {"scale": "per_tensor", "scale_bits": 16, "bias_bits": 16, "other_ops": "fp16"},
          "per_channel_8": {"scale_bits": 8, "bias_bits": 8}}


@pytest.mark.parametrize("quantize", NARROW.values(), ids=NARROW.keys())
def test_narrow_scales_and_quantized_biases_are_stored_at_their_widths_and_rebuild_bit_for_bit(quantize, run_config,
                                                                                               tmp_path):
    """Scales at their declared width (2 bytes a half, 1 byte an exponent), the classifier's bias as codes at
    bias_bits with its one scale; the rebuilt model computes the same logits bit for bit."""
    model = quantized_digits(**quantize)
    entry = save_entry(tmp_path / "entry", model, config={**run_config, "compress": {"stages": [quantize]}},
                       packed=True)
    scale_bytes, channels = quantize["scale_bits"] // 8, 1 if quantize.get("scale") == "per_tensor" else 64
    assert record(entry, "conv2.0.parametrizations.weight.0.scale")["bytes"] == channels * scale_bytes
    assert record(entry, "conv2.0.input_quantizer.scale")["bytes"] == scale_bytes
    bias = record(entry, "fc.parametrizations.bias.original")
    assert (bias["encoding"], bias["bits"], bias["scale"]) == ("codes", quantize["bias_bits"],
                                                               "fc.parametrizations.bias.0.scale")
    assert record(entry, "fc.parametrizations.bias.0.scale")["bytes"] == scale_bytes  # one per tensor
    rebuilt = build_model_from_entry(load_entry(entry))
    inputs = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(rebuilt(inputs), model(inputs))
        assert torch.equal(rebuilt.fc.bias, model.fc.bias) and bool(model.fc.bias.ne(0).any())


@pytest.mark.parametrize("scale_bits, learned, stored, stored_bytes", [
    (16, 1 / 3, 0.333251953125, bytes([0x55, 0x35])),  # IEEE half 0x3555 = 1.0101010101₂ · 2^-2, little-endian
    (8, 0.3, 0.25, bytes([0xFE])),  # log2 0.3 = -1.74 → 2^-2, the exponent -2 as int8 0xFE
])
def test_export_stores_the_scale_rounded_to_its_width_which_the_model_computes_with(scale_bits, learned, stored,
                                                                                    stored_bytes, run_config, tmp_path):
    model = quantized_digits(scale="per_tensor", scale_bits=scale_bits)
    quantizer = find_parametrization(model.fc, WeightQuantizer)
    with torch.no_grad():
        quantizer.scale.fill_(learned)
        executed = model.fc.weight.clone()
    entry = save_entry(tmp_path / "entry", model, config=run_config, packed=True)
    scale = record(entry, "fc.parametrizations.weight.0.scale")
    assert (entry / PACKED_FILE).read_bytes()[scale["offset"]:scale["offset"] + scale["bytes"]] == stored_bytes
    rebuilt = build_model_from_entry(load_entry(entry)).fc
    assert find_parametrization(rebuilt, WeightQuantizer).scale.item() == stored
    assert torch.equal(rebuilt.weight, executed)


def test_bias_codes_at_another_width_than_the_compression_state_declares_are_refused(run_config, tmp_path):
    entry = save_entry(tmp_path / "entry", quantized_digits(bias_bits=8), config=run_config, packed=True)
    document = json.loads((entry / ENTRY_JSON).read_text())
    document["compression_state"]["biases"]["fc"]["bits"] = 16  # the stream holds 8-bit codes
    (entry / ENTRY_JSON).write_text(json.dumps(document))
    with pytest.raises(EntryError, match=r"tensor fc\.parametrizations\.bias\.original holds 8-bit codes with scales "
                                         r"fc\.parametrizations\.bias\.0\.scale, but the compression state declares "
                                         r"the bias of layer 'fc' 16-bit"):
        build_model_from_entry(load_entry(entry))


def test_a_scale_that_its_declared_width_cannot_hold_is_refused(run_config, tmp_path):
    """A quantizer that declares 16-bit scales but computes with another value (not rounded by it) is not packed."""
    model = quantized_digits()
    finalize_for_export(model)
    quantizer = model.conv2[0].input_quantizer
    quantizer.micronet_scale_bits = 16  # declared after the fact: its scale is not rounded to a half
    with torch.no_grad():
        quantizer.scale.fill_(1 / 3)
    with pytest.raises(EntryError, match=r"conv2\.0\.input_quantizer\.scale holds scales declared 16 bits wide that "
                                         "are not exactly values of that width"):
        pack_state(model)


# --- hostile packed files: each edit is resealed (entry.json records the new sha256), and refused in one line ---

def reseal(entry: Path, edit_bytes: Callable[[bytearray, list[dict]], None]) -> None:
    """Apply ``edit_bytes`` to model.packed and its layout, then record the file's new sha256 in entry.json."""
    data, document = bytearray((entry / PACKED_FILE).read_bytes()), json.loads((entry / ENTRY_JSON).read_text())
    edit_bytes(data, document["weights"]["tensors"])
    (entry / PACKED_FILE).write_bytes(bytes(data))
    document["weights"]["sha256"] = sha256_file(entry / PACKED_FILE)
    (entry / ENTRY_JSON).write_text(json.dumps(document))


def by_name(layout: list[dict], name: str) -> dict:
    return next(r for r in layout if r["name"] == name)


CONV2 = "conv2.0.parametrizations.weight.original"


def truncate(data: bytearray, layout: list[dict]) -> None:
    del data[-10:]


def narrower_width(data: bytearray, layout: list[dict]) -> None:
    by_name(layout, CONV2)["bits"] = 3  # the stream keeps its 4-bit length


def extra_bitmap_bit(data: bytearray, layout: list[dict]) -> None:
    """Mark one more element of conv2.0's bitmap as nonzero than its layout counts."""
    start = by_name(layout, CONV2)["offset"]
    bitmap = np.unpackbits(np.frombuffer(bytes(data[start:start + 18_432 // 8]), np.uint8), bitorder="little")
    zero = int(np.flatnonzero(bitmap == 0)[0])
    data[start + zero // 8] |= 1 << (zero % 8)


def code_off_the_grid(data: bytearray, layout: list[dict]) -> None:
    """The first 4-bit value of conv2.0 becomes 15: the symmetric grid [-7, 7] stores patterns 0..14 only."""
    r = by_name(layout, CONV2)
    data[r["offset"] + 18_432 // 8] |= 0x0F


def nan_scale(data: bytearray, layout: list[dict]) -> None:
    r = by_name(layout, "conv2.0.parametrizations.weight.0.scale")
    data[r["offset"]:r["offset"] + 4] = np.array([np.nan], "<f4").tobytes()


def negative_scale(data: bytearray, layout: list[dict]) -> None:
    r = by_name(layout, "conv2.0.parametrizations.weight.0.scale")
    data[r["offset"]:r["offset"] + 4] = np.array([-1.0], "<f4").tobytes()


def overlapping_streams(data: bytearray, layout: list[dict]) -> None:
    layout[1]["offset"] -= 1


def pickle_instead(data: bytearray, layout: list[dict]) -> None:
    data[:8] = b"\x80\x04\x95\x00\x00\x00\x00\x00"


@pytest.mark.parametrize("edit, pattern", [
    (truncate, r"the file is truncated"),
    (narrower_width, r"a bitmap of 18,432 bits and [\d,]+ values of 3 bits take [\d,]+ bytes, the layout says "
                     r"[\d,]+: its width disagrees with its stream"),
    (extra_bitmap_bit, r"its bitmap marks [\d,]+ nonzeros, the layout says [\d,]+"),
    (code_off_the_grid, r"the 4-bit pattern 15, outside the symmetric grid \[-7, 7\]"),
    (nan_scale, r"holds NaN or infinite values"),
    (negative_scale, r"its scales conv2\.0\.parametrizations\.weight\.0\.scale are not 64 \(one per output\) or 1 "
                     r"\(per tensor\) positive float32 values"),
    (overlapping_streams, r"starts at byte [\d,]+, not at [\d,]+ where the previous stream ends"),
    (pickle_instead, r"is not a packed weights file"),
], ids=lambda v: getattr(v, "__name__", None))
def test_a_hostile_packed_file_is_refused_in_one_line(packed_entry, tmp_path, edit, pattern):
    entry = tmp_path / "entry"
    shutil.copytree(packed_entry, entry)
    reseal(entry, edit)
    with pytest.raises(EntryError, match=pattern) as refused:
        build_model_from_entry(load_entry(entry))
    assert "\n" not in str(refused.value)
