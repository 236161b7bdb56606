"""Measuring: what each layer alone costs in validation loss and saves in score, and what an allocation counts.

For every prunable or quantizable layer (compress's weight layers, :func:`compress.base.weight_layers`: every
Conv, Linear and Embedding, so the matrices of an LSTM, the linears of a Transformer, embedding tables and
adaptive-softmax clusters are layers like any other) and every (bits, sparsity) of a grid, a copy of the trained
model gets that setting on that one layer, through the techniques the compress stages train with:

* sparsity s: one-shot magnitude pruning of the layer to s (:class:`compress.PruneTechnique` at its target);
* bits b: fake quantization of the layer's weight and input at b bits (:class:`compress.QuantizeTechnique`,
  LSQ) in the state a QAT stage starts from: weight step sizes by least squared error on the (pruned) weights,
  the input's by least squared error on the first calibration batch; ``float`` leaves the layer unquantized;

each quantized with the keys of the QAT stage that will train it that are not per layer (:data:`STAGE_KEYS`:
step-size granularity and width, bias width, method, and the model-wide other ops and attention operands), so that
its cost is counted as the stage will store it; followed by a short calibration (:func:`compress.calibrate`): a
forward pass over the first training batches
(``--calibration-batches``, 2) that initialises the input quantizer and re-estimates every batch norm's
statistics, as any training after the change does first (without it, one-shot pruning mostly measures the
batch-norm statistics it invalidates). Nothing is trained, so a measurement is deterministic, and the
reference (the trained model, calibrated the same way) has an increase of exactly 0.

Each copy is then

1. evaluated exactly by the task on the **validation** split (:meth:`data.tasks.Task.evaluate`, loss and the
   gate's metric), never on the test split;
2. counted by the scorer on inputs from the validation split. The layer's cost is read from the scorer's
   per-layer table (``Count.layers``): the rows of the layer and of its submodules (quantizers,
   parametrizations), plus any other row that differs from the reference count (listed as ``changed_rows``: e.g.
   the batch norm folded into a conv pruned so far that whole output channels are empty, which the scorer then
   counts as constants). The remaining rows (activations, pools, folded batch norms) are the ``rest``,
   so that ``rest + Σ_layers cost(layer's setting)`` is the model's total for any one-layer change, and
   (assumed by the allocation, train/search/solve.py; :func:`check` counts it) for any combination.

An allocate stage first fixes the probe's model (:meth:`Probe.fix`): the layers it does not allocate get the
settings of the stages after it, and what those set model-wide, so that they are in the reference and the ``rest``.

Every cost is counted with the freebie off, and the unquantized settings' also with it on (``freebie_on``):
an allocation that quantizes nothing gets the freebie, any other does not.

:func:`measure` returns the content of sensitivity.json (train/search/formats.py). Imports compress, data,
scoring, train's build, config, distributed and objectives, and the search's grid, formats and solve.
"""
from __future__ import annotations

import copy
import itertools
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from omegaconf import OmegaConf

from compress import PruneTechnique, QuantizeTechnique, Stage, attach_final, calibrate, compression_state
from compress.base import weight_layers
from data import Loaders
from data.tasks import Evaluation, Task
from scoring import Count, count_inputs
from scoring.challenge import HIGHER_IS_BETTER
from scoring.rules import score_terms
from train.build import data_options, restore_model, task_of
from train.config import ConfigError
from train.distributed import Context, resolve_device
from train.objectives import OBJECTIVES
from train.search.formats import SENSITIVITY_FORMAT
from train.search.grid import DEFAULT_BITS, DEFAULT_SPARSITY, FREEBIE_OFF, FREEBIE_ON, REFERENCE, \
    Setting, grid, layer_pattern
from train.search.solve import Allocation

log = logging.getLogger("micronet.sensitivity")

