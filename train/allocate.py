"""``python -m train.allocate SENSITIVITY --budget B``: one (bits, sparsity) per layer, chosen exactly, written as a
compress config.

From a sensitivity measurement (``python -m train.sensitivity``, its sensitivity.json) the allocation picks for every
measured layer one setting of the grid that minimises the predicted score

    score = rest + Σ_layers cost(layer, setting)      (params/baseline_params + ops/baseline_ops, from the scorer's
                                                       per-layer table: see train/sensitivity.py)

subject to a budget on the predicted increase of the validation loss, ``Σ_layers max(0, loss_increase)``
(``--budget``, nats per example), or to a target validation metric (``--target-metric``: top-1 predicted as the
reference minus the sum of the per-layer drops; perplexity as exp(reference loss + the sum of the loss increases)).

**Additivity assumption.** Each layer's loss increase was measured with that layer alone changed; their sum is
taken as the increase of the combination (interactions between layers are ignored, and a measured improvement
counts as no change). The score side is additive exactly, as long as the freebie is settled: it is lost for the
whole model once any tensor is quantized below 16 bits, so the problem is solved twice, with every setting
costed freebie off, and with only the unquantized settings costed freebie on; the better of the two wins. The
allocation is then checked: the model with every chosen setting is counted (and evaluated one-shot on the
validation split) and the counted score is printed next to the predicted one.

**Exact solver.** A multiple-choice knapsack, solved as an integer program with ``scipy.optimize.milp`` (HiGHS,
relative gap 0): binary x[l, s], one setting per layer (Σ_s x[l, s] = 1), Σ penalty·x ≤ budget, minimise Σ cost·x.

The result is a compress config: the stages of a template (``--template``, default ``prune_q4``: gradual pruning,
then QAT; ``distill_prune_q8`` for both distilled) with the chosen sparsity of every pruned layer as its
``layer_sparsity`` and the chosen bits of every quantized layer as its ``layer_bits`` (weights and inputs). It is
written to ``CONFIG_DIR/compress/NAME.yaml`` and the command that trains it from the measured run is printed.
Several budgets give several configs: the front of score against validation metric.

**As a stage.** A compress config may do both steps inside the run: a stage with ``allocate:`` (documented at
:class:`AllocateStage`; ``conf/compress/auto.yaml``) measures the model trained so far with the same
:func:`train.sensitivity.measure`, solves the same :func:`allocate`, and gives the stages after it (the template) the
chosen per-layer settings (:func:`fill_stages`). Its outputs go to ``RUN/sensitivity/`` as the two commands write
them, with ``allocation.json`` last (:func:`run_allocate_stage`): a run restarted after it reads the allocation
back (:func:`read_allocation`) instead of measuring again.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import re
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn as nn
from omegaconf import OmegaConf

from conf import CONF_DIR
from compress import compression_state
from compress.base import Settings, select_layers
from scoring.entry import atomic_write
from scoring.challenge import PERPLEXITY, TOP1
from train.config import ConfigError, check_same_run
from train.sensitivity import DEFAULT_BITS, DEFAULT_SPARSITY, FREEBIE_OFF, FREEBIE_ON, Probe, Setting, grid, \
    grid_bits, grid_sparsity, layer_pattern, measure, read_sensitivity, write_outputs

#: What an allocate stage writes last into ``RUN/sensitivity/``: its presence means the stage has finished.
ALLOCATION_JSON = "allocation.json"
#: Version of allocation.json.
ALLOCATION_FORMAT = 1

#: A loss budget larger than any loss increase (nats per example): every layer takes its cheapest setting. Finite,
#: since the run's config is stored as strict JSON in its entry.
UNLIMITED = 1e9

log = logging.getLogger("micronet.allocate")


def solve(costs: Sequence[Sequence[float]], penalties: Sequence[Sequence[float]], budget: float) -> list[int] | None:
    """The multiple-choice knapsack: for each group g one option k minimising Σ costs[g][k] subject to
    Σ penalties[g][k] ≤ budget. Returns the chosen option of each group, or None when no choice fits."""
    # Imported here: train/run.py imports this module for every run, and only an allocate stage solves.
    from scipy.optimize import Bounds, LinearConstraint, milp
    sizes = [len(group) for group in costs]
    if any(size == 0 for size in sizes):
        return None
    n = sum(sizes)
    one_each = np.zeros((len(sizes), n))
    start = 0
    for g, size in enumerate(sizes):
        one_each[g, start:start + size] = 1
        start += size
    penalty = np.concatenate([np.asarray(p, dtype=float) for p in penalties])[None, :]
    result = milp(np.concatenate([np.asarray(c, dtype=float) for c in costs]), integrality=np.ones(n),
                  bounds=Bounds(0, 1), constraints=[LinearConstraint(one_each, 1, 1),
                                                    LinearConstraint(penalty, -np.inf, budget)],
                  options={"mip_rel_gap": 0.0})
    if result.x is None:  # infeasible (status 2); milp raises nothing
        return None
    choice, start = [], 0
    for size in sizes:
        choice.append(int(np.argmax(result.x[start:start + size])))
        start += size
    return choice


@dataclass
class Allocation:
    """The chosen setting of every layer, and what the sensitivity predicts for it."""

    settings: dict[str, Setting]
    freebie: bool
    #: Predicted score and its parts (rest + the chosen settings' costs).
    score: float
    params: float
    ops: float
    #: Predicted validation-loss increase (sum of the layers' clamped increases) and validation metric.
    loss_increase: float
    metric: float
    constraint: str
    #: Filled by :func:`check`: the counted score and the one-shot validation result of the combination.
    counted: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON: ``layers`` ({layer: {bits, sparsity}}), freebie, constraint, ``predicted`` and ``counted``."""
        return {"layers": {layer: dataclasses.asdict(s) for layer, s in self.settings.items()}, "freebie": self.freebie,
                "constraint": self.constraint, "predicted": {key: getattr(self, key) for key in _PREDICTED},
                "counted": self.counted}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Allocation:
        """The inverse of :meth:`to_dict` (other keys of ``data`` are ignored)."""
        return cls(settings={layer: Setting(**s) for layer, s in data["layers"].items()}, freebie=data["freebie"],
                   constraint=data["constraint"], counted=dict(data["counted"]), **data["predicted"])


