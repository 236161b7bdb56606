"""The contract between compression techniques and the training loop, and what techniques share.

A *stage* (see ``compress/stages.py``) is a named block of training with its own epochs and learning
rate, during which a list of :class:`Technique` objects is active. The loop in ``train/`` knows nothing
about pruning or quantization: it calls these hooks, in this order, for every stage:

0. ``configure(steps_per_epoch=..., predict=...)`` once when the stage starts or resumes, with the number
   of optimizer steps in one epoch of this stage (``len(train_loader)``), so that schedules written in
   epochs or fractions of the stage can be converted to steps, and the task's way of running a model on a
   batch (:data:`Predict`: a classifier maps images to logits; a language model maps a window of tokens and
   the state carried from the previous window to log-probabilities and the next state).
1. ``attach(model)`` once when the stage starts or resumes. It adds the technique's structure to the
   model (masks, quantizers) and must be idempotent: on resume the structure is already there, restored
   from the checkpoint by :func:`compress.apply_compression_state`. Build the optimizer *after* attach:
   quantizers may add parameters (learned step sizes).
2. ``on_epoch_start(model, epoch)`` before each epoch (0-based, within the stage), after ``model.train()``.
3. For each training batch: ``loss(loss, outputs, inputs, targets)`` may replace the task loss (e.g.
   distillation), then after ``optimizer.step()``: ``on_step_end(model, step)`` with the 0-based
   global step within the stage (e.g. the pruning schedule updates masks here).
4. ``scalars(model)`` whenever the loop logs: numbers for TensorBoard and the progress line.
5. ``on_stage_end(model)`` after the stage's last epoch: training-only behaviour of the stage (e.g.
   frozen BatchNorm statistics) ends here, so that later stages train normally.

A technique that carries state from batch to batch (a distillation teacher's language-model state) saves it
in every checkpoint through ``state_dict()`` / ``load_state_dict()``.

Compression state lives on the model (masks and quantizers are submodules and buffers), so it is saved
with every ``state_dict``; the *structure* needed to rebuild it is described by
:func:`compress.compression_state`. Everything a technique does that only matters in training is a
function of (stage, epoch, step), re-applied by these hooks on resume.

The rest of this module is what pruning and quantization share: reading a technique's config with
one-line errors (:class:`Settings`), choosing layers by type and name pattern, converting stage
positions to epochs, and finding parametrizations on a layer's weight.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
from torch.nn.utils import parametrize
from torch.utils._pytree import tree_map

#: ``predict(model, inputs, carry) -> (outputs, carry)``: how the task runs a model on a batch, given what the
#: previous batch left (None at the start; a language model's state), returning what the next batch continues from.
Predict = Callable[[nn.Module, torch.Tensor, Any], tuple[torch.Tensor, Any]]


def predict_outputs(model: nn.Module, inputs: torch.Tensor, carry: Any = None) -> tuple[torch.Tensor, Any]:
    """The :data:`Predict` of independent batches (classification): ``model(inputs)``, nothing carried."""
    return model(inputs), None


def map_carry(function: Callable[[torch.Tensor], torch.Tensor], carry: Any) -> Any:
    """``function`` applied to every tensor of a carried state (a pytree), e.g. to detach it or move it."""
    return tree_map(lambda value: function(value) if isinstance(value, torch.Tensor) else value, carry)


class Technique:
    """Base class: every hook is a no-op, so a technique overrides only what it needs.

    A technique a stage can name is registered with :func:`register_technique`: its :attr:`name` is the key
    of the stage mapping that configures it."""

    #: The key of a stage's mapping that configures it, also its name in logs ("prune", "quantize", "distill").
    name: str = "technique"
    #: Where it runs within a stage: techniques attach and act in increasing ``order`` (prune 10 before quantize 20,
    #: so a weight is ``quantize(original * mask)``; distill 30 replaces the loss both train on).
    order: int = 0
    #: Keys of its config that are positions within the stage, in the config's ``unit`` (:data:`UNITS`); a smoke
    #: run that shortens the stage rescales them (``compress.stages.rescale_stages``).
    positions: tuple[str, ...] = ()
    #: Whether :meth:`loss` reads the model's outputs (a task that can skip computing them then computes them).
    needs_outputs: bool = False

    @classmethod
    def from_stage(cls, cfg: Mapping[str, Any] | None, *, stage_epochs: int, where: str,
                   load_teacher: Callable[[str], nn.Module]) -> Technique:
        """Build from the stage's mapping ``cfg`` (``where`` is its key path, for messages); ``load_teacher``
        is for techniques that need another model (distillation)."""
        return cls(cfg, stage_epochs=stage_epochs, where=where)

    def configure(self, *, steps_per_epoch: int, predict: Predict = predict_outputs) -> None:
        """Called before :meth:`attach` with the number of optimizer steps per epoch of the stage and the task's
        :data:`Predict`."""

    def attach(self, model: nn.Module) -> None:
        """Add this technique's structure to ``model`` (idempotent)."""

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        """Called before each epoch of the stage (``epoch`` counts from 0 within the stage).

        A run resumed mid-epoch calls it again for that epoch, on a model already in the epoch's state, and
        with the RNG not yet restored: it must be idempotent and must not draw random numbers that matter.
        """

    def loss(self, loss: torch.Tensor, outputs: torch.Tensor, inputs: torch.Tensor,
             targets: torch.Tensor) -> torch.Tensor:
        """Return the loss to optimise; the default keeps the task loss."""
        return loss

    def on_step_end(self, model: nn.Module, step: int) -> None:
        """Called after each optimizer step (``step`` counts from 0 within the stage)."""

    def scalars(self, model: nn.Module) -> dict[str, float]:
        """Numbers worth logging now (e.g. current sparsity)."""
        return {}

    def on_stage_end(self, model: nn.Module) -> None:
        """Called once after the last epoch of the stage."""

    def state_dict(self) -> dict[str, Any]:
        """What the technique carries between batches, for a checkpoint (none by default)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (called on resume, after :meth:`attach`)."""


