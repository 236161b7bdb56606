"""Counted by hand: what the 2019 winners did, as the scorer's protocol states it (docs/rules.md, "What the
winners did"): dot products summed in adder trees, the ops outside dot products declared narrower, per-tensor
scales under a folded batch norm, and the acceptance of an adder tree as an official score.

One example per count, so params = bits / 32 and ops = (Σ mults · width + Σ adds · width) / 32. No freebie: every
model quantizes something to 4 bits.
"""
from __future__ import annotations

from fractions import Fraction

import pytest
import torch
import torch.nn as nn

from scoring import count_model
from scoring.entry.files import EntryError
from scoring.entry.kit import Judged, accept_accumulator
from scoring.report import build_report, totals_text
from scoring.rules import ADDER_TREE, accumulator_setting, adder_tree_levels
from tests.scoring.helpers import FakeQuant, layer_rows, quantize_weight, trained_bn


def _ops(count) -> Fraction:
    return Fraction(count.ops).limit_denominator(64)


def test_adder_tree_levels_grow_one_bit_per_level():
    # 18 products of 8 bits: 9 adds at 8 bits leave 9; 4 at 9 leave 5; 2 at 10 leave 3; 1 at 11 leaves 2; 1 at 12.
    assert adder_tree_levels(18, 8) == (((8, 9), (9, 4), (10, 2), (11, 1), (12, 1)), 13)
    assert sum(adds for _, adds in adder_tree_levels(18, 8)[0]) == 17  # the official L - 1
    assert adder_tree_levels(4, 8) == (((8, 2), (9, 1)), 10)
    assert adder_tree_levels(1, 8) == ((), 8) and adder_tree_levels(0, 8) == ((), 8)


class QuantConv(nn.Module):
    """A 1×1 conv 4→2 with 4-bit weights (row 0: 4 nonzeros, row 1: 3) on a 4-bit input (unless ``float_input``)."""

    def __init__(self, float_input: bool = False, batch_norm: bool = False):
        super().__init__()
        self.quant = nn.Identity() if float_input else FakeQuant(4)
        self.conv = nn.Conv2d(4, 2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[1., 2, -3, 7], [5, -6, 7, 0]]).view(2, 4, 1, 1) * 0.01)
        quantize_weight(self.conv, 4)
        self.bn = trained_bn(nn.BatchNorm2d(2)) if batch_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(self.quant(x)))


def _image() -> torch.Tensor:
    return torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(0))


def test_adder_tree_counts_each_level_at_its_width():
    count = count_model(QuantConv().eval(), _image(), accumulator_bits=ADDER_TREE)
    # 9 positions; products 4 + 4 = 8 bits wide. Row 0, 4 terms: 2 adds at 8 + 1 at 9 = 25 bits; row 1, 3 terms:
    # 1 add at 8 + 1 at 9 = 17 bits. Adds 9 · (3 + 2) = 45 at 9 · (25 + 17) = 378 bits; mults 9 · 7 = 63 at 4 bits.
    assert (count.mults, count.adds) == (63, 45)
    assert _ops(count) == Fraction(63 * 4 + 378, 32)
    assert count.float_dot_products == {} and "adder tree" in count.project_rules
    flat = count_model(QuantConv().eval(), _image())  # the same additions in a 32-bit accumulator
    assert _ops(flat) == Fraction(63 * 4 + 45 * 32, 32)


def test_adder_tree_sums_a_float_operands_dot_products_at_32_bits_and_lists_them():
    count = count_model(QuantConv(float_input=True).eval(), _image(), accumulator_bits=ADDER_TREE)
    assert _ops(count) == Fraction(63 * 32 + 45 * 32, 32)  # a float input: 32-bit mults, 32-bit additions
    assert count.float_dot_products == {"conv": "its input"}
    assert "its input is a float" in layer_rows(count)["conv"][3]
    assert count.to_dict()["float_dot_products"] == {"conv": "its input"}
    assert "float_dot_products" not in count_model(QuantConv().eval(), _image()).to_dict()  # 32-bit: no such field


