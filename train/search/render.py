"""Rendering what the search measured, chose and compared: sensitivity.md and its heat map, the allocation's
console table, the comparison's tables, its metric-versus-score PNG, its score-versus-latency PNG and TensorBoard's
HParams view.

matplotlib and TensorBoard are imported inside the functions that draw, so that reading and solving load neither.
Imports scoring (the gate, atomic writes), train.config and the search's grid, formats and solve.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable

from scoring.entry import atomic_write
from scoring.challenge import HIGHER_IS_BETTER, gate_for
from train.config import ConfigError
from train.search.formats import SENSITIVITY_JSON, Run, write_json
from train.search.grid import FREEBIE_OFF, settings_text
from train.search.solve import Allocation, Group, front


# --- sensitivity -------------------------------------------------------------------------------------
def _bits_label(bits: int | None) -> str:
    return "float" if bits is None else str(bits)


def _pivot(entry: Mapping[str, Any], bits: Sequence[int | None], sparsity: Sequence[float],
           value: Callable[[Mapping[str, Any]], float]) -> list[list[float]]:
    cells = {(s["bits"], s["sparsity"]): value(s) for s in entry["settings"]}
    return [[cells.get((b, s), math.nan) for s in sparsity] for b in bits]


def sensitivity_markdown(result: Mapping[str, Any]) -> str:
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


def plot_sensitivity(result: Mapping[str, Any], path: str | Path) -> None:
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


def write_sensitivity(result: Mapping[str, Any], out: str | Path) -> dict[str, Path]:
    """Write sensitivity.json with its renderings, sensitivity.md and sensitivity.png, into ``out``; return their
    paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / SENSITIVITY_JSON, "md": out / "sensitivity.md", "png": out / "sensitivity.png"}
    write_json(paths["json"], result)
    atomic_write(paths["md"], lambda tmp: tmp.write_text(sensitivity_markdown(result)))
    atomic_write(paths["png"], lambda tmp: plot_sensitivity(result, tmp))
    return paths