#: The predictions of an :class:`Allocation`, as :meth:`Allocation.to_dict` groups them.
_PREDICTED = ("score", "params", "ops", "loss_increase", "metric")


def _penalties(sensitivity: Mapping[str, Any], loss_budget: float | None,
               target_metric: float | None) -> tuple[str, float, list[list[float]]]:
    """(description, budget, penalty of every layer's settings) of the constraint."""
    ref = sensitivity["reference"]
    layers = sensitivity["layers"]
    if (loss_budget is None) == (target_metric is None):
        raise ValueError("give exactly one of a loss budget and a target metric")
    if loss_budget is not None or sensitivity["metric"] == PERPLEXITY:
        if loss_budget is None:  # perplexity = exp(mean loss): a target is a loss budget
            loss_budget = math.log(target_metric) - ref["loss"]
            description = f"validation perplexity <= {target_metric:g}"
        else:
            description = f"validation loss increase <= {loss_budget:g}"
        penalties = [[max(0.0, s["loss_increase"]) for s in layer["settings"]] for layer in layers]
        return description, loss_budget, penalties
    if not sensitivity["higher_is_better"]:
        raise ValueError(f"a target for metric {sensitivity['metric']!r} is not supported; use --budget")
    penalties = [[max(0.0, -s["metric_change"]) for s in layer["settings"]] for layer in layers]
    return f"validation {sensitivity['metric']} >= {target_metric:g}", ref["metric"] - target_metric, penalties


