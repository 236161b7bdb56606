"""The scorer sees compression exactly: one layer's bits or sparsity change the counts as the rules say."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from compress import PruneTechnique, QuantizeTechnique, compression_state
from compress.base import original_weight
from models import create_model
from scoring import count_model


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
