"""Adversarial cases counted by hand: shared weights, pruned grouped convs, batch-norm folding, bit tags, masks.

Every expected number is derived in the comments; all counts are at 32 bits (``freebie=False``) unless a
quantizer says otherwise, so params = bits / 32 and ops = mults · (width / 32) + adds.
"""
from __future__ import annotations

from fractions import Fraction

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from scoring import UnsupportedOpError, count_model
from tests.scoring.helpers import FakeQuant, layer_rows, quantize_weight, set_grid_weights, trained_bn


# --- shared weights ---------------------------------------------------------------------------------
class ConvTwice(nn.Module):
    """One 1×1 conv 4→4 with bias applied twice."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.conv(self.conv(x))


class SharedLinear(nn.Module):
    """Two linear layers 4→4 without bias holding the same weight tensor."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4, bias=False)
        self.b = nn.Linear(4, 4, bias=False)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(self.a(x))


def test_a_conv_used_twice_is_stored_once_and_executed_twice():
    count = count_model(ConvTwice(), torch.randn(1, 4, 2, 2), freebie=False)
    # stored once: 16 weights + 4 biases = 20 × 32 bits; each use: N = 2·2·4 = 16 outputs, L = 4:
    # 64 mults, 3·16 = 48 adds + 16 bias adds; twice: 128 mults, 128 adds.
    assert (count.param_bits, count.mults, count.adds) == (640, 128, 128)


def test_a_weight_shared_by_two_layers_is_stored_once_and_counted_in_both():
    count = count_model(SharedLinear(), torch.randn(1, 4), freebie=False)
    # 16 weights stored once (in the first layer that uses them); each layer: 4 outputs × L = 4 → 16 mults, 12 adds
    assert layer_rows(count) == {"a": (512, 16, 12, ""), "b": (0, 16, 12, "")}


def test_a_quantized_pruned_weight_used_twice_is_stored_once():
    linear = nn.Linear(4, 4, bias=False)
    set_grid_weights(linear.weight, 4, Fraction(1, 2))  # 8 of 16 weights zero, every row keeps one
    quantize_weight(linear, 4)
    model = nn.Sequential(linear, linear)
    count = count_model(model, torch.randn(1, 4))
    # stored: 8 nonzeros × 4 bits + 16 mask bits + one 32-bit scale = 80; per use 8 mults and 8 - 4 = 4 adds.
    assert (count.param_bits, count.mults, count.adds) == (80, 16, 8)
    # The input is never quantized: the multiplies count at 32 bits (widest input), so ops = 16 + 8.
    assert not count.freebie and count.ops == 24


# --- pruned grouped conv ------------------------------------------------------------------------------
def test_a_pruned_grouped_conv_counts_each_output_channel_over_its_own_nonzeros():
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)  # weight 6×2×3×3: 18 per output channel, 108 in all
    with torch.no_grad():
        conv.weight[conv.weight == 0] = 0.5
        conv.weight[0] = 0  # channel 0 fully pruned: 0 weights
        conv.weight[1, 0, 0] = 0  # channel 1: 3 zeros, 15 weights left
    count = count_model(conv, torch.randn(1, 4, 5, 5), freebie=False)
    # nonzeros 108 - 18 - 3 = 87: sparse (87·32 + 108 mask bits = 2,892) beats dense (3,456); + 6 biases · 32.
    assert count.param_bits == 87 * 32 + 108 + 6 * 32
    # 25 outputs per channel: mults 87·25 = 2,175; adds (L-1 + 1 for the bias per output): channel 0 is its
    # constant bias, no additions (the official (0-1)·25 + 25 = 0); channel 1 (14 + 1)·25, channels 2..5
    # (17 + 1)·25 each = 375 + 1,800.
    assert (count.mults, count.adds) == (2175, 2175)
    assert count.layers[0]["sparsity"] == pytest.approx(21 / 108)


