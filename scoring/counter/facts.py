"""Tensor facts: what the counter knows about each tensor it has seen, kept by identity without keeping the tensor
alive, and how an op's outputs' facts follow from its inputs'. Also an operand's width (from its bit tag).
Imports torch, :mod:`scoring.rules` and :mod:`scoring.counter.producers`."""
from __future__ import annotations

import weakref
from dataclasses import dataclass, replace
from typing import Any, Iterable

import torch

from scoring.counter.producers import Lineage, Producer
from scoring.rules import FREE, LOOKUP, PERMUTATION, VIEW, Rule


@dataclass(frozen=True)
class Width:
    """Width of an op's inputs before the freebie is known: the widest tag and whether any is untagged."""

    tagged: int = 0
    untagged: bool = False

    def __or__(self, other: Width) -> Width:
        return Width(max(self.tagged, other.tagged), self.untagged or other.untagged)

    def bits(self, default: int) -> int:
        """The width in bits, an untagged operand at ``default`` (32, or 16 under the freebie)."""
        return max(self.tagged, default if self.untagged else 0)


NO_INPUT = Width()
#: An unquantized operand (32 bits, or 16 under the freebie).
UNTAGGED = Width(0, True)
#: A product with a ±1 operand: a sign flip, 1/32 op.
SIGN_FLIP = Width(1)


@dataclass(frozen=True, eq=False)
class Mask:
    """A declared mask (``micronet_mask_bits``) of ``bits`` bits over a tensor of which it keeps ``kept``."""

    bits: int
    kept: torch.Tensor  # bool, where the mask module lets a value through (see modules.kept_by)

    def covers(self, weight: torch.Tensor, nonzeros: int) -> bool:
        """True when every nonzero of ``weight`` lies where the mask keeps a value.

        ``weight`` is compared in the mask's layout, or transposed (a linear layer consumes ``weight.t()``):
        either is a fixed layout the weight can be stored in.
        """
        if weight.numel() != self.kept.numel() or nonzeros > int(self.kept.count_nonzero()):
            return False
        layouts = [weight, weight.t()] if weight.dim() == 2 else [weight]
        return any(not bool((w.reshape(self.kept.shape).ne(0) & ~self.kept).any()) for w in layouts)


@dataclass(frozen=True)
class Facts:
    """What the counter knows about one tensor.

    ``static``: derived only from parameters, buffers and constants (ops on it are precomputed at export);
    ``bits``: its bit tag, set by a quantizer and kept through data movement; ``producer``: the conv/linear that
    computed it, for folding a batch norm; ``raw``: the conv/linear outputs it holds unchanged, so that every op
    reading them is known to folding; ``roots``: the parameters it derives from, so each stored value is counted
    once; ``mask``: the mask a module declared on it.
    """

    static: bool
    bits: int | None = None
    producer: Producer | None = None
    raw: Lineage = ()
    roots: frozenset[int] = frozenset()
    mask: Mask | None = None
    #: An index tensor: integer input (token ids), or computed from index tensors alone.
    index: bool = False
    #: Per dim, (split, part) when an earlier view split one dim into parts (None: not split), for telling a
    #: view that reorders a dim (channel shuffle) from one that does not.
    parts: tuple[tuple[int, int] | None, ...] | None = None

    @property
    def constant(self) -> bool:
        """Static and derived from no parameter or buffer: a literal, not a stored value or an operand width."""
        return self.static and not self.roots

    def width(self) -> Width:
        """This tensor's width as an operand: its tag, or untagged."""
        return Width(self.bits) if self.bits is not None else UNTAGGED


CONSTANT = Facts(static=True)
DYNAMIC = Facts(static=False)


