"""``python -m train.sensitivity RUN_DIR``: what each layer alone costs in validation loss and saves in score.

For every prunable or quantizable layer (compress's weight layers, :func:`compress.base.weight_layers`: every
Conv, Linear and Embedding, so the matrices of an LSTM, the linears of a Transformer, embedding tables and
adaptive-softmax clusters are layers like any other) and every (bits, sparsity) of a grid, a copy of the trained
model gets that setting on that one layer, through the techniques the compress stages train with:

* sparsity s: one-shot magnitude pruning of the layer to s (:class:`compress.PruneTechnique` at its target);
* bits b: fake quantization of the layer's weight and input at b bits (:class:`compress.QuantizeTechnique`,
  LSQ) in the state a QAT stage starts from: weight step sizes by least squared error on the (pruned) weights,
  the input's by least squared error on the first calibration batch; ``float`` leaves the layer unquantized;

followed by a short calibration (:func:`calibrate`): a forward pass over the first training batches
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
   (assumed by ``train.allocate``, which checks it by counting) for any combination.

The freebie (16-bit counting) is lost for the whole model once any tensor is quantized below 16 bits, so
every cost is counted with the freebie off, and the unquantized settings also with it on (``freebie_on``):
an allocation that quantizes nothing gets the freebie, any other does not.

Output in ``--out`` (default ``RUN_DIR/sensitivity``): ``sensitivity.json`` (everything above, per layer and
setting; read by ``python -m train.allocate``), ``sensitivity.md`` (a table per layer) and ``sensitivity.png``
(a heat map per layer: the validation-loss increase, annotated with the layer's score contribution).
"""
from __future__ import annotations

import argparse
import copy
import glob
import itertools
import json
import logging
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from omegaconf import OmegaConf

from compress import PruneTechnique, QuantizeTechnique, compression_state
from compress.base import matches, weight_layers
from compress.quantization import ActivationQuantizer
from data import Loaders
from data.tasks import Evaluation, Task
from scoring import Count, count_inputs
from scoring.entry import atomic_write
from scoring.challenge import PERPLEXITY, TOP1
from scoring.rules import score_terms
from train.build import data_options, restore_model, task_of
from train.config import ConfigError
from train.distributed import Context, resolve_device
from train.objectives import OBJECTIVES

log = logging.getLogger("micronet.sensitivity")

#: Version of sensitivity.json.
FORMAT_VERSION = 1
SENSITIVITY_JSON = "sensitivity.json"
#: The folder of a run dir the outputs go to (the command's default ``--out``, and an allocate stage's).
SENSITIVITY_DIR = "sensitivity"
#: Grid defaults: bit widths (None = unquantized, written ``float``) and sparsities.
DEFAULT_BITS: tuple[int | None, ...] = (None, 8, 6, 4, 3, 2)
DEFAULT_SPARSITY: tuple[float, ...] = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
#: Whether a larger value of each gate metric is better.
HIGHER_IS_BETTER: Mapping[str, bool] = {TOP1: True, PERPLEXITY: False}
#: The count modes a cost is given in (keys of each setting's ``cost``).
FREEBIE_OFF, FREEBIE_ON = "freebie_off", "freebie_on"


@dataclass(frozen=True)
class Setting:
    """One layer's compression: weight and input ``bits`` (None: unquantized) and the fraction ``sparsity`` pruned."""

    bits: int | None
    sparsity: float

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    def label(self) -> str:
        return f"{'float' if self.bits is None else f'{self.bits}-bit'}, {self.sparsity:.0%} sparse"


#: The trained model's own setting of every layer: the reference each measurement changes one layer from.
REFERENCE = Setting(None, 0.0)


def layer_pattern(name: str) -> str:
    """An fnmatch pattern matching exactly the layer ``name`` (compress selects layers by pattern)."""
    return glob.escape(name)


def apply_setting(model: nn.Module, layer: str, setting: Setting) -> None:
    """Prune ``layer`` of ``model`` to ``setting.sparsity`` by magnitude and give its weight and input quantizers
    of ``setting.bits``, as the compress stages do (the input quantizers still need :func:`calibrate`)."""
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
        quantize = QuantizeTechnique({"weight_bits": setting.bits, "activation_bits": setting.bits,
                                      "first_last_bits": None, "layers": pattern},
                                     stage_epochs=1, where=f"sensitivity[{layer}].quantize")
        quantize.attach(model)