# --- batch norm folding -------------------------------------------------------------------------------
def test_linear_without_bias_then_batch_norm_1d_folds_into_a_bias():
    model = nn.Sequential(nn.Linear(5, 3, bias=False), trained_bn(nn.BatchNorm1d(3)))
    count = count_model(model, torch.randn(2, 5), freebie=False)
    # linear: 15 weights, 3 outputs × (L = 5): 15 mults, 12 adds; the folded BN: 3 biases, 3 bias adds.
    assert layer_rows(count) == {"0": (480, 15, 12, ""), "1": (96, 0, 3, "folded into 0")}


class ConcatBN(nn.Module):
    """BN over the channel concatenation of a conv without bias (3 channels) and one with bias (2 channels)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 3, 1, bias=False)
        self.b = nn.Conv2d(2, 2, 1)
        self.bn = trained_bn(nn.BatchNorm2d(5))

    def forward(self, x):
        return self.bn(torch.cat([self.a(x), self.b(x)], 1))


def test_batch_norm_after_a_concat_gives_a_bias_only_to_the_channels_without_one():
    count = count_model(ConcatBN(), torch.randn(1, 2, 2, 2), freebie=False)
    # a: 6 weights, 12 outputs × L = 2: 24 mults, 12 adds. b: 4 weights + 2 biases, 8 outputs: 16 mults,
    # 8 + 8 bias adds. BN: a's 3 channels get a bias (3 params, 12 adds); b's merge into its own bias.
    assert layer_rows(count) == {"a": (192, 24, 12, ""), "b": (192, 16, 16, ""), "bn": (96, 0, 12, "folded into a+b")}


class ResidualBN(nn.Module):
    """BN after a residual add: it cannot fold."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1, bias=False)
        self.bn = trained_bn(nn.BatchNorm2d(2))

    def forward(self, x):
        return self.bn(self.conv(x) + x)


@pytest.mark.parametrize("model, layer", [
    (nn.Sequential(nn.Conv2d(2, 2, 1), nn.ReLU(), trained_bn(nn.BatchNorm2d(2))), "2"),
    (ResidualBN(), "bn"),
])
def test_batch_norm_after_relu_or_add_is_counted_unfolded(model, layer):
    count = count_model(model, torch.randn(1, 2, 2, 2), freebie=False)
    # 2 params per channel (64 bits each channel), 1 mult + 1 add per element (8 elements)
    assert layer_rows(count)[layer] == (4 * 32, 8, 8, "not folded")


class SharedConvTwoNorms(nn.Module):
    """One conv without bias applied twice, followed by a different BN (``same=False``) or the same BN."""

    def __init__(self, same: bool):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1, bias=False)
        self.bn1 = trained_bn(nn.BatchNorm2d(2))
        self.bn2 = self.bn1 if same else trained_bn(nn.BatchNorm2d(2))

    def forward(self, x):
        return self.bn2(self.conv(self.bn1(self.conv(x))))


def test_a_shared_weight_absorbs_the_scale_of_one_batch_norm_only():
    count = count_model(SharedConvTwoNorms(same=False), torch.randn(1, 2, 2, 2), freebie=False)
    # conv: 4 weights stored once, 2 uses × (8 outputs × L = 2): 32 mults, 16 adds. bn1 folds: 2 biases,
    # 8 adds. bn2's scale cannot also go into that weight: unfolded, 4 params, 8 mults + 8 adds.
    assert layer_rows(count) == {"conv": (128, 32, 16, ""), "bn1": (64, 0, 8, "folded into conv"),
                            "bn2": (128, 8, 8, "not folded")}
    # The same BN after both uses folds both times into the one weight: its 2 biases stored once.
    count = count_model(SharedConvTwoNorms(same=True), torch.randn(1, 2, 2, 2), freebie=False)
    assert layer_rows(count) == {"conv": (128, 32, 16, ""), "bn1": (64, 0, 16, "folded into conv")}


