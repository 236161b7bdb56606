"""The scorer sees compression exactly: one layer's bits or sparsity change the counts as the rules say."""
from __future__ import annotations

from fractions import Fraction

import pytest
import torch
import torch.nn as nn

from compress import PruneTechnique, QuantizeTechnique, WeightMask, compression_state, finalize_for_export
from compress.base import find_parametrization, original_weight
from models import create_model
from scoring import count_model
from scoring.oplist import Conv2D, FullyConnected, count_oplist


def quantize(model: nn.Module, layer_bits: dict | None = None) -> None:
    technique = QuantizeTechnique({"method": "minmax", "weight_bits": 8, "activation_bits": 8,
                                   "layer_bits": layer_bits or {}}, stage_epochs=1, where="quantize")
    technique.configure(steps_per_epoch=1)
    technique.attach(model)


@pytest.fixture
def setup():
    """digits_cnn at 8 bits everywhere; conv3's weights are ±1..7 (never zero at 4 or 8 bits); inputs calibrated."""
    torch.manual_seed(0)
    model = create_model("digits_cnn", num_classes=10)
    with torch.no_grad():
        weight = model.conv3[0].weight
        weight.copy_(torch.randint(1, 8, weight.shape) * (torch.randint(0, 2, weight.shape) * 2 - 1))
        weight[:, 0, 0, 0] = 7
    quantize(model)
    inputs = torch.randn(16, 1, 8, 8)
    model.train()
    model(inputs)  # calibrates the input quantizers
    outputs = {"n": model.conv3[0].out_channels * 4 * 4}  # conv3 runs after the 2x2 max-pool: 4x4 outputs
    return model, inputs, outputs


def counts(model: nn.Module, inputs: torch.Tensor):
    count = count_model(model, inputs)
    return count, next(layer for layer in count.layers if layer["name"] == "conv3.0")


def test_one_layer_weight_bits(setup):
    model, inputs, _ = setup
    before, layer_before = counts(model, inputs)
    assert not before.freebie and (layer_before["weight_bits"], layer_before["input_bits"]) == (8, 8)
    quantize(model, {"conv3.0": {"weight": 4, "activation": 8}})
    after, layer_after = counts(model, inputs)
    assert layer_after["weight_bits"] == 4 and layer_after["sparsity"] == 0
    numel = model.conv3[0].weight.numel()
    assert after.param_bits - before.param_bits == -4 * numel  # b bits per weight, scales unchanged
    assert after.params - before.params == pytest.approx(-4 * numel / 32)
    # the multiplies' width is their widest input: still the 8-bit activations
    assert (after.mults, after.adds, after.ops) == (before.mults, before.adds, before.ops)


def test_one_layer_input_bits(setup):
    model, inputs, _ = setup
    before, layer_before = counts(model, inputs)
    quantize(model, {"conv3.0": {"weight": 8, "activation": 16}})
    model.train()
    model(inputs)  # calibrate the new 16-bit input quantizer
    after, layer_after = counts(model, inputs)
    assert layer_after["input_bits"] == 16
    assert after.param_bits == before.param_bits
    assert (after.mults, after.adds) == (before.mults, before.adds)
    assert after.ops - before.ops == pytest.approx(layer_before["mults"] * (16 - 8) / 32)