def allocate(sensitivity: Mapping[str, Any], *, loss_budget: float | None = None,
             target_metric: float | None = None) -> Allocation | None:
    """The exact optimum for one budget (see the module docstring); None when no choice meets it."""
    description, budget, penalties = _penalties(sensitivity, loss_budget, target_metric)
    layers, ref = sensitivity["layers"], sensitivity["reference"]
    best: tuple[float, bool, list[int]] | None = None
    for mode in ref["rest"]:
        # Freebie on: only the unquantized settings (their cost counted with the freebie) are allowed.
        allowed = [[k for k, s in enumerate(layer["settings"]) if mode in s["cost"]] for layer in layers]
        choice = solve([[layer["settings"][k]["cost"][mode]["score"] for k in ks] for layer, ks in zip(layers, allowed)],
                       [[p[k] for k in ks] for p, ks in zip(penalties, allowed)], budget)
        if choice is None:
            continue
        picked = [ks[c] for ks, c in zip(allowed, choice)]
        total = ref["rest"][mode]["score"] + sum(layer["settings"][k]["cost"][mode]["score"]
                                                 for layer, k in zip(layers, picked))
        if best is None or total < best[0]:
            best = (total, mode == FREEBIE_ON, picked)
    if best is None:
        return None
    total, freebie, picked = best
    mode = FREEBIE_ON if freebie else FREEBIE_OFF
    chosen = [layer["settings"][k] for layer, k in zip(layers, picked)]
    loss = sum(max(0.0, s["loss_increase"]) for s in chosen)
    if sensitivity["metric"] == PERPLEXITY:
        metric = math.exp(ref["loss"] + loss)
    else:
        metric = ref["metric"] + sum(min(0.0, s["metric_change"]) for s in chosen)
    return Allocation(
        settings={layer["name"]: Setting(s["bits"], s["sparsity"]) for layer, s in zip(layers, chosen)},
        freebie=freebie, score=total,
        params=ref["rest"][mode]["params"] + sum(s["cost"][mode]["params"] for s in chosen),
        ops=ref["rest"][mode]["ops"] + sum(s["cost"][mode]["ops"] for s in chosen),
        loss_increase=loss, metric=metric, constraint=description)


def check(allocation: Allocation, probe: Probe) -> None:
    """Count (and evaluate one-shot on the validation split) the probe's model with every chosen setting applied;
    stored in ``allocation.counted``. The counted score equals the predicted one when the costs add up."""
    model = probe.prepared(allocation.settings)
    count = probe.count(model, freebie=allocation.freebie)
    evaluation = probe.evaluate(model)
    allocation.counted = {"score": count.score(probe.task.name), "params": count.params, "ops": count.ops,
                          "freebie": count.freebie, "loss": evaluation.loss, "metric": probe.metric(evaluation)}


# --- the compress config -----------------------------------------------------------------------------
def load_template(template: str) -> dict[str, Any]:
    """A compress config by name (conf/compress/NAME.yaml) or path, interpolations kept (``${train.epochs}``)."""
    path = Path(template) if template.endswith((".yaml", ".yml")) else CONF_DIR / "compress" / f"{template}.yaml"
    if not path.is_file():
        raise ConfigError(f"template {template!r}: no file {path}",
                          f"name a config of {CONF_DIR / 'compress'} (e.g. prune_q4, distill_prune_q8) or a yaml path")
    config = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    try:
        check_template(config.get("stages") if isinstance(config, dict) else None, f"template {path}")
    except ValueError as err:
        raise ConfigError(str(err), "use prune_q4, prune_q8 or distill_prune_q8, or a config of the same shape "
                                    "with unstructured pruning") from None
    return config


def check_template(stages: Any, where: str) -> None:
    """ValueError unless ``stages`` (a list of stage mappings) has a stage with ``prune:`` (unstructured: what the
    sensitivity measures) and a stage with ``quantize:``: the stages that train an allocation."""
    if not isinstance(stages, list) or not any("prune" in s for s in stages) or not any("quantize" in s for s in stages):
        raise ValueError(f"{where} needs a stage with prune: and a stage with quantize:")
    structure = (next(s for s in stages if "prune" in s)["prune"] or {}).get("structure", "unstructured")
    if structure != "unstructured":
        raise ValueError(f"{where} prunes with structure={structure}; the sensitivity measured unstructured "
                         "magnitude pruning")


