"""An op-list calculator in the style of the organizers' reference calculator.

A model is written by hand as a list of descriptors (:class:`Conv2D`, :class:`DepthwiseConv2D`,
:class:`FullyConnected`, :class:`GlobalAvg`, :class:`Scale`, :class:`Add`, :class:`Activation`, and for
transformers :class:`LayerNorm` and :class:`Attention`, for language models :class:`Recurrent` and
:class:`Softmax`), each with its input size, kernel, stride, padding,
bias, activation, sparsity and bit widths. Every count goes through
the same rules table as the traced counter (:mod:`scoring.rules`), so a traced count can be checked by hand.

Widths: ``bits`` is the width of the stored weights; the op's multiplies count at
``max(bits, input_bits)`` (``input_bits`` defaults to ``bits``), biases are stored at ``bias_bits``
(default ``bits``, as in the official calculator), additions at the accumulator width.

Language models: :class:`Recurrent` (LSTM / GRU / RNN cells, per step), :class:`Softmax` (and log-softmax) and
:class:`FullyConnected` describe a token's ops; an embedding lookup is free.

Sparsity: the mask costs 1 bit per weight, or with ``block=(rows, cols)`` 1 bit per block of the
(out, weights per output) weight matrix, partial edge blocks included (rules: "Block sparsity: 1 bit per
block"), as the traced counter charges a pruning mask that declares ``micronet_mask_bits``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Mapping, Sequence

from scoring.rules import (CELLS, ELEMENTWISE, RULES, Rule, attention_counts, dot_counts, norm_counts,
                           recurrent_counts, weight_storage_bits)

#: Activation names of the official calculator, mapped onto rule keys.
ACTIVATION_ALIASES: Mapping[str, str] = {"swish": "silu", "relu6": "hardtanh", "hard_swish": "hardswish",
                                         "hard_sigmoid": "hardsigmoid"}


@dataclass(frozen=True)
class OpCount:
    """One op's stored bits, multiplies (at ``mult_bits`` each) and additions."""

    param_bits: Fraction
    mults: Fraction
    adds: Fraction
    mult_bits: int


def _activation_rule(rules: Mapping[str, Rule], name: str) -> Rule:
    key = ACTIVATION_ALIASES.get(name, name)
    rule = rules.get(key)
    if rule is None or rule.kind != ELEMENTWISE:
        known = sorted(k for k, r in rules.items() if r.kind == ELEMENTWISE) + sorted(ACTIVATION_ALIASES)
        raise ValueError(f"unknown activation {name!r}; use one of {', '.join(known)}")
    return rule


def conv_output_size(size: int, kernel: int, stride: int, padding: str | int) -> int:
    """Output size along one dim: 'same' = ceil(size/stride); else floor((size + 2·pad - k)/stride) + 1."""
    if padding == "same":
        return math.ceil(size / stride)
    pad = 0 if padding == "valid" else int(padding)
    return (size + 2 * pad - kernel) // stride + 1


def _fraction(value: float | Fraction) -> Fraction:
    return value if isinstance(value, Fraction) else Fraction(str(value))


