"""The allocate stage: sensitivity and allocation inside a run, and the one module of the search train/run.py
imports.

A compress config may do both steps of the search inside the run (``conf/compress/auto.yaml``): a stage written
``{name, allocate: mapping}`` (compress.stages knows its kind, :data:`compress.stages.ALLOCATE`; its keys are read
here, :class:`AllocateStage`) measures the model trained so far on the run's validation split with the same
:func:`train.search.measure.measure` as ``python -m train.search.sensitivity``, solves the same
:func:`train.search.solve.allocate` as ``python -m train.search.allocate``, and builds the stages after it (the
template) anew with the chosen per-layer settings (:func:`run_allocate_stage`). Its outputs go to
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

from compress import Stage, build_stages, compression_state
from compress.base import Settings, select_layers
from compress.stages import ALLOCATE, stage_kind
from data import Loaders
from data.tasks import Task
from scoring.challenge import PERPLEXITY, TOP1
from train.config import ConfigError
from train.search.configs import check_template, fill_stages, write_config
from train.search.formats import ALLOCATION_FORMAT, ALLOCATION_JSON, PARTIAL_SENSITIVITY_JSON, SENSITIVITY_DIR, \
    read_allocation, read_partial_sensitivity, write_json
from train.search.grid import DEFAULT_BITS, DEFAULT_SPARSITY, grid, grid_bits, grid_sparsity, settings_text
from train.search.measure import Probe, check, measure
from train.search.render import write_sensitivity
from train.search.solve import UNLIMITED, Allocation, allocate

log = logging.getLogger("micronet.allocate")


@dataclass(frozen=True)
class AllocateStage:
    """The ``allocate:`` mapping of a compress stage (``conf/compress/auto.yaml``), checked key by key:

        budget               the predicted validation-loss increase allowed (nats per example, >= 0), or
        target_metric        the validation metric to keep (top-1 fraction in (0, 1], or perplexity > 1): exactly one
        bits                 the grid's bit widths (weights and inputs), float = unquantized; default float,8,6,4,3,2
        sparsity             the grid's sparsities in [0, 1); default 0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98
        calibration_batches  training batches of the calibration after each change (train/search/measure.py); default 2
        layers, exclude      fnmatch patterns of the layers measured and allocated (the others stay as trained);
                             default ["*"] and []

    The stages after it are the template (as ``--template`` of the command): its first ``prune:`` and first
    ``quantize:`` stages train the allocation (:func:`train.search.configs.fill_stages`), their other keys (schedule,
    method) as written."""

    budget: float | None
    target_metric: float | None
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
        if (budget is None) == (target is None):
            raise ValueError(f"{where}: expected exactly one of budget (the predicted validation-loss increase "
                             f"allowed, e.g. 1.5) and target_metric (the validation {metric} to keep)")
        grids = {}
        for key, check_grid, default in (("bits", grid_bits, DEFAULT_BITS), ("sparsity", grid_sparsity, DEFAULT_SPARSITY)):
            value = settings.get(key, list(default))
            try:
                grids[key] = check_grid(value if isinstance(value, Sequence) and not isinstance(value, str) else [value])
            except ValueError as err:
                raise ValueError(f"{where}.{key}={value!r}: {err}") from None
        spec = cls(budget=budget, target_metric=target, bits=grids["bits"], sparsity=grids["sparsity"],
                   calibration_batches=settings.number("calibration_batches", 2, low=1, high=math.inf, integer=True),
                   layers=settings.patterns("layers", ["*"]), exclude=settings.patterns("exclude", []))
        settings.finish()
        return spec

    def smoke(self) -> AllocateStage:
        """A smoke run's version (:func:`smoke_stages`): the grid's first and last bit width and sparsity, one
        calibration batch, and no constraint, so that every layer takes its cheapest setting and every later
        technique runs."""
        def ends(values: list) -> list:
            return list(dict.fromkeys([values[0], values[-1]]))
        return dataclasses.replace(self, budget=UNLIMITED, target_metric=None, bits=ends(self.bits),
                                   sparsity=ends(self.sparsity), calibration_batches=1)

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
        spec.measured_layers(model, f"{where}.{ALLOCATE}")
    return specs


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


def smoke_stages(compress: Mapping[str, Any], metric: str) -> dict[str, Any]:
    """A copy of the resolved compress config ``compress`` in which every allocate stage is a smoke run's
    (:meth:`AllocateStage.smoke`; ``metric``: the task's gate metric). ValueError for a bad allocate mapping."""
    config = copy.deepcopy(dict(compress))
    for index, stage in enumerate(config.get("stages") or []):
        if stage_kind(stage) == ALLOCATE:
            spec = AllocateStage.from_stage(stage[ALLOCATE], f"compress.stages[{index}].{ALLOCATE}", metric)
            stage[ALLOCATE] = dataclasses.asdict(spec.smoke())
    return config


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
                      score_examples=config["score"]["examples"], val_split=config["data"]["val_split"])
        record = measure_and_allocate(spec, probe, where=f"compress.stages[{index}]", later=stages[index + 1:],
                                      out=out, config=config, baseline=baseline, command=command,
                                      should_stop=should_stop)
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
    built = build_stages({"stages": fill_stages(later, Allocation.from_dict(record))}, load_teacher=load_teacher)
    return {key: value for key, value in record.items() if key not in ("config", "format")}, built


