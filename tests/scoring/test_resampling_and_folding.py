"""Counted by hand: batch-norm folding when a conv's raw output has other readers, and resampling (nearest and
linear interpolation, the project rules of docs/rules.md).

All counts are at 32 bits (``freebie=False``) unless a quantizer says otherwise, one example per count, so
params = bits / 32 and ops = mults · (width / 32) + adds.
"""
from __future__ import annotations

from fractions import Fraction
from typing import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from scoring import UnsupportedOpError, count_model
from tests.scoring.helpers import FakeQuant, layer_rows, quantize_weight, set_grid_weights, trained_bn

#: A 1×1 conv 2→3 without bias on a 1×2×2×2 input: 12 outputs over L = 2 weights, 6 weights stored.
CONV = (192, 24, 12, "")
#: Its batch norm folded: 3 biases stored (96 bits), 1 bias add per output (12).
FOLDED = (96, 0, 12, "folded into conv")
#: Its batch norm unfolded: γ and β per channel (6 × 32 = 192 bits), 1 mult + 1 add per element (12, 12).
UNFOLDED = (192, 12, 12, "not folded")


def _input() -> torch.Tensor:
    return torch.randn(1, 2, 2, 2, generator=torch.Generator().manual_seed(0))


# --- batch norm folding and the other readers of the conv's output ------------------------------------
class NormPlusRaw(nn.Module):
    """``y = conv(x); return bn(y) + y``: the add reads the raw y."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 1, bias=False)
        self.bn = trained_bn(nn.BatchNorm2d(3))

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_a_batch_norm_whose_conv_output_is_also_read_raw_is_counted_unfolded():
    count = count_model(NormPlusRaw(), _input(), freebie=False)
    # A fold would store W·γ/σ and compute s·y + b, but the add needs y itself: the bn is an affine.
    # conv: 6 weights (192 bits), 12 outputs × L = 2: 24 mults, 12 adds. bn unfolded: 2 × 3 params (192 bits),
    # 1 mult + 1 add per element of its 1×3×2×2 input: 12, 12. The add, in the model: 12 adds.
    assert layer_rows(count) == {"conv": CONV, "bn": UNFOLDED, "(model)": (0, 0, 12, "")}
    # totals: 384 bits, 36 mults, 36 adds (a fold would have given 288 bits, 24 mults, 36 adds)
    assert (count.param_bits, count.mults, count.adds) == (384, 36, 36)


class ConvNorm(nn.Module):
    """``bn(conv(x))``, and ``reader`` (if any) on the raw conv output: ``(bn(y), reader(y))``."""

    def __init__(self, reader: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 1, bias=False)
        self.bn = trained_bn(nn.BatchNorm2d(3))
        self.reader = reader

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) if self.reader is None else (self.bn(y), self.reader(y))


def test_a_plain_conv_batch_norm_still_folds():
    count = count_model(ConvNorm(), _input(), freebie=False)
    assert layer_rows(count) == {"conv": CONV, "bn": FOLDED}
    assert (count.param_bits, count.mults, count.adds) == (288, 24, 24)


class NormAfter(nn.Module):
    """A batch norm over ``view(y)`` of ``channels`` channels (a reader of the raw conv output)."""

    def __init__(self, channels: int, view: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.view = view
        norm = nn.BatchNorm2d if view(torch.zeros(1, 3, 2, 2)).dim() == 4 else nn.BatchNorm1d
        self.norm = trained_bn(norm(channels))

    def forward(self, y):
        return self.norm(self.view(y))


@pytest.mark.parametrize("reader", [
    lambda y: y,  # returned: the model's caller reads it raw
    torch.relu,
    lambda y: y[:, :2],  # a slice is not followed: a reader
    lambda y: y.view_as(y) * 2,  # through a reshape that keeps the channels, a multiply
    lambda y: torch.cat([y, y], 1).sum(),  # through a channel concatenation, a sum
    lambda y: torch.cat([y, y], 2),  # a concatenation along another dim
    # a reshape that mixes channels ([1, 3, 2, 2] -> [1, 2, 6]: row 0 holds channels 0 and 1), read by a batch
    # norm whose per-row affine cannot absorb a per-channel one
    NormAfter(2, lambda y: y.reshape(1, 2, 6)),
], ids=["returned", "relu", "slice", "reshape then mul", "channel cat then sum", "cat along H",
        "reshape across channels then batch norm"])
def test_any_other_reader_of_the_raw_output_keeps_the_batch_norm_unfolded(reader):
    count = count_model(ConvNorm(reader), _input(), freebie=False)
    assert layer_rows(count)["conv"] == CONV
    assert layer_rows(count)["bn"] == UNFOLDED


@pytest.mark.parametrize("view", [lambda y: y, lambda y: y.flatten(2)], ids=["directly", "HW flattened"])
def test_another_batch_norm_reading_the_raw_output_absorbs_the_fold(view):
    count = count_model(ConvNorm(NormAfter(3, view)), _input(), freebie=False)
    # bn folds; the other batch norm, unfolded (2 × 3 params, 12 mults + 12 adds), absorbs its inverse affine
    assert layer_rows(count) == {"conv": CONV, "bn": FOLDED, "reader.norm": UNFOLDED}


class DenseStem(nn.Module):
    """A DenseNet stem and one bottleneck-less dense layer: the stem's output y feeds bn1, and through a channel
    concatenation with the layer's new features, ``reader``: a batch norm (as DenseNet's next layer) or a conv."""

    def __init__(self, reader: str):
        super().__init__()
        self.stem = nn.Conv2d(2, 3, 1, bias=False)
        self.bn1 = trained_bn(nn.BatchNorm2d(3))
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(3, 2, 1, bias=False)
        self.reader = trained_bn(nn.BatchNorm2d(5)) if reader == "bn" else nn.Conv2d(5, 1, 1, bias=False)

    def forward(self, x):
        y = self.stem(x)
        return self.reader(torch.cat([y, self.conv(self.relu(self.bn1(y)))], 1))


def _affine(norm: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) per channel of a batch norm at inference."""
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    return scale, norm.bias - norm.running_mean * scale