@torch.no_grad()
def calibrate(model: nn.Module, batches: Sequence[torch.Tensor], predict: Callable[..., Any]) -> None:
    """The short calibration after a change: a forward pass over ``batches`` (carrying what the task's ``predict``
    carries from batch to batch) in which every batch norm re-estimates its statistics (one-shot pruning shifts
    those of the layers after it; any training after the change re-estimates them first) and every uncalibrated
    input quantizer takes LSQ's least-error step on the first batch, as at the first step of a QAT stage. Nothing
    else runs in training mode, and nothing is trained."""
    model.eval()
    fresh = [m for m in model.modules() if isinstance(m, ActivationQuantizer) and not bool(m.calibrated)]
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
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
                 trained_on_validation: bool = False) -> None:
        self.model, self.config, self.task, self.device = model.to(device).eval(), config, task, device
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
        self.accumulator_bits = int(score.get("accumulator_bits", 32))
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

    def prepared(self, settings: Mapping[str, Setting], model: nn.Module | None = None) -> nn.Module:
        """A copy of the model (or of ``model``) with ``settings`` applied per layer, quantizers calibrated."""
        model = copy.deepcopy(self.model if model is None else model)
        for layer, setting in settings.items():
            apply_setting(model, layer, setting)
        calibrate(model, self.calibration, self.predict)
        return model

    def evaluate(self, model: nn.Module) -> Evaluation:
        """The task's exact evaluation of ``model`` on the validation split."""
        return self.task.evaluate(model, self.val, self.device, "val")

    def metric(self, evaluation: Evaluation) -> float:
        """The gate's metric of an evaluation (top-1, or perplexity)."""
        return evaluation.to_dict()[self.task.metric]

    def count(self, model: nn.Module, freebie: bool) -> Count:
        """The scorer's count of ``model`` on the validation inputs, as the run counts (accumulator width)."""
        return count_inputs(model.eval(), self.score_inputs, accumulator_bits=self.accumulator_bits, freebie=freebie)


def grid(bits: Sequence[int | None], sparsity: Sequence[float]) -> list[Setting]:
    """Every (bits, sparsity) pair, the reference (float, dense) first."""
    settings = [Setting(b, s) for b in bits for s in sparsity]
    return [REFERENCE] + [s for s in settings if s != REFERENCE]


def measure(probe: Probe, *, layers: Sequence[str] | None = None, settings: Sequence[Setting] | None = None,
            progress: Callable[[str], None] = log.info) -> dict[str, Any]:
    """Measure every layer of ``layers`` (default: all weight layers) at every setting of ``settings`` (default: the
    default grid); returns the content of sensitivity.json (see the module docstring)."""
    task_name = probe.task.name
    all_layers = weight_layers(probe.model)
    layers = list(all_layers) if layers is None else list(layers)
    settings = grid(DEFAULT_BITS, DEFAULT_SPARSITY) if settings is None else list(settings)
    if REFERENCE not in settings:
        settings = [REFERENCE, *settings]
    trained = probe.evaluate(probe.model)
    reference = probe.evaluate(probe.prepared({}))  # calibrated as every setting is: its own increase is 0
    ref_metric = probe.metric(reference)
    ref_counts = {mode: probe.count(probe.model, freebie=mode == FREEBIE_ON) for mode in probe.freebie_modes}
    rest = {}
    for mode, count in ref_counts.items():
        rows = _rows(count)
        mine = [name for name in rows if any(owned(name, layer) for layer in layers)]
        rest[mode] = cost_entry(task_name, count.param_bits - sum(rows[n][0] for n in mine),
                                count.ops - sum(rows[n][1] for n in mine))
    result: dict[str, Any] = {
        "format": FORMAT_VERSION, "task": task_name, "model": probe.config["model"]["name"],
        "metric": probe.task.metric, "higher_is_better": HIGHER_IS_BETTER[probe.task.metric],
        "validation": {"split": "val", "val_split": probe.val_split, "examples": reference.total,
                       "trained_on": probe.trained_on_validation},
        "calibration_batches": len(probe.calibration),
        "calibration_examples": sum(len(batch) for batch in probe.calibration), "score_examples": ref_counts[FREEBIE_OFF].examples,
        "grid": {"bits": sorted({s.bits for s in settings}, key=lambda b: -99 if b is None else -b),  # float first
                 "sparsity": sorted({s.sparsity for s in settings})},
        "trained": trained.to_dict(),
        "reference": {"evaluation": reference.to_dict(), "loss": reference.loss, "metric": ref_metric,
                      "rest": rest, "total": {mode: cost_entry(task_name, c.param_bits, c.ops)
                                              for mode, c in ref_counts.items()}},
        "layers": [],
    }
    for layer in layers:
        start = time.perf_counter()
        module = all_layers[layer]
        entry = {"name": layer, "type": type(module).__name__, "weights": module.weight.numel(), "settings": []}
        pruned: dict[float, nn.Module] = {}
        for setting in settings:
            if setting.sparsity not in pruned:  # one pruned copy per sparsity, quantized copies made from it
                pruned[setting.sparsity] = probe.prepared({layer: Setting(None, setting.sparsity)})
            model = pruned[setting.sparsity]
            if setting.quantized:
                model = probe.prepared({layer: Setting(setting.bits, 0.0)}, model)
            evaluation = probe.evaluate(model)
            modes = (FREEBIE_OFF,) if setting.quantized else probe.freebie_modes
            costs, changed, row = {}, set(), None
            for mode in modes:
                count = probe.count(model, freebie=mode == FREEBIE_ON)
                costs[mode], other = layer_cost(count, layer, ref_counts[mode], task_name)
                changed.update(other)
                row = row or next(r for r in count.layers if r["name"] == layer)
            metric = probe.metric(evaluation)
            entry["settings"].append({
                "bits": setting.bits, "sparsity": setting.sparsity, "loss": evaluation.loss,
                "loss_increase": evaluation.loss - reference.loss, "metric": metric,
                "metric_change": metric - ref_metric, "evaluation": evaluation.to_dict(),
                "measured_sparsity": row["sparsity"], "weight_bits": row["weight_bits"],
                "input_bits": row["input_bits"], "cost": costs, "changed_rows": sorted(changed)})
        result["layers"].append(entry)
        progress(f"{layer}: {len(settings)} settings in {time.perf_counter() - start:.1f} s")
    return result