def fill_stages(stages: Sequence[Mapping[str, Any]], allocation: Allocation) -> list[dict[str, Any]]:
    """A copy of ``stages`` in which the first ``prune:`` and the first ``quantize:`` carry the allocation as per-layer
    overrides (the template's schedule keys kept), or are removed where the allocation has nothing for them."""
    stages = copy.deepcopy([dict(stage) for stage in stages])
    pruned = {layer_pattern(layer): s.sparsity for layer, s in allocation.settings.items() if s.sparsity}
    quantized = {layer_pattern(layer): s.bits for layer, s in allocation.settings.items() if s.quantized}
    prune_stage = next(s for s in stages if "prune" in s)
    quantize_stage = next(s for s in stages if "quantize" in s)
    if pruned:
        prune = {k: v for k, v in (prune_stage["prune"] or {}).items()
                 if k not in ("final_sparsity", "layers", "exclude", "first_last_sparsity", "layer_sparsity")}
        prune_stage["prune"] = {"final_sparsity": max(pruned.values()), **prune, "layers": list(pruned),
                                "first_last_sparsity": None, "layer_sparsity": pruned}
    else:
        del prune_stage["prune"]
    if quantized:
        quantize = {k: v for k, v in (quantize_stage["quantize"] or {}).items()
                    if k not in ("weight_bits", "activation_bits", "layers", "exclude", "first_last_bits", "layer_bits")}
        quantize_stage["quantize"] = {**quantize, "layers": list(quantized), "first_last_bits": None,
                                      "layer_bits": quantized}
    else:
        del quantize_stage["quantize"]
    return stages