class SharedConvOneNorm(nn.Module):
    """One conv without bias applied twice, a BN after one use only: the first (``norm_first``) or the second."""

    def __init__(self, norm_first: bool):
        super().__init__()
        self.norm_first = norm_first
        self.conv = nn.Conv2d(2, 2, 1, bias=False)
        self.bn = trained_bn(nn.BatchNorm2d(2))

    def forward(self, x):
        if self.norm_first:
            return self.conv(self.bn(self.conv(x)))  # the second use's output is raw
        return self.bn(self.conv(self.conv(x)))  # the first use's output is raw


@pytest.mark.parametrize("norm_first", [True, False])
def test_a_shared_weight_also_used_raw_keeps_the_batch_norm_unfolded(norm_first):
    count = count_model(SharedConvOneNorm(norm_first), torch.randn(1, 2, 2, 2), freebie=False)
    # The raw use needs W, the normalised use W·γ/σ: one stored tensor cannot be both, so the BN is unfolded,
    # in either order. conv: 4 weights stored once (128 bits), 2 uses × (8 outputs × L = 2): 32 mults, 16 adds.
    # bn: 2 params per channel = 4 × 32 = 128 bits, 1 mult + 1 add per element of its 1×2×2×2 input: 8, 8.
    assert layer_rows(count) == {"conv": (128, 32, 16, ""), "bn": (128, 8, 8, "not folded")}
    # totals: 256 bits, 40 mults, 24 adds (a fold would have given 192 bits, 32 mults, 24 adds)
    assert (count.param_bits, count.mults, count.adds) == (256, 40, 24)


class SharedLinearSameNorm(SharedLinear):
    """SharedLinear with the same BN after each of the two layers."""

    def __init__(self):
        super().__init__()
        self.bn = trained_bn(nn.BatchNorm1d(4))

    def forward(self, x):
        return self.bn(self.b(self.bn(self.a(x))))


def test_the_same_batch_norm_after_every_use_of_a_shared_weight_still_folds():
    count = count_model(SharedLinearSameNorm(), torch.randn(1, 4), freebie=False)
    # Both uses want W·γ/σ: the BN folds into both. a: 16 weights (512 bits), 4 outputs × L = 4: 16 mults,
    # 12 adds; b: the same ops, nothing stored. bn: 4 biases stored once (128 bits), 4 bias adds per use: 8.
    assert layer_rows(count) == {"a": (512, 16, 12, ""), "b": (0, 16, 12, ""),
                            "bn": (128, 0, 8, "folded into a; folded into b")}
    assert (count.param_bits, count.mults, count.adds) == (640, 32, 32)


def test_batch_norm_after_a_weight_computed_at_run_time_is_counted_unfolded():
    class DynamicConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = trained_bn(nn.BatchNorm2d(2))

        def forward(self, x):
            weight = x[0, :, 0, 0].reshape(2, 1, 1, 1).expand(2, 2, 1, 1)  # from the input: no stored weight
            return self.bn(F.conv2d(x, weight))

    count = count_model(DynamicConv(), torch.randn(1, 2, 2, 2), freebie=False)
    # no stored weight can absorb the scale: 2 params per channel, 1 mult + 1 add per element (8)
    assert layer_rows(count)["bn"] == (128, 8, 8, "not folded")


@pytest.mark.parametrize("norm", [nn.BatchNorm2d(2, track_running_stats=False), nn.InstanceNorm2d(2, affine=True)])
def test_a_norm_with_batch_statistics_at_inference_is_refused(norm):
    # Its mean and variance are computed from the input: neither a fold nor a fixed affine counts them.
    model = nn.Sequential(nn.Conv2d(2, 2, 1, bias=False), norm)
    with pytest.raises(UnsupportedOpError, match=r"in layer '1', .*normalises with batch statistics"):
        count_model(model, torch.randn(3, 2, 2, 2))