#: Every technique a stage can use, by its stage key (:attr:`Technique.name`), filled by :func:`register_technique`.
TECHNIQUES: dict[str, type[Technique]] = {}


def register_technique(cls: type[Technique]) -> type[Technique]:
    """Class decorator: make a :class:`Technique` subclass available to stages under its ``name``.

    The module defining it must be imported for the registration to happen: ``compress/__init__.py`` imports
    every technique module."""
    if cls.name in TECHNIQUES or cls.name in ("name", "epochs"):
        raise ValueError(f"technique name {cls.name!r} is taken (a registered technique or a stage key)")
    TECHNIQUES[cls.name] = cls
    return cls


# --------------------------------------------------------------------------------------------------
# Config reading
# --------------------------------------------------------------------------------------------------

#: Bit widths a quantizer may be given: the range QAT works in, and 16 (half-precision storage).
ALLOWED_BITS = (2, 3, 4, 5, 6, 7, 8, 16)

#: Units of positions within a stage (pruning start/end/frequency, freezing epochs).
UNITS = ("fraction", "epoch", "step")

#: Default of :meth:`Settings.get` / :meth:`Settings.number` for keys that must be given.
REQUIRED = object()


class Settings:
    """One technique's config mapping, read key by key; every error names the full key and the bad value.

    ``where`` is the key path used in messages, e.g. ``compress.stages[0].prune``. Call :meth:`finish`
    after reading: keys that were never read are typos and raise.
    """

    def __init__(self, cfg: Mapping[str, Any] | None, where: str):
        if cfg is None:
            cfg = {}
        if not isinstance(cfg, Mapping):
            raise ValueError(f"{where}={cfg!r}: expected a mapping of settings")
        self.where = where
        self._cfg = dict(cfg)
        self._read: set[str] = set()

    def error(self, key: str, value: Any, expected: str) -> ValueError:
        """The ValueError for ``key=value``, saying what was expected."""
        return ValueError(f"{self.where}.{key}={value!r}: expected {expected}")

    def get(self, key: str, default: Any = REQUIRED) -> Any:
        """The raw value of ``key``; without a default the key is required."""
        self._read.add(key)
        if key not in self._cfg:
            if default is REQUIRED:
                raise ValueError(f"{self.where}.{key} is missing: it is required")
            return default
        return self._cfg[key]

    def number(self, key: str, default: Any = REQUIRED, *, low: float, high: float, low_open: bool = False,
               high_open: bool = False, integer: bool = False, optional: bool = False) -> Any:
        """A number in ``[low, high]`` (open ends with ``low_open`` / ``high_open``); ``None`` if optional."""
        value = self.get(key, default)
        if value is None and optional:
            return None
        kind = "an integer" if integer else "a number"
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        expected = f"{kind} in {interval}" + (" or null" if optional else "")
        ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type:
            raise self.error(key, value, expected)
        if not ((low < value if low_open else low <= value) and (value < high if high_open else value <= high)):
            raise self.error(key, value, expected)
        return int(value) if integer else float(value)

    def choice(self, key: str, default: Any, choices: Sequence[str]) -> str:
        """One of ``choices``."""
        value = self.get(key, default)
        if value not in choices:
            raise self.error(key, value, "one of " + ", ".join(choices))
        return value

    def bits(self, key: str, default: Any, *, optional: bool = False) -> int | None:
        """A bit width from :data:`ALLOWED_BITS` (``None`` allowed if optional)."""
        return check_bits(self.get(key, default), f"{self.where}.{key}", optional=optional)

    def patterns(self, key: str, default: Sequence[str]) -> list[str]:
        """A list of fnmatch patterns of layer names."""
        value = self.get(key, list(default))
        if isinstance(value, str) or not isinstance(value, Sequence) \
                or not all(isinstance(p, str) and p for p in value):
            raise self.error(key, value, "a list of layer-name patterns (fnmatch), e.g. ['conv1', 'layer4.*']")
        return list(value)

    def mapping(self, key: str) -> dict[str, Any]:
        """A mapping from layer-name patterns to values (empty by default)."""
        value = self.get(key, {})
        if value is None:
            return {}
        if not isinstance(value, Mapping) or not all(isinstance(p, str) and p for p in value):
            raise self.error(key, value, "a mapping from layer-name patterns (fnmatch) to values")
        return dict(value)

    def finish(self) -> None:
        """Raise for keys that were never read (misspelt or not used by this technique)."""
        unknown = sorted(set(self._cfg) - self._read)
        if unknown:
            raise ValueError(f"{self.where}: unknown key(s) {', '.join(unknown)}; "
                             f"allowed: {', '.join(sorted(self._read))}")