#: The keys of a QAT stage's ``quantize:`` that are not per layer (neither which layers nor their bits, nor the
#: schedule): a measured setting is quantized with them, so that its cost is counted as the stage will train it
#: (:attr:`Probe.quantize`). ``other_ops`` and ``attention_bits`` act model-wide: every quantize attach sets them.
STAGE_KEYS = ("method", "averaging_constant", "scale", "scale_bits", "bias_bits", "attention_bits", "other_ops")


def apply_setting(model: nn.Module, layer: str, setting: Setting, quantize: Mapping[str, Any] | None = None) -> None:
    """Prune ``layer`` of ``model`` to ``setting.sparsity`` by magnitude and give its weight and input quantizers
    of ``setting.bits``, as the compress stages do (the input quantizers still need :func:`calibrate`), with the
    ``quantize:`` keys ``quantize`` that are not per layer (:data:`STAGE_KEYS`; default the technique's)."""
    pattern = [layer_pattern(layer)]
    if setting.sparsity:
        # start = end = step 0: the cubic schedule's final target, imposed at once.
        prune = PruneTechnique({"final_sparsity": setting.sparsity, "layers": pattern, "first_last_sparsity": None,
                                "unit": "step", "start": 0, "end": 0, "frequency": 1},
                               stage_epochs=1, where=f"sensitivity[{layer}].prune")
        prune.configure(steps_per_epoch=1)
        prune.attach(model)
        prune.on_step_end(model, 0)
    if setting.bits is not None:
        technique = QuantizeTechnique({**(quantize or {}), "weight_bits": setting.bits, "activation_bits": setting.bits,
                                       "first_last_bits": None, "layers": pattern},
                                      stage_epochs=1, where=f"sensitivity[{layer}].quantize")
        technique.attach(model)


def owned(name: str, layer: str) -> bool:
    """Whether the per-layer table's row ``name`` belongs to ``layer`` (the layer or one of its submodules)."""
    return name == layer or name.startswith(layer + ".")


def _rows(count: Count) -> dict[str, tuple[int, float]]:
    return {row["name"]: (row["param_bits"], row["ops"]) for row in count.layers}


def cost_entry(task: str, param_bits: int, ops: float) -> dict[str, float]:
    """Stored bits and ops (32-bit equivalents per example) with their score terms on ``task``."""
    params_term, ops_term = score_terms(task, Fraction(param_bits, 32), ops)
    return {"param_bits": param_bits, "params": param_bits / 32, "ops": ops, "params_term": float(params_term),
            "ops_term": float(ops_term), "score": float(params_term + ops_term)}


def layer_cost(count: Count, layer: str, reference: Count, task: str) -> tuple[dict[str, float], list[str]]:
    """``layer``'s cost in ``count`` (the model with only that layer changed from ``reference``, same freebie):
    its own rows plus the change of any other row, and the names of those other rows."""
    rows, before = _rows(count), _rows(reference)
    param_bits = sum(bits for name, (bits, _) in rows.items() if owned(name, layer))
    ops = sum(value for name, (_, value) in rows.items() if owned(name, layer))
    changed = sorted(name for name in rows.keys() | before.keys()
                     if not owned(name, layer) and rows.get(name) != before.get(name))
    for name in changed:
        param_bits += rows.get(name, (0, 0.0))[0] - before.get(name, (0, 0.0))[0]
        ops += rows.get(name, (0, 0.0))[1] - before.get(name, (0, 0.0))[1]
    return cost_entry(task, param_bits, ops), changed