def tensors(values: Iterable[Any], found: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """The tensors among ``values``, in lists and tuples too, in order."""
    found = [] if found is None else found
    for value in values:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            tensors(value, found)
    return found


def integral(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` holds integers (or booleans)."""
    return not (tensor.is_floating_point() or tensor.is_complex())


class _Ref(weakref.ref):
    """A weak reference to a tensor that knows its key in :class:`FactMap` (the tensor's ``id``)."""

    __slots__ = ("key",)


class FactMap:
    """Tensor -> :class:`Facts` by identity, keeping no tensor alive (``WeakIdKeyDictionary``'s semantics at a
    fraction of its cost: it is read for every input of every op). An entry is dropped when its tensor dies, before
    the ``id`` can be reused; a lookup still checks that the entry refers to the tensor asked about."""

    def __init__(self) -> None:
        self.entries: dict[int, tuple[_Ref, Facts]] = {}
        entries = self.entries

        def drop(ref: _Ref) -> None:  # the tensor died: forget it, unless its id already holds a newer entry
            entry = entries.get(ref.key)
            if entry is not None and entry[0] is ref:
                del entries[ref.key]

        self.drop = drop
        #: Per op: whether it writes into its first argument.
        self.mutates: dict[Any, bool] = {}

    def get(self, tensor: torch.Tensor, default: Facts = CONSTANT) -> Facts:
        """The facts of ``tensor``; ``default`` (a constant) for a tensor never seen."""
        entry = self.entries.get(id(tensor))
        return entry[1] if entry is not None and entry[0]() is tensor else default

    def __setitem__(self, tensor: torch.Tensor, facts: Facts) -> None:
        key = id(tensor)
        entry = self.entries.get(key)
        if entry is not None and entry[0]() is tensor:
            ref = entry[0]
        else:
            ref = _Ref(tensor, self.drop)
            ref.key = key
        self.entries[key] = (ref, facts)

    def mark_input(self, tensor: torch.Tensor) -> None:
        """An input of the model (or a state carried into it): dynamic; an index tensor when integral."""
        self[tensor] = Facts(static=False, index=integral(tensor))

    def mark_written_base(self, func: Any, args: tuple) -> None:
        """An op writing computed values into a view (``out[:, a:b] = x``) makes the viewed tensor dynamic too."""
        mutates = self.mutates.get(func)
        if mutates is None:
            schema = func._schema.arguments
            alias = schema[0].alias_info if schema else None
            mutates = self.mutates[func] = bool(alias is not None and alias.is_write)
        if mutates and isinstance(args[0], torch.Tensor) and args[0]._base is not None:
            base = args[0]._base
            if self.get(base).static:
                self[base] = DYNAMIC

    def propagate(self, out: Any, known: list[Facts], rule: Rule | None, *, static: bool,
                  producer: Producer | None = None, raw: Lineage = (), index: bool = False,
                  parts: tuple | None = None) -> None:
        """Set the facts of an op's outputs ``out`` from those of its inputs (``known``); ``raw`` is their lineage
        (an activation's only: a static tensor is no conv/linear output)."""
        bits = None
        if rule is not None and (rule.kind in (FREE, VIEW, LOOKUP, PERMUTATION) or rule.keeps_bits):
            # the tags of the values moved: neither constants nor indices (which move data, they are not values)
            tags = [i.bits for i in known if not i.index and (i.roots or not i.static)]
            if tags and None not in tags:
                bits = max(tags)
            if rule.kind == VIEW and producer is None and len(known) == 1:
                producer = known[0].producer
        outputs = [out] if isinstance(out, torch.Tensor) else tensors([out])
        if not static:  # an activation: no roots, no mask
            facts = (DYNAMIC if bits is None and producer is None and not raw and not index and parts is None
                     else Facts(static=False, bits=bits, producer=producer, raw=raw, index=index, parts=parts))
            for tensor in outputs:
                self[tensor] = facts
            return
        roots = frozenset().union(*(i.roots for i in known))
        facts = Facts(static=True, bits=bits, producer=producer, roots=roots, index=index, parts=parts)
        # A declared mask passes through static ops that keep its tensor's size (quantizer, views).
        masks = {i.mask for i in known if i.mask is not None}
        mask = masks.pop() if len(masks) == 1 else None
        for tensor in outputs:
            keeps = mask is not None and tensor.numel() == mask.kept.numel()
            self[tensor] = replace(facts, mask=mask) if keeps else facts

    def operand_width(self, operands: Iterable[torch.Tensor], extra: Width = NO_INPUT,
                      unquantized: Width = UNTAGGED) -> Width:
        """Width of an op: the widest of its operands (and ``extra``), constants left out; an operand without a bit
        tag at ``unquantized`` (the width a module declared for its other ops, else untagged)."""
        width = extra
        for facts in map(self.get, operands):
            if not facts.constant:
                width |= unquantized if facts.bits is None else Width(facts.bits)
        return width

    def product_width(self, operands: Iterable[torch.Tensor], extra: Width = NO_INPUT,
                      unquantized: Width = UNTAGGED) -> Width:
        """Width of a product: a sign flip (1/32 op) when an operand is 1-bit (±1), else the widest operand."""
        operands = list(operands)
        if any(self.get(t).bits == 1 for t in operands):
            return SIGN_FLIP
        return self.operand_width(operands, extra, unquantized)