@dataclass(frozen=True, kw_only=True)
class _Weighted:
    """Shared (keyword-only) fields of the ops with weights: conv, depthwise conv, fully connected."""

    bias: bool = False
    activation: str | None = None
    sparsity: float | Fraction = 0
    bits: int = 32
    input_bits: int | None = None
    bias_bits: int | None = None
    block: tuple[int, int] | None = None

    def _shape(self) -> tuple[int, int, int]:
        """(weights per output, outputs, output channels)."""
        raise NotImplementedError

    def count(self, rules: Mapping[str, Rule] = RULES) -> OpCount:
        """Stored bits, multiplies and additions of this op under ``rules``."""
        weights_per_output, outputs, channels = self._shape()
        density = 1 - _fraction(self.sparsity)
        if not 0 <= density <= 1:
            raise ValueError(f"sparsity {self.sparsity} is outside [0, 1]")
        weights = weights_per_output * channels
        mask_bits = None
        if self.block is not None:
            rows, cols = self.block
            mask_bits = -(-channels // rows) * -(-weights_per_output // cols)
        param_bits = weight_storage_bits(weights, weights * density, self.bits, mask_bits)
        mults, adds = dot_counts(weights_per_output * density, outputs, self.bias)  # (L-1)·N, + N for a bias
        if self.bias:
            param_bits += channels * (self.bias_bits or self.bits)
        if self.activation:
            act_mults, act_adds = _activation_rule(rules, self.activation).counts(outputs)
            mults, adds = mults + act_mults, adds + act_adds
        return OpCount(Fraction(param_bits), Fraction(mults), Fraction(adds), max(self.bits, self.input_bits or self.bits))


@dataclass(frozen=True)
class Conv2D(_Weighted):
    """A k×k convolution of a square input (``groups`` > 1 for grouped convs)."""

    input_size: int
    kernel: int
    in_channels: int
    out_channels: int
    stride: int = 1
    padding: str | int = "same"
    groups: int = 1

    def _shape(self) -> tuple[int, int, int]:
        size = conv_output_size(self.input_size, self.kernel, self.stride, self.padding)
        return self.kernel ** 2 * self.in_channels // self.groups, size * size * self.out_channels, self.out_channels


@dataclass(frozen=True)
class DepthwiseConv2D(_Weighted):
    """A k×k depthwise convolution (one filter per channel) of a square input."""

    input_size: int
    kernel: int
    channels: int
    stride: int = 1
    padding: str | int = "same"

    def _shape(self) -> tuple[int, int, int]:
        size = conv_output_size(self.input_size, self.kernel, self.stride, self.padding)
        return self.kernel ** 2, size * size * self.channels, self.channels


@dataclass(frozen=True)
class FullyConnected(_Weighted):
    """A linear layer on one example, applied at each of ``positions`` positions (tokens)."""

    in_features: int
    out_features: int
    positions: int = 1

    def _shape(self) -> tuple[int, int, int]:
        return self.in_features, self.out_features * self.positions, self.out_features


@dataclass(frozen=True)
class _Elementwise:
    """An op over a square feature map, counted by one rule of the table."""

    input_size: int
    channels: int
    bits: int = field(default=32, kw_only=True)

    def _rule_counts(self, rules: Mapping[str, Rule]) -> tuple[int, int]:
        raise NotImplementedError

    def count(self, rules: Mapping[str, Rule] = RULES) -> OpCount:
        """Multiplies and additions of this op under ``rules`` (no stored values)."""
        mults, adds = self._rule_counts(rules)
        return OpCount(Fraction(0), Fraction(mults), Fraction(adds), self.bits)


@dataclass(frozen=True)
class GlobalAvg(_Elementwise):
    """Global average pool over H×W×C: C outputs, (H·W - 1)·C merges (rule ``mean``)."""

    def _rule_counts(self, rules: Mapping[str, Rule]) -> tuple[int, int]:
        return rules["mean"].counts(self.channels, (self.input_size ** 2 - 1) * self.channels)


@dataclass(frozen=True)
class Scale(_Elementwise):
    """Channel scale (squeeze-excite gate) of H×W×C (rule ``mul``)."""

    def _rule_counts(self, rules: Mapping[str, Rule]) -> tuple[int, int]:
        return rules["mul"].counts(self.input_size ** 2 * self.channels)


@dataclass(frozen=True)
class Add(_Elementwise):
    """Residual add of H×W×C (rule ``add``)."""

    def _rule_counts(self, rules: Mapping[str, Rule]) -> tuple[int, int]:
        return rules["add"].counts(self.input_size ** 2 * self.channels)


@dataclass(frozen=True)
class Activation(_Elementwise):
    """A standalone activation over H×W×C (``input_size`` 1 for a vector of ``channels``)."""

    activation: str = "relu"

    def _rule_counts(self, rules: Mapping[str, Rule]) -> tuple[int, int]:
        return _activation_rule(rules, self.activation).counts(self.input_size ** 2 * self.channels)


@dataclass(frozen=True)
class LayerNorm:
    """Layer norm over ``features`` values at each of ``positions`` positions (rule ``native_layer_norm``);
    with ``affine``, γ and β are applied and stored at ``bits``."""

    positions: int
    features: int
    affine: bool = True
    bits: int = field(default=32, kw_only=True)

    def count(self, rules: Mapping[str, Rule] = RULES) -> OpCount:
        """Stored bits, multiplies and additions of this op under ``rules``."""
        mults, adds = norm_counts(rules, "native_layer_norm", self.positions * self.features, self.positions,
                                  scale=self.affine, shift=self.affine)
        param_bits = 2 * self.features * self.bits if self.affine else 0
        return OpCount(Fraction(param_bits), Fraction(mults), Fraction(adds), self.bits)


@dataclass(frozen=True)
class Attention:
    """Scaled dot-product attention of ``heads`` heads (one example), as the fused kernels' rule counts it."""

    heads: int
    queries: int
    keys: int
    head_dim: int
    value_dim: int | None = None  # default: head_dim
    causal: bool = False
    masked: bool = False
    bits: int = field(default=32, kw_only=True)

    def count(self, rules: Mapping[str, Rule] = RULES) -> OpCount:
        """Multiplies and additions of this op under ``rules`` (no stored values)."""
        mults, adds = attention_counts(rules, self.heads, self.queries, self.keys, self.head_dim,
                                       self.value_dim or self.head_dim, causal=self.causal, masked=self.masked)
        return OpCount(Fraction(0), Fraction(mults), Fraction(adds), self.bits)


@dataclass(frozen=True)
class Softmax:
    """Softmax (or, with ``log``, log-softmax) over ``n`` values at each of ``positions`` positions (rules
    ``_softmax`` / ``_log_softmax``)."""

    n: int
    positions: int = 1
    log: bool = False
    bits: int = field(default=32, kw_only=True)

    def count(self, rules: Mapping[str, Rule] = RULES) -> OpCount:
        """Multiplies and additions of this op under ``rules`` (no stored values)."""
        elements = self.n * self.positions
        mults, adds = rules["_log_softmax" if self.log else "_softmax"].counts(
            elements, elements - self.positions, self.positions)
        return OpCount(Fraction(0), Fraction(mults), Fraction(adds), self.bits)


@dataclass(frozen=True, kw_only=True)
class Recurrent:
    """``steps`` steps of a recurrent cell (``"lstm"``, ``"gru"``, ``"rnn_tanh"``, ``"rnn_relu"``: a key of
    :data:`scoring.rules.CELLS`) from ``input_size`` to ``hidden_size``, with an LSTM's projection to
    ``proj_size`` (0: none), as the traced counter's recurrent rules count it.

    ``bias`` means the framework's two biases, stored as one per merged gate row (:class:`scoring.rules.Cell`);
    ``sparsity`` applies to every weight matrix, ``bits`` to the weights and biases, ``input_bits`` to the input.
    """

    cell: str
    input_size: int
    hidden_size: int
    steps: int = 1
    proj_size: int = 0
    bias: bool = True
    sparsity: float | Fraction = 0
    bits: int = 32
    input_bits: int | None = None

    def count(self, rules: Mapping[str, Rule] = RULES) -> OpCount:
        """Stored bits, multiplies and additions of this op under ``rules``."""
        cell = CELLS[self.cell]
        density = 1 - _fraction(self.sparsity)
        hidden, recurrent = self.hidden_size, self.proj_size or self.hidden_size
        rows, merged = cell.gates * hidden, cell.merged * hidden
        shapes = [(rows, self.input_size), (rows, recurrent)] + ([(self.proj_size, hidden)] if self.proj_size else [])
        param_bits = sum(weight_storage_bits(r * c, r * c * density, self.bits) for r, c in shapes)
        if self.bias:
            param_bits += (merged + 2 * (rows - merged)) * self.bits
        unmerged = rows - merged
        (mults, adds), (cell_mults, cell_adds) = recurrent_counts(
            rules, cell, hidden, self.steps, merged=[((self.input_size + recurrent) * density, merged)],
            inputs=[(self.input_size * density, unmerged)] if unmerged else [],
            recurrent=[(recurrent * density, unmerged)] if unmerged else [], biases=(self.bias, self.bias))
        if self.proj_size:
            proj_mults, proj_adds = dot_counts(hidden * density, self.proj_size * self.steps)
            mults, adds = mults + proj_mults, adds + proj_adds
        return OpCount(Fraction(param_bits), Fraction(mults + cell_mults), Fraction(adds + cell_adds),
                       max(self.bits, self.input_bits or self.bits))


Op = (Conv2D | DepthwiseConv2D | FullyConnected | GlobalAvg | Scale | Add | Activation | LayerNorm | Attention
      | Softmax | Recurrent)


@dataclass(frozen=True)
class OpListCount:
    """Totals of an op list: raw counts, and params/ops in 32-bit equivalents."""

    param_bits: Fraction
    mults: Fraction
    adds: Fraction
    params: Fraction
    ops: Fraction
    rows: tuple[OpCount, ...]


def count_oplist(ops: Sequence[Op], *, accumulator_bits: int = 32, rules: Mapping[str, Rule] = RULES) -> OpListCount:
    """Count a hand-written op list (one example) under the rules table."""
    rows = tuple(op.count(rules) for op in ops)
    param_bits = sum((r.param_bits for r in rows), Fraction(0))
    mults = sum((r.mults for r in rows), Fraction(0))
    adds = sum((r.adds for r in rows), Fraction(0))
    mult_bits = sum((r.mults * r.mult_bits for r in rows), Fraction(0))
    return OpListCount(param_bits, mults, adds, param_bits / 32, (mult_bits + adds * accumulator_bits) / 32, rows)