def test_one_layer_sparsity(setup):
    model, inputs, outputs = setup
    before, layer_before = counts(model, inputs)
    prune = PruneTechnique({"final_sparsity": 0.5, "layers": ["conv3.0"], "first_last_sparsity": None,
                            "unit": "step", "start": 0, "end": 0, "frequency": 1}, stage_epochs=1, where="prune")
    prune.configure(steps_per_epoch=1)
    prune.attach(model)
    prune.on_step_end(model, 0)
    after, layer_after = counts(model, inputs)
    conv = model.conv3[0]
    numel, per_output, n = conv.weight.numel(), original_weight(conv)[0].numel(), outputs["n"]
    assert layer_after["sparsity"] == 0.5 and layer_after["weight_bits"] == 8
    # the mask goes before the existing quantizer, whose tagged output is what the conv consumes
    assert [p["kind"] for p in compression_state(model)["weights"]["conv3.0"]] == ["mask", "weight_quantizer"]
    # params: nonzeros x 8 bits + a 1-bit mask over the full tensor
    assert after.param_bits - before.param_bits == -(numel // 2) * 8 + numel
    # conv: L = weights per output x density; mults L*N, adds (L-1)*N, at 8 and 32 bits
    dense_l, sparse_l = per_output, per_output // 2
    assert layer_before["mults"] == dense_l * n and layer_after["mults"] == sparse_l * n
    assert after.mults - before.mults == (sparse_l - dense_l) * n
    assert after.adds - before.adds == (sparse_l - dense_l) * n
    assert after.ops - before.ops == pytest.approx((sparse_l - dense_l) * n * (8 / 32 + 1))


def prune_now(model: nn.Module, **cfg) -> None:
    """Prune every conv/linear of ``model`` to 50% at once (``cfg``: structure, block_shape)."""
    technique = PruneTechnique({"final_sparsity": 0.5, "first_last_sparsity": None, "unit": "step", "start": 0,
                                "end": 0, "frequency": 1, **cfg}, stage_epochs=1, where="prune")
    technique.configure(steps_per_epoch=1)
    technique.attach(model)
    technique.on_step_end(model, 0)


def test_block_sparsity_costs_one_mask_bit_per_block():
    """Rules: a sparse tensor costs nonzeros × bits + a 1-bit mask per element; block sparsity 1 bit per block."""
    torch.manual_seed(0)
    linear = nn.Sequential(nn.Linear(64, 64, bias=False))
    prune_now(linear, structure="block", block_shape=[4, 4])
    count = count_model(linear, torch.randn(2, 64), freebie=False)
    # 16 x 16 = 256 blocks of 16 weights, 128 of them kept: 2048 nonzeros
    assert int(linear[0].weight.count_nonzero()) == 2048
    assert count.param_bits == 2048 * 32 + 256
    hand = count_oplist([FullyConnected(in_features=64, out_features=64, sparsity=Fraction(1, 2), block=(4, 4))])
    assert hand.param_bits == count.param_bits and hand.mults == count.mults and hand.adds == count.adds
    assert compression_state(linear)["weights"]["0"] == [{"kind": "mask", "block_shape": [4, 4]}]

    # conv 10 x (6·3·3 = 54) in 4x4 blocks: 3 x 14 = 42 blocks, the edge ones partial (2 rows, 2 columns)
    conv = nn.Sequential(nn.Conv2d(6, 10, 3, bias=False))
    prune_now(conv, structure="block", block_shape=[4, 4])
    count = count_model(conv, torch.randn(2, 6, 8, 8), freebie=False)
    nonzeros = int(conv[0].weight.count_nonzero())
    assert nonzeros < 540 and count.param_bits == nonzeros * 32 + 42
    hand = count_oplist([Conv2D(input_size=8, kernel=3, in_channels=6, out_channels=10, padding=0,
                                sparsity=Fraction(540 - nonzeros, 540), block=(4, 4))])
    assert hand.param_bits == count.param_bits and hand.mults == count.mults

    # after a 4-bit weight quantizer the mask still counts per block; zeros rounded inside kept blocks are
    # stored as values (the kept weights of the mask), scales at 32 bits per output channel
    quantize(conv, {"0": {"weight": 4, "activation": None}})
    count = count_model(conv, torch.randn(2, 6, 8, 8))
    assert count.param_bits == nonzeros * 4 + 42 + 10 * 32


def test_unstructured_and_broken_block_masks_cost_one_bit_per_weight():
    torch.manual_seed(0)
    linear = nn.Sequential(nn.Linear(64, 64, bias=False))
    prune_now(linear)
    count = count_model(linear, torch.randn(2, 64), freebie=False)
    assert count.param_bits == 2048 * 32 + 4096
    hand = count_oplist([FullyConnected(in_features=64, out_features=64, sparsity=Fraction(1, 2))])
    assert hand.param_bits == count.param_bits
    # a block mask that a later stage prunes inside a block no longer declares blocks
    blocked = nn.Sequential(nn.Linear(64, 64, bias=False))
    prune_now(blocked, structure="block", block_shape=[4, 4])
    mask = blocked[0].parametrizations.weight[0]
    assert mask.micronet_mask_bits == 256
    keep = mask.mask.clone()
    keep[tuple(keep.nonzero()[0].tolist())] = False
    mask.restrict(keep)
    assert mask.micronet_mask_bits == 4096
    assert count_model(blocked, torch.randn(2, 64), freebie=False).param_bits == 2047 * 32 + 4096


def test_export_keeps_block_masks_so_the_entry_counts_like_the_trained_model():
    torch.manual_seed(0)
    blocked, unstructured = nn.Sequential(nn.Linear(64, 64, bias=False)), nn.Sequential(nn.Linear(64, 64, bias=False))
    prune_now(blocked, structure="block", block_shape=[4, 4])
    prune_now(unstructured)
    inputs = torch.randn(2, 64)
    before = [count_model(m, inputs, freebie=False).param_bits for m in (blocked, unstructured)]
    for model in (blocked, unstructured):
        finalize_for_export(model)
    assert find_parametrization(blocked[0], WeightMask) is not None       # 256 bits beat 4096
    assert find_parametrization(unstructured[0], WeightMask) is None      # baked into the weight
    after = [count_model(m, inputs, freebie=False).param_bits for m in (blocked, unstructured)]
    assert after == before == [2048 * 32 + 256, 2048 * 32 + 4096]
