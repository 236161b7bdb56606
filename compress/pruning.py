"""Gradual magnitude pruning (Zhu & Gupta 2017, "To prune, or not to prune", arXiv:1710.01878).

Sparsity follows the cubic schedule of the paper: at steps t = t0, t0 + Δt, ..., t0 + nΔt

    s_t = s_f + (s_i − s_f) · (1 − (t − t0) / (nΔt))³

and at each of those steps every pruned layer keeps the weights of largest magnitude (its own ranking,
or one global ranking over the layers that share the stage's ``final_sparsity``). Optionally the unit
of pruning is a block of the (out, in·kh·kw) weight matrix, or the N:M pattern (n kept in every m
consecutive weights of a row).

A mask is a :mod:`torch.nn.utils.parametrize` parametrization holding a bool buffer, so the executed
``module.weight`` is ``original * mask``: the scorer counts zeros of the very tensor the layer uses,
and the mask is saved in every ``state_dict``. Masks only ever lose entries (a pruned weight is never
revived), the original's pruned entries are zeroed after every optimizer step of a pruning stage (so
weight decay and momentum cannot move them), and in later stages the product with the mask keeps the
executed weight exactly zero; quantizers registered after the mask map 0 to 0.
``compress.finalize_for_export`` bakes masks into the originals.

The mask declares its stored size to the scorer as ``micronet_mask_bits`` (scoring/protocol.py): one
bit per block (partial edge blocks included) for ``structure: block`` while the mask is constant over
every block, else one bit per weight (unstructured, N:M, or blocks broken by another stage's pruning).

Config keys of a stage's ``prune:`` mapping (values checked by :class:`PruneTechnique`):

    final_sparsity      fraction of weights pruned at the end, in [0, 1) (implied by ``nm``)
    initial_sparsity    s_i, in [0, final_sparsity]; default 0
    unit                fraction | epoch | step: unit of start, end and frequency; default fraction
    start, end          t0 and t0 + nΔt; defaults (unit fraction) 0 and 0.75 of the stage
    frequency           Δt; default (unit fraction) 0.05 of the stage; at least one step
    ranking             layer | global; default layer
    structure           unstructured | block | nm; default unstructured
    block_shape         [rows, cols] of a block (structure=block); partial blocks at the edges count
    nm                  [n, m] (structure=nm): imposed at the start step, not gradual
    layers, exclude     fnmatch patterns of conv/linear/embedding layer names; default ["*"] and []
    first_last_sparsity final sparsity of the first and last conv/linear/embedding layers; default 0 (not
                        pruned); null = like the others
    layer_sparsity      {pattern: final sparsity}; the first matching pattern wins over the above
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn as nn

from .base import REQUIRED, UNITS, Predict, Settings, Technique, find_parametrization, first_and_last, first_match, \
    original_weight, predict_outputs, put_parametrization, register_technique, select_layers, stage_epochs_at, \
    weight_layers


@dataclasses.dataclass(frozen=True)
class CubicSchedule:
    """The Zhu & Gupta schedule in optimizer steps: ``start`` = t0, ``end`` = t0 + nΔt, ``frequency`` = Δt."""

    initial: float
    final: float
    start: int
    end: int
    frequency: int

    def sparsity(self, step: int) -> float:
        """s_t of the paper at ``step`` (before t0: s_i; after t0 + nΔt: s_f)."""
        span = self.end - self.start
        progress = 1.0 if span <= 0 else min(max((step - self.start) / span, 0.0), 1.0)
        return self.final + (self.initial - self.final) * (1.0 - progress) ** 3

    def updates_at(self, step: int) -> bool:
        """True at the steps where masks are recomputed: t0 + kΔt up to t0 + nΔt, and t0 + nΔt itself."""
        return self.start <= step <= self.end and ((step - self.start) % self.frequency == 0 or step == self.end)

    def towards(self, final: float) -> CubicSchedule:
        """The same schedule for a layer with its own final sparsity (never starting above it)."""
        return dataclasses.replace(self, final=final, initial=min(self.initial, final))


class WeightMask(nn.Module):
    """Parametrization ``weight = original * mask`` with the mask as a bool buffer (saved, not trained).

    The forward pass multiplies by a float copy of the mask (not saved), refreshed whenever the mask
    changes: a float multiply is several times faster than one that converts the bool mask every step.
    ``block_shape`` ([rows, cols] over the (out, in·kh·kw) matrix) is the unit of block pruning, if any.
    """

    kind = "mask"

    def __init__(self, shape: torch.Size, block_shape: tuple[int, int] | None = None):
        super().__init__()
        self.register_buffer("mask", torch.ones(shape, dtype=torch.bool))
        self.register_buffer("factor", torch.ones(shape), persistent=False)
        self.block_shape = None if block_shape is None else (int(block_shape[0]), int(block_shape[1]))

    @property
    def micronet_mask_bits(self) -> int:
        """Bits of the stored mask (scoring/protocol.py): one per block while the mask is constant over
        every block of ``block_shape`` (partial edge blocks count), else one per weight."""
        if self.block_shape is None:
            return self.mask.numel()
        kept, sizes = _block_sums(self.mask.flatten(1).float(), self.block_shape)
        if bool(((kept != 0) & (kept != sizes)).any()):
            return self.mask.numel()
        return kept.numel()

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.factor

    def restrict(self, keep: torch.Tensor) -> None:
        """Prune every weight not in ``keep``; the pruned set only grows, so a pruned weight is never revived."""
        self.mask &= keep
        self.factor.copy_(self.mask)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.factor.copy_(self.mask)

    def describe(self) -> dict[str, Any]:
        """The settings that rebuild this parametrization (see ``compress.compression_state``)."""
        if self.block_shape is None:
            return {"kind": self.kind}
        return {"kind": self.kind, "block_shape": list(self.block_shape)}

    @classmethod
    def check_description(cls, description: Mapping[str, Any], weight: torch.Tensor) -> None:
        """Refuse (``ValueError``) a description :meth:`rebuild` must not build on ``weight``: keys other than
        :meth:`describe`'s, or a block shape that is not [rows, cols] within the (out, in·kh·kw) weight matrix."""
        unknown = sorted(set(description) - {"kind", "block_shape"})
        if unknown:
            raise ValueError(f"unknown mask setting(s) {', '.join(map(repr, unknown))}; a mask has kind and "
                             "block_shape")
        block = description.get("block_shape")
        rows, cols = weight.shape[0], math.prod(weight.shape[1:])
        if block is not None and not (isinstance(block, list) and len(block) == 2
                                      and all(isinstance(v, int) and not isinstance(v, bool) for v in block)
                                      and 1 <= block[0] <= rows and 1 <= block[1] <= cols):
            raise ValueError(f"mask block_shape={block!r}: expected [rows, cols] with 1 <= rows <= {rows} and "
                             f"1 <= cols <= {cols} (the layer's weight matrix)")

    @classmethod
    def rebuild(cls, description: Mapping[str, Any], weight: torch.Tensor) -> WeightMask:
        """An empty mask for ``weight``; its values come from ``load_state_dict``."""
        cls.check_description(description, weight)
        return cls(weight.shape, description.get("block_shape"))


