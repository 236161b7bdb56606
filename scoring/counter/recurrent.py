"""Recurrent cells: the layers and directions a recurrent op computes, read from its arguments, and their gate dot
products, biases, pointwise ops and projection counted by the rules' cell tables.

Recurrent layers are counted where torch's composite functions (``torch.lstm``, ``torch.gru_cell``, ...) are
called (the tracer's :class:`~scoring.counter.tracer.Composites`), before a backend kernel is chosen: every kernel
path then counts alike, and the state is an activation even when it starts at zero. Their kernels
(``mkldnn_rnn_layer``, ``_cudnn_rnn``, the fused cells) have rules of their own for direct calls.

Imports torch, :mod:`scoring.rules` and the counter's facts, layers and storage."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from scoring.counter.facts import NO_INPUT, UNTAGGED, FactMap
from scoring.counter.layers import Layer
from scoring.counter.storage import Rows, Storage, histogram
from scoring.rules import (CELLS, COMPOSITE_LAYOUTS, KERNEL_MODES, RECURRENT, Cell, Rule, UnsupportedOpError,
                           cell_counts, recurrent_counts)


@dataclass(frozen=True)
class Recurrence:
    """One layer and direction of a recurrent op, read from its arguments (:func:`recurrences`).

    ``steps`` (time step, sequence) pairs run through ``cell`` with ``hidden`` units; ``x`` is the layer's input
    (None: computed inside the op, the previous layer's output). ``w_ih`` and ``w_hh`` are None for a fused cell
    (its gates come from separate matmuls); ``w_hr`` is an LSTM's projection.
    """

    cell: Cell
    hidden: int
    steps: int
    x: torch.Tensor | None
    w_ih: torch.Tensor | None
    w_hh: torch.Tensor | None
    b_ih: torch.Tensor | None = None
    b_hh: torch.Tensor | None = None
    w_hr: torch.Tensor | None = None


def _cell(key: str, rule: Rule, bound: Mapping[str, Any]) -> Cell:
    name = rule.cell
    if name == "mode":
        name = KERNEL_MODES.get(bound["mode"])
        if name is None:
            raise UnsupportedOpError(f"aten.{key} runs a recurrent cell of mode {bound['mode']}, which the scorer "
                                     f"does not know (known: {dict(KERNEL_MODES)}); add it to KERNEL_MODES and CELLS "
                                     "in scoring/rules.py")
    return CELLS[name]


def _layers(cell: Cell, x: torch.Tensor, params: Sequence[torch.Tensor], per: int, biases: bool,
            layers: int, directions: int) -> list[Recurrence]:
    """The layers and directions of a flat weight list: ``per`` tensors each, ``w_ih, w_hh[, b_ih, b_hh][, w_hr]``."""
    if per * layers * directions != len(params) or per - 2 - 2 * biases not in (0, 1):
        raise UnsupportedOpError(f"a recurrent op with {len(params)} weights for {layers} layer(s) × {directions} "
                                 f"direction(s) ({per} each, biases={biases}): not a layout the scorer knows")
    steps = x.numel() // x.shape[-1]
    result = []
    for index in range(layers * directions):
        chunk = params[index * per:(index + 1) * per]
        b_ih, b_hh = chunk[2:4] if biases else (None, None)
        w_hr = chunk[-1] if per - 2 - 2 * biases else None
        result.append(Recurrence(cell, chunk[0].shape[0] // cell.gates, steps, x if index < directions else None,
                                 chunk[0], chunk[1], b_ih, b_hh, w_hr))
    return result


def recurrences(key: str, rule: Rule, bound: Mapping[str, Any]) -> list[Recurrence]:
    """Every layer and direction that the recurrent op ``key`` (rule ``rule``) computes, read from its arguments
    ``bound`` (by schema name) according to the rule's layout (:data:`scoring.rules.RECURRENT_LAYOUTS`)."""
    cell = _cell(key, rule, bound)
    if bound.get("train") and bound.get("dropout"):
        raise UnsupportedOpError(f"aten.{key} runs with dropout={bound['dropout']} in training mode: dropout is "
                                 "training only; count the model in eval mode")
    layout = rule.layout
    if layout == "sequence":
        x = bound["input"] if "input" in bound else bound["data"]
        return _layers(cell, x, bound["params"], len(bound["params"]) // (
            bound["num_layers"] * (1 + bound["bidirectional"])), bound["has_biases"],
            bound["num_layers"], 1 + bound["bidirectional"])
    if layout == "kernel":  # cuDNN / MIOpen: weight_stride0 tensors per layer and direction
        per = bound["weight_stride0"]
        return _layers(cell, bound["input"], bound["weight"], per, per >= 4, bound["num_layers"],
                       1 + bound["bidirectional"])
    if layout == "layer":  # oneDNN: one layer, one direction; without biases the bias slots hold other tensors
        x, biases = bound["input"], bound["has_biases"]
        w_ih = bound["weight0"]
        return [Recurrence(cell, bound["hidden_size"], x.numel() // x.shape[-1], x, w_ih, bound["weight1"],
                           bound["weight2"] if biases else None, bound["weight3"] if biases else None)]
    if layout == "cell":
        x = bound["input"]
        return [Recurrence(cell, bound["w_ih"].shape[0] // cell.gates, x.numel() // x.shape[-1], x,
                           bound["w_ih"], bound["w_hh"], bound["b_ih"], bound["b_hh"])]
    gates = bound["input_gates"]  # fused_cell
    return [Recurrence(cell, gates.shape[-1] // cell.gates, gates.numel() // gates.shape[-1], None, None, None,
                       bound["input_bias"], bound["hidden_bias"])]


