"""``python -m train.compare RUNS_DIR [--png front.png]``: one table of every finished run under a folder.

Reads every ``report.json`` below ``RUNS_DIR`` (run dirs of ``train/run.py``, a Hydra multirun such as
``multirun/digits`` with its ``<model>/<compress>/seed<seed>`` subfolders, exported bundles) with the run's config
(``.hydra/config.yaml``, else the entry's), and prints

1. one row per run: task, model, compress, seed, validation and test metric, params, ops, score, gate;
2. one row per configuration, seeds aggregated: runs, gate passes, mean ± std of the metrics and the score, and
   the worst seed (lowest top-1 / highest perplexity).

Runs are one configuration when they agree on task, model, compress and every other setting that defines a run
(``train.config.run_settings``) except the seed and ``init``; a setting that differs inside a (task, model,
compress) group is shown in the ``variant`` column (a setting one run lacks, e.g. one added since it was
written, is no difference). ``--png`` draws the test metric against the score: every
run, the mean ± std of each configuration, the front of configurations no other beats on both, and the gate (a
run worse than every configuration's mean, e.g. a collapsed one, is named in a corner instead of drawn).
``--tensorboard DIR`` writes the same runs for TensorBoard's HParams view (``tensorboard --logdir DIR``).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from scoring.challenge import UnknownTaskError, gate_for
from scoring.entry import ENTRY_JSON, REPORT_JSON, EntryError, read_report
from train.config import ConfigError, run_settings
from train.sensitivity import HIGHER_IS_BETTER

#: Run settings that vary between the runs of one configuration.
_PER_RUN = ("seed", "init")


@dataclass
class Run:
    """What the comparison reads from one run folder."""

    path: str
    task: str
    model: str
    compress: str
    seed: int | None
    metric: str
    test: float | None
    val: float | None
    correct: int | None
    total: int | None
    params: float
    ops: float
    score: float
    gate_passed: bool | None
    settings: dict[str, Any] = field(default_factory=dict)
    variant: str = ""


def _config(folder: Path) -> dict[str, Any]:
    """The run's config: .hydra/config.yaml (resolved), else the entry's resolved config, else nothing."""
    hydra = folder / ".hydra" / "config.yaml"
    if hydra.is_file():
        try:
            return OmegaConf.to_container(OmegaConf.load(hydra), resolve=True)
        except OmegaConfBaseException:
            pass  # an interpolation that needs Hydra's resolvers: the entry's copy is resolved
    entry = folder / "entry" / ENTRY_JSON
    if entry.is_file():
        try:
            return json.loads(entry.read_text()).get("config") or {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}
    return {}


def read_run(folder: Path, root: Path) -> Run:
    """One run folder (holding report.json)."""
    report = read_report(folder)
    config = _config(folder)
    gate = report.get("gate") or {}
    metric = gate.get("metric") or ("perplexity" if report.get("perplexity") is not None else "top1")
    validation = report.get("validation") or {}
    seed = report.get("seed", config.get("seed"))
    return Run(path=str(folder.relative_to(root)) if folder != root else ".", task=report["task"],
               model=report.get("model") or (config.get("model") or {}).get("name", "?"),
               compress=report.get("compress") or (config.get("compress") or {}).get("name", "?"),
               seed=seed, metric=metric, test=report.get(metric), val=validation.get(metric),
               correct=report.get("correct"), total=report.get("total"), params=report["params"], ops=report["ops"],
               score=report["score"], gate_passed=report.get("gate_passed"),
               settings={k: v for k, v in run_settings(config).items() if k.split(".")[0] not in _PER_RUN}
               if config else {})


def find_runs(root: str | Path) -> list[Run]:
    """Every run below ``root`` (a folder holding report.json), in path order; unreadable reports are refused."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"{root} is not a folder", "pass the folder holding the run dirs, e.g. outputs or multirun/digits")
    runs = []
    for report in sorted(root.rglob(REPORT_JSON)):
        if "entry" in report.relative_to(root).parts[:-1]:
            continue  # a bundle's copy inside an entry folder
        runs.append(read_run(report.parent, root))
    if not runs:
        raise ConfigError(f"no {REPORT_JSON} below {root}", "point at the folder of finished runs (train/run.py writes "
                                                            "report.json at the end of a run)")
    return runs


