"""What each kind of op costs: dot products (conv, matmul), batch norms, lookups, permutations, recurrent ops,
norms, attention and the element-based kinds, as handlers keyed by rule kind (:data:`scoring.rules.KINDS`).

A dot product's additions count in the accumulator, or with an adder tree level by level; the ops outside dot
products count at the width a module running them declares (``micronet_other_ops_bits``), if any.

Imports torch, :mod:`scoring.rules` and the counter's own modules."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from scoring.counter.arguments import arguments
from scoring.counter.elements import elements
from scoring.counter.facts import NO_INPUT, UNTAGGED, FactMap, Facts, Width
from scoring.counter.folding import Folding
from scoring.counter.layers import Layer
from scoring.counter.permutations import Permutations
from scoring.counter.producers import Producer
from scoring.counter.recurrent import RecurrentCounter
from scoring.counter.storage import Rows, Storage, stored_view
from scoring.rules import (ADAPTIVE_POOL, ATTENTION, BATCH_NORM, CONV, ELEMENTWISE, LOOKUP, MATMUL, NORM, PERMUTATION,
                           POOL, RECURRENT, REDUCE, SOFTMAX, Rule, UnsupportedOpError, adder_tree_levels,
                           attention_counts, dot_counts, norm_counts)


@dataclass(slots=True)
class Op:
    """One executed op on computed values: its aten function, rule key and rule, arguments, output, the tensors
    among its arguments (``inputs``) with their facts (``known``), and the layer it counts in."""

    func: Any
    key: str
    rule: Rule
    args: tuple
    kwargs: dict
    out: Any
    inputs: list[torch.Tensor]
    known: list[Facts]
    layer: Layer

    def arguments(self) -> dict[str, Any]:
        """The arguments by their schema names, defaults filled in."""
        return arguments(self.func, self.args, self.kwargs)


#: Counts one op of a kind; the conv/linear output it produced, for a batch norm to fold into (else None).
Handler = Callable[[Op], Producer | None]


class OpCosts:
    """Counts the ops of a trace that cost something, by rule kind (see :meth:`handlers`)."""

    def __init__(self, rules: Mapping[str, Rule], rules_used: set[str], facts: FactMap, storage: Storage,
                 folding: Folding, permutations: Permutations, *, adder_tree: bool = False,
                 other_ops: Callable[[], Width | None] = lambda: None):
        self.rules, self.rules_used = rules, rules_used
        self.facts, self.storage, self.folding, self.permutations = facts, storage, folding, permutations
        #: The width declared for the ops outside dot products running now (None: none).
        self.other_ops = other_ops
        #: With an adder tree: the layers whose dot products multiply a float operand, summed at 32 bits instead,
        #: and that operand (None: no adder tree).
        self.float_dots: dict[str, str] | None = {} if adder_tree else None
        self.recurrent = RecurrentCounter(rules, rules_used, facts, storage, self.dot, self.float_dot)

    def handlers(self) -> dict[str, Handler]:
        """The handler of each kind that costs something (all but FREE and VIEW)."""
        return {CONV: self.conv, MATMUL: self.matmul, BATCH_NORM: self.batch_norm, LOOKUP: self.lookup,
                PERMUTATION: self.permutation, RECURRENT: self.recurrent_op, NORM: self.norm,
                ATTENTION: self.attention, **dict.fromkeys((ELEMENTWISE, REDUCE, POOL, ADAPTIVE_POOL, SOFTMAX),
                                                           self.element_based)}

    def dot(self, layer: Layer, operands: Sequence[torch.Tensor], weight: torch.Tensor, rows: Rows, reuse: int,
            bias: Width | None = None, extra: Width = NO_INPUT) -> int | None:
        """Count dot products over ``weight`` (nonzeros per output ``rows``), each output used ``reuse`` times and
        plus a bias of width ``bias`` (None: no bias), at the width of ``operands`` (and ``extra``); a static weight
        is stored. With an adder tree, the widest final sum in bits (else None)."""
        width = self.facts.product_width(operands, extra)
        facts = [self.facts.get(operand) for operand in operands]
        floats = [f for f in facts if f.bits is None]
        final = None
        if self.float_dots is not None and not floats and not extra.untagged:
            final = self._adder_tree(layer, sum(f.bits for f in facts), rows, reuse, width, bias)
        else:
            if floats or extra.untagged:
                self.float_dot(layer, "a stored weight" if floats and floats[0].static else "its input")
            mults = adds = 0
            for length, outputs in rows.histogram:
                m, a = dot_counts(length, reuse * outputs, bias is not None)
                mults, adds = mults + m, adds + a
            layer.add_ops(width, mults, adds)
        if self.facts.get(weight).static:
            self.storage.store_weight(layer, weight)
        return final

    def float_dot(self, layer: Layer, operand: str) -> None:
        """With an adder tree: ``layer`` multiplies ``operand``, a float, so its dot products sum in a 32-bit
        accumulator (as the 2019 winners counted their float-input first and last layers)."""
        if self.float_dots is not None:
            self.float_dots.setdefault(layer.name, operand)
            layer.note(f"{operand} is a float: additions at 32 bits, not in an adder tree")

    def _adder_tree(self, layer: Layer, product: int, rows: Rows, reuse: int, width: Width,
                    bias: Width | None) -> int:
        """Count dot products of integers summed in adder trees (:func:`~scoring.rules.adder_tree_levels`): the
        multiplies at ``width``, each level's additions at its width from ``product`` (the product's width in bits)
        up, the bias add (``bias``: its width) at the wider of the final sum and the bias. The widest final sum."""
        widest = product
        for length, outputs in rows.histogram:
            count = reuse * outputs
            levels, final = adder_tree_levels(length, product)
            layer.add_ops(width, length * count, 0)
            for bits, adds in levels:
                layer.add_adds(Width(bits), adds * count)
            if bias is not None and length:  # an output without a nonzero weight is the constant bias: no add
                layer.add_adds(Width(final) | bias, count)
            widest = max(widest, final)
        return widest

    def conv(self, op: Op) -> Producer:
        """A convolution: dot products over its weight's nonzeros at every output position."""
        layer, args, out = op.layer, op.args, op.out
        x, weight, bias = args[0], args[1], args[2]
        if len(args) > 6 and args[6]:
            raise UnsupportedOpError(
                f"transposed convolution (in layer '{layer.name}', {layer.type}) is not counted by the scorer; "
                "use upsampling + a conv, or extend OpCosts.conv in scoring/counter/kinds.py")
        rows = self.storage.rows(weight, tuple(range(1, weight.dim())))  # the weight itself: its facts say if static
        final = self.dot(layer, (x, weight), weight, rows, out.numel() // out.shape[1], self._bias(bias))
        if bias is not None:
            self.storage.store_dense(layer, [bias], [self.facts.get(bias)])
        return self.folding.use(Producer(layer.name, weight.shape[0], bias is not None, self.facts.get(weight).roots,
                                         empty=rows.empty, bias=self._bias_roots(bias), final=final))

    def _bias(self, bias: torch.Tensor | None) -> Width | None:
        """A dot product's bias argument: its width (None: no bias)."""
        return None if bias is None else self.facts.get(bias).width()

    def _bias_roots(self, bias: torch.Tensor | None) -> frozenset[int]:
        """The parameters a stored bias derives from (empty: none, or a bias computed at run time)."""
        return self.facts.get(bias).roots if bias is not None and self.facts.get(bias).static else frozenset()

    def matmul(self, op: Op) -> Producer:
        """A matrix product (linear layers, addmm, bmm): dot products over the static operand's nonzeros."""
        layer, args, kwargs, out = op.layer, op.args, op.kwargs, op.out
        bias, (a, b) = (args[0], args[1:3]) if len(args) >= 3 else (None, args[:2])
        weight = a if self.facts.get(a).static and not self.facts.get(b).static else b
        if weight is a:  # weight on the left: its rows are the outputs
            rows = self.storage.rows(a, (-1,))
            final = self.dot(layer, (a, b), a, rows, b.shape[-1], self._bias(bias))
        else:
            rows = self.storage.rows(b, (-2,))
            final = self.dot(layer, (a, b), b, rows, a.shape[-2], self._bias(bias))
        # out = beta·bias + alpha·(a @ b): a scaling is precomputed at export when what it scales is static
        # (the bias; alpha folds into a static weight), else 1 multiply per scaled element.
        if kwargs.get("beta", 1) != 1 and bias is not None and not self.facts.get(bias).static:
            layer.add_ops(self.facts.operand_width([bias]), stored_view(bias).numel(), 0)
        if kwargs.get("alpha", 1) != 1 and not (self.facts.get(a).static or self.facts.get(b).static):
            layer.add_ops(self.facts.operand_width((a, b)), out.numel(), 0)
        if bias is not None:
            self.storage.store_dense(layer, [bias], [self.facts.get(bias)])
        return self.folding.use(Producer(layer.name, out.shape[-1], bias is not None, self.facts.get(weight).roots,
                                         empty=rows.empty if weight is b else 0, bias=self._bias_roots(bias),
                                         final=final))

    def batch_norm(self, op: Op) -> None:
        """A batch norm: folded or an affine, decided when the trace is complete (:class:`Folding`)."""
        self.folding.batch_norm(op.layer, op.key, op.args, bool(op.arguments().get("training")), self.other_ops())

    def lookup(self, op: Op) -> None:
        """A table lookup: free; a static table is a stored weight (a conv/linear reading it too takes it over)."""
        table = op.args[0]
        if self.facts.get(table).static:
            self.storage.store_weight(op.layer, table, priority=0)

    def permutation(self, op: Op) -> None:
        """channel_shuffle, roll, flip: a permutation along each dim they reorder."""
        self.permutations.permutation(op.layer, op.key, op.arguments(), op.out)

    def recurrent_op(self, op: Op) -> None:
        """A recurrent kernel called directly (torch's composite functions are counted where they are called)."""
        self.recurrent.count(op.layer, op.key, op.rule, op.arguments())

    def norm(self, op: Op) -> None:
        """A layer norm or group norm, its affine included."""
        bound = op.arguments()
        x, weight, bias = bound["input"], bound["weight"], bound["bias"]
        if "group" in bound:  # group norm: each example's channels in G groups
            groups = bound["N"] * bound["group"]
        else:  # layer norm over the trailing normalized_shape
            groups = x.numel() // max(math.prod(bound["normalized_shape"]), 1)
        mults, adds = norm_counts(self.rules, op.key, x.numel(), groups, scale=weight is not None,
                                  shift=bias is not None)
        self._composite(op, [t for t in (x, weight) if t is not None], mults, adds)  # β only enters additions

    def attention(self, op: Op) -> None:
        """A fused scaled dot-product attention (any backend's kernel)."""
        bound, layer = op.arguments(), op.layer
        q, k, v = bound["query"], bound["key"], bound["value"]
        self.float_dot(layer, f"the softmax output of a fused attention (aten.{op.key})")
        if bound.get("dropout_p"):
            raise UnsupportedOpError(
                f"aten.{op.key} (in layer '{layer.name}', {layer.type}) runs with dropout_p={bound['dropout_p']}: "
                "dropout is training only; pass dropout_p=0 when the module is not training")
        mask = bound.get("attn_mask", bound.get("attn_bias"))
        queries, head_dim = q.shape[-2:]
        mults, adds = attention_counts(self.rules, math.prod(q.shape[:-2]), queries, k.shape[-2], head_dim, v.shape[-1],
                                       causal=bool(bound.get("is_causal")), masked=mask is not None)
        self.rules_used.add("_softmax")  # its softmax is counted by that rule
        self._composite(op, [q, k, v], mults, adds, other=False)  # the mask only enters additions

    def _composite(self, op: Op, operands: list[torch.Tensor], mults: int, adds: int, other: bool = True) -> None:
        """Count a composite op's ``mults`` and ``adds`` at the width of ``operands`` (an op outside dot products,
        ``other``, at the width declared for those); its static inputs stored."""
        declared = self.other_ops() if other else None
        width = self.facts.operand_width(operands, unquantized=declared or UNTAGGED)
        op.layer.add_ops(width, mults, adds, width if declared else None)
        self.storage.store_dense(op.layer, op.inputs, op.known, declared.tagged if declared else None)

    def element_based(self, op: Op) -> None:
        """Elementwise ops, reductions, softmax and pools: the rule's counts per element, merge and row (at the width
        declared for the ops outside dot products, if any)."""
        rule, layer, declared = op.rule, op.layer, self.other_ops()
        result = op.out[0] if isinstance(op.out, tuple) else op.out
        mults, adds = rule.counts(*elements(op.key, rule, op.func, op.args, op.kwargs, result))
        unquantized = declared or UNTAGGED
        width = (self.facts.product_width(op.inputs, unquantized=unquantized) if rule.product
                 else self.facts.operand_width(op.inputs, unquantized=unquantized))
        layer.add_ops(width, mults, adds, width if declared else None)
        if rule.alpha_scales is not None:
            self._alpha(layer, rule, op.arguments(), unquantized)
        self.storage.store_dense(layer, op.inputs, op.known, declared.tagged if declared else None)

    def _alpha(self, layer: Layer, rule: Rule, bound: Mapping[str, Any], unquantized: Width) -> None:
        """``x + alpha·y`` with alpha != 1: 1 multiply per element of y, none for a constant or static y."""
        scaled = bound[rule.alpha_scales]
        if bound.get("alpha", 1) == 1 or not isinstance(scaled, torch.Tensor) or self.facts.get(scaled).static:
            return
        layer.add_ops(self.facts.operand_width([scaled], unquantized=unquantized), stored_view(scaled).numel(), 0)