def test_a_concatenation_read_only_by_unfolded_batch_norms_keeps_the_fold():
    model = DenseStem("bn").eval()
    count = count_model(model, _input(), freebie=False)
    # stem: 6 weights, 12 outputs × L = 2. bn1 folds into it: 3 biases, 12 adds. relu: 12. conv 3→2: 6 weights,
    # 8 outputs × L = 3: 24 mults, 16 adds. The reader reads the concatenation of y and the conv's output (that
    # part of its input was folded, so it folds into nothing): unfolded, 2 × 5 params (320 bits), 20 elements.
    assert layer_rows(count) == {"stem": CONV, "bn1": (96, 0, 12, "folded into stem"), "relu": (0, 12, 0, ""),
                                 "conv": (192, 24, 16, ""), "reader": (320, 20, 20, "not folded")}
    # The fold is exact: with z = s·y + b (the folded stem), the reader's affine a·y + c on the stem's channels
    # becomes (a/s)·z + (c - a·b/s), an affine like any other: same parameters, same ops.
    x = _input()
    with torch.no_grad():
        s, b = _affine(model.bn1)
        a, c = (t[:3] for t in _affine(model.reader))
        z = F.conv2d(x, model.stem.weight * s[:, None, None, None], b)
        new = model.conv(model.relu(z))
        folded = torch.cat([(a / s)[:, None, None] * z + (c - a * b / s)[:, None, None],
                            model.reader(torch.cat([z, new], 1))[:, 3:]], 1)
        assert torch.allclose(folded, model(x), atol=1e-5)


def test_a_concatenation_read_by_a_conv_keeps_the_batch_norm_unfolded():
    count = count_model(DenseStem("conv"), _input(), freebie=False)
    # The conv after the concatenation needs the stem's raw output: bn1 is an affine (192 bits, 12 + 12).
    # reader: 5 weights (160 bits), 4 outputs × L = 5: 20 mults, 16 adds.
    assert layer_rows(count) == {"stem": CONV, "bn1": (192, 12, 12, "not folded"), "relu": (0, 12, 0, ""),
                                 "conv": (192, 24, 16, ""), "reader": (160, 20, 16, "")}


# --- resampling -----------------------------------------------------------------------------------
class Resample(nn.Module):
    """``F.interpolate(x, **options)``."""

    def __init__(self, **options):
        super().__init__()
        self.options = options

    def forward(self, x):
        return F.interpolate(x, **self.options)