@dataclass
class Group:
    """The runs of one configuration."""

    task: str
    model: str
    compress: str
    variant: str
    runs: list[Run]

    @property
    def label(self) -> str:
        return self.compress + (f" [{self.variant}]" if self.variant else "")

    def values(self, key: str) -> list[float]:
        return [getattr(run, key) for run in self.runs if getattr(run, key) is not None]

    def worst(self) -> Run | None:
        """The run with the worst test metric."""
        scored = [run for run in self.runs if run.test is not None]
        if not scored:
            return None
        pick = min if HIGHER_IS_BETTER[scored[0].metric] else max
        return pick(scored, key=lambda run: run.test)


def group_runs(runs: Sequence[Run]) -> list[Group]:
    """Runs grouped by (task, model, compress) and the run settings that differ within that, by mean score."""
    by_name: dict[tuple[str, str, str], list[Run]] = {}
    for run in runs:
        by_name.setdefault((run.task, run.model, run.compress), []).append(run)
    groups = []
    for (task, model, compress), members in by_name.items():
        keys = sorted({key for run in members for key in run.settings})
        # None is what a run written before a setting existed reads for it (train.config._select): no difference
        differing = [key for key in keys if len({json.dumps(run.settings[key], sort_keys=True) for run in members
                                                  if run.settings.get(key) is not None}) > 1]
        variants: dict[str, list[Run]] = {}
        for run in members:
            run.variant = ", ".join(f"{key}={run.settings.get(key)}" for key in differing)
            variants.setdefault(run.variant, []).append(run)
        groups += [Group(task, model, compress, variant, sorted(group, key=lambda r: (r.seed is None, r.seed or 0)))
                   for variant, group in variants.items()]
    return sorted(groups, key=lambda g: (g.task, statistics.fmean(g.values("score"))))


def _mean_std(values: Sequence[float], digits: int = 4) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _metric(run: Run, value: float | None) -> str:
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
                     f"{'–' if run.seed is None else run.seed} | {_metric(run, run.val)} | {_metric(run, run.test)} | "
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


def front(groups: Sequence[Group]) -> list[Group]:
    """The configurations no other beats on both mean score (lower) and mean test metric, by score."""
    scored = [g for g in groups if g.values("test")]
    if not scored:
        return []
    sign = 1.0 if HIGHER_IS_BETTER[scored[0].runs[0].metric] else -1.0
    points = [(statistics.fmean(g.values("score")), sign * statistics.fmean(g.values("test")), g) for g in scored]
    kept = [g for s, m, g in points
            if not any(s2 <= s and m2 >= m and (s2 < s or m2 > m) for s2, m2, _ in points)]
    return sorted(kept, key=lambda g: statistics.fmean(g.values("score")))


def _limit_metric_axis(axis: Any, groups: Sequence[Group], threshold: float | None) -> None:
    """The metric axis spans every configuration's mean, the gate and the runs on the better side of the worst of
    those: a collapsed run (top-1 0.1) would otherwise squash every other point into a line. The runs left off are
    named in the corner."""
    higher = HIGHER_IS_BETTER[groups[0].runs[0].metric]
    span = [statistics.fmean(g.values("test")) for g in groups] + ([threshold] if threshold is not None else [])
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
        metric = mine[0].runs[0].metric if mine else "top1"
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
        try:
            threshold = float(gate_for(task).threshold)
        except UnknownTaskError:  # a task without a gate in the rules: nothing to draw
            threshold = None
        if threshold is not None:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", help="folder holding run dirs (outputs/, a multirun folder, …)")
    parser.add_argument("--png", help="draw the metric-versus-score front into this PNG")
    parser.add_argument("--tensorboard", metavar="DIR", help="write the runs for TensorBoard's HParams view into DIR")
    parser.add_argument("--json", help="also write runs and configurations as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from scoring.errors import fail

    args = build_parser().parse_args(argv)
    try:
        runs = find_runs(args.runs)
        groups = group_runs(runs)
        if args.tensorboard:
            write_hparams(runs, args.tensorboard)
    except (ConfigError, EntryError) as err:
        fail(str(err))
    print(f"## Runs ({len(runs)})\n\n{runs_table([run for g in groups for run in g.runs])}\n\n"
          f"## Configurations, seeds aggregated (by mean score)\n\n{groups_table(groups)}")
    if args.png:
        plot_front(groups, args.png)
        print(f"\nfront drawn in {args.png}")
    if args.tensorboard:
        print(f"HParams written: tensorboard --logdir {args.tensorboard}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "runs": [vars(run) for run in runs],
            "configurations": [{"task": g.task, "model": g.model, "compress": g.compress, "variant": g.variant,
                                "runs": [run.path for run in g.runs]} for g in groups]}, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