def read_sensitivity(path: str | Path) -> dict[str, Any]:
    """sensitivity.json from its path, or from the folder holding it (``RUN_DIR/sensitivity`` or ``RUN_DIR``)."""
    path = Path(path)
    candidates = [path] if path.suffix == ".json" else [path / SENSITIVITY_JSON, path / SENSITIVITY_DIR / SENSITIVITY_JSON]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise ConfigError(f"no {SENSITIVITY_JSON} at {' or '.join(map(str, candidates))}",
                          f"run `python -m train.sensitivity RUN_DIR` first, or pass the path of its {SENSITIVITY_JSON}")
    try:
        result = json.loads(found.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{found} is not valid JSON ({err})", "re-run `python -m train.sensitivity`") from None
    if not isinstance(result, dict) or result.get("format") != FORMAT_VERSION:
        raise ConfigError(f"{found} is not a sensitivity.json of format {FORMAT_VERSION}",
                          "re-run `python -m train.sensitivity` with this version")
    result["path"] = str(found)
    return result


# --- outputs ---------------------------------------------------------------------------------------
def _bits_label(bits: int | None) -> str:
    return "float" if bits is None else str(bits)


def _pivot(entry: Mapping[str, Any], bits: Sequence[int | None], sparsity: Sequence[float],
           value: Callable[[Mapping[str, Any]], float]) -> list[list[float]]:
    cells = {(s["bits"], s["sparsity"]): value(s) for s in entry["settings"]}
    return [[cells.get((b, s), math.nan) for s in sparsity] for b in bits]


def markdown(result: Mapping[str, Any]) -> str:
    """sensitivity.md: the reference, then per layer a table of bits × sparsity with the validation-loss increase
    and the layer's score contribution (freebie off)."""
    ref = result["reference"]
    bits, sparsity = result["grid"]["bits"], result["grid"]["sparsity"]
    lines = [f"# Sensitivity: {result['model']} on {result['task']}", "",
             f"Validation split: {result['validation']['examples']} examples"
             + (" (held out by --val-split from data the model was trained on)" if result["validation"]["trained_on"]
                else "") + f"; reference loss {ref['loss']:.4f}, {result['metric']} {ref['metric']:.4f}.",
             f"Calibration: {result['calibration_examples']} training examples; counts on {result['score_examples']} "
             "validation examples.", "",
             "Each cell: validation-loss increase with only this layer changed · the layer's score contribution "
             "(params/baseline + ops/baseline, freebie off).", ""]
    for entry in result["layers"]:
        lines += [f"## {entry['name']} ({entry['type']}, {entry['weights']:,} weights)", "",
                  "| bits \\ sparsity | " + " | ".join(f"{s:.0%}" for s in sparsity) + " |",
                  "|---|" + "---:|" * len(sparsity)]
        loss = _pivot(entry, bits, sparsity, lambda s: s["loss_increase"])
        score = _pivot(entry, bits, sparsity, lambda s: s["cost"][FREEBIE_OFF]["score"])
        for b, loss_row, score_row in zip(bits, loss, score):
            cells = ["–" if math.isnan(d) else f"{d:+.3f} · {c:.4f}" for d, c in zip(loss_row, score_row)]
            lines.append(f"| {_bits_label(b)} | " + " | ".join(cells) + " |")
        lines.append("")
    changed = sorted({name for e in result["layers"] for s in e["settings"] for name in s["changed_rows"]})
    lines.append("Rows of other layers changed by a one-layer setting (counted with that layer): "
                 + (", ".join(changed) if changed else "none") + ".")
    return "\n".join(lines) + "\n"


def plot(result: Mapping[str, Any], path: str | Path) -> None:
    """sensitivity.png: per layer, a heat map over bits × sparsity of the validation-loss increase (colour, log
    scale) with the layer's score contribution in thousandths written in each cell."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    bits, sparsity = result["grid"]["bits"], result["grid"]["sparsity"]
    layers = result["layers"]
    columns = min(4, len(layers))
    rows = math.ceil(len(layers) / columns)
    figure, axes = plt.subplots(rows, columns, squeeze=False, layout="constrained",
                                figsize=((0.5 * len(sparsity) + 1.0) * columns + 1.2, (0.36 * len(bits) + 1.1) * rows + 0.5))
    floor = 1e-3  # increases below it (and decreases) share the lightest colour
    norm = LogNorm(vmin=floor, vmax=max(floor * 10, max(s["loss_increase"] for e in layers for s in e["settings"])))
    image = None
    for axis, entry in zip(axes.flat, layers):
        loss = _pivot(entry, bits, sparsity, lambda s: max(s["loss_increase"], floor))
        score = _pivot(entry, bits, sparsity, lambda s: s["cost"][FREEBIE_OFF]["score"])
        image = axis.imshow(loss, cmap="magma_r", norm=norm, aspect="auto")
        for i, score_row in enumerate(score):
            for j, value in enumerate(score_row):
                if not math.isnan(value):
                    dark = norm(loss[i][j]) > 0.6
                    axis.text(j, i, f"{1000 * value:.1f}", ha="center", va="center", fontsize=6.5,
                              color="white" if dark else "black")
        axis.set_title(f"{entry['name']} ({entry['type']}, {entry['weights']:,} w)", fontsize=9)
        axis.set_xticks(range(len(sparsity)), [f"{s:.0%}" for s in sparsity], fontsize=7)
        axis.set_yticks(range(len(bits)), [_bits_label(b) for b in bits], fontsize=7)
        axis.set_xlabel("sparsity", fontsize=8)
        axis.set_ylabel("bits (weight and input)", fontsize=8)
    for axis in list(axes.flat)[len(layers):]:
        axis.axis("off")
    figure.suptitle(f"{result['model']} on {result['task']}: validation-loss increase with one layer changed (colour);\n"
                    "in each cell that layer's score contribution x 1000 (freebie off)", fontsize=9)
    figure.colorbar(image, ax=axes, shrink=0.9, label="validation loss increase (nats)")
    figure.savefig(path, dpi=110, format="png")
    plt.close(figure)


def write_outputs(result: Mapping[str, Any], out: str | Path) -> dict[str, Path]:
    """Write sensitivity.json, sensitivity.md and sensitivity.png into ``out``; return their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / SENSITIVITY_JSON, "md": out / "sensitivity.md", "png": out / "sensitivity.png"}
    text = json.dumps(result, indent=1) + "\n"
    atomic_write(paths["json"], lambda tmp: tmp.write_text(text))
    atomic_write(paths["md"], lambda tmp: tmp.write_text(markdown(result)))
    atomic_write(paths["png"], lambda tmp: plot(result, tmp))
    return paths