def check_bits(value: Any, where: str, *, optional: bool = False) -> int | None:
    """Validate a bit width (one of :data:`ALLOWED_BITS`, or ``None`` when optional)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value not in ALLOWED_BITS:
        allowed = ", ".join(map(str, ALLOWED_BITS)) + (" or null" if optional else "")
        raise ValueError(f"{where}={value!r}: expected a bit width, one of {allowed}")
    return value


def stage_epochs_at(value: float, unit: str, stage_epochs: int) -> float:
    """A position within the stage given in ``unit`` ("fraction" of the stage or "epoch"), in epochs."""
    return value * stage_epochs if unit == "fraction" else float(value)


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------

#: Layer types whose weights are pruned and quantized (transposed convolutions are not: their output
#: channels are not the weight's first dimension). An embedding table's rows play the output channels.
WEIGHT_LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.Embedding)


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every conv / linear / embedding layer of ``model`` by qualified name, in registration order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, WEIGHT_LAYER_TYPES)}


def first_and_last(model: nn.Module) -> set[str]:
    """Names of the first and last conv/linear/embedding layers in registration order (the stem and the classifier
    of timm / torchvision models), which are usually kept denser and at higher precision."""
    names = list(weight_layers(model))
    return {names[0], names[-1]} if names else set()


def matches(name: str, patterns: Sequence[str]) -> bool:
    """True when ``name`` matches one of the fnmatch ``patterns``."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def first_match(name: str, overrides: Mapping[str, Any]) -> tuple[bool, Any]:
    """``(True, value)`` of the first pattern in ``overrides`` matching ``name``; ``(False, None)`` if none."""
    for pattern, value in overrides.items():
        if fnmatch.fnmatchcase(name, pattern):
            return True, value
    return False, None


def select_layers(model: nn.Module, settings: Settings, *, include: Sequence[str], exclude: Sequence[str],
                  per_layer: Mapping[str, Any]) -> dict[str, nn.Module]:
    """Conv/linear layers matching ``include`` and not ``exclude``.

    Every pattern (including the keys of ``per_layer``) must match at least one layer: a pattern that
    matches nothing is almost always a typo, and would silently change nothing.
    """
    layers = weight_layers(model)
    if not layers:
        raise ValueError(f"{settings.where}: the model has no Conv/Linear/Embedding layer to compress")
    for key, patterns in (("layers", include), ("exclude", exclude), ("per-layer", list(per_layer))):
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in layers):
                shown = ", ".join(list(layers)[:12]) + (", ..." if len(layers) > 12 else "")
                raise ValueError(f"{settings.where}: {key} pattern {pattern!r} matches no Conv/Linear/Embedding layer; "
                                 f"layers are: {shown}")
    return {name: m for name, m in layers.items() if matches(name, include) and not matches(name, exclude)}


# --------------------------------------------------------------------------------------------------
# Weight parametrizations (masks, weight quantizers)
# --------------------------------------------------------------------------------------------------

def weight_parametrizations(module: nn.Module) -> list[nn.Module]:
    """The parametrizations applied to ``module.weight``, innermost first (empty when none)."""
    if not parametrize.is_parametrized(module, "weight"):
        return []
    return list(module.parametrizations["weight"])


def find_parametrization(module: nn.Module, kind: type) -> nn.Module | None:
    """The parametrization of type ``kind`` on ``module.weight``, or ``None``."""
    return next((p for p in weight_parametrizations(module) if isinstance(p, kind)), None)


def put_parametrization(module: nn.Module, new: nn.Module, *, innermost: bool = False) -> None:
    """Add ``new`` to ``module.weight``'s parametrizations, replacing one of the same type in place.

    ``innermost`` puts a new one first in the chain: a mask must come before the weight quantizer,
    whose output (tagged with its bit width) is what the layer consumes and the scorer reads.
    """
    old = find_parametrization(module, type(new))
    if old is not None:
        chain = module.parametrizations["weight"]
        chain[list(chain).index(old)] = new
    elif innermost and parametrize.is_parametrized(module, "weight"):
        module.parametrizations["weight"].insert(0, new)
    else:
        parametrize.register_parametrization(module, "weight", new)


def original_weight(module: nn.Module) -> torch.Tensor:
    """The trained tensor behind ``module.weight`` (the parameter itself when not parametrized)."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations["weight"].original
    return module.weight
