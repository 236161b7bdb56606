"""Storage accounting: which values a model stores for inference (weights, biases, tables, scales), at what width,
how many nonzeros, and which layer keeps each, every stored value counted once over all batches.

Imports torch and the counter's :mod:`~scoring.counter.facts` and :mod:`~scoring.counter.layers`."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Iterable

import torch
import torch.nn as nn

from scoring.counter.facts import Facts, FactMap
from scoring.counter.layers import MODEL_LAYER, Layer, Stored


@dataclass(frozen=True)
class Rows:
    """The nonzero weights of each output of one weight: ``lines`` (None when every output has ``full``), their
    ``histogram`` of ``(nonzeros, outputs)`` pairs and the total ``nonzeros``."""

    shape: tuple[int, ...]
    full: int
    lines: torch.Tensor | None
    histogram: tuple[tuple[int, int], ...]
    nonzeros: int

    @property
    def empty(self) -> int:
        """Outputs without a nonzero weight."""
        return sum(outputs for length, outputs in self.histogram if length == 0)

    def vector(self) -> torch.Tensor:
        """The per-output counts as a tensor."""
        return self.lines if self.lines is not None else torch.full(self.shape, self.full, dtype=torch.long)


def histogram(lines: torch.Tensor) -> tuple[tuple[int, int], ...]:
    """The ``(value, how many)`` pairs of ``lines``, by value."""
    values, counts = torch.unique(lines, return_counts=True)
    return tuple(zip(values.tolist(), counts.tolist()))


def stored_view(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor without broadcast (stride-0) dimensions: what is actually stored."""
    if 0 not in tensor.stride():
        return tensor
    return tensor[tuple(slice(0, 1) if s == 0 else slice(None) for s in tensor.stride())]