# --- command line ------------------------------------------------------------------------------------
def grid_bits(values: Sequence[Any]) -> list[int | None]:
    """The bit widths of a grid: ``float`` (or None) = unquantized, else 2..8; ValueError for a bad one."""
    bits = []
    for value in values:
        if value is None or value == "float":
            bits.append(None)
        elif isinstance(value, int) and not isinstance(value, bool) and 2 <= value <= 8:
            bits.append(value)
        else:
            raise ValueError(f"{value!r} is not a bit width: use float or 2..8, e.g. float,8,6,4,3,2")
    if not bits:
        raise ValueError("no bit width: use float or 2..8, e.g. float,8,6,4,3,2")
    return bits


def grid_sparsity(values: Sequence[Any]) -> list[float]:
    """The sparsities of a grid: fractions in [0, 1); ValueError for a bad one."""
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1 for v in values):
        raise ValueError(f"{list(values)!r}: expected fractions in [0, 1), e.g. 0,0.5,0.8,0.9,0.95")
    return [float(v) for v in values]


def parse_bits(text: str) -> list[int | None]:
    """``float,8,4,2`` → [None, 8, 4, 2] (argparse type)."""
    try:
        return grid_bits([int(item) if item.strip().isdigit() else item.strip() for item in text.split(",")])
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parse_sparsity(text: str) -> list[float]:
    """``0,0.5,0.9`` → [0.0, 0.5, 0.9] (argparse type)."""
    try:
        return grid_sparsity([float(item) for item in text.split(",")])
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected fractions in [0, 1), e.g. 0,0.5,0.8,0.9,0.95") from None