class QuantLinear(nn.Module):
    """A linear 3→1 with 4-bit weights, an 8-bit bias (unless ``float_bias``) and a 4-bit input."""

    def __init__(self, float_bias: bool = False):
        super().__init__()
        self.quant, self.fc = FakeQuant(4), nn.Linear(3, 1)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1., 2, 3]]) * 0.01)  # 2, 5, 7 times its 4-bit step: no zero
            self.fc.bias.fill_(0.5)
        quantize_weight(self.fc, 4)
        if not float_bias:
            quantize_weight(self.fc, 8, name="bias")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.quant(x))


@pytest.mark.parametrize("float_bias, bias_add_bits", [(False, 10), (True, 32)])
def test_adder_tree_adds_the_bias_at_the_wider_of_the_final_sum_and_the_bias(float_bias, bias_add_bits):
    count = count_model(QuantLinear(float_bias).eval(), torch.randn(1, 3), accumulator_bits=ADDER_TREE)
    # 3 products of 8 bits: 1 add at 8 + 1 at 9 = 17 bits, final sum 8 + ceil(log2 3) = 10 bits; the bias add at
    # max(10, 8) = 10 bits (a float bias: 32). Mults 3 at 4 bits.
    assert (count.mults, count.adds) == (3, 3)
    assert _ops(count) == Fraction(3 * 4 + 17 + bias_add_bits, 32)


def test_declared_other_ops_width_counts_a_folded_shift_in_the_adder_tree_at_it():
    model = QuantConv(batch_norm=True)
    model.micronet_other_ops_bits = 16
    count = count_model(model.eval(), _image(), accumulator_bits=ADDER_TREE)
    # As above (63 mults at 4 bits, 378 adder-tree bits), plus the folded shift: 2 · 9 = 18 adds at the wider of the
    # widest final sum (4 terms: 8 + 2 = 10 bits) and the batch norm's declared 16 bits; the shift stored at 16 bits.
    assert _ops(count) == Fraction(63 * 4 + 378 + 18 * 16, 32)
    assert layer_rows(count)["bn"][:3] == (2 * 16, 0, 18)
    assert {"adder tree", "other ops precision"} <= set(count.project_rules)


class OtherOps(nn.Module):
    """x → 1×1 conv 2→2 (4-bit weights, float input) → ReLU → + x → batch norm (unfolded: it reads an add)."""

    def __init__(self, declared: int | None):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[1., -7], [3, 5]]).view(2, 2, 1, 1) * 0.01)  # on the 4-bit grid
        quantize_weight(self.conv, 4)
        self.bn = trained_bn(nn.BatchNorm2d(2))
        if declared is not None:
            self.micronet_other_ops_bits = declared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(torch.relu(self.conv(x)) + x)


@pytest.mark.parametrize("declared, bits", [(None, 32), (16, 16)])
def test_declared_other_ops_width_counts_activations_adds_and_an_unfolded_batch_norm_at_it(declared, bits):
    x = torch.randn(1, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    count = count_model(OtherOps(declared).eval(), x)
    # The conv is a dot product: 8 outputs × 2 mults at 32 bits (its float input), 8 adds at 32. Outside it, at
    # ``bits``: ReLU 8 mults, the residual add 8 adds, the batch norm 8 mults + 8 adds and its γ, β (4 values).
    assert (count.mults, count.adds) == (16 + 8 + 8, 8 + 8 + 8)
    assert _ops(count) == Fraction(16 * 32 + 8 * 32 + (8 + 8 + 8 + 8) * bits, 32)
    assert layer_rows(count)["bn"][:3] == (4 * bits, 8, 8)
    assert ("other ops precision" in count.project_rules) == (declared is not None)


def test_a_narrower_declared_width_cancels_the_freebie():
    model = OtherOps(8)
    model.conv = nn.Conv2d(2, 2, 1, bias=False)  # nothing quantized but the declared 8-bit other ops
    assert not count_model(model.eval(), torch.randn(1, 2, 2, 2)).freebie
    model.micronet_other_ops_bits = 16
    assert count_model(model.eval(), torch.randn(1, 2, 2, 2)).freebie


class TensorScaled(nn.Module):
    """A 1×1 conv 2→3 whose 4-bit weight has one 8-bit scale for the whole tensor; a batch norm after it."""

    def __init__(self, batch_norm: bool):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 1, bias=False)
        quantize_weight(self.conv, 4)
        quantizer = self.conv.parametrizations["weight"][0]
        quantizer.micronet_scale_bits, quantizer.micronet_scale_granularity = 8, "tensor"
        self.bn = trained_bn(nn.BatchNorm2d(3)) if batch_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


