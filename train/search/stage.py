"""The allocate stage: sensitivity and allocation inside a run, and the one module of the search train/run.py
imports.

A compress config may do both steps of the search inside the run (``conf/compress/auto.yaml``): a stage written
``{name, allocate: mapping}`` (compress.stages knows its kind, :data:`compress.stages.ALLOCATE`; its keys are read
here, :class:`AllocateStage`) measures the model trained so far on the run's validation split with the same
:func:`train.search.measure.measure` as ``python -m train.search.sensitivity``, solves the same
:func:`train.search.solve.allocate` as ``python -m train.search.allocate``, and builds the stages after it (the
template) anew with the chosen per-layer settings (:func:`run_allocate_stage`). Unlike the command's, its
measurement knows the template: the layers it does not allocate keep the template's settings and are measured with
them, and every setting is quantized with the template's QAT keys (:func:`fixed_stages`, :func:`layer_keys`).

``max_score: template`` caps the allocation at the template's score, which the stage counts: the template's stages
attached at their end-of-schedule targets to the trained model (:func:`compress.attach_final`, what a plan counts)
and counted as every setting is (:func:`template_score`). Counting it is exact and simple; summing the measured
costs of each layer's template setting instead would need every template setting on the grid, and a setting the
grid cannot express (4-bit weights on 8-bit inputs) is common. Its outputs go to
``RUN/sensitivity/`` as the two commands write them, with ``allocation.json`` last: a run restarted after it reads
the allocation back instead of measuring again. While it measures, it keeps the layers measured so far there
(``sensitivity.partial.json``) and reads the stop request between layers: a run stopped or killed during the stage
resumes the measurement where it was. A smoke run shortens it through :func:`smoke_stages`; a plan (train/plan.py)
reads a chosen allocation back without measuring anything (:func:`read_back_allocation`).

Imports compress, data, train.config and the rest of the search; never train/run.py.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from compress import PruneTechnique, QuantizeTechnique, Stage, build_stages, compression_state
from compress.base import Settings, matches, select_layers, weight_layers
from compress.stages import ALLOCATE, stage_kind
from data import Loaders
from data.tasks import Task
from scoring.challenge import PERPLEXITY, TOP1
from train.config import ConfigError
from train.search.configs import check_template, fill_stages, write_config
from train.search.formats import ALLOCATION_FORMAT, ALLOCATION_JSON, PARTIAL_SENSITIVITY_JSON, SENSITIVITY_DIR, \
    read_allocation, read_partial_sensitivity, write_json
from train.search.grid import DEFAULT_BITS, DEFAULT_SPARSITY, FREEBIE_ON, REFERENCE, Setting, grid, grid_bits, \
    grid_sparsity, layer_pattern, settings_text
from train.search.measure import STAGE_KEYS, Probe, check, measure
from train.search.render import write_sensitivity
from train.search.solve import UNLIMITED, Allocation, allocate

log = logging.getLogger("micronet.allocate")

#: ``max_score: template``: the cap is the count of the stages after the allocate stage as written.
TEMPLATE = "template"


@dataclass(frozen=True)
class AllocateStage:
    """The ``allocate:`` mapping of a compress stage (``conf/compress/auto.yaml``), checked key by key:

        budget               the predicted validation-loss increase allowed (nats per example, >= 0), or
        target_metric        the validation metric to keep (top-1 fraction in (0, 1], or perplexity > 1), or
        max_score            the predicted score allowed (> 0), or ``template``: the count of the stages after it as
                             written (:data:`TEMPLATE`); the least predicted loss increase under it. Exactly one
        bits                 the grid's bit widths (weights and inputs), float = unquantized; default float,8,6,4,3,2
        sparsity             the grid's sparsities in [0, 1); default 0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98
        calibration_batches  training batches of the calibration after each change (train/search/measure.py); default 2
        layers, exclude      fnmatch patterns of the layers measured and allocated (the others keep the template's
                             settings, and are measured so); default ["*"] and []

    The stages after it are the template (as ``--template`` of the command): its first ``prune:`` and first
    ``quantize:`` stages train the allocation (:func:`train.search.configs.fill_stages`), their other keys (schedule,
    method) as written."""

    budget: float | None
    target_metric: float | None
    max_score: float | str | None
    bits: list[int | None]
    sparsity: list[float]
    calibration_batches: int
    layers: list[str]
    exclude: list[str]

    @classmethod
    def from_stage(cls, cfg: Mapping[str, Any], where: str, metric: str) -> AllocateStage:
        """Read and check the mapping (``where``: its key path; ``metric``: the task's gate metric); ValueError."""
        settings = Settings(cfg, where)
        budget = settings.number("budget", None, low=0, high=math.inf, high_open=True, optional=True)
        high = 1.0 if metric == TOP1 else math.inf
        target = settings.number("target_metric", None, low=1.0 if metric == PERPLEXITY else 0.0, low_open=True,
                                 high=high, high_open=metric != TOP1, optional=True)
        max_score = settings.get("max_score", None)
        if max_score is not None and max_score != TEMPLATE and (isinstance(max_score, bool) or not isinstance(
                max_score, (int, float)) or not max_score > 0):
            raise settings.error("max_score", max_score, f"a number > 0, or {TEMPLATE} (the score of the stages after "
                                                         "it as written)")
        if [budget, target, max_score].count(None) != 2:
            raise ValueError(f"{where}: expected exactly one of budget (the predicted validation-loss increase "
                             f"allowed, e.g. 1.5), target_metric (the validation {metric} to keep) and max_score "
                             f"(the predicted score allowed, or {TEMPLATE})")
        grids = {}
        for key, check_grid, default in (("bits", grid_bits, DEFAULT_BITS), ("sparsity", grid_sparsity, DEFAULT_SPARSITY)):
            value = settings.get(key, list(default))
            try:
                grids[key] = check_grid(value if isinstance(value, Sequence) and not isinstance(value, str) else [value])
            except ValueError as err:
                raise ValueError(f"{where}.{key}={value!r}: {err}") from None
        spec = cls(budget=budget, target_metric=target, max_score=max_score if max_score in (None, TEMPLATE)
                   else float(max_score), bits=grids["bits"], sparsity=grids["sparsity"],
                   calibration_batches=settings.number("calibration_batches", 2, low=1, high=math.inf, integer=True),
                   layers=settings.patterns("layers", ["*"]), exclude=settings.patterns("exclude", []))
        settings.finish()
        return spec

    def smoke(self, model_layers: Sequence[str], template: Callable[[str], Setting | None]) -> AllocateStage:
        """A smoke run's version (:func:`smoke_stages`): only the first of the layers it allocates (a full ImageNet
        model has 124; ``model_layers``: the model's weight layers; the others keep the template's settings), one
        calibration batch, and one setting besides the trained model's own: the layer's setting in the template
        (``template(layer)``, :func:`template_setting`) where the grid holds it, so that a smoke run ends at the
        model its plan counts; else the grid's last bit width and last sparsity (its cheapest corner as the defaults
        are ordered). Its ``max_score`` is kept (a smoke run's score stays under its plan), else no constraint."""
        first = next((name for name in model_layers if matches(name, self.layers) and not matches(name, self.exclude)),
                     None)
        cut = {"layers": [layer_pattern(first)], "exclude": []} if first else {}
        own = template(first) if first else None
        on_grid = own is not None and own.bits in self.bits and any(math.isclose(own.sparsity, s) for s in self.sparsity)
        setting = {"bits": [own.bits], "sparsity": [own.sparsity]} if on_grid \
            else {"bits": self.bits[-1:], "sparsity": self.sparsity[-1:]}
        constraint = {} if self.max_score is not None else {"budget": UNLIMITED, "target_metric": None}
        return dataclasses.replace(self, **constraint, **cut, **setting, calibration_batches=1)

    def measured_layers(self, model: nn.Module, where: str) -> list[str]:
        """The weight layers the stage measures; ValueError for a pattern that matches none, or none left."""
        layers = select_layers(model, Settings({}, where), include=self.layers, exclude=self.exclude, per_layer={})
        if not layers:
            raise ValueError(f"{where}: layers {self.layers} without exclude {self.exclude} leave no layer to allocate")
        return list(layers)


def check_allocate_stages(stages: Sequence[Mapping[str, Any]], model: nn.Module, metric: str) -> dict[int, AllocateStage]:
    """The allocate stages of a resolved compress config's ``stages``, by index, checked before anything trains:
    at most one, measuring an uncompressed model (no technique before it, none on ``model``: an ``init=`` run), with
    a template after it (:func:`check_template`). ValueError names the problem."""
    specs = {index: AllocateStage.from_stage(stage[ALLOCATE], f"compress.stages[{index}].{ALLOCATE}", metric)
             for index, stage in enumerate(stages) if stage_kind(stage) == ALLOCATE}
    if len(specs) > 1:
        raise ValueError(f"compress.stages{sorted(specs)}: more than one allocate stage; keep one")
    for index, spec in specs.items():
        where = f"compress.stages[{index}]"
        earlier = [s["name"] for s in stages[:index] if any(k in s for k in ("prune", "quantize"))]
        structure = compression_state(model)
        if earlier or structure["weights"] or structure["inputs"]:
            raise ValueError(f"{where}: the allocate stage measures an uncompressed model, but "
                             + (f"stage {earlier[0]} compresses it before" if earlier else "the init= model is compressed"))
        check_template(list(stages[index + 1:]), f"{where}: the stages after allocate")
        layers = spec.measured_layers(model, f"{where}.{ALLOCATE}")
        try:
            fixed_stages(stages[index + 1:], layers)
        except ValueError as err:
            raise ValueError(f"{where}: the stages after allocate: {err}") from None
    return specs


def counted_stages(stages: Sequence[Mapping[str, Any]]) -> list[Stage]:
    """``stages`` built with only what decides the count: their pruning and quantization (distillation and the
    training keys change the weights a run trains, not what the scorer counts)."""
    kept = [{key: value for key, value in stage.items() if key in ("name", "epochs", "prune", "quantize")}
            for stage in stages]
    return build_stages({"stages": kept}, load_teacher=lambda spec: None)


def fixed_stages(later: Sequence[Mapping[str, Any]], layers: Sequence[str]) -> list[Stage]:
    """The template ``later`` as it compresses what an allocation of ``layers`` leaves to it: every other layer at
    its settings, and what it sets model-wide (:meth:`train.search.measure.Probe.fix`). ValueError for a template
    that cannot leave ``layers`` to the allocation."""
    return counted_stages(fill_stages(later, {layer: REFERENCE for layer in layers}, keep_template=True))


def layer_keys(later: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The keys of the template's first ``quantize:`` that every quantized layer gets alike
    (:data:`train.search.measure.STAGE_KEYS`): what a measured setting is quantized with."""
    quantize = next(stage for stage in later if "quantize" in stage)["quantize"] or {}
    return {key: value for key, value in quantize.items() if key in STAGE_KEYS}


def check_allocation(compress: Mapping[str, Any], model: nn.Module, metric: str, *,
                     validation: Callable[[], object | None], distributed: bool) -> None:
    """Refuse before anything trains what would stop an allocate stage of the resolved compress config ``compress``
    after the baseline trained: bad settings, no template after it, a compressed model (:func:`check_allocate_stages`),
    no validation split (the test split never chooses settings), several processes. ``validation()`` is the run's
    validation loader, or None; it is called only for a config with an allocate stage (it builds the loaders)."""
    if not check_allocate_stages(compress.get("stages") or [], model, metric):
        return
    if validation() is None:
        raise ConfigError(f"compress={compress['name']} allocates per-layer settings on the validation split, and "
                          "this run has none", "pass data.val_split=0.2")
    if distributed:
        raise ConfigError(f"compress={compress['name']}: an allocate stage runs in one process",
                          "run it without torchrun, or torchrun the written compress config with init=")


def smoke_stages(compress: Mapping[str, Any], metric: str, model: Callable[[], nn.Module]) -> dict[str, Any]:
    """A copy of the resolved compress config ``compress`` in which every allocate stage is a smoke run's
    (:meth:`AllocateStage.smoke`; ``metric``: the task's gate metric; ``model()``: the run's model, built on the
    meta device will do, called only for a config with an allocate stage). ValueError for a bad allocate mapping."""
    config = copy.deepcopy(dict(compress))
    stages = config.get("stages") or []
    for index, stage in enumerate(stages):
        if stage_kind(stage) == ALLOCATE:
            spec = AllocateStage.from_stage(stage[ALLOCATE], f"compress.stages[{index}].{ALLOCATE}", metric)
            built = model()
            stage[ALLOCATE] = dataclasses.asdict(spec.smoke(
                list(weight_layers(built)), lambda layer: template_setting(stages[index + 1:], built, layer)))
    return config


def template_setting(later: Sequence[Mapping[str, Any]], model: nn.Module, layer: str) -> Setting | None:
    """The setting the template ``later`` gives ``layer`` of ``model`` at its end, in the stages an allocation
    fills (:func:`train.search.configs.fill_stages`: the first ``prune:`` and the first ``quantize:``); None where
    a :class:`Setting` cannot express it (weights and inputs at different widths, or quantized weights on a float
    input), or where ``later`` is no template (the run refuses it at its start)."""
    stages = counted_stages(later)
    prune = next((t for stage in stages for t in stage.techniques if isinstance(t, PruneTechnique)), None)
    quantize = next((t for stage in stages for t in stage.techniques if isinstance(t, QuantizeTechnique)), None)
    if prune is None or quantize is None:
        return None
    sparsity = prune.final_sparsity(model).get(layer, 0.0)
    widths = quantize.final_bits(model).get(layer)
    if widths is None:
        return Setting(None, sparsity)
    weight, inputs = widths
    if inputs != weight and not isinstance(weight_layers(model)[layer], nn.Embedding):  # an embedding has no input
        return None
    return Setting(weight, sparsity)


def planned_cap(compress: Mapping[str, Any], metric: str) -> float | str | None:
    """The ``max_score`` of the allocate stage of the resolved compress config ``compress`` (a number, or
    :data:`TEMPLATE`); None without one, or with an allocate mapping a run would refuse (a plan lists why)."""
    for index, stage in enumerate(compress.get("stages") or []):
        if stage_kind(stage) == ALLOCATE:
            try:
                return AllocateStage.from_stage(stage[ALLOCATE], f"compress.stages[{index}].{ALLOCATE}",
                                                metric).max_score
            except ValueError:
                return None
    return None


def run_allocate_stage(name: str, model: nn.Module, *, config: Mapping[str, Any], task: Task, loaders: Loaders,
                       device: torch.device, run_dir: Path, baseline: str, command: str,
                       load_teacher: Callable[[str], nn.Module], should_stop: Callable[[], bool],
                       ) -> tuple[dict[str, Any], list[Stage]] | None:
    """The allocate stage ``name`` of the run in ``run_dir`` (resolved ``config``) on ``model``, the model trained
    so far: per-layer settings measured on the validation split and chosen exactly (:func:`measure_and_allocate`),
    or read back from ``RUN/sensitivity/allocation.json`` when an earlier start chose them. ``baseline`` is where
    the measured model is saved, ``command`` the run's command line (both written into the outputs).

    Returns the allocation's record for the report (allocation.json without the run's config) and the stages after
    this one built anew with the settings; None when ``should_stop()`` asked for a stop, before the stage or between
    two layers it measures (the layers measured so far are kept: the next start measures the others)."""
    stages = config["compress"]["stages"]
    index = [stage["name"] for stage in stages].index(name)
    out = run_dir / SENSITIVITY_DIR
    record = read_allocation(out, config)
    if record is not None:
        log.info("stage '%s' already finished: allocation read back from %s", name, out)
    elif should_stop():
        return None
    else:
        spec = check_allocate_stages(stages, model, task.metric)[index]
        log.info("stage '%s': measuring every layer on the validation split, then allocating", name)
        probe = Probe(model, config, task, loaders, device=device, calibration_batches=spec.calibration_batches,
                      score_examples=config["score"]["examples"], val_split=config["data"]["val_split"],
                      quantize=layer_keys(stages[index + 1:]))
        record = measure_and_allocate(spec, probe, where=f"compress.stages[{index}]", later=stages[index + 1:],
                                      steps_per_epoch=len(loaders.train), out=out, config=config, baseline=baseline,
                                      command=command, should_stop=should_stop)
        if record is None:
            return None
        log.info("stage '%s' finished in %.0f s: %s", name, record["seconds"], out)
    log.info("%s", allocation_summary(record))
    return _allocated(record, stages[index + 1:], load_teacher)


def read_back_allocation(name: str, *, config: Mapping[str, Any], run_dir: Path,
                         load_teacher: Callable[[str], nn.Module]) -> tuple[dict[str, Any], list[Stage]] | None:
    """What :func:`run_allocate_stage` returns for the allocate stage ``name`` of the run in ``run_dir`` (resolved
    ``config``) once an earlier start of it chose the allocation (``RUN/sensitivity/allocation.json``), without
    a model or data; None while there is none. ConfigError when the file cannot be read or a run of another
    configuration wrote it."""
    record = read_allocation(run_dir / SENSITIVITY_DIR, config)
    if record is None:
        return None
    stages = config["compress"]["stages"]
    index = [stage["name"] for stage in stages].index(name)
    return _allocated(record, stages[index + 1:], load_teacher)


def _allocated(record: dict[str, Any], later: Sequence[Mapping[str, Any]], load_teacher: Callable[[str], nn.Module]
               ) -> tuple[dict[str, Any], list[Stage]]:
    """The allocation's record for the report (allocation.json without the run's config) and the stages ``later``
    (the template, as written) built anew with its per-layer settings."""
    built = build_stages({"stages": fill_stages(later, Allocation.from_dict(record).settings, keep_template=True)},
                         load_teacher=load_teacher)
    return {key: value for key, value in record.items() if key not in ("config", "format")}, built


def measure_and_allocate(spec: AllocateStage, probe: Probe, *, where: str, later: Sequence[Mapping[str, Any]],
                         steps_per_epoch: int, out: Path, config: Mapping[str, Any], baseline: str, command: str,
                         progress: Callable[[str], None] = log.info,
                         should_stop: Callable[[], bool] = lambda: False) -> dict[str, Any] | None:
    """The allocate stage's work on ``probe`` (the model trained so far, on the run's validation split): measure
    (the layers it does not allocate at the template ``later``'s settings, :func:`fixed_stages`), allocate,
    check, and write into ``out`` sensitivity.json / .md / .png, the stages ``later`` with the allocation as a
    compress config (``conf/compress/<name>_allocated.yaml``, as the command writes one) and, last,
    allocation.json: the record returned, which :func:`train.search.formats.read_allocation` reads back.
    ``baseline`` is where the measured model is saved (for ``python -m train.search.allocate RUN`` sweeps);
    ``steps_per_epoch`` the run's, at which the template's schedules end.

    After each layer the measurement so far is kept in ``out`` (:data:`PARTIAL_SENSITIVITY_JSON`), and it resumes
    from there; returns None when ``should_stop()`` asks for a stop between two layers."""
    start = time.perf_counter()
    partial = out / PARTIAL_SENSITIVITY_JSON
    out.mkdir(parents=True, exist_ok=True)

    def keep(measured: dict[str, Any]) -> bool:
        write_json(partial, measured)
        return should_stop()

    layers = spec.measured_layers(probe.model, where)
    kept = [name for name in weight_layers(probe.model) if name not in layers]
    cap = template_score(probe, later, steps_per_epoch) if spec.max_score == TEMPLATE else spec.max_score
    probe.fix(fixed_stages(later, layers), steps_per_epoch)
    result = measure(probe, layers=layers, settings=grid(spec.bits, spec.sparsity), progress=progress,
                     partial=read_partial_sensitivity(out), after_layer=keep)
    if result is None:
        log.warning("allocate: stopped between two layers; the layers measured so far are kept in %s", partial)
        return None
    # what the costs assume besides each layer's setting: python -m train.search.allocate refuses to reuse them
    result["run"], result["template"] = baseline, {"kept_layers": kept, "quantize": probe.quantize}
    result["path"] = str(write_sensitivity(result, out)["json"])
    allocation = _solved(spec, result, cap, where=where, baseline=baseline)
    check(allocation, probe)
    name = f"{config['compress']['name']}_allocated"
    path = out / "conf" / "compress" / f"{name}.yaml"
    write_config({"name": name, "stages": fill_stages(later, allocation.settings, keep_template=True)}, allocation,
                 result, path,
                 f"the stages of compress={config['compress']['name']} after its allocate stage", command)
    record = {"format": ALLOCATION_FORMAT, "stage": where, "split": "val", "val_split": probe.val_split,
              "validation_examples": result["validation"]["examples"], "max_score": cap, **allocation.to_dict(),
              # relative to the run dir, which may move
              "sensitivity": str(Path(result["path"]).relative_to(out.parent)),
              "compress_config": str(path.relative_to(out.parent)),
              "seconds": round(time.perf_counter() - start, 1), "config": dict(config)}
    write_json(out / ALLOCATION_JSON, record)
    partial.unlink(missing_ok=True)
    return record


def template_score(probe: Probe, later: Sequence[Mapping[str, Any]], steps_per_epoch: int) -> float:
    """The score of the template ``later`` as written, counted on the probe's model as every setting is
    (:meth:`train.search.measure.Probe.final`: what a plan counts, on the trained weights)."""
    model = probe.final(counted_stages(later), steps_per_epoch)
    return probe.count(model, freebie=None if FREEBIE_ON in probe.freebie_modes else False).score(probe.task.name)


def _solved(spec: AllocateStage, result: Mapping[str, Any], cap: float | None, *, where: str,
            baseline: str) -> Allocation:
    """The allocation of the measurement ``result`` under the stage's constraint (``cap``: its max_score's value);
    ConfigError when nothing of the grid meets it (the trained model is kept: the fix says how to go on)."""
    allocation = allocate(result, loss_budget=spec.budget, target_metric=spec.target_metric, max_score=cap)
    if allocation is not None:
        if spec.max_score == TEMPLATE:
            allocation.constraint += ", the count of the stages after it as written (max_score: template)"
        return allocation
    if cap is not None:
        cheapest = allocate(result, loss_budget=UNLIMITED).score
        raise ConfigError(f"{where}: no setting of the grid fits max_score={spec.max_score} (predicted score <= "
                          f"{cap:.6f}; the cheapest of the grid predicts {cheapest:.6f})",
                          f"re-run with init={baseline} and a higher {where}.{ALLOCATE}.max_score, fewer bits or more "
                          "sparsity in the grid, or fewer layers allocated: the trained model is kept")
    raise ConfigError(f"{where}: no setting of the grid meets target_metric={spec.target_metric:g} (the trained "
                      f"model has validation {result['metric']} {result['reference']['metric']:.4f}, calibrated)",
                      f"re-run with init={baseline} and a lower {where}.target_metric, or a budget: the trained "
                      "model is kept")


def allocation_summary(record: Mapping[str, Any]) -> str:
    """One line for the console: where the per-layer settings come from, and what they are."""
    allocation = Allocation.from_dict(record)
    return (f"per-layer settings allocated on the validation split ({record['validation_examples']} examples, "
            f"{allocation.constraint}; predicted score {allocation.score:.6f}): {settings_text(allocation.settings)}")
