"""The quantize keys that express what the 2019 winners did (scale, scale_bits, bias_bits, other_ops,
attention_bits): what they do to the model, what the scorer counts for them (by hand), the compression state
that rebuilds them, and their one-line refusals.

Counts are of one example; no freebie (every model is quantized to 4 or 8 bits), so params = bits / 32.
"""
from __future__ import annotations

import json
from fractions import Fraction

import pytest
import torch
import torch.nn as nn

from compress import QuantizeTechnique, apply_compression_state, compression_state
from compress.quantization import WeightQuantizer, stored_scale
from models.transformer_xl import RelativeAttention
from scoring import count_model
from tests.scoring.helpers import layer_rows


class Net(nn.Module):
    """conv 2→3 3×3 (bias) → batch norm (folds) → ReLU → global mean → linear 3→4; weights far from zero."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Linear(3, 4)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for weight in (self.conv.weight, self.fc.weight):  # |w| in [0.5, 1]: no weight rounds to 0 at 4 bits
                sign = torch.randint(0, 2, weight.shape, generator=gen) * 2 - 1
                weight.copy_((torch.rand(weight.shape, generator=gen) * 0.5 + 0.5) * sign)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def quantized(**keys) -> tuple[nn.Module, torch.Tensor]:
    """Net with 4-bit weights and inputs everywhere (minmax) and ``keys``, calibrated, in eval mode."""
    model = Net()
    technique = QuantizeTechnique({"method": "minmax", "weight_bits": 4, "activation_bits": 4,
                                   "first_last_bits": None, **keys}, stage_epochs=1, where="quantize")
    technique.configure(steps_per_epoch=1)
    technique.attach(model)
    x = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    model.train()
    model(x)
    return model.eval(), x[:1]


def _param_bits(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    return {name: row[0] for name, row in layer_rows(count_model(model, x)).items() if name in ("conv", "fc")}


def test_stored_scales_are_rounded_to_their_format():
    scale = torch.tensor([0.3])
    assert stored_scale(scale, 32) is scale
    assert stored_scale(scale, 16).item() == 1229 / 4096  # IEEE half: 1.2 · 2⁻² with 10 mantissa bits, 1 + 205/1024
    assert stored_scale(scale, 8).item() == 0.25  # 2 ** round(log2 0.3) = 2 ** -2
    model, _ = quantized(scale="per_tensor", scale_bits=8)
    quantizer = model.fc.parametrizations["weight"][0]
    step = quantizer.scale.item()
    assert quantizer.scale.numel() == 1 and step != 2.0 ** round(torch.log2(quantizer.scale).item())  # as observed
    on_grid = model.fc.weight / 2.0 ** round(torch.log2(quantizer.scale).item())  # the weights use the stored step
    assert torch.equal(on_grid, on_grid.round())


@pytest.mark.parametrize("keys, bits", [
    # conv: 54 weights × 4 + 3 channel scales × 32 + input scale 32 + the merged bias (3 × 32, the batch norm folds);
    # fc: 12 weights × 4 + 4 channel scales × 32 + input scale 32 + 4 biases × 32.
    ({}, {"conv": 216 + 96 + 32 + 96, "fc": 48 + 128 + 32 + 128}),
    # one 8-bit scale per weight tensor (the fold makes the conv's one per channel: 3 × 8) and per input
    ({"scale": "per_tensor", "scale_bits": 8}, {"conv": 216 + 24 + 8 + 96, "fc": 48 + 8 + 8 + 128}),
    # 8-bit biases, each with a 32-bit step; the conv's merged bias stays at the batch norm's 32 bits
    ({"bias_bits": 8}, {"conv": 216 + 96 + 32 + 96 + 32, "fc": 48 + 128 + 32 + 4 * 8 + 32}),
])
def test_scale_and_bias_keys_count_by_hand(keys, bits):
    assert _param_bits(*quantized(**keys)) == bits


def test_other_ops_fp16_runs_and_counts_the_ops_outside_dot_products_at_16_bits():
    model, x = quantized(other_ops="fp16")
    seen = []
    for net in (model, quantized()[0]):
        net.bn.register_forward_hook(lambda module, args, out: seen.append(out))
        net(x)
    fp16, fp32 = seen
    assert torch.equal(fp16, fp16.half().float()) and not torch.equal(fp32, fp32.half().float())
    rows = {True: layer_rows(count_model(model, x))["(model)"]}
    rows[False] = layer_rows(count_model(quantized()[0], x))["(model)"]
    # ReLU 3 × 16 mults, the mean 3 mults + 3 × 15 adds: 96 ops at 16 bits instead of 32
    assert rows[True][1:3] == rows[False][1:3] == (48 + 3, 45)
    assert [row["ops"] for row in count_model(model, x).layers if row["name"] == "(model)"] == [96 * 16 / 32]
    model.train()
    model(x).sum().backward()  # the rounding passes the gradient straight through
    assert model.conv.parametrizations["weight"].original.grad.abs().sum() > 0


class Attention(nn.Module):
    """Transformer-XL's relative attention, one head of 2, a cache of 2 keys; its out projection quantized."""

    def __init__(self):
        super().__init__()
        self.attention = RelativeAttention(4, 1, 2, 2, 0.0, 0.0)
        self.register_buffer("cache", torch.zeros(1, 2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(x, (self.cache + 0 * x[:, :1, :2], self.cache + 0 * x[:, :1, :2]))[0]


def _attention(**keys) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = Attention()
    technique = QuantizeTechnique({"method": "minmax", "weight_bits": 8, "activation_bits": 8,
                                   "layers": ["attention.out"], **keys}, stage_epochs=1, where="quantize")
    technique.configure(steps_per_epoch=1)
    technique.attach(model)
    x = torch.randn(1, 1, 4)
    model.train()
    model(x)
    return model.eval(), x


def test_attention_bits_quantize_the_score_and_value_products():
    plain, quantized_operands = count_model(*_attention()), count_model(*_attention(attention_bits=8))
    # One query, 3 keys (2 cached + itself), span C + 1 = 3, d_head 2: content 3 × 2, position 3 × 2 and value
    # 3 × 2 multiplies = 18, now at 8 bits instead of 32: 18 × 24 / 32 = 13.5 ops fewer.
    assert Fraction(plain.ops - quantized_operands.ops) == Fraction(27, 2)
    # 6 operand quantizers store a 32-bit scale each (+192 bits); the position vectors W_R R (3 × 2, precomputed
    # and stored) are stored at 8 bits (−6 × 24 = −144 bits).
    assert quantized_operands.param_bits - plain.param_bits == 192 - 144


def test_compression_state_rebuilds_every_key_and_is_unchanged_without_them():
    model, x = quantized(scale="per_tensor", scale_bits=16, bias_bits=8, other_ops="fp16")
    state = json.loads(json.dumps(compression_state(model)))
    assert state["weights"]["fc"] == [{"kind": "weight_quantizer", "bits": 4, "method": "minmax", "scale_bits": 16,
                                       "scale": "per_tensor"}]
    assert state["biases"]["conv"] == {"kind": "bias_quantizer", "bits": 8, "method": "minmax", "scale_bits": 16}
    assert state["other_ops"] == "fp16"
    fresh = Net()
    apply_compression_state(fresh, state)
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(fresh.eval()(x), model(x))
    assert count_model(fresh, x).to_dict() == count_model(model, x).to_dict()
    assert set(compression_state(quantized()[0])) == {"format", "weights", "inputs"}  # as written before the keys


@pytest.mark.parametrize("keys, message", [
    ({"scale": "per_row"}, "quantize.scale='per_row': expected one of per_channel, per_tensor"),
    ({"scale_bits": 12}, "quantize.scale_bits=12: expected one of 32, 16, 8"),
    ({"bias_bits": 4}, "quantize.bias_bits=4: expected one of 8, 16, 32"),
    ({"other_ops": "fp8"}, "quantize.other_ops='fp8': expected one of fp32, fp16, bf16"),
])
def test_bad_values_are_refused_in_one_line(keys, message):
    with pytest.raises(ValueError, match=f"^{message}$".replace("(", r"\(").replace(".", r"\.")):
        QuantizeTechnique({"weight_bits": 4, **keys}, stage_epochs=1, where="quantize")


def test_attention_bits_on_a_model_without_operand_points_is_refused():
    with pytest.raises(ValueError, match=r"quantize\.attention_bits=8: expected null for a model without attention "
                                         r"operand points"):
        quantized(attention_bits=8)


def test_a_description_with_an_unknown_scale_is_refused():
    with pytest.raises(ValueError, match="weight quantizer scale='per_row'"):
        WeightQuantizer.check_description({"kind": "weight_quantizer", "bits": 4, "method": "lsq",
                                           "scale": "per_row"}, torch.zeros(2, 2))


@pytest.mark.parametrize("change, message", [
    (lambda s: s.update(biases=[1]), "compression state biases and operands must map names to descriptions"),
    (lambda s: s["biases"].update(bn={}), "names layer 'bn', which this model does not have"),
    (lambda s: s["biases"]["conv"].update(kind="weight_quantizer"), "layer 'conv': bias description .* is not a "
                                                                    "bias_quantizer"),
    (lambda s: s["biases"]["conv"].update(scale_bits=12), "layer 'conv': bias quantizer scale_bits=12: expected one "
                                                          "of 32, 16, 8"),
    (lambda s: s.update(operands={"attention.query_operand": {}}), "quantizes operand 'attention.query_operand', "
                                                                   "which this model does not have"),
    (lambda s: s.update(other_ops="fp8"), "compression state other_ops='fp8': expected one of fp32, fp16, bf16"),
])
def test_out_of_range_optional_sections_are_refused_in_one_line(change, message):
    model, _ = quantized(bias_bits=8, other_ops="fp16")
    state = json.loads(json.dumps(compression_state(model)))
    change(state)
    with pytest.raises(ValueError, match=message) as refused:
        apply_compression_state(Net(), state)
    assert "\n" not in str(refused.value)