class Probe:
    """A trained model with what measuring it needs: its task, the validation loader, calibration batches from the
    training split, the scorer's inputs (from the validation split) and the run's count settings."""

    def __init__(self, model: nn.Module, config: Mapping[str, Any], task: Task, loaders: Loaders, *,
                 device: torch.device, calibration_batches: int, score_examples: int, val_split: float | int,
                 trained_on_validation: bool = False, quantize: Mapping[str, Any] | None = None) -> None:
        self.model, self.config, self.task, self.device = model.to(device).eval(), config, task, device
        #: The :data:`STAGE_KEYS` every measured setting is quantized with (the later QAT stage's; default none).
        self.quantize = dict(quantize or {})
        #: The validation hold-out (``data.val_split``), and whether the model was trained on it (a run trained
        #: without one, measured on a hold-out chosen afterwards).
        self.val_split, self.trained_on_validation = val_split, trained_on_validation
        self.val = loaders.val
        self.predict = OBJECTIVES[task.kind].predict
        if hasattr(loaders.train, "set_epoch"):
            loaders.train.set_epoch(0)
        #: The first training batches of epoch 0 (inputs only), kept for every calibration.
        self.calibration = [inputs.to(device) for inputs, _ in itertools.islice(loaders.train, calibration_batches)]
        self.score_inputs = task.score_inputs(loaders.val, score_examples, device, self.model)
        score = config.get("score", {})
        self.accumulator_bits = score.get("accumulator_bits", 32)
        #: The count modes the run allows: ``score.freebie=false`` never claims the freebie.
        self.freebie_modes = (FREEBIE_OFF,) if score.get("freebie") is False else (FREEBIE_OFF, FREEBIE_ON)

    @classmethod
    def from_run(cls, run: str | Path, *, val_split: float | int | None = None, device: str = "auto",
                 calibration_batches: int = 2, score_examples: int | None = None) -> Probe:
        """The probe of a run dir / entry / checkpoint (``train.build.restore_model``), on the run's validation split
        (its ``data.val_split`` hold-out, or the task's own, e.g. a corpus's valid file). ``val_split`` holds one out
        of the training data for a run trained without any (never the test split). ``score_examples`` defaults to
        the run's ``score.examples``."""
        model, config = restore_model(run)
        run_split = (config.get("data") or {}).get("val_split") or 0
        if run_split and val_split is not None and val_split != run_split:
            raise ConfigError(f"{run} was trained with data.val_split={run_split}: its validation split is fixed",
                              "drop --val-split (the run's hold-out is used)")
        structure = compression_state(model)
        if structure["weights"] or structure["inputs"]:
            raise ConfigError(f"{run} is already compressed (masks or quantizers on "
                              f"{', '.join(sorted({*structure['weights'], *structure['inputs']})[:4])})",
                              "measure the uncompressed baseline run (compress=none) it started from")
        cfg = OmegaConf.create(dict(config))
        context = Context(resolve_device(device))
        split = run_split or val_split or 0
        task = task_of(cfg)
        try:
            loaders = task.loaders(replace(data_options(cfg, context), val_split=split), batch_size=cfg.train.batch_size,
                                   eval_batch_size=cfg.train.eval_batch_size, seed=cfg.seed, device=context.device)
        except ValueError as err:  # e.g. a hold-out asked of a task with a validation split of its own
            raise ConfigError(str(err), "drop --val-split, or choose one the task accepts") from None
        if loaders.val is None:
            raise ConfigError(f"{run} has no validation split (it was trained with data.val_split=0), and the test "
                              "split must not be used to choose settings",
                              "retrain with data.val_split=0.2, or pass --val-split 0.2 to hold out part of its "
                              "training data for the measurement")
        return cls(model, config, task, loaders, device=context.device,
                   calibration_batches=calibration_batches, score_examples=score_examples or cfg.score.examples,
                   val_split=split, trained_on_validation=bool(split and not run_split))

    def prepared(self, settings: Mapping[str, Setting]) -> nn.Module:
        """A copy of the model with ``settings`` applied per layer, quantizers calibrated."""
        model = copy.deepcopy(self.model)
        for layer, setting in settings.items():
            apply_setting(model, layer, setting, self.quantize)
        calibrate(model, self.calibration, self.predict)
        return model

    def final(self, stages: Sequence[Stage], steps_per_epoch: int) -> nn.Module:
        """A copy of the model carrying the techniques of ``stages`` at their end-of-schedule targets
        (:func:`compress.attach_final`, as a plan attaches them), its input quantizers calibrated; its batch norms
        keep the statistics they have (nothing is counted differently for them)."""
        model = copy.deepcopy(self.model)
        attach_final(model, stages, steps_per_epoch=steps_per_epoch)
        calibrate(model, self.calibration, self.predict, batch_norms=False)
        return model

    def fix(self, stages: Sequence[Stage], steps_per_epoch: int) -> None:
        """Measure from now on the model with ``stages`` attached (:meth:`final`): the layers an allocation leaves
        to the stages, at their settings, and what the stages set model-wide (``other_ops``, attention operands)
        are then in the reference, counted in ``rest``. Once anything is quantized below 16 bits the freebie
        cannot be had, and only the freebie-off costs are counted."""
        self.model = self.final(stages, steps_per_epoch)
        if not self.count(self.model, freebie=None).freebie:
            self.freebie_modes = (FREEBIE_OFF,)

    def evaluate(self, model: nn.Module) -> Evaluation:
        """The task's exact evaluation of ``model`` on the validation split."""
        return self.task.evaluate(model, self.val, self.device, "val")

    def metric(self, evaluation: Evaluation) -> float:
        """The gate's metric of an evaluation (top-1, or perplexity)."""
        return evaluation.to_dict()[self.task.metric]

    def count(self, model: nn.Module, freebie: bool | None) -> Count:
        """The scorer's count of ``model`` on the validation inputs, as the run counts (accumulator width); with
        the freebie, without, or (None) with it unless a tensor is quantized below 16 bits."""
        return count_inputs(model.eval(), self.score_inputs, accumulator_bits=self.accumulator_bits, freebie=freebie)