# --- bit tags ---------------------------------------------------------------------------------------
class Tags(nn.Module):
    """A 4-bit input through ReLU and max-pool (tag kept) into a 4-bit conv, and through an add (tag lost)."""

    def __init__(self):
        super().__init__()
        self.quant = FakeQuant(4)
        self.conv = nn.Conv2d(2, 2, 1, bias=False)
        set_grid_weights(self.conv.weight, 4, Fraction(0))
        quantize_weight(self.conv, 4)

    def forward(self, x):
        y = self.quant(x)
        pooled = self.conv(F.max_pool2d(F.relu(y), 2))
        summed = self.conv((y + y).view_as(y)[..., :2, :2])
        return pooled, summed


def test_bit_tags_pass_relu_max_pool_and_views_but_not_an_add():
    count = count_model(Tags(), torch.randn(1, 2, 4, 4))
    # ReLU 32 mults @4; max-pool 2×2→ 8 outputs × 3 comparisons = 24 mults @4; add 32 adds;
    # conv of the pooled input: 8 outputs × L = 2: 16 mults @4 (weight 4, input 4), 8 adds;
    # conv of the summed input: 16 mults @32 (the add's output is unquantized), 8 adds.
    assert (count.mults, count.adds) == (88, 48)
    assert count.ops == Fraction(32 * 4 + 24 * 4 + 16 * 4 + 16 * 32, 32) + 48  # 25 + 48
    # stored: 4 weights × 4 bits + the conv's scale + the activation quantizer's scale
    assert count.param_bits == 16 + 32 + 32


# --- declared masks ---------------------------------------------------------------------------------
class HalfFilters(nn.Module):
    """A block mask over a 16-filter conv: two blocks, the first 8 filters kept."""

    micronet_mask_bits = 2

    def forward(self, w):
        return w * torch.cat([torch.ones(8, *w.shape[1:]), torch.zeros(8, *w.shape[1:])])


class OneBlock(nn.Module):
    """Declares one kept block over the whole weight and passes it through unchanged."""

    micronet_mask_bits = 1

    def forward(self, w):
        return w * 1.0


def test_zeros_inside_kept_blocks_are_stored_values():
    conv = nn.Conv2d(8, 16, 3, bias=False)  # 1,152 weights; the mask keeps 576
    set_grid_weights(conv.weight, 4, Fraction(0))
    with torch.no_grad():
        conv.weight[0, :, 0, :2] = 0  # 16 zeros of the original inside a kept block
    parametrize.register_parametrization(conv, "weight", HalfFilters())
    quantize_weight(conv, 4)
    count = count_model(conv, torch.randn(1, 8, 5, 5))
    # cheapest of dense 1,152·4 = 4,608; 560 nonzeros·4 + 1,152 = 3,392; the 576 kept values·4 + 2 = 2,306.
    # (Counting only the 560 nonzeros with the 2 block bits, 2,242, would drop the 16 zeros' positions.)
    assert count.param_bits == 576 * 4 + 2 + 32  # + the 32-bit scale


def test_a_declared_block_mask_cannot_hide_unstructured_zeros():
    linear = nn.Linear(8, 8, bias=False)
    with torch.no_grad():
        linear.weight.fill_(0.5)
        linear.weight[:, 2:] = 0  # 48 zeros not made by the mask: 16 nonzeros
    parametrize.register_parametrization(linear, "weight", OneBlock())
    count = count_model(linear, torch.randn(1, 8), freebie=False)
    # The one kept block stores all 64 values (64·32 + 1 = 2,049 > dense 2,048); the cheapest is
    # 16 nonzeros·32 + a 64-bit mask = 576, not 16·32 + 1 = 513.
    assert count.param_bits == 16 * 32 + 64
    assert (count.mults, count.adds) == (16, 8)  # 8 outputs × 2 nonzeros: 16 mults, 8·1 adds


# --- the per-layer table ----------------------------------------------------------------------------
def test_the_per_layer_table_sums_to_the_totals():
    count = count_model(Tags(), [torch.randn(1, 2, 4, 4), torch.randn(2, 2, 4, 4)])
    # all widths are multiples of 1/32, so every per-layer number is an exact binary float
    assert count.examples == 3
    for key in ("param_bits", "params", "mults", "adds", "ops"):
        assert sum(row[key] for row in count.layers) == getattr(count, key), key
