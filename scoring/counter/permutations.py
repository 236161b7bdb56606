"""Reorderings: channel_shuffle, roll and flip, and views that reorder a dim (the view-transpose-view channel
shuffle), each counted as a permutation of the dim: 1 multiply per output element with a stored n×n permutation
matrix. Imports torch, :mod:`scoring.rules` and the counter's facts, layers and storage."""
from __future__ import annotations

import functools
import math
from typing import Any, Mapping

import torch

from scoring.counter.facts import UNTAGGED, FactMap
from scoring.counter.layers import Layer, Stored
from scoring.counter.storage import Storage
from scoring.rules import REORDERING_VIEW, dot_counts

#: Ops that reshape without moving data (dims split or merged), transpose dims, or copy a tensor as it is.
_RESHAPES = frozenset({"view", "_unsafe_view", "unsqueeze", "squeeze"})
_TRANSPOSES = frozenset({"t", "transpose", "permute"})
_COPIES = frozenset({"clone", "_to_copy", "alias", "detach", "lift_fresh"})


@functools.lru_cache(maxsize=4096)  # a pure function of two shapes, asked for every reshape of every token
def _dim_groups(before: tuple[int, ...], after: tuple[int, ...]) -> tuple[tuple[list[int], list[int]], ...]:
    """The (dims before, dims after) of a reshape whose sizes multiply to the same product, size-1 dims left out."""
    dims_before = [d for d, size in enumerate(before) if size != 1]
    dims_after = [d for d, size in enumerate(after) if size != 1]
    groups, i, j = [], 0, 0
    while i < len(dims_before) and j < len(dims_after):
        ins, outs = [dims_before[i]], [dims_after[j]]
        product_in, product_out = before[dims_before[i]], after[dims_after[j]]
        i, j = i + 1, j + 1
        while product_in != product_out:
            if (i == len(dims_before)) if product_in < product_out else (j == len(dims_after)):
                return tuple(groups)  # not a reshape of equal products (an empty tensor)
            if product_in < product_out:
                ins.append(dims_before[i])
                product_in, i = product_in * before[dims_before[i]], i + 1
            else:
                outs.append(dims_after[j])
                product_out, j = product_out * after[dims_after[j]], j + 1
        groups.append((ins, outs))
    return tuple(groups)


def _transposed(key: str, args: tuple, parts: tuple) -> tuple:
    """``parts`` (per dim) in the dim order of a transpose / permute."""
    dims = len(parts)
    if key == "t":
        order = list(range(dims))[::-1]
    elif key == "transpose":
        first, second = args[1] % dims, args[2] % dims
        order = list(range(dims))
        order[first], order[second] = second, first
    else:
        order = [d % dims for d in args[1]]
    return tuple(parts[d] for d in order)


class Permutations:
    """Counts the permutations of a trace, each distinct permutation matrix stored once, and numbers the views
    that split a dim into parts (a tensor's facts keep, per dim, which split and part it is)."""

    def __init__(self, facts: FactMap, storage: Storage):
        self.facts, self.storage = facts, storage
        self.splits = 0  # views that split a dim into parts, numbered

    def permutation(self, layer: Layer, key: str, bound: Mapping[str, Any], out: torch.Tensor) -> None:
        """channel_shuffle, roll, flip (``bound``: their arguments by name): a permutation along each dim they
        reorder."""
        x = bound["self"]
        if key in ("channel_shuffle", "native_channel_shuffle"):
            moves = [(1, ("groups", bound["groups"]))]
        elif key == "flip":
            moves = [(d, ("flip",)) for d in bound["dims"]]
        else:  # roll: no dims rolls the flattened tensor
            shifts, dims = list(bound["shifts"]), list(bound["dims"])
            moves = list(zip(dims, (("shift", s) for s in shifts))) if dims else [(None, ("shift", shifts[0]))]
        for dim, how in moves:
            n = x.numel() if dim is None else x.shape[dim]
            if n > 1 and not (how[0] == "shift" and how[1] % n == 0):  # else the identity
                self._permute(layer, key, n, how, x, out)

    def _permute(self, layer: Layer, key: str, n: int, how: tuple, x: torch.Tensor, out: torch.Tensor) -> None:
        """A permutation of a dim of size ``n``: 1 multiply per output element with a stored n×n permutation matrix
        (n nonzeros + an n² mask), once per distinct permutation ``how``."""
        layer.add_ops(self.facts.operand_width([x], UNTAGGED), *dot_counts(1, out.numel()))
        matrix = ("permutation", key, n, how)
        if self.storage.wants(matrix, n * n):
            self.storage.keep(layer, matrix, Stored(n * n, None, nonzeros=n))

    def view_parts(self, layer: Layer, key: str, args: tuple, out: torch.Tensor) -> tuple | None:
        """The parts of split dims after a layout op, and a view merging parts back in another order counted as a
        permutation of that dim (the view-transpose-view channel shuffle)."""
        if key not in _RESHAPES and key not in _TRANSPOSES and key not in _COPIES:
            return None
        x = args[0]
        parts = self.facts.get(x).parts
        if key in _COPIES:
            return parts
        if key in _TRANSPOSES:
            return _transposed(key, args, parts) if parts is not None else None
        new: list[tuple[int, int] | None] = [None] * out.dim()
        for ins, outs in _dim_groups(x.shape, out.shape):
            merged = [parts[d] for d in ins] if parts is not None else [None]
            if len(ins) > 1 and None not in merged and len({split for split, _ in merged}) == 1:
                order = tuple(part for _, part in merged)
                if list(order) != sorted(order):  # parts of one dim back together, reordered
                    sizes = tuple(x.shape[d] for d in ins)
                    self._permute(layer, REORDERING_VIEW, math.prod(sizes), (order, sizes), x, out)
            if len(ins) == 1 and len(outs) > 1:  # a split: its parts numbered
                self.splits += 1
                for part, dim in enumerate(outs):
                    new[dim] = (self.splits, part)
            elif len(ins) == 1 and parts is not None:
                new[outs[0]] = parts[ins[0]]
        return tuple(new) if any(p is not None for p in new) else None