def measure(probe: Probe, *, layers: Sequence[str] | None = None, settings: Sequence[Setting] | None = None,
            progress: Callable[[str], None] = log.info, partial: Mapping[str, Any] | None = None,
            after_layer: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any] | None:
    """Measure every layer of ``layers`` (default: all weight layers) at every setting of ``settings`` (default: the
    default grid); returns the content of sensitivity.json (see the module docstring).

    ``partial``: what an interrupted measurement had (sensitivity.json's content, with the layers measured so far);
    its layers are kept when everything else of it is this measurement's (the reference's evaluation included: the
    same trained model). ``after_layer(result so far)`` is called after each layer measured; when it returns True
    before the last one, the measurement stops there and returns None."""
    all_layers = weight_layers(probe.model)
    layers = list(all_layers) if layers is None else list(layers)
    settings = grid(DEFAULT_BITS, DEFAULT_SPARSITY) if settings is None else list(settings)
    if REFERENCE not in settings:
        settings = [REFERENCE, *settings]
    result, ref_counts = _reference(probe, layers, settings)
    before = _measured_before(result, partial)
    for layer in layers:
        if layer in before:
            result["layers"].append(before[layer])
            continue
        start = time.perf_counter()
        module = all_layers[layer]
        result["layers"].append({"name": layer, "type": type(module).__name__, "weights": module.weight.numel(),
                                 "settings": _measure_layer(probe, layer, settings, result["reference"], ref_counts)})
        progress(f"{layer}: {len(settings)} settings in {time.perf_counter() - start:.1f} s")
        if after_layer is not None and after_layer(result) and len(result["layers"]) < len(layers):
            return None
    return result