def zero_pruned(module: nn.Module, mask: WeightMask) -> None:
    """Set the original weight to exactly zero where ``mask`` prunes it."""
    with torch.no_grad():
        original_weight(module).mul_(mask.factor)


def mask_sparsity(model: nn.Module) -> dict[str, float]:
    """Fraction of pruned weights of every masked layer, by layer name."""
    table = {}
    for name, module in weight_layers(model).items():
        mask = find_parametrization(module, WeightMask)
        if mask is not None:
            table[name] = 1.0 - mask.mask.count_nonzero().item() / mask.mask.numel()
    return table


def mask_zeros(model: nn.Module) -> list[str]:
    """Give every conv/linear/embedding layer without a mask whose weight holds exact zeros a mask of its non-zeros.

    An entry stores pruned weights as zeros, its masks baked in (``compress.finalize_for_export``); a model
    started from one (``init=``) gets its masks back this way, so that further training keeps them pruned.
    Returns the names of the layers masked.
    """
    masked = []
    for name, module in weight_layers(model).items():
        if find_parametrization(module, WeightMask) is not None:
            continue
        keep = original_weight(module).detach() != 0
        if bool(keep.all()):
            continue
        mask = WeightMask(module.weight.shape).to(module.weight.device)
        put_parametrization(module, mask, innermost=True)
        mask.restrict(keep)
        masked.append(name)
    return masked


@dataclasses.dataclass
class _PrunedLayer:
    module: nn.Module
    mask: WeightMask
    schedule: CubicSchedule
    ranked_globally: bool