# --- allocation ----------------------------------------------------------------------------------------
def allocation_header(metric: str) -> list[str]:
    """The head of the allocate command's table (one row per budget: :func:`allocation_row`)."""
    return ["| config | constraint | predicted score | counted score | predicted val loss | one-shot val loss "
            f"| predicted val {metric} | one-shot val {metric} | layers |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]


def allocation_row(name: str, allocation: Allocation, reference_loss: float) -> str:
    """One config's row: the predicted and (when checked) counted score, validation loss and metric, the layers."""
    counted = {key: f"{value:.{6 if key == 'score' else 4}f}" for key, value in allocation.counted.items()
               if key in ("score", "loss", "metric")}
    return (f"| {name} | {allocation.constraint} | {allocation.score:.6f} | {counted.get('score', '–')} | "
            f"{reference_loss + allocation.loss_increase:.4f} | {counted.get('loss', '–')} | "
            f"{allocation.metric:.4f} | {counted.get('metric', '–')} | {settings_text(allocation.settings)} |")


# --- comparison ----------------------------------------------------------------------------------------
def _mean_std(values: Sequence[float], digits: int = 4) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _metric(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def _gate(run: Run) -> str:
    if run.gate_passed is None:
        return "–"
    counts = f" {run.correct}/{run.total}" if run.correct is not None else ""
    return ("pass" if run.gate_passed else "FAIL") + counts


def runs_table(runs: Sequence[Run]) -> str:
    """The per-run markdown table."""
    lines = ["| task | model | compress | variant | seed | val metric | test metric | params | ops | score | gate |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for run in runs:
        lines.append(f"| {run.task} | {run.model} | {run.compress} | {run.variant or '–'} | "
                     f"{'–' if run.seed is None else run.seed} | {_metric(run.val)} | {_metric(run.test)} | "
                     f"{run.params:,.0f} | {run.ops:,.0f} | {run.score:.6f} | {_gate(run)} |")
    return "\n".join(lines)


def groups_table(groups: Sequence[Group]) -> str:
    """The per-configuration markdown table (seeds aggregated)."""
    lines = ["| task | model | compress | variant | runs | gate passes | val metric | test metric | score "
             "| worst seed |", "|---|---|---|---|---:|---:|---:|---:|---:|---|"]
    for group in groups:
        worst = group.worst()
        passes = sum(run.gate_passed is True for run in group.runs)
        lines.append(
            f"| {group.task} | {group.model} | {group.compress} | {group.variant or '–'} | {len(group.runs)} | "
            f"{passes}/{len(group.runs)} | {_mean_std(group.values('val'))} | {_mean_std(group.values('test'))} | "
            f"{_mean_std(group.values('score'), 6)} | "
            + ("–" if worst is None else f"seed {worst.seed}: {worst.test:.4f} ({_gate(worst)})") + " |")
    return "\n".join(lines)


def _limit_metric_axis(axis: Any, groups: Sequence[Group], threshold: float) -> None:
    """The metric axis spans every configuration's mean, the gate and the runs on the better side of the worst of
    those: a collapsed run (top-1 0.1) would otherwise squash every other point into a line. The runs left off are
    named in the corner."""
    higher = HIGHER_IS_BETTER[groups[0].runs[0].metric]
    span = [statistics.fmean(g.values("test")) for g in groups] + [threshold]
    worst = min(span) if higher else max(span)
    kept = span + [v for g in groups for v in g.values("test") if (v >= worst if higher else v <= worst)]
    low, high = min(kept), max(kept)
    pad = 0.08 * ((high - low) or abs(high) or 1.0)
    axis.set_ylim(low - pad, high + pad)
    off = [f"{g.label} seed {r.seed}: {r.test:.4g}" for g in groups for r in g.runs
           if r.test is not None and not low - pad <= r.test <= high + pad]
    if off:
        axis.text(0.99, 0.01, "off the axis: " + "; ".join(off), transform=axis.transAxes, ha="right", va="bottom",
                  fontsize=7, color="dimgrey")


def plot_front(groups: Sequence[Group], path: str | Path) -> None:
    """The metric-versus-score PNG: one panel per task."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    tasks = sorted({g.task for g in groups})
    figure, axes = plt.subplots(1, len(tasks), figsize=(7.5 * len(tasks), 5), squeeze=False, layout="constrained")
    for axis, task in zip(axes[0], tasks):
        mine = [g for g in groups if g.task == task and g.values("test")]
        gate = gate_for(task)
        metric, threshold = gate.metric, float(gate.threshold)
        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for index, group in enumerate(mine):
            colour = colours[index % len(colours)]
            scores, tests = group.values("score"), group.values("test")
            axis.scatter([r.score for r in group.runs if r.test is not None], tests, s=14, alpha=0.45, color=colour)
            mean_s, mean_t = statistics.fmean(scores), statistics.fmean(tests)
            spread = (statistics.stdev(scores), statistics.stdev(tests)) if len(group.runs) > 1 else (0.0, 0.0)
            axis.errorbar(mean_s, mean_t, xerr=spread[0], yerr=spread[1], fmt="o", color=colour, capsize=3,
                          label=f"{group.label} ({len(group.runs)} run{'s' * (len(group.runs) != 1)})")
            axis.annotate(group.label, (mean_s, mean_t), textcoords="offset points", xytext=(5, 5), fontsize=7,
                          color=colour)
        best = front(mine)
        if len(best) > 1:
            axis.plot([statistics.fmean(g.values("score")) for g in best],
                      [statistics.fmean(g.values("test")) for g in best], "--", color="grey", lw=1, label="front")
        axis.axhline(threshold, color="crimson", lw=1, ls=":", label=f"gate {threshold:g}")
        if mine:
            _limit_metric_axis(axis, mine, threshold)
        axis.set_xscale("log")
        axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))  # 0.2, not 2 x 10^-1
        # every minor tick labelled on a narrow axis; on a wide one only 2, 3, 5, 7 x 10^k (all nine collide)
        low, high = axis.get_xlim()
        labelled = range(1, 10) if high / low < 4 else (2, 3, 5, 7)
        axis.xaxis.set_minor_formatter(FuncFormatter(
            lambda value, _: f"{value:g}" if round(value / 10 ** math.floor(math.log10(value) + 1e-9)) in labelled
            else ""))
        axis.set_xlabel("score (params/baseline + ops/baseline; log scale)")
        axis.set_ylabel(f"test {metric}")
        axis.set_title(f"{task}: test {metric} against score, mean ± std over seeds")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7, loc="best")
    figure.savefig(path, dpi=100, format="png")
    plt.close(figure)


#: The score of a task's dense 32-bit baseline: params/params + ops/ops.
DENSE_SCORE = 2.0


def plot_latency(runs: Sequence[Run], path: str | Path) -> int:
    """The score-versus-latency PNG, one panel per task: each run with a measured.json at its batch-1 latency on
    ONNX Runtime, and the dense float32 model of each measurement at the baseline's score. Returns how many runs
    were drawn; ConfigError when none was measured."""
    measured = [run for run in runs if run.latency_ms is not None]
    if not measured:
        raise ConfigError("no run has a measured.json", "measure the runs first: python -m scoring measure RUN_DIR "
                                                        "[RUN_DIR ...]")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({run.task for run in measured})
    figure, axes = plt.subplots(1, len(tasks), figsize=(7.5 * len(tasks), 5), squeeze=False, layout="constrained")
    for axis, task in zip(axes[0], tasks):
        mine = [run for run in measured if run.task == task]
        axis.scatter([run.latency_ms for run in mine], [run.score for run in mine], s=18)
        for run in mine:
            axis.annotate(f"{run.compress} seed {run.seed}", (run.latency_ms, run.score), textcoords="offset points",
                          xytext=(5, 4), fontsize=7)
        dense = [run.dense_latency_ms for run in mine if run.dense_latency_ms is not None]
        axis.scatter(dense, [DENSE_SCORE] * len(dense), marker="x", color="grey",
                     label=f"dense float32 model ({len(dense)} measurement{'s' * (len(dense) != 1)})")
        axis.set_yscale("log")
        axis.set_xlabel("batch-1 latency on ONNX Runtime (ms, median)")
        axis.set_ylabel("score (params/baseline + ops/baseline; log scale)")
        axis.set_title(f"{task}: counted score against measured latency")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7, loc="best")
    figure.savefig(path, dpi=100, format="png")
    plt.close(figure)
    return len(measured)


def write_hparams(runs: Sequence[Run], directory: str | Path) -> Path:
    """Every run in TensorBoard's HParams view: its task, model, compress, seed and variant settings against its
    score, params, ops, metrics and gate. Refuses a folder that already holds event files (they would repeat)."""
    from torch.utils.tensorboard import SummaryWriter

    directory = Path(directory)
    if directory.exists() and any(directory.rglob("events.out.tfevents.*")):
        raise ConfigError(f"{directory} already holds TensorBoard event files",
                          "pass a new --tensorboard folder (or delete that one) so no run appears twice")
    with SummaryWriter(directory) as writer:
        for run in runs:
            hparams = {"task": run.task, "model": run.model, "compress": run.compress,
                       "seed": -1 if run.seed is None else run.seed, "variant": run.variant or "-"}
            metrics = {"hparam/score": run.score, "hparam/params": run.params, "hparam/ops": run.ops,
                       f"hparam/test_{run.metric}": run.test, f"hparam/val_{run.metric}": run.val,
                       "hparam/gate_passed": None if run.gate_passed is None else float(run.gate_passed)}
            writer.add_hparams(hparams, {k: v for k, v in metrics.items() if v is not None}, run_name=run.path)
    return directory