def measure_and_allocate(spec: AllocateStage, probe: Probe, *, where: str, later: Sequence[Mapping[str, Any]],
                         out: Path, config: Mapping[str, Any], baseline: str, command: str,
                         progress: Callable[[str], None] = log.info,
                         should_stop: Callable[[], bool] = lambda: False) -> dict[str, Any] | None:
    """The allocate stage's work on ``probe`` (the model trained so far, on the run's validation split): measure,
    allocate, check, and write into ``out`` sensitivity.json / .md / .png, the stages ``later`` with the allocation
    as a compress config (``conf/compress/<name>_allocated.yaml``, as the command writes one) and, last,
    allocation.json: the record returned, which :func:`train.search.formats.read_allocation` reads back.
    ``baseline`` is where the measured model is saved (for ``python -m train.search.allocate RUN`` sweeps).

    After each layer the measurement so far is kept in ``out`` (:data:`PARTIAL_SENSITIVITY_JSON`), and it resumes
    from there; returns None when ``should_stop()`` asks for a stop between two layers."""
    start = time.perf_counter()
    partial = out / PARTIAL_SENSITIVITY_JSON
    out.mkdir(parents=True, exist_ok=True)

    def keep(measured: dict[str, Any]) -> bool:
        write_json(partial, measured)
        return should_stop()

    result = measure(probe, layers=spec.measured_layers(probe.model, where), settings=grid(spec.bits, spec.sparsity),
                     progress=progress, partial=read_partial_sensitivity(out), after_layer=keep)
    if result is None:
        log.warning("allocate: stopped between two layers; the layers measured so far are kept in %s", partial)
        return None
    result["run"] = baseline
    result["path"] = str(write_sensitivity(result, out)["json"])
    allocation = allocate(result, loss_budget=spec.budget, target_metric=spec.target_metric)
    if allocation is None:
        raise ConfigError(f"{where}: no setting of the grid meets target_metric={spec.target_metric:g} (the trained "
                          f"model has validation {result['metric']} {result['reference']['metric']:.4f}, calibrated)",
                          f"re-run with init={baseline} and a lower {where}.target_metric, or a budget: the trained "
                          "model is kept")
    check(allocation, probe)
    name = f"{config['compress']['name']}_allocated"
    path = out / "conf" / "compress" / f"{name}.yaml"
    write_config({"name": name, "stages": fill_stages(later, allocation)}, allocation, result, path,
                 f"the stages of compress={config['compress']['name']} after its allocate stage", command)
    record = {"format": ALLOCATION_FORMAT, "stage": where, "split": "val", "val_split": probe.val_split,
              "validation_examples": result["validation"]["examples"], **allocation.to_dict(),
              # relative to the run dir, which may move
              "sensitivity": str(Path(result["path"]).relative_to(out.parent)),
              "compress_config": str(path.relative_to(out.parent)),
              "seconds": round(time.perf_counter() - start, 1), "config": dict(config)}
    write_json(out / ALLOCATION_JSON, record)
    partial.unlink(missing_ok=True)
    return record


def allocation_summary(record: Mapping[str, Any]) -> str:
    """One line for the console: where the per-layer settings come from, and what they are."""
    allocation = Allocation.from_dict(record)
    return (f"per-layer settings allocated on the validation split ({record['validation_examples']} examples, "
            f"{allocation.constraint}; predicted score {allocation.score:.6f}): {settings_text(allocation.settings)}")