def _owners(model: nn.Module) -> dict[int, str]:
    """Parameter / buffer -> the layer owning it (a parametrization's original: the parametrized module); one
    registered in several modules (a shared weight) has no single owner."""
    owners: dict[int, set[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            owners.setdefault(id(tensor), set()).add(name.split(".parametrizations.")[0] or MODEL_LAYER)
    return {key: names.pop() for key, names in owners.items() if len(names) == 1}


class Storage:
    """The stored values of one model, by key (the parameters they derive from), with the layer keeping each."""

    def __init__(self, model: nn.Module, facts: FactMap):
        self.facts = facts
        #: Storage of every parameter and buffer: a weight on it can be measured once (see rows).
        self.param_storages = {t.untyped_storage().data_ptr(): t for t in [*model.parameters(), *model.buffers()]
                               if not t.is_meta and t.numel()}
        self.owners = _owners(model)
        self.rows_cache: dict[tuple, Rows] = {}
        self.nonzeros_cache: dict[tuple, int] = {}
        #: Stored values read through views (by their parameters): the elements read so far (None: all of them).
        self.coverage: dict[frozenset[int], torch.Tensor | None] = {}
        self.reads: set[tuple] = set()
        #: Stored values by key: (layer, value, priority).
        self.kept: dict[Hashable, tuple[Layer, Stored, int]] = {}
        #: Stored weights (by their parameters) quantized with one scale per tensor -> the key of that scale.
        self.tensor_scales: dict[frozenset[int], Hashable] = {}

    def wants(self, key: Hashable, numel: int, priority: int = 1) -> bool:
        """Whether a value stored under ``key`` (the parameters it derives from), read at ``numel`` values, must be
        (re)counted: its first read, a larger read (a table looked up for a growing context), or a read of higher
        ``priority``: a conv/linear read (1) after a lookup (0), so that a tied table belongs to its output layer,
        and any read in the module owning the parameters (+2) after reads elsewhere."""
        if not key:
            return False
        kept = self.kept.get(key)
        return kept is None or (priority, numel) > (kept[2], kept[1].numel)

    def _priority(self, layer: Layer, roots: frozenset[int], priority: int) -> int:
        """``priority``, + 2 when ``layer`` is the module owning every parameter in ``roots``."""
        return priority + 2 if roots and all(self.owners.get(root) == layer.name for root in roots) else priority

    def keep(self, layer: Layer, key: Hashable, stored: Stored, priority: int = 1) -> None:
        """Count ``stored`` under ``key`` in ``layer`` (replacing what was counted under that key)."""
        self.kept[key] = (layer, stored, priority)

    def _extent(self, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What a static read stores: (the stored tensor, the flat mask of its elements read so far; None: all).

        A view of a larger static tensor holding the same parameters (a slice of a table, a row of it) stores the
        elements of that tensor that any read so far covered: a position table sliced for a growing context, or
        read row by row, counts the rows read; a transpose or the whole tensor counts it all.
        """
        roots = self.facts.get(tensor).roots
        base = tensor._base
        if (base is None or not base.is_contiguous() or not self.facts.get(base).static
                or self.facts.get(base).roots != roots):
            return stored_view(tensor), None
        offset = tensor.storage_offset() - base.storage_offset()
        covered = self.coverage.get(roots, False)
        if covered is None or (offset == 0 and tensor.numel() == base.numel() and 0 not in tensor.stride()):
            self.coverage[roots] = None  # the whole tensor
            return base, None
        geometry = (roots, tuple(tensor.shape), tensor.stride(), offset)
        if geometry not in self.reads:
            self.reads.add(geometry)
            read = torch.zeros(base.numel(), dtype=torch.bool, device=base.device)
            read.as_strided(tensor.shape, tensor.stride(), offset).fill_(True)
            covered = read if covered is False else covered | read
            self.coverage[roots] = None if bool(covered.all()) else covered
        return base, self.coverage[roots]

    def restore(self, key: Hashable, numel: int, bits: int | None) -> None:
        """Count what is kept under ``key`` (if anything) as ``numel`` values of ``bits`` instead, where it is."""
        kept = self.kept.get(key)
        if kept is not None:
            self.keep(kept[0], key, Stored(numel, bits), kept[2])

    def store_dense(self, layer: Layer, tensors: list[torch.Tensor], known: list[Facts],
                    bits: int | None = None) -> None:
        """Count static inputs (biases, scales, position tables) as dense stored values; ``known``: their facts. One
        without a bit tag is stored at ``bits`` (None: unquantized)."""
        for tensor, facts in zip(tensors, known):
            if facts.static and facts.roots:
                base, read = self._extent(tensor)
                numel = base.numel() if read is None else int(read.sum())
                priority = self._priority(layer, facts.roots, 1)
                if self.wants(facts.roots, numel, priority):
                    self.keep(layer, facts.roots, Stored(numel, facts.bits if facts.bits is not None else bits),
                              priority)

    def store_weight(self, layer: Layer, weight: torch.Tensor, priority: int = 1) -> None:
        """Count a static weight (conv/linear, recurrent matrix, lookup table): its nonzeros × bits + a mask, or
        its declared mask, or dense, whichever is cheapest."""
        facts = self.facts.get(weight)
        layer.weight_width = facts.width() if layer.weight_width is None else layer.weight_width | facts.width()
        base, read = self._extent(weight)
        numel = base.numel() if read is None else int(read.sum())
        priority = self._priority(layer, facts.roots, priority)
        if not self.wants(facts.roots, numel, priority):
            return
        storage = None if base.is_meta else base.untyped_storage().data_ptr()
        if read is not None:  # part of a larger weight: its nonzeros among the elements read
            nonzeros = numel if self._dense(base, storage) else int(base.reshape(-1)[read].count_nonzero())
            stored = Stored(numel, facts.bits, nonzeros)
        else:
            nonzeros = self._nonzero_total(base, storage)
            mask = facts.mask
            if mask is not None and mask.covers(base, nonzeros):
                stored = Stored(numel, facts.bits, nonzeros, mask.bits, int(mask.kept.count_nonzero()))
            else:
                stored = Stored(numel, facts.bits, nonzeros)
        self.keep(layer, facts.roots, stored, priority)

    def store_biases(self, layer: Layer, biases: list[torch.Tensor], numel: int) -> None:
        """A recurrent op's biases, stored as ``numel`` values (b_ih + b_hh summed where they meet)."""
        known = [self.facts.get(b) for b in biases]
        if not known or not all(facts.static for facts in known):
            return
        roots = frozenset().union(*(facts.roots for facts in known))
        tags = [facts.bits for facts in known]
        if self.wants(roots, numel):
            self.keep(layer, roots, Stored(numel, None if None in tags else max(tags)))

    def rows(self, weight: torch.Tensor, dims: tuple[int, ...]) -> Rows:
        """Nonzero weights per output, summed over ``dims``; run-time zeros (dynamic weights) do not count.

        Measured once per weight read from a parameter's own storage (unchanged since: same version).
        """
        dims = tuple(d % weight.dim() for d in dims)
        static = self.facts.get(weight).static
        storage = weight.untyped_storage().data_ptr() if not weight.is_meta else None
        key = None
        if storage in self.param_storages:
            key = (storage, weight.storage_offset(), tuple(weight.shape), weight.stride(), weight._version, dims,
                   static)
            cached = self.rows_cache.get(key)
            if cached is not None:
                return cached
        shape = tuple(size for d, size in enumerate(weight.shape) if d not in dims)
        full = math.prod(weight.shape[d] for d in dims)
        outputs = math.prod(shape)
        # A meta tensor holds no values: dense.
        if static and storage is not None and weight.numel() and not self._dense(weight, storage):
            lines = weight.count_nonzero(dims) if dims else weight.ne(0).long()
            rows = Rows(shape, full, lines, histogram(lines), int(lines.sum()))
        else:
            rows = Rows(shape, full, None, ((full, outputs),) if outputs else (), full * outputs)
        if key is not None:
            self.rows_cache[key] = rows
        return rows

    def _dense(self, weight: torch.Tensor, storage: int) -> bool:
        """Whether ``weight`` has no zero (a total count first: per-dim counting is several times slower, and most
        weights are dense); any view of a dense parameter is dense."""
        owner = self.param_storages.get(storage)
        if owner is not None and self._nonzero_total(owner, storage) == owner.numel():
            return True
        return self._nonzero_total(weight, storage) == weight.numel()

    def _nonzero_total(self, weight: torch.Tensor, storage: int | None) -> int:
        """The nonzeros of ``weight``, counted once per parameter storage and version when it spans that storage."""
        if storage is None:
            return weight.numel()  # meta: no values
        whole = weight.numel() * weight.element_size() == weight.untyped_storage().nbytes()
        key = (storage, weight._version) if whole and storage in self.param_storages else None
        total = self.nonzeros_cache.get(key) if key is not None else None
        if total is None:
            total = int(weight.count_nonzero())
            if key is not None:
                self.nonzeros_cache[key] = total
        return total

    def assign(self, layers: Iterable[Layer]) -> None:
        """Give every stored value to the layer that keeps it (``layers``: all of them, emptied first)."""
        for layer in layers:
            layer.stored.clear()
        for layer, stored, _ in self.kept.values():
            layer.stored.append(stored)