@register_technique
class PruneTechnique(Technique):
    """Gradual magnitude pruning of a stage; see the module docstring for its config keys."""

    name = "prune"
    order = 10
    positions = ("start", "end", "frequency")

    def __init__(self, cfg: Mapping[str, Any] | None, *, stage_epochs: int, where: str):
        s = Settings(cfg, where)
        self._settings = s
        self.stage_epochs = stage_epochs
        self.structure = s.choice("structure", "unstructured", ("unstructured", "block", "nm"))
        self.block_shape = self._read_pair(s, "block_shape", self.structure == "block")
        self.nm = self._read_pair(s, "nm", self.structure == "nm")
        if self.nm is not None:
            n, m = self.nm
            if n >= m:
                raise s.error("nm", [n, m], "[n, m] with n < m (keep n of every m weights)")
            implied = 1.0 - n / m
            self.final = s.number("final_sparsity", implied, low=implied, high=implied)
        else:
            self.final = s.number("final_sparsity", low=0.0, high=1.0, high_open=True)
        self.initial = s.number("initial_sparsity", 0.0, low=0.0, high=self.final)
        self.unit = s.choice("unit", "fraction", UNITS)
        fraction = self.unit == "fraction"
        limit = {"fraction": 1.0, "epoch": float(stage_epochs), "step": float("inf")}[self.unit]
        self.start = s.number("start", 0.0 if fraction else REQUIRED, low=0.0, high=limit)
        self.end = s.number("end", 0.75 if fraction else REQUIRED, low=self.start, high=limit)
        self.frequency = s.number("frequency", 0.05 if fraction else REQUIRED, low=0.0, high=limit, low_open=True)
        if self.unit == "step":  # configure() would otherwise truncate 2.5 steps to 2 silently
            for key in ("start", "end", "frequency"):
                if not getattr(self, key).is_integer():
                    raise s.error(key, getattr(self, key), "a whole number of steps (unit=step)")
        self.ranking = s.choice("ranking", "layer", ("layer", "global"))
        self.include = s.patterns("layers", ["*"])
        self.exclude = s.patterns("exclude", [])
        self.first_last = s.number("first_last_sparsity", 0.0, low=0.0, high=1.0, high_open=True, optional=True)
        self.layer_sparsity = s.mapping("layer_sparsity")
        per_layer = Settings(self.layer_sparsity, f"{where}.layer_sparsity")
        for pattern in self.layer_sparsity:
            per_layer.number(pattern, low=0.0, high=1.0, high_open=True)
        if self.nm is not None:
            if self.ranking == "global" or self.layer_sparsity or self.first_last not in (0.0, None):
                raise ValueError(f"{where}: structure=nm fixes every pruned layer at {self.final:.4g} sparsity; "
                                 "use ranking=layer, no layer_sparsity and first_last_sparsity 0 or null")
        s.finish()
        self.schedule: CubicSchedule | None = None
        self._layers: list[_PrunedLayer] = []
        self._last_step = -1

    @staticmethod
    def _read_pair(s: Settings, key: str, used: bool) -> tuple[int, int] | None:
        value = s.get(key, None)
        if not used:
            if value is not None:
                raise s.error(key, value, f"nothing: {key} is only used with structure="
                                          f"{'block' if key == 'block_shape' else 'nm'}")
            return None
        if not (isinstance(value, (list, tuple)) and len(value) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)):
            raise s.error(key, value, "two positive integers, e.g. [1, 4] or [2, 4]")
        return int(value[0]), int(value[1])

    def configure(self, *, steps_per_epoch: int, predict: Predict = predict_outputs) -> None:
        total = self.stage_epochs * steps_per_epoch

        def steps(value: float) -> int:
            return int(value) if self.unit == "step" else round(stage_epochs_at(value, self.unit, self.stage_epochs)
                                                                  * steps_per_epoch)

        end = steps(self.end)
        if self.unit == "step" and end > total - 1:
            raise self._settings.error("end", self.end, f"a step within the stage (at most {total - 1}: "
                                                        f"{self.stage_epochs} epochs × {steps_per_epoch} steps)")
        # The last on_step_end of the stage is step total-1: an end at the stage's very end is reached there.
        end = min(end, total - 1)
        self.schedule = CubicSchedule(self.initial, self.final, min(steps(self.start), end), end,
                                      max(1, steps(self.frequency)))

    def final_sparsity(self, model: nn.Module) -> dict[str, float]:
        """The sparsity every layer of ``model`` this stage selects ends its schedule at (0: left dense)."""
        return {name: target for name, _, target, _ in self._targets(model)}

    def _targets(self, model: nn.Module) -> Iterator[tuple[str, nn.Module, float, bool]]:
        """(name, module, final sparsity, ranked in the global pool) of every layer this stage selects."""
        first_last = first_and_last(model)
        for name, module in select_layers(model, self._settings, include=self.include, exclude=self.exclude,
                                          per_layer=self.layer_sparsity).items():
            explicit, target = first_match(name, self.layer_sparsity)
            global_pool = not explicit and not (name in first_last and self.first_last is not None)
            if not explicit:
                target = self.final if global_pool else self.first_last
            yield name, module, target, global_pool

    def attach(self, model: nn.Module) -> None:
        s = self._settings
        if self.schedule is None:
            raise RuntimeError(f"{s.where}: configure(steps_per_epoch=...) must be called before attach()")
        self._layers = []
        for name, module, target, global_pool in self._targets(model):
            if target == 0.0:
                continue
            if self.nm is not None and module.weight[0].numel() % self.nm[1]:
                raise ValueError(f"{s.where}: layer {name!r} has {module.weight[0].numel()} weights per output, "
                                 f"not a multiple of m={self.nm[1]}; add it to exclude")
            mask = find_parametrization(module, WeightMask)
            if mask is None:  # an existing mask (earlier stage, or restored on resume) is kept
                mask = WeightMask(module.weight.shape, self.block_shape).to(module.weight.device)
                put_parametrization(module, mask, innermost=True)
            elif self.block_shape is not None:  # its declared size checks that the blocks still hold
                mask.block_shape = self.block_shape
            self._layers.append(_PrunedLayer(module, mask, self.schedule.towards(target),
                                             global_pool and self.ranking == "global"))

    def on_step_end(self, model: nn.Module, step: int) -> None:
        self._last_step = step
        if self.schedule is not None and self.schedule.updates_at(step):
            self._update_masks(step)
        for layer in self._layers:
            zero_pruned(layer.module, layer.mask)

    def _update_masks(self, step: int) -> None:
        pooled = [layer for layer in self._layers if layer.ranked_globally]
        for layer in self._layers:
            if not layer.ranked_globally:
                self._prune(layer, step, [layer])
        if pooled:
            self._prune(pooled[0], step, pooled)

    def _prune(self, lead: _PrunedLayer, step: int, group: list[_PrunedLayer]) -> None:
        """Prune ``group`` jointly to ``lead``'s scheduled sparsity: the lowest-scoring units go."""
        target = lead.schedule.sparsity(step)
        with torch.no_grad():
            weights = [original_weight(layer.module) * layer.mask.factor for layer in group]
            if self.nm is not None:
                keeps = [_nm_keep(w.abs(), *self.nm) for w in weights]
            else:
                # Units already pruned score -1, below any live weight (exact zeros included): they are the
                # first to go, so ties at 0 cannot prune past the target.
                scores = [torch.where(self._unit_scores(layer.mask.factor) > 0, self._unit_scores(w.abs()), -1.0)
                          for layer, w in zip(group, weights)]
                flat = torch.cat([sc.flatten() for sc in scores])
                pruned = round(target * flat.numel())
                keep = torch.ones_like(flat, dtype=torch.bool)
                if pruned:
                    keep[torch.topk(flat, pruned, largest=False, sorted=False).indices] = False
                keeps = [self._expand(k.view_as(sc), w.shape)
                         for k, sc, w in zip(keep.split([sc.numel() for sc in scores]), scores, weights)]
            for layer, keep in zip(group, keeps):
                layer.mask.restrict(keep)

    def _unit_scores(self, magnitude: torch.Tensor) -> torch.Tensor:
        """Score of each pruning unit: the weight's magnitude, or a block's mean magnitude."""
        if self.block_shape is None:
            return magnitude
        sums, counts = _block_sums(magnitude.flatten(1), self.block_shape)
        return sums / counts

    def _expand(self, keep: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Element mask of ``shape`` from a mask over pruning units."""
        if self.block_shape is None:
            return keep.view(shape)
        rows, cols = self.block_shape
        matrix_shape = (shape[0], shape[1:].numel())
        full = keep.repeat_interleave(rows, 0).repeat_interleave(cols, 1)
        return full[:matrix_shape[0], :matrix_shape[1]].reshape(shape)

    def scalars(self, model: nn.Module) -> dict[str, float]:
        table = mask_sparsity(model)
        out = {f"sparsity/{name}": value for name, value in table.items()}  # the loop prefixes "prune/"
        if self._layers:
            total = sum(layer.mask.mask.numel() for layer in self._layers)
            kept = sum(layer.mask.mask.count_nonzero().item() for layer in self._layers)
            out["sparsity/pruned_layers"] = 1.0 - kept / total
        if self.schedule is not None:
            out["sparsity/target"] = self.schedule.sparsity(self._last_step)
        return out


def _block_sums(matrix: torch.Tensor, block_shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of ``matrix`` over each block, elements of each block); partial blocks at the edges count."""
    rows, cols = block_shape
    pad = (0, -matrix.shape[1] % cols, 0, -matrix.shape[0] % rows)

    def blocks(values: torch.Tensor) -> torch.Tensor:
        return nn.functional.pad(values, pad).unflatten(1, (-1, cols)).unflatten(0, (-1, rows)).sum((1, 3))

    return blocks(matrix), blocks(torch.ones_like(matrix))


def _nm_keep(magnitude: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` largest of every ``m`` consecutive weights of each output's flattened row."""
    groups = magnitude.flatten(1).unflatten(1, (-1, m))
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, groups.topk(n, dim=2).indices, True)
    return keep.view(magnitude.shape)
