"""Compression stages: the ordered list a ``conf/compress/*.yaml`` file describes, built into objects.

A compress config is ``{name, stages: [stage, ...]}``; each stage is a mapping with

    name        identifier used for its checkpoint and logs: letters, digits, "_" or "-"; unique;
                "train" is reserved for the baseline stage
    epochs      positive integer (conf files interpolate it from ``${train.epochs}``)
    <technique> optional mapping configuring a registered technique (:data:`compress.base.TECHNIQUES`):
                prune (compress/pruning.py), quantize (compress/quantization.py), distill (compress/distillation.py)
    <other>     train-config keys this stage changes (lr, schedule, warmup_epochs, weight_decay, ...), or
                ``lr_scale`` (the stage's lr as a multiple of ``train.lr``), returned as ``Stage.overrides``;
                train/run.py checks them against the train config (train.config.stage_train_config).

A stage has a kind (``Stage.kind``, :func:`stage_kind`): a block of training as above, or, written
``{name, allocate: mapping}``, an allocation that trains nothing (it chooses per-layer sparsity and bits for the
stages after it). Here an allocation's mapping is only checked to be one: the module that runs the stage reads it
from the config and documents its keys (train/search/stage.py).

Within a stage the techniques run in their ``order`` (prune → quantize → distill), so a weight is always
``quantize(original * mask)``. Adding a technique adds a module with a registered :class:`Technique`
subclass (imported in compress/__init__.py); nothing here changes.

:func:`attach_final` gives a model what the stages leave on it at the end of their schedules, without training,
and :func:`calibrate` the forward pass that initialises its input quantizers: what a plan (train/plan.py) and an
allocate stage (train/search/stage.py, train/search/measure.py) count.
"""
from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from .base import TECHNIQUES, Technique
from .distillation import DistillTechnique
from .pruning import PruneTechnique
from .quantization import ActivationQuantizer

#: Stage name of the baseline training in train/run.py.
BASELINE_STAGE = "train"

#: The kinds of stage (:attr:`Stage.kind`): a block of training, and an allocation (the key that marks one).
TRAINING, ALLOCATE = "training", "allocate"

_STAGE_NAME = re.compile(r"[A-Za-z0-9_-]+")


@dataclasses.dataclass
class Stage:
    """A block of training with its own epochs, train-config overrides and active techniques."""

    name: str
    epochs: int
    overrides: dict[str, Any]
    techniques: list[Technique]
    #: :data:`TRAINING`, or :data:`ALLOCATE` for a stage that trains nothing (see the module docstring).
    kind: str = TRAINING


def stage_kind(raw: Mapping[str, Any]) -> str:
    """The kind of a stage mapping as written: :data:`ALLOCATE` when it has ``allocate:``, else :data:`TRAINING`."""
    return ALLOCATE if ALLOCATE in raw else TRAINING


def build_stages(compress_cfg: Mapping[str, Any], *, load_teacher: Callable[[str], nn.Module]) -> list[Stage]:
    """Validate a compress config and build its stages (``[]`` for ``compress=none``).

    ``load_teacher(spec)`` returns a teacher model for distillation; it is called only when a
    distillation stage attaches, i.e. after the stages before it have trained.
    """
    if isinstance(compress_cfg, DictConfig):
        compress_cfg = OmegaConf.to_container(compress_cfg, resolve=True)
    if not isinstance(compress_cfg, Mapping):
        raise ValueError(f"compress={compress_cfg!r}: expected a mapping with keys name and stages")
    unknown = sorted(set(compress_cfg) - {"name", "stages"})
    if unknown:
        raise ValueError(f"compress: unknown key(s) {', '.join(unknown)}; allowed: name, stages")
    raw_stages = compress_cfg.get("stages")
    if raw_stages is None:
        raw_stages = []
    if isinstance(raw_stages, (str, Mapping)) or not isinstance(raw_stages, Sequence):
        raise ValueError(f"compress.stages={raw_stages!r}: expected a list of stage mappings")
    stages: list[Stage] = []
    for index, raw in enumerate(raw_stages):
        stage = _build_stage(raw, f"compress.stages[{index}]", load_teacher)
        if stage.name in {s.name for s in stages}:
            raise ValueError(f"compress.stages[{index}].name={stage.name!r}: expected a name not used by an "
                             "earlier stage")
        stages.append(stage)
    return stages


