"""The result of a count: :class:`Count`, built from the traced layers once the freebie is decided, widths
resolved. Imports :mod:`scoring.rules` and the counter's facts and layers."""
from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Iterable, Mapping

from scoring.counter.facts import NO_INPUT
from scoring.counter.layers import Layer
from scoring.rules import ADDER_TREE, score, score_terms

#: Width of an unquantized tensor with and without the freebie.
FULL_BITS = 32
FREEBIE_BITS = 16


@dataclass(frozen=True)
class Count:
    """Per-example counts of one model under the MicroNet rules.

    ``mults``/``adds`` are raw counts, ``param_bits`` the stored bits; ``params`` and ``ops`` are in
    32-bit equivalents (what the score divides by the baselines). An example is an input of the batch
    dimension (:func:`~scoring.counter.count_model`) or a token (:func:`~scoring.counter.count_stream`).
    """

    mults: float
    adds: float
    param_bits: int
    params: float
    ops: float
    freebie: bool
    accumulator_bits: int | str  # the setting: a width, or ADDER_TREE
    examples: int
    layers: list[dict[str, Any]]
    project_rules: dict[str, str]
    ops_exact: Fraction = field(repr=False, compare=False, default=Fraction(0))
    #: With an adder tree: the layers whose dot products multiply a float (not integer-quantized) operand, summed in
    #: a 32-bit accumulator instead, with that operand. An adder tree is official only where this is empty.
    float_dot_products: dict[str, str] = field(default_factory=dict)

    def score_terms(self, task: str) -> tuple[float, float]:
        """(params term, ops term) of the score on ``task``."""
        params_term, ops_term = score_terms(task, Fraction(self.param_bits, 32), self.ops_exact)
        return float(params_term), float(ops_term)

    def score(self, task: str) -> float:
        """params / baseline_params + ops / baseline_ops for ``task``."""
        return score(task, Fraction(self.param_bits, 32), self.ops_exact)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict of every field (``float_dot_products`` only with an adder tree)."""
        tree = self.accumulator_bits == ADDER_TREE
        adder_tree = {"float_dot_products": dict(self.float_dot_products)} if tree else {}
        return {"mults": self.mults, "adds": self.adds, "param_bits": self.param_bits, "params": self.params,
                "ops": self.ops, "freebie": self.freebie, "accumulator_bits": self.accumulator_bits, **adder_tree,
                "examples": self.examples, "project_rules": dict(self.project_rules),
                "layers": [dict(layer) for layer in self.layers]}


def _number(value: Fraction) -> int | float:
    return int(value) if value.denominator == 1 else float(value)


def _freebie(narrowest_tag: tuple[int, str] | None, freebie: bool | None) -> bool:
    """Whether the freebie applies: as asked, or (None) when no tensor is quantized below 16 bits."""
    narrow = narrowest_tag is not None and narrowest_tag[0] < FREEBIE_BITS
    if freebie and narrow:
        raise ValueError(f"freebie=True, but {narrowest_tag[1]}: the freebie applies only when "
                         f"no tensor is below {FREEBIE_BITS} bits; use freebie=None (auto) or False")
    return (not narrow) if freebie is None else bool(freebie)


def _row(layer: Layer, mults: int, param_bits: int, ops: Fraction, examples: int, default: int) -> dict[str, Any]:
    """The per-layer table's row of ``layer``: its ``mults`` and ``param_bits`` summed, ``ops`` per example."""
    weights = [s for s in layer.stored if s.nonzeros is not None]
    numel = sum(s.numel for s in weights)
    return {
        "name": layer.name, "type": layer.type,
        "params": param_bits / 32, "param_bits": param_bits,
        "mults": _number(Fraction(mults, examples)), "adds": _number(Fraction(layer.adds, examples)),
        "ops": float(ops),
        "sparsity": 1 - sum(s.nonzeros for s in weights) / numel if numel else None,
        "weight_bits": layer.weight_width.bits(default) if layer.weight_width else None,
        "input_bits": layer.input_width.bits(default) if layer.input_width and layer.input_width != NO_INPUT else None,
        "note": "; ".join(layer.notes),
    }


def _op_bits(layer: Layer, accumulator_bits: int, default: int) -> tuple[int, int]:
    """(bits of ``layer``'s multiplies, bits of its additions): additions not counted at a width of their own count
    at ``accumulator_bits``."""
    mult_bits = sum(count * width.bits(default) for width, count in layer.mults.items())
    at_own_width = sum(layer.adds_at.values())
    add_bits = ((layer.adds - at_own_width) * accumulator_bits
                + sum(count * width.bits(default) for width, count in layer.adds_at.items()))
    return mult_bits, add_bits


def build_count(layers: Iterable[Layer], narrowest_tag: tuple[int, str] | None, examples: int,
                accumulator_bits: int | str, freebie: bool | None, project_rules: Mapping[str, str],
                float_dot_products: Mapping[str, str] | None = None) -> Count:
    """The :class:`Count` of traced ``layers`` over ``examples``, the freebie decided from the narrowest tag.

    Additions without a width of their own count at ``accumulator_bits``; with an adder tree (whose dot products of
    integers gave their additions a width each) the others (dot products of ``float_dot_products``, the float
    additions outside dot products) at 32 bits."""
    freebie = _freebie(narrowest_tag, freebie)
    default = FREEBIE_BITS if freebie else FULL_BITS
    accumulator = FULL_BITS if accumulator_bits == ADDER_TREE else accumulator_bits
    rows, total_mults, total_adds, total_op_bits, total_param_bits = [], 0, 0, 0, 0
    for layer in layers:
        mults = sum(layer.mults.values())
        mult_bits, add_bits = _op_bits(layer, accumulator, default)
        param_bits = sum(s.total_bits(default) for s in layer.stored)
        if not (mults or layer.adds or param_bits or layer.notes):
            continue  # a container or data movement only
        total_mults, total_adds = total_mults + mults, total_adds + layer.adds
        total_op_bits, total_param_bits = total_op_bits + mult_bits + add_bits, total_param_bits + param_bits
        ops = Fraction(mult_bits + add_bits, 32 * examples)
        rows.append(_row(layer, mults, param_bits, ops, examples, default))
    ops = Fraction(total_op_bits, 32 * examples)
    return Count(mults=_number(Fraction(total_mults, examples)), adds=_number(Fraction(total_adds, examples)),
                 param_bits=total_param_bits, params=total_param_bits / 32, ops=float(ops), freebie=freebie,
                 accumulator_bits=accumulator_bits, examples=examples, layers=rows,
                 project_rules=dict(project_rules), ops_exact=ops, float_dot_products=dict(float_dot_products or {}))