@pytest.mark.parametrize("batch_norm, param_bits", [
    (False, 6 * 4 + 8),              # 6 weights at 4 bits, one 8-bit scale
    (True, 6 * 4 + 3 * 8 + 3 * 32),  # folded: a scale per output channel (3 × 8 bits), the shift (3 × 32 bits)
])
def test_a_per_tensor_scale_becomes_one_per_channel_where_a_batch_norm_folds(batch_norm, param_bits):
    count = count_model(TensorScaled(batch_norm).eval(), torch.randn(1, 2, 2, 2))
    assert count.param_bits == param_bits
    assert ("per-tensor scales and folding" in count.project_rules) == batch_norm


def test_a_per_tensor_granularity_with_several_scales_is_refused():
    model = TensorScaled(False)
    model.conv.parametrizations["weight"][0].micronet_scale_count = 3
    with pytest.raises(ValueError, match="micronet_scale_granularity='tensor' with 3 scales"):
        count_model(model.eval(), torch.randn(1, 2, 2, 2))


def test_report_names_the_accumulation_and_an_adder_tree_over_floats_is_not_official():
    tree = build_report(task="cifar100", count=count_model(QuantConv().eval(), _image(), accumulator_bits=ADDER_TREE))
    assert (tree["accumulator"], tree["float_dot_products"]) == ("adder tree", {})
    assert "dot products summed in adder trees" in totals_text(tree)
    flat = build_report(task="cifar100", count=count_model(QuantConv().eval(), _image()))
    assert flat["accumulator"] == "32-bit" and "float_dot_products" not in flat
    floats = build_report(task="cifar100", count=count_model(QuantConv(float_input=True).eval(), _image(),
                                                             accumulator_bits=ADDER_TREE))
    assert "NOT an official score" in totals_text(floats)

    judged = Judged(entry=None, unofficial=())
    assert accept_accumulator(judged, tree, False) is judged and accept_accumulator(judged, flat, False) is judged
    with pytest.raises(EntryError, match=r"^score.accumulator_bits=adder_tree is official only where both inputs of "
                                         r"every dot product are integer-quantized, but 1 layer\(s\) multiply a float: "
                                         r"'conv' \(its input\) ; fix: ") as refused:
        accept_accumulator(judged, floats, False)
    assert "\n" not in str(refused.value)
    assert accept_accumulator(judged, floats, True).unofficial == ("accumulator_bits=adder_tree over float operands "
                                                                   "in 1 layer(s)",)


@pytest.mark.parametrize("setting", ["tree", 0, 33, True, "32"])
def test_an_accumulator_setting_other_than_a_width_or_adder_tree_is_refused_in_one_line(setting):
    assert accumulator_setting(ADDER_TREE) == ADDER_TREE and accumulator_setting(16) == 16
    with pytest.raises(ValueError, match=r"^score\.accumulator_bits=.* must be an integer in 1\.\.32 or adder_tree$"):
        accumulator_setting(setting)