def _build_stage(raw: Any, where: str, load_teacher: Callable[[str], nn.Module]) -> Stage:
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}={raw!r}: expected a mapping with name, epochs and techniques")
    name = raw.get("name")
    if not isinstance(name, str) or not _STAGE_NAME.fullmatch(name) or name == BASELINE_STAGE:
        raise ValueError(f"{where}.name={name!r}: expected letters, digits, '_' or '-', "
                         f"other than {BASELINE_STAGE!r} (the baseline stage)")
    if stage_kind(raw) == ALLOCATE:
        unknown = sorted(set(raw) - {"name", ALLOCATE})
        if unknown:
            raise ValueError(f"{where}: an allocate stage trains nothing, so it takes no {', '.join(unknown)}; "
                             "allowed: name, allocate")
        if not isinstance(raw[ALLOCATE], Mapping):
            raise ValueError(f"{where}.allocate={raw[ALLOCATE]!r}: expected a mapping of settings")
        return Stage(name=name, epochs=0, overrides={}, techniques=[], kind=ALLOCATE)
    epochs = raw.get("epochs")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"{where}.epochs={epochs!r}: expected an integer >= 1")
    techniques = [kind.from_stage(raw[key], stage_epochs=epochs, where=f"{where}.{key}", load_teacher=load_teacher)
                  for key, kind in sorted(TECHNIQUES.items(), key=lambda item: item[1].order)
                  if raw.get(key) is not None]
    overrides = {key: value for key, value in raw.items() if key not in ("name", "epochs", *TECHNIQUES)}
    return Stage(name=name, epochs=epochs, overrides=overrides, techniques=techniques)


def rescale_stages(compress_cfg: Mapping[str, Any], epochs: int) -> dict[str, Any]:
    """A copy of a resolved, valid compress config in which every stage lasts at most ``epochs`` epochs, with
    its techniques' positions (:attr:`Technique.positions`) given as fractions of the stage, so that every
    schedule keeps its shape in the shorter stage (smoke runs).

    A position in steps depends on the data's size, unknown here: ValueError names the key."""
    config = copy.deepcopy(dict(compress_cfg))
    for index, stage in enumerate(config.get("stages") or []):
        if stage_kind(stage) != TRAINING:  # no epochs to shorten
            continue
        length = stage["epochs"]
        stage["epochs"] = min(length, epochs)
        for key, kind in TECHNIQUES.items():
            settings = stage.get(key)
            if not isinstance(settings, dict) or not kind.positions or settings.get("unit", "fraction") == "fraction":
                continue
            if settings["unit"] != "epoch":
                raise ValueError(f"compress.stages[{index}].{key}.unit={settings['unit']!r}: a shortened stage "
                                 "cannot rescale positions counted in steps; write them with unit fraction or epoch")
            for position in kind.positions:
                if settings.get(position) is not None:
                    settings[position] = settings[position] / length
            settings["unit"] = "fraction"
    return config


def attach_final(model: nn.Module, stages: Sequence[Stage], *, steps_per_epoch: int) -> list[dict[str, Any]]:
    """Attach every technique of ``stages`` to ``model`` in run order, pruning at the end of its schedule (the final
    sparsity, ranked on the weights as they are); distillation is skipped (it changes the weights a run trains, not
    what is counted). Returns what was attached, per stage: ``{stage, attached, skipped}``."""
    attached = []
    for stage in stages:
        names = []
        for technique in stage.techniques:
            if isinstance(technique, DistillTechnique):
                continue
            technique.configure(steps_per_epoch=steps_per_epoch)
            technique.attach(model)
            if isinstance(technique, PruneTechnique):
                technique.on_step_end(model, technique.schedule.end)
            names.append(technique.name)
        skipped = [technique.name for technique in stage.techniques if technique.name not in names]
        if stage.techniques:
            attached.append({"stage": stage.name, "attached": names, "skipped": skipped})
    return attached


@torch.no_grad()
def calibrate(model: nn.Module, batches: Sequence[torch.Tensor], predict: Callable[..., Any], *,
              batch_norms: bool = True) -> None:
    """The short calibration after a change: a forward pass over ``batches`` (carrying what the task's ``predict``
    carries from batch to batch) in which every batch norm re-estimates its statistics (one-shot pruning shifts
    those of the layers after it; any training after the change re-estimates them first; not with
    ``batch_norms`` False) and every uncalibrated input quantizer takes LSQ's least-error step on the first batch, as
    at the first step of a QAT stage. Nothing else runs in training mode, and nothing is trained."""
    model.eval()
    fresh = [m for m in model.modules() if isinstance(m, ActivationQuantizer) and not bool(m.calibrated)]
    norms = [m for m in model.modules() if batch_norms and isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats]
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # the cumulative average over the batches
    for module in fresh + norms:
        module.train()
    carry = None
    for batch in batches if fresh or norms else ():
        _, carry = predict(model, batch, carry)
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    model.eval()