def parse_split(text: str) -> float | int:
    """A validation split as ``data.val_split`` takes it: a fraction in (0, 1) or a count (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value.is_integer() and value >= 1:
        return int(value)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a fraction in (0, 1) or a count of examples")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train.sensitivity", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a trained, uncompressed run dir (or entry / checkpoint)")
    parser.add_argument("--out", help="output folder (default RUN/sensitivity)")
    parser.add_argument("--bits", type=parse_bits, default=list(DEFAULT_BITS),
                        help="bit widths (weight and input), float = unquantized; default float,8,6,4,3,2")
    parser.add_argument("--sparsity", type=parse_sparsity, default=list(DEFAULT_SPARSITY),
                        help="sparsities; default 0,0.5,0.7,0.8,0.9,0.95,0.98")
    parser.add_argument("--layers", nargs="+", default=["*"], metavar="PATTERN",
                        help="fnmatch patterns of the layers to measure (default every Conv/Linear/Embedding)")
    parser.add_argument("--exclude", nargs="+", default=[], metavar="PATTERN", help="layers not to measure")
    parser.add_argument("--val-split", type=parse_split, default=None,
                        help="a validation hold-out for a run trained without one (never the test split)")
    parser.add_argument("--calibration-batches", type=int, default=2,
                        help="training batches that initialise the input quantizers and re-estimate batch-norm "
                             "statistics after each change (default 2)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from scoring.entry.boundary import USER_ERRORS
    from scoring.errors import fail

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    try:
        if args.calibration_batches < 1:
            raise ConfigError(f"--calibration-batches {args.calibration_batches}", "use a positive count, e.g. 2")
        probe = Probe.from_run(args.run, val_split=args.val_split, device=args.device,
                               calibration_batches=args.calibration_batches)
        layers = [name for name in weight_layers(probe.model)
                  if matches(name, args.layers) and not matches(name, args.exclude)]
        if not layers:
            raise ConfigError(f"no Conv/Linear/Embedding layer matches --layers {' '.join(args.layers)}"
                              + (f" --exclude {' '.join(args.exclude)}" if args.exclude else ""),
                              f"layers are: {', '.join(list(weight_layers(probe.model))[:12])}")
        if probe.trained_on_validation:
            log.warning("warning: the run was trained on these %s validation examples (it has no val split): the "
                        "loss increases are measured on training data", args.val_split)
        result = measure(probe, layers=layers, settings=grid(args.bits, args.sparsity))
        result["run"] = str(args.run)
        paths = write_outputs(result, args.out or Path(args.run) / SENSITIVITY_DIR)
    except USER_ERRORS as err:
        fail(str(err))
    print(f"{len(result['layers'])} layers x {len(result['layers'][0]['settings'])} settings measured in "
          f"{time.perf_counter() - start:.0f} s; wrote {paths['json']}, {paths['md'].name}, {paths['png'].name}\n"
          f"next: python -m train.allocate {paths['json']} --budget 0.05")
    return 0


if __name__ == "__main__":
    sys.exit(main())