def compress_config(allocation: Allocation, template: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The template's stages with the allocation as per-layer overrides (stages left without a technique dropped)."""
    config = {"name": name, "stages": fill_stages(template["stages"], allocation)}
    config["stages"] = [s for s in config["stages"] if any(k in s for k in ("prune", "quantize", "distill"))]
    quantize_stage = next((s for s in config["stages"] if "quantize" in s), None)
    teachers = {s["distill"].get("teacher") for s in config["stages"] if isinstance(s.get("distill"), Mapping)}
    if quantize_stage is not None and re.fullmatch(r"q\d+", quantize_stage["name"]) \
            and quantize_stage["name"] not in teachers and "qat" not in {s["name"] for s in config["stages"]}:
        quantize_stage["name"] = "qat"  # the template's q8 / q4 would misname mixed widths
    return config


def settings_text(settings: Mapping[str, Setting]) -> str:
    """``conv1.0 8-bit dense, conv2.0 4-bit 95%, …``"""
    return ", ".join(f"{layer} {'float' if s.bits is None else f'{s.bits}-bit'} "
                     f"{'dense' if not s.sparsity else f'{s.sparsity:.0%}'}" for layer, s in settings.items())


def write_config(config: Mapping[str, Any], allocation: Allocation, sensitivity: Mapping[str, Any],
                 path: Path, template: str, command: str) -> None:
    """The YAML file, headed by comments saying where it comes from and what it predicts."""
    counted = allocation.counted
    header = [
        f"# Written by `{command}`",
        f"# from {sensitivity.get('path', 'a sensitivity measurement')}",
        f"# (run {sensitivity.get('run', '?')}, {sensitivity['validation']['examples']} validation examples), "
        f"template {template}.",
        f"# Constraint: {allocation.constraint} (per-layer increases added: see train/allocate.py).",
        f"# Predicted: score {allocation.score:.6f} (freebie {'on' if allocation.freebie else 'off'}), validation "
        f"loss +{allocation.loss_increase:.4f}, {sensitivity['metric']} {allocation.metric:.4f}.",
    ]
    if counted:
        header.append(f"# Counted with every setting applied: score {counted['score']:.6f}; one-shot validation "
                      f"loss {counted['loss']:.4f}, {sensitivity['metric']} {counted['metric']:.4f} (before training).")
    header.append(f"# Layers: {settings_text(allocation.settings)}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(header) + "\n" + OmegaConf.to_yaml(OmegaConf.create(dict(config)))
    atomic_write(path, lambda tmp: tmp.write_text(text))


def train_command(sensitivity: Mapping[str, Any], config_dir: Path, names: Sequence[str]) -> str:
    """The train/run.py command that trains the written configs from the measured run (a multirun for several)."""
    parts = ["python train/run.py"] + (["-m"] if len(names) > 1 else [])
    run = sensitivity.get("run")
    if run:
        parts.append(f"init={run}")
    if sensitivity["validation"]["val_split"] and not sensitivity["validation"]["trained_on"]:
        parts.append(f"data.val_split={sensitivity['validation']['val_split']}")
    if config_dir.resolve() != CONF_DIR:
        parts.append(f"hydra.searchpath=[file://{config_dir.resolve()}]")
    parts.append(f"compress={','.join(names)}")
    return " ".join(parts)


# --- the allocate stage ------------------------------------------------------------------------------
@dataclass(frozen=True)
class AllocateStage:
    """The ``allocate:`` mapping of a compress stage (``conf/compress/auto.yaml``), checked key by key:

        budget               the predicted validation-loss increase allowed (nats per example, >= 0), or
        target_metric        the validation metric to keep (top-1 fraction in (0, 1], or perplexity > 1): exactly one
        bits                 the grid's bit widths (weights and inputs), float = unquantized; default float,8,6,4,3,2
        sparsity             the grid's sparsities in [0, 1); default 0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98
        calibration_batches  training batches of the calibration after each change (train/sensitivity.py); default 2
        layers, exclude      fnmatch patterns of the layers measured and allocated (the others stay as trained);
                             default ["*"] and []

    The stages after it are the template (as ``--template`` of the command): its first ``prune:`` and first
    ``quantize:`` stages train the allocation (:func:`fill_stages`), their other keys (schedule, method) as written."""

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
        """A smoke run's version (train/smoke.py): the grid's first and last bit width and sparsity, one calibration
        batch, and no constraint, so that every layer takes its cheapest setting and every later technique runs."""
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
    specs = {index: AllocateStage.from_stage(stage["allocate"], f"compress.stages[{index}].allocate", metric)
             for index, stage in enumerate(stages) if "allocate" in stage}
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
        spec.measured_layers(model, f"{where}.allocate")
    return specs


def read_allocation(out: Path, config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The record an allocate stage of this run wrote into ``out`` (``RUN/sensitivity``), or None when it has not
    finished. ConfigError when it cannot be read, or was written by a run of another configuration."""
    path = out / ALLOCATION_JSON
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if record.get("format") != ALLOCATION_FORMAT:
            raise ValueError(f"format {record.get('format')!r}, not {ALLOCATION_FORMAT}")
    except (OSError, ValueError, AttributeError) as err:
        raise ConfigError(f"{path} cannot be read ({err})", f"delete {path} and re-run the same command: the allocate "
                                                            "stage measures again") from None
    check_same_run(record["config"], dict(config), path)
    return record


def run_allocate_stage(spec: AllocateStage, probe: Probe, *, where: str, later: Sequence[Mapping[str, Any]],
                       out: Path, config: Mapping[str, Any], baseline: str, command: str,
                       progress: Callable[[str], None] = log.info) -> dict[str, Any]:
    """The allocate stage on ``probe`` (the model trained so far, on the run's validation split): measure
    (:func:`train.sensitivity.measure`), allocate, check, and write into ``out`` sensitivity.json / .md / .png, the
    stages ``later`` with the allocation as a compress config (``conf/compress/<name>_allocated.yaml``, as the
    command writes one) and, last, allocation.json: the record returned, which :func:`read_allocation` reads back.
    ``baseline`` is where the measured model is saved (for ``python -m train.allocate RUN`` sweeps)."""
    start = time.perf_counter()
    result = measure(probe, layers=spec.measured_layers(probe.model, where), settings=grid(spec.bits, spec.sparsity),
                     progress=progress)
    result["run"] = baseline
    result["path"] = str(write_outputs(result, out)["json"])
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
    text = json.dumps(record, indent=1) + "\n"
    atomic_write(out / ALLOCATION_JSON, lambda tmp: tmp.write_text(text))
    return record


def allocation_summary(record: Mapping[str, Any]) -> str:
    """One line for the console: where the per-layer settings come from, and what they are."""
    allocation = Allocation.from_dict(record)
    return (f"per-layer settings allocated on the validation split ({record['validation_examples']} examples, "
            f"{allocation.constraint}; predicted score {allocation.score:.6f}): {settings_text(allocation.settings)}")


# --- command line ------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train.allocate", description=__doc__.split("\n\n")[0])
    parser.add_argument("sensitivity", help="sensitivity.json, or the run dir / folder holding it")
    constraint = parser.add_mutually_exclusive_group(required=True)
    constraint.add_argument("--budget", type=float, nargs="+", metavar="NATS",
                            help="allowed predicted increase of the validation loss (several: one config each)")
    constraint.add_argument("--target-metric", type=float, nargs="+", metavar="VALUE",
                            help="validation metric to keep (top-1 fraction, or perplexity)")
    parser.add_argument("--name", default="auto", help="compress config name (suffixed per budget when several)")
    parser.add_argument("--template", default="prune_q4",
                        help="compress config whose stages train the allocation (name or yaml path; default prune_q4)")
    parser.add_argument("--config-dir", help="folder of config groups to write compress/NAME.yaml into (default: "
                                             "next to sensitivity.json; pass conf to add it to this repository)")
    parser.add_argument("--no-check", action="store_true",
                        help="skip counting and evaluating the allocated model (needs the run's data)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (for the check)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from scoring.entry.boundary import USER_ERRORS
    from scoring.errors import fail

    args = build_parser().parse_args(argv)
    values = args.budget or args.target_metric
    try:
        sensitivity = read_sensitivity(args.sensitivity)
        template = load_template(args.template)
        if not args.name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"--name {args.name!r}", "use letters, digits, '_' or '-'")
        config_dir = Path(args.config_dir) if args.config_dir else Path(sensitivity["path"]).parent / "conf"
        probe = None
        if not args.no_check:
            if not sensitivity.get("run"):
                raise ConfigError(f"{sensitivity['path']} names no run to check the allocation on",
                                  "pass --no-check, or measure with `python -m train.sensitivity RUN_DIR`")
            validation = sensitivity["validation"]
            probe = Probe.from_run(sensitivity["run"], device=args.device,
                                   val_split=validation["val_split"] if validation["trained_on"] else None,
                                   calibration_batches=sensitivity["calibration_batches"],
                                   score_examples=sensitivity["score_examples"])
        metric = sensitivity["metric"]
        lines = ["| config | constraint | predicted score | counted score | predicted val loss | one-shot val loss "
                 f"| predicted val {metric} | one-shot val {metric} | layers |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
        names, ref = [], sensitivity["reference"]
        for value in values:
            name = args.name if len(values) == 1 else f"{args.name}_{value:g}".replace(".", "p")
            try:
                allocation = allocate(sensitivity, **({"loss_budget": value} if args.budget else
                                                      {"target_metric": value}))
            except ValueError as err:
                raise ConfigError(str(err), "pass --budget NATS instead") from None
            if allocation is None:
                print(f"{name}: no setting of the grid meets {'budget' if args.budget else 'target'} {value:g} "
                      "(the reference itself is in the grid: is the target better than the trained model?)")
                continue
            if probe is not None:
                check(allocation, probe)
            path = config_dir / "compress" / f"{name}.yaml"
            write_config(compress_config(allocation, template, name), allocation, sensitivity, path, args.template,
                         " ".join(["python -m train.allocate", *map(shlex.quote, sys.argv[1:] if argv is None else argv)]))
            names.append(name)
            counted = {key: f"{value:.{6 if key == 'score' else 4}f}" for key, value in allocation.counted.items()
                       if key in ("score", "loss", "metric")}
            lines.append(f"| {name} | {allocation.constraint} | {allocation.score:.6f} | {counted.get('score', '–')} | "
                         f"{ref['loss'] + allocation.loss_increase:.4f} | {counted.get('loss', '–')} | "
                         f"{allocation.metric:.4f} | {counted.get('metric', '–')} | {settings_text(allocation.settings)} |")
    except USER_ERRORS as err:
        fail(str(err))
    print("\n".join(lines))
    if names:
        print(f"\nwrote {len(names)} config(s) into {config_dir / 'compress'}; train with:\n"
              f"  {train_command(sensitivity, config_dir, names)}")
    return 0 if names else 1


if __name__ == "__main__":
    sys.exit(main())
