"""Rules brought in line with the organizers: empty dot products with a bias, permutations (channel shuffle),
binary weights, hard-swish / ReLU6 / clamp, and EfficientNet-B0 with half of every weight zeroed against the
official calculator's formulas (scoring/oplist.py).

Counts at 32 bits (``freebie=False``) unless stated; params = bits / 32.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from models import create_model
from scoring import count_model
from scoring.oplist import Add, Conv2D, DepthwiseConv2D, FullyConnected, GlobalAvg, Scale, count_oplist
from tests.scoring.helpers import FakeQuant


def _signs(shape: torch.Size) -> torch.Tensor:
    """±0.5 at random: no exact zero (a random normal sign can be 0)."""
    return torch.where(torch.rand(shape) < 0.5, -0.5, 0.5)


def _fill(weight: torch.Tensor) -> None:
    with torch.no_grad():
        weight.copy_(_signs(weight.shape))


# --- empty dot products -------------------------------------------------------------------------------------
def test_an_output_with_an_empty_dot_product_and_a_bias_costs_no_additions():
    linear = nn.Linear(3, 4)
    _fill(linear.weight)
    with torch.no_grad():
        linear.weight[0] = 0  # output 0 is its bias: a constant
    count = count_model(linear, torch.randn(1, 3), freebie=False)
    # official: (L - 1)·N + N per row: row 0 (0 - 1) + 1 = 0, rows 1..3 (3 - 1) + 1 = 3  => 9 adds; 9 mults
    assert (count.mults, count.adds) == (9, 9)
    with torch.no_grad():
        linear.bias = None
    count = count_model(linear, torch.randn(1, 3), freebie=False)
    # without a bias the official formula would give -1 for row 0: it costs none, rows 1..3 2 each
    assert (count.mults, count.adds) == (9, 6)


def test_a_folded_batch_norm_adds_nothing_to_a_channel_whose_dot_products_are_empty():
    model = nn.Sequential(nn.Conv2d(2, 3, 1, bias=False), nn.BatchNorm2d(3)).eval()
    _fill(model[0].weight)
    with torch.no_grad():
        model[0].weight[1] = 0  # channel 1: its folded bias is the whole output
    count = count_model(model, torch.randn(1, 2, 2, 2), freebie=False)
    # 4 positions: channels 0 and 2 L = 2: 16 mults, 4 × 2 × 1 = 8 adds + 8 bias adds; channel 1 none
    rows = {row["name"]: (row["mults"], row["adds"]) for row in count.layers}
    assert rows == {"0": (16, 8), "1": (0, 8)}
    # 4 nonzero weights × 32 bits + a 6-bit mask (cheaper than 6 × 32 dense), 3 folded biases × 32
    assert count.param_bits == 4 * 32 + 6 + 3 * 32


# --- permutations ---------------------------------------------------------------------------------------------
class Shuffles(nn.Module):
    """Channel shuffle (nn.ChannelShuffle) twice over 6 channels, once over 4, and free reshapes and transposes."""

    def forward(self, x):
        a = nn.functional.channel_shuffle(x, 2)  # 6 channels
        b = nn.functional.channel_shuffle(a, 2)  # the same permutation again: its matrix is stored once
        c = nn.functional.channel_shuffle(b[:, :4].contiguous(), 2)  # a 4-channel permutation
        heads = b.reshape(1, 2, 3, 4).permute(0, 2, 1, 3).reshape(1, 3, 8)  # a head split: whole dims, free
        return c, heads


def test_channel_shuffle_is_a_product_with_a_stored_sparse_permutation_matrix():
    count = count_model(Shuffles(), torch.randn(1, 6, 2, 2), freebie=False)
    # each output element is 1 multiply with the permutation matrix (one nonzero per row: L = 1, no adds):
    # 24 + 24 + 16 = 64 mults. Stored: the 6×6 matrix (6 nonzeros × 32 bits + a 36-bit mask) once, the 4×4 one
    # (4 × 32 + 16); the reshapes and the permute of whole dims are free.
    assert (count.mults, count.adds) == (64, 0)
    assert count.param_bits == (6 * 32 + 36) + (4 * 32 + 16)
    assert "channel_shuffle" not in count.project_rules  # an official rule (the FAQ)
    # under the freebie the matrices' values are 16-bit like every unquantized tensor
    assert count_model(Shuffles(), torch.randn(1, 6, 2, 2)).param_bits == (6 * 16 + 36) + (4 * 16 + 16)


class ManualShuffle(nn.Module):
    """torchvision's ShuffleNetV2 channel shuffle: split the channels into (groups, per group), swap, merge back."""

    def forward(self, x):
        b, c, h, w = x.shape
        shuffled = x.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous().view(b, c, h, w)
        unshuffled_order = x.view(b, 2, c // 2, h, w).reshape(b, c, h, w)  # split and merged in order: free
        windows = x.view(b, c, h // 2, 2, w).permute(0, 1, 2, 4, 3).reshape(b, c, h // 2, w * 2)  # across dims: free
        return shuffled, unshuffled_order, windows


def test_a_view_transpose_view_channel_shuffle_is_the_same_permutation():
    # only the first output reorders a dim: 6 channels × 2 × 4 positions = 48 mults, the 6×6 matrix stored
    count = count_model(ManualShuffle(), torch.randn(1, 6, 4, 2), freebie=False)
    assert (count.mults, count.adds, count.param_bits) == (48, 0, 6 * 32 + 36)
    assert count_model(nn.ChannelShuffle(2), torch.randn(1, 6, 4, 2), freebie=False).mults == 48


def test_attention_head_splits_and_merges_are_free():
    class Heads(nn.Module):
        def forward(self, x):  # [1, 4 tokens, 3 × 2 heads × 4]
            q, k, v = x.view(1, 4, 3, 2, 4).permute(2, 0, 3, 1, 4)
            return (q + k + v).transpose(1, 2).reshape(1, 4, 8)

    count = count_model(Heads(), torch.randn(1, 4, 24), freebie=False)
    assert (count.mults, count.adds, count.params) == (0, 64, 0)  # the two adds only


@pytest.mark.parametrize("fn, expected", [
    # a 2×5 input: roll along the dim of 5 by 2: 10 mults; a 5×5 matrix: 5 × 32 + 25
    (lambda x: torch.roll(x, 2, 2), (10, 5 * 32 + 25)),
    # flip of both dims (2 and 5): 2 products of 10 elements; matrices 2 × 32 + 4 and 5 × 32 + 25
    (lambda x: torch.flip(x, (1, 2)), (20, (2 * 32 + 4) + (5 * 32 + 25))),
    (lambda x: torch.roll(x, 5, 2), (0, 0)),  # a full turn: the identity
])
def test_rolls_and_flips_are_permutations_per_dim(fn, expected):
    class Fn(nn.Module):
        def forward(self, x):
            return fn(x)

    count = count_model(Fn(), torch.randn(1, 2, 5), freebie=False)
    assert (count.mults, count.param_bits) == expected


# --- binary weights -------------------------------------------------------------------------------------------
class Binarize(nn.Module):
    """±1 weights with one scale per output row (mean |w|): a 1-bit quantizer declared through scoring/protocol.py."""

    micronet_bits = 1

    def __init__(self, rows: int):
        super().__init__()
        self.micronet_scale_count = rows

    def forward(self, w):
        return torch.sign(w) * w.abs().mean(1, keepdim=True)


def test_binary_weights_multiply_at_one_thirty_second_of_an_op():
    linear = nn.Linear(4, 3, bias=False)
    _fill(linear.weight)
    parametrize.register_parametrization(linear, "weight", Binarize(3))
    count = count_model(linear, torch.randn(1, 4))
    # 3 outputs × L = 4: 12 multiplies, each a sign flip of the float input: 12/32 op; 9 adds at 32 bits
    assert not count.freebie and (count.mults, count.adds) == (12, 9)
    assert count.ops == 12 / 32 + 9
    assert count.param_bits == 12 * 1 + 3 * 32  # 12 one-bit weights + 3 scales
    # whatever the other operand's width: a 6-bit quantized input
    quantized = nn.Sequential(FakeQuant(6, scale_count=0), linear)
    assert count_model(quantized, torch.randn(1, 4)).ops == 12 / 32 + 9


def test_a_product_with_a_binary_activation_is_a_sign_flip():
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.sign = FakeQuant(1, scale_count=0)  # a 1-bit tensor: ±1 (the helper's grid is {-1, 0, 1} · s)

        def forward(self, x):
            return x[:, :4] * self.sign(x[:, 4:])

    count = count_model(Gate(), torch.randn(1, 8))
    assert (count.mults, count.ops) == (4, 4 / 32)


# --- hard-swish, ReLU6, clamp -----------------------------------------------------------------------------------
def test_hard_swish_counts_as_the_2019_entrys_table():
    # CanyonWind/Single-Path-One-Shot-NAS-MXNet (utils/micronet_counting.py): x·clip(x + 3, 0, 6)/6 is
    # +3 (1 add), the clip (1 op), /6 (1 mult), ×x (1 mult); on 112×112×16 = 200,704 elements:
    # 3 × 200,704 = 602,112 mults and 200,704 adds (their table: 0.603M and 0.201M)
    count = count_model(nn.Hardswish(), torch.randn(1, 16, 112, 112))
    assert (count.mults, count.adds) == (602_112, 200_704)
    assert "CanyonWind" in count.project_rules["hardswish"]
    # a clip to a range is one op: ReLU6, clamp with both bounds
    assert count_model(nn.ReLU6(), torch.randn(1, 10)).mults == 10
    assert count_model(nn.Hardtanh(-2, 2), torch.randn(1, 10)).mults == 10


# --- EfficientNet-B0 against the official calculator ------------------------------------------------------------
#: EfficientNet-B0's stages: (expansion, kernel, stride, output channels, repeats).
B0_STAGES = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
             (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]


def efficientnet_b0_oplist(sparsity: float, bits: int) -> list:
    """EfficientNet-B0 at 224 written as the organizers' calculator does (their EfficientNet colab): every conv's
    batch norm folded into a bias, swish after the stem, expansion, depthwise and head convs, squeeze-excite
    (reduce to a quarter of the block's input channels, swish; expand, sigmoid; channel scale), residual adds where
    the shape is kept, every weight at ``sparsity``."""
    weighted = dict(bias=True, sparsity=sparsity, bits=bits)
    ops, size, channels = [Conv2D(224, 3, 3, 32, stride=2, activation="swish", **weighted)], 112, 32
    for expansion, kernel, stride, out, repeats in B0_STAGES:
        for i in range(repeats):
            stride_i, mid = stride if i == 0 else 1, channels * expansion
            if expansion != 1:
                ops.append(Conv2D(size, 1, channels, mid, activation="swish", **weighted))
            ops.append(DepthwiseConv2D(size, kernel, mid, stride=stride_i, activation="swish", **weighted))
            size = math.ceil(size / stride_i)
            reduced = max(1, channels // 4)
            ops += [GlobalAvg(size, mid, bits=bits), Conv2D(1, 1, mid, reduced, activation="swish", **weighted),
                    Conv2D(1, 1, reduced, mid, activation="sigmoid", **weighted), Scale(size, mid, bits=bits),
                    Conv2D(size, 1, mid, out, **weighted)]
            if stride_i == 1 and channels == out:
                ops.append(Add(size, out, bits=bits))
            channels = out
    return ops + [Conv2D(size, 1, channels, 1280, activation="swish", **weighted), GlobalAvg(size, 1280, bits=bits),
                  FullyConnected(1280, 1000, **weighted)]


@pytest.mark.slow
def test_efficientnet_b0_with_half_of_every_weight_zeroed_counts_the_official_additions():
    torch.manual_seed(0)
    model = create_model("efficientnet_b0", num_classes=1000).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                flat = module.weight.view(-1)
                flat.copy_(_signs(flat.shape))
                flat[:flat.numel() // 2] = 0  # the first half in memory order: whole filters and rows empty
    count = count_model(model, torch.randn(1, 3, 224, 224))
    official = count_oplist(efficientnet_b0_oplist(0.5, 16))
    # The official calculator spreads the sparsity evenly: (L/2 - 1)·N + N additions per conv. Here half of the
    # filters are empty and half full, yet every output has a bias (its own or a folded batch norm's), so each
    # output costs its own L_r - 1 + 1 = L_r additions: the same total, to the unit. (Charging the empty outputs
    # their bias add, as the scorer did, would add one addition per output of every empty filter.)
    assert count.adds == official.adds
    assert count.mults == official.mults  # L/2·N multiplies either way
    assert count.param_bits == official.param_bits  # half the weights × 16 bits + 1 mask bit each, 16-bit biases
    assert count.freebie