@pytest.mark.parametrize("shape, options, rule, outputs, taps", [
    ((1, 2, 3, 4), {"scale_factor": 2}, "upsample_nearest2d", 96, 0),
    ((1, 2, 3, 4), {"size": (5, 7)}, "upsample_nearest2d", 70, 0),
    ((1, 2, 3, 4), {"scale_factor": 2, "mode": "nearest-exact"}, "_upsample_nearest_exact2d", 96, 0),
    ((1, 2, 5), {"scale_factor": 2}, "upsample_nearest1d", 20, 0),
    ((1, 1, 2, 2, 2), {"scale_factor": 2}, "upsample_nearest3d", 64, 0),
    ((1, 2, 5), {"scale_factor": 2, "mode": "linear"}, "upsample_linear1d", 20, 2),
    ((1, 2, 3, 4), {"scale_factor": 2, "mode": "bilinear"}, "upsample_bilinear2d", 96, 4),
    ((1, 2, 3, 4), {"size": (5, 7), "mode": "bilinear", "align_corners": True}, "upsample_bilinear2d", 70, 4),
    ((1, 2, 4, 4), {"scale_factor": 0.5, "mode": "bilinear"}, "upsample_bilinear2d", 8, 4),
    ((1, 1, 2, 2, 2), {"scale_factor": 2, "mode": "trilinear"}, "upsample_trilinear3d", 64, 8),
    ((1, 2, 3, 4), {"scale_factor": 2, "mode": "bicubic"}, "upsample_bicubic2d", 96, 16),
], ids=["nearest", "nearest to a size", "nearest-exact", "nearest 1d", "nearest 3d", "linear", "bilinear",
        "bilinear to a size, align_corners", "bilinear down", "trilinear", "bicubic"])
def test_resampling_costs_its_taps_per_output_element(shape, options, rule, outputs, taps):
    count = count_model(Resample(**options), torch.randn(*shape), freebie=False)
    out = F.interpolate(torch.zeros(shape), **options)
    assert out.numel() == outputs
    # nearest: a copy per output element, free. Interpolation: a dot product over its taps per output element
    # (L = 2, 4, 8, 16), L mults and L - 1 adds: e.g. bilinear ×2 of 2×3×4 -> 2×6×8 = 96 outputs: 384, 288.
    assert (count.mults, count.adds) == (taps * outputs, max(taps - 1, 0) * outputs)
    assert rule in count.project_rules


@pytest.mark.parametrize("upsample", [nn.Upsample(scale_factor=2, mode="bilinear"),
                                      nn.UpsamplingBilinear2d(scale_factor=2), nn.Upsample(scale_factor=2),
                                      nn.UpsamplingNearest2d(scale_factor=2)],
                         ids=["Upsample bilinear", "UpsamplingBilinear2d", "Upsample nearest", "UpsamplingNearest2d"])
def test_upsampling_modules_count_as_their_op(upsample):
    count = count_model(nn.Sequential(upsample), torch.randn(1, 2, 3, 4), freebie=False)
    bilinear = upsample.mode == "bilinear"
    # 2×6×8 = 96 outputs: bilinear 4 mults + 3 adds each; nearest free (no row)
    assert layer_rows(count) == ({"0": (0, 384, 288, "")} if bilinear else {})


def test_antialiased_downsampling_has_no_rule():
    with pytest.raises(UnsupportedOpError, match="_upsample_bilinear2d_aa"):
        count_model(Resample(scale_factor=0.5, mode="bilinear", antialias=True), torch.randn(1, 2, 4, 4))


class QuantizedUpsample(nn.Module):
    """A 4-bit input, upsampled ×2, into a 1×1 conv 2→2 with 4-bit weights."""

    def __init__(self, mode: str):
        super().__init__()
        self.quant = FakeQuant(4)
        self.up = nn.Upsample(scale_factor=2, mode=mode)
        self.conv = nn.Conv2d(2, 2, 1, bias=False)
        set_grid_weights(self.conv.weight, 4, Fraction(0))
        quantize_weight(self.conv, 4)

    def forward(self, x):
        return self.conv(self.up(self.quant(x)))


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_nearest_upsampling_keeps_the_bit_width_and_interpolation_does_not(mode):
    count = count_model(QuantizedUpsample(mode), torch.randn(1, 2, 3, 4), freebie=False)
    rows = {row["name"]: row for row in count.layers}
    # conv: 96 outputs × L = 2: 192 mults, 96 adds; 4 weights at 4 bits. Nearest copies 4-bit values: the conv's
    # mults are 4-bit (192·4/32 + 96 = 120 ops). Interpolated values are off the grid: 32-bit (192 + 96 = 288);
    # the interpolation itself multiplies 4-bit inputs by constants: 384·4/32 + 288 = 336 ops.
    assert (rows["conv"]["input_bits"], rows["conv"]["ops"]) == ((4, 120) if mode == "nearest" else (32, 288))
    if mode == "bilinear":
        assert (rows["up"]["input_bits"], rows["up"]["ops"]) == (4, 336)
    else:
        assert "up" not in rows