def _measured_before(result: Mapping[str, Any], partial: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """The layers of ``partial`` by name, when it is the measurement ``result`` (no layer yet) was begun anew;
    else none. Compared as JSON, which is how a partial measurement is kept."""
    if not partial:
        return {}
    head = json.loads(json.dumps({key: value for key, value in result.items() if key != "layers"}))
    if head != {key: value for key, value in partial.items() if key != "layers"}:
        return {}
    return {entry["name"]: entry for entry in partial.get("layers") or []}


def _reference(probe: Probe, layers: Sequence[str], settings: Sequence[Setting]
               ) -> tuple[dict[str, Any], dict[str, Count]]:
    """sensitivity.json with no layer yet (the model, the grid, the reference's evaluation and the ``rest`` of every
    count mode), and the reference's count in every mode."""
    task_name = probe.task.name
    trained = probe.evaluate(probe.model)
    reference = probe.evaluate(probe.prepared({}))  # calibrated as every setting is: its own increase is 0
    ref_counts = {mode: probe.count(probe.model, freebie=mode == FREEBIE_ON) for mode in probe.freebie_modes}
    rest = {}
    for mode, count in ref_counts.items():
        rows = _rows(count)
        mine = [name for name in rows if any(owned(name, layer) for layer in layers)]
        rest[mode] = cost_entry(task_name, count.param_bits - sum(rows[n][0] for n in mine),
                                count.ops - sum(rows[n][1] for n in mine))
    result: dict[str, Any] = {
        "format": SENSITIVITY_FORMAT, "task": task_name, "model": probe.config["model"]["name"],
        "metric": probe.task.metric, "higher_is_better": HIGHER_IS_BETTER[probe.task.metric],
        "validation": {"split": "val", "val_split": probe.val_split, "examples": reference.total,
                       "trained_on": probe.trained_on_validation},
        "calibration_batches": len(probe.calibration),
        "calibration_examples": sum(len(batch) for batch in probe.calibration), "score_examples": ref_counts[FREEBIE_OFF].examples,
        "grid": {"bits": sorted({s.bits for s in settings}, key=lambda b: -99 if b is None else -b),  # float first
                 "sparsity": sorted({s.sparsity for s in settings})},
        "trained": trained.to_dict(),
        "reference": {"evaluation": reference.to_dict(), "loss": reference.loss, "metric": probe.metric(reference),
                      "rest": rest, "total": {mode: cost_entry(task_name, c.param_bits, c.ops)
                                              for mode, c in ref_counts.items()}},
        "layers": [],
    }
    return result, ref_counts


def _measure_layer(probe: Probe, layer: str, settings: Sequence[Setting], reference: Mapping[str, Any],
                   ref_counts: Mapping[str, Count]) -> list[dict[str, Any]]:
    """``layer`` at every setting, the others as trained: sensitivity.json's entries of the layer (``reference``: the
    reference's entry of sensitivity.json, ``ref_counts`` its counts)."""
    entries = []
    for setting in settings:
        # Each copy from the probe's model: copies of a copy share its parametrized layers' classes (torch's
        # parametrize), and a bias quantizer registered on one would break the others.
        model = probe.prepared({layer: setting})
        evaluation = probe.evaluate(model)
        modes = (FREEBIE_OFF,) if setting.quantized else probe.freebie_modes
        costs, changed, row = {}, set(), None
        for mode in modes:
            count = probe.count(model, freebie=mode == FREEBIE_ON)
            costs[mode], other = layer_cost(count, layer, ref_counts[mode], probe.task.name)
            changed.update(other)
            row = row or next(r for r in count.layers if r["name"] == layer)
        metric = probe.metric(evaluation)
        entries.append({
            "bits": setting.bits, "sparsity": setting.sparsity, "loss": evaluation.loss,
            "loss_increase": evaluation.loss - reference["loss"], "metric": metric,
            "metric_change": metric - reference["metric"], "evaluation": evaluation.to_dict(),
            "measured_sparsity": row["sparsity"], "weight_bits": row["weight_bits"],
            "input_bits": row["input_bits"], "cost": costs, "changed_rows": sorted(changed)})
    return entries


def check(allocation: Allocation, probe: Probe) -> None:
    """Count (and evaluate one-shot on the validation split) the probe's model with every chosen setting applied;
    stored in ``allocation.counted``. The counted score equals the predicted one when the costs add up."""
    model = probe.prepared(allocation.settings)
    count = probe.count(model, freebie=allocation.freebie)
    evaluation = probe.evaluate(model)
    allocation.counted = {"score": count.score(probe.task.name), "params": count.params, "ops": count.ops,
                          "freebie": count.freebie, "loss": evaluation.loss, "metric": probe.metric(evaluation)}