#: Counts dot products: (layer, operands, weight, rows, reuse, bias=False, extra=NO_INPUT); see OpCosts.dot.
Dot = Callable[..., Any]


#: Notes that a layer multiplies a float operand (layer, operand); see OpCosts.float_dot.
FloatDot = Callable[[Layer, str], None]


class RecurrentCounter:
    """Counts recurrent ops by their cells' rules; ``dot`` counts the dot products of an LSTM's projection, and
    ``float_dot`` notes that the gates multiply the recurrent state, a float inside the kernel."""

    def __init__(self, rules: Mapping[str, Rule], rules_used: set[str], facts: FactMap, storage: Storage, dot: Dot,
                 float_dot: FloatDot):
        self.rules, self.rules_used = rules, rules_used
        self.facts, self.storage, self.dot, self.float_dot = facts, storage, dot, float_dot
        #: torch's composite recurrent functions (torch.lstm, ...) -> their rule key.
        self.composites = {getattr(torch, key): key for key, rule in rules.items()
                           if rule.kind == RECURRENT and rule.layout in COMPOSITE_LAYOUTS and hasattr(torch, key)}

    def count(self, layer: Layer, key: str, rule: Rule, bound: Mapping[str, Any]) -> None:
        """A recurrent op: per layer and direction the gate dot products, biases, pointwise ops and projection."""
        self.float_dot(layer, f"the recurrent state inside aten.{key}")
        for rec in recurrences(key, rule, bound):
            cell, hidden = rec.cell, rec.hidden
            merged = cell.merged * hidden
            unmerged = (cell.gates - cell.merged) * hidden
            biases = (rec.b_ih is not None, rec.b_hh is not None)
            if rec.w_ih is None:  # fused cell: merge the two dot products' outputs, add the bias
                adds = self.rules["add"].counts(rec.steps * (merged * (1 + any(biases)) + unmerged * sum(biases)))[1]
                layer.add_ops(NO_INPUT, 0, adds)
                pointwise = cell_counts(self.rules, cell, hidden * rec.steps)
            else:
                pointwise = self._gates(layer, rec, merged, unmerged, biases)
            layer.add_ops(UNTAGGED, *pointwise)
            self.rules_used.update(name for name, _ in cell.pointwise)
            self.storage.store_biases(layer, [b for b in (rec.b_ih, rec.b_hh) if b is not None],
                                      merged + unmerged * sum(biases))
            if rec.w_hr is not None:  # the LSTM's projection of h
                self.dot(layer, (rec.w_hr,), rec.w_hr, self.storage.rows(rec.w_hr, (-1,)), rec.steps, extra=UNTAGGED)

    def _gates(self, layer: Layer, rec: Recurrence, merged: int, unmerged: int,
               biases: tuple[bool, bool]) -> tuple[int, int]:
        """Count the gate dot products of one layer and direction, store its matrices; its pointwise counts."""
        ih, hh = self.storage.rows(rec.w_ih, (-1,)), self.storage.rows(rec.w_hh, (-1,))
        merged_rows, inputs, recurrent = _gate_rows(ih, hh, merged, unmerged)
        dots, pointwise = recurrent_counts(self.rules, rec.cell, rec.hidden, rec.steps, merged=merged_rows,
                                           inputs=inputs if unmerged else (),
                                           recurrent=recurrent if unmerged else (), biases=biases)
        # the input products at the input's width, the recurrent ones at the (unquantized) state's
        input_mults = ih.nonzeros * rec.steps
        x_width = (self.facts.product_width([rec.x, rec.w_ih]) if rec.x is not None
                   else self.facts.product_width([rec.w_ih], UNTAGGED))
        layer.add_ops(x_width, input_mults, dots[1])
        layer.add_ops(self.facts.product_width([rec.w_hh], UNTAGGED), dots[0] - input_mults, 0)
        for weight in (rec.w_ih, rec.w_hh):
            if self.facts.get(weight).static:
                self.storage.store_weight(layer, weight)
        return pointwise


def _gate_rows(ih: Rows, hh: Rows, merged: int, unmerged: int) -> tuple[tuple, tuple, tuple]:
    """Histograms of the nonzeros per gate row: of the ``merged`` rows (their input and recurrent dot products
    joined), of the ``unmerged`` rows' input products and of their recurrent products."""
    if ih.lines is None and hh.lines is None:
        return ((ih.full + hh.full, merged),), ((ih.full, unmerged),), ((hh.full, unmerged),)
    vih, vhh = ih.vector(), hh.vector()
    return histogram(vih[:merged] + vhh[:merged]), histogram(vih[merged:]), histogram(vhh[merged:])
