"""The rules doc's calibration cases, to the unit: through the op list and through the traced counter."""
from __future__ import annotations

from fractions import Fraction

import pytest
import torch
import torch.nn as nn

from scoring import count_model, score
from scoring.oplist import Add, Conv2D, DepthwiseConv2D, FullyConnected, GlobalAvg, Scale
from tests.scoring.helpers import quantize_weight, set_grid_weights


class Slices(nn.Module):
    """Applies ``op`` to the two halves of the input along ``dim`` (no parameters, no other ops)."""

    def __init__(self, op, dim: int, first: int):
        super().__init__()
        self.op, self.dim, self.first = op, dim, first

    def forward(self, x):
        return self.op(x.narrow(self.dim, 0, self.first), x.narrow(self.dim, self.first, x.shape[self.dim] - self.first))


class Mean(nn.Module):
    def forward(self, x):
        return x.mean((2, 3))


def _conv(in_ch, out_ch, k, stride, padding, bias, act, groups=1):
    layers = [nn.Conv2d(in_ch, out_ch, k, stride, padding, groups=groups, bias=bias)]
    return nn.Sequential(*layers, *([act] if act is not None else []))


def _sparse(model, sparsity):
    set_grid_weights(model[0].weight, 8, sparsity)
    return model


def _quantized_linear(in_f, out_f, bits, sparsity):
    linear = nn.Linear(in_f, out_f)
    set_grid_weights(linear.weight, bits, sparsity)
    # The official calculator stores the bias at the layer's width and counts no scales.
    quantize_weight(linear, bits, scale_count=0)
    quantize_weight(linear, bits, "bias", scale_count=0)
    return linear


# (op-list descriptor, traced model factory, input shape, freebie, expected (param bits, mults, adds))
CASES = {
    "conv3x3_swish_16bit": (
        Conv2D(224, 3, 3, 32, stride=2, bias=True, activation="swish", bits=16),
        lambda: _conv(3, 32, 3, 2, 1, True, nn.SiLU()), (3, 224, 224), None, (14_336, 12_042_240, 11_239_424)),
    "conv3x3_swish_16bit_50pct": (
        Conv2D(224, 3, 3, 32, stride=2, bias=True, activation="swish", bits=16, sparsity=0.5),
        lambda: _sparse(_conv(3, 32, 3, 2, 1, True, nn.SiLU()), Fraction(1, 2)), (3, 224, 224), None,
        (8_288, 6_623_232, 5_820_416)),
    "conv1x1_32bit": (
        Conv2D(56, 1, 24, 144, bits=32),
        lambda: _conv(24, 144, 1, 1, 0, False, None), (24, 56, 56), False, (110_592, 10_838_016, 10_386_432)),
    "conv3x3_valid_relu_32bit": (
        Conv2D(15, 3, 8, 8, stride=2, padding=0, bias=True, activation="relu", bits=32),
        lambda: _conv(8, 8, 3, 2, 0, True, nn.ReLU()), (8, 15, 15), False, (18_688, 28_616, 28_224)),
    "depthwise5x5_swish_16bit": (
        DepthwiseConv2D(28, 5, 144, stride=2, bias=True, activation="swish", bits=16),
        lambda: _conv(144, 144, 5, 2, 2, True, nn.SiLU(), groups=144), (144, 28, 28), None, (59_904, 790_272, 733_824)),
    "global_avg_7x7x1280": (
        GlobalAvg(7, 1280), Mean, (1280, 7, 7), None, (0, 1_280, 61_440)),
    "channel_scale_14x14x480": (
        Scale(14, 480), lambda: Slices(torch.mul, 3, 14), (480, 14, 15), None, (0, 94_080, 0)),
    "residual_add_56x56x24": (
        Add(56, 24), lambda: Slices(torch.add, 1, 24), (48, 56, 56), None, (0, 0, 75_264)),
    "linear_16bit": (
        FullyConnected(1280, 1000, bias=True, bits=16),
        lambda: nn.Linear(1280, 1000), (1280,), None, (20_496_000, 1_280_000, 1_280_000)),
    "linear_75pct_4bit": (
        FullyConnected(1280, 1000, bias=True, bits=4, sparsity=0.75),
        lambda: _quantized_linear(1280, 1000, 4, Fraction(3, 4)), (1280,), None, (2_564_000, 320_000, 320_000)),
}


@pytest.mark.parametrize("case", CASES)
def test_oplist_matches_calibration_case(case):
    op, _, _, _, expected = CASES[case]
    count = op.count()
    assert (count.param_bits, count.mults, count.adds) == expected


@pytest.mark.parametrize("case", CASES)
def test_traced_counter_matches_calibration_case(case):
    _, factory, shape, freebie, expected = CASES[case]
    torch.manual_seed(0)
    count = count_model(factory(), torch.randn(1, *shape), freebie=freebie)
    assert (count.param_bits, count.mults, count.adds) == expected


def test_traced_widths_follow_the_case_bits():
    # 16-bit cases run under the freebie: params and mults at 16 bits, additions at 32.
    _, factory, shape, freebie, (param_bits, mults, adds) = CASES["conv3x3_swish_16bit"]
    count = count_model(factory(), torch.randn(1, *shape), freebie=freebie)
    assert count.freebie
    assert count.params == param_bits / 32
    assert count.ops == mults * 16 / 32 + adds


def test_worked_example_of_the_rules_page():
    assert round(score("imagenet", 3e6, 500e6), 3) == 0.862
    assert score("imagenet", 3_000_000, 500_000_000) == pytest.approx(3 / 6.9 + 500 / 1170, rel=1e-12)
