"""The conv/linear outputs a batch norm can fold into: which layer produced a tensor, with what weight and bias,
and which ops read that output raw. A tensor's facts (:mod:`scoring.counter.facts`) carry its producer and its
lineage (the conv/linear outputs it holds unchanged); :mod:`scoring.counter.folding` folds batch norms into
producers. Imports torch only."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class Producer:
    """A conv/linear output (or a channel concatenation of them), for folding a batch norm into it once."""

    layer: str
    channels: int
    has_bias: bool
    #: The parameters its weight derives from (empty: a weight computed at run time, which absorbs no scale).
    weight: frozenset[int] = frozenset()
    parts: tuple[Producer, ...] = ()
    #: Channels whose dot products are empty (no nonzero weight): a folded bias makes them constants.
    empty: int = 0
    #: The parameters its own bias derives from (empty: no bias, or one computed at run time).
    bias: frozenset[int] = frozenset()
    #: With an adder tree, the widest final sum of its dot products in bits (None: a flat accumulator).
    final: int | None = None
    #: The batch norm (by its parameters) tentatively folded into this output, None if none.
    batch_norm: frozenset[int] | None = None
    #: Read by a batch norm counted unfolded over the same channels: its affine can absorb a scale.
    absorbed: bool = False
    #: Read unchanged (through reshapes and channel concatenations) by an op other than a batch norm: that op
    #: needs the output unscaled, so no batch norm folds into it.
    read_raw: bool = False

    @property
    def folded(self) -> bool:
        """Whether a batch norm has (tentatively) folded into this output."""
        return self.batch_norm is not None

    def weights(self) -> list[frozenset[int]]:
        """The stored weights (by the parameters they derive from) whose scale a folded batch norm changes."""
        return [leaf.weight for leaf in self.leaves()]

    def leaves(self) -> list[Producer]:
        """The conv/linear outputs this is made of: itself, or the parts of a concatenation."""
        return [leaf for part in self.parts for leaf in part.leaves()] if self.parts else [self]

    def final_bits(self) -> int | None:
        """With an adder tree, the widest final sum of the dot products of every part (None: a flat accumulator)."""
        finals = [leaf.final for leaf in self.leaves()]
        return None if None in finals else max(finals)

    def unbiased_channels(self) -> tuple[int, int]:
        """(channels without a bias of their own, those of them with empty dot products): a fold gives them a
        bias, which costs an addition only where a dot product is computed."""
        if self.parts:
            counts = [part.unbiased_channels() for part in self.parts]
            return sum(c for c, _ in counts), sum(e for _, e in counts)
        return (0, 0) if self.has_bias else (self.channels, self.empty)

    def fold(self, batch_norm: frozenset[int]) -> None:
        """Fold ``batch_norm`` (by its parameters) into this output and its parts, tentatively."""
        self.batch_norm = batch_norm
        for part in self.parts:
            part.fold(batch_norm)

    def holds(self, batch_norm: frozenset[int]) -> bool:
        """Whether this output can use a weight that absorbed ``batch_norm``'s affine: it was folded with that
        batch norm, or an unfolded batch norm after it absorbs the inverse affine in its own; and no other op
        reads it raw."""
        return (self.batch_norm == batch_norm or self.absorbed) and not self.read_raw


def concat_producer(tensors: list, dim: int, producers: list[Producer | None]) -> Producer | None:
    """The producer of a channel concatenation of unfolded conv/linear outputs (mixed convs), if it is one;
    ``producers`` are those of the concatenated ``tensors``."""
    if not tensors or dim % tensors[0].dim() != 1 or any(p is None or p.folded for p in producers):
        return None
    return Producer("+".join(p.layer for p in producers), sum(p.channels for p in producers),
                    all(p.has_bias for p in producers), parts=tuple(producers))


#: The conv/linear outputs a tensor holds unchanged, each on channels (dim 1) of its own.
Lineage = tuple[Producer, ...]


def view_lineage(lineage: Lineage, source: torch.Tensor, view: torch.Tensor) -> Lineage | None:
    """The lineage of ``view``, a reshape or copy of ``source``: kept when it keeps the first two dims (every
    element stays in its channel); None when it may move elements across channels."""
    if view.dim() >= 2 and source.dim() >= 2 and view.shape[:2] == source.shape[:2]:
        return lineage
    return None


def concat_lineage(tensors: Sequence[torch.Tensor], dim: int, lineages: Sequence[Lineage]) -> Lineage | None:
    """The lineage of a concatenation of ``tensors`` (with ``lineages``) along ``dim``: every part's when ``dim`` is
    the channel dim (each part keeps its channels, shifted); None for any other dim."""
    if not tensors or tensors[0].dim() < 2 or dim % tensors[0].dim() != 1:
        return None
    return tuple(producer for lineage in lineages for producer in lineage)
