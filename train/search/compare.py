"""``python -m train.search.compare RUNS_DIR [--png front.png]``: one table of every finished run under a folder.

Reads every ``report.json`` below ``RUNS_DIR`` (run dirs of ``train/run.py``, a Hydra multirun such as
``multirun/digits`` with its ``<model>/<compress>/seed<seed>`` subfolders, exported bundles) with the run's config
(``.hydra/config.yaml``, else the entry's; train/search/formats.py), and prints

1. one row per run: task, model, compress, seed, validation and test metric, params, ops, score, gate;
2. one row per configuration, seeds aggregated: runs, gate passes, mean ± std of the metrics and the score, and
   the worst seed (lowest top-1 / highest perplexity).

Runs are one configuration when they agree on everything that defines a run but the seed and ``init``; a setting
that differs inside a (task, model, compress) group is shown in the ``variant`` column (train/search/solve.py).
``--png`` draws the test metric against the score: every run, the mean ± std of each configuration, the front of
configurations no other beats on both, and the gate (a run worse than every configuration's mean, e.g. a collapsed
one, is named in a corner instead of drawn). ``--latency-png`` draws the score against the batch-1 latency on ONNX
Runtime of every run measured by ``python -m scoring measure`` (its measured.json), beside the dense float32
model's. ``--tensorboard DIR`` writes the same runs for TensorBoard's HParams
view (``tensorboard --logdir DIR``).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from scoring.entry.boundary import command
from train.search.formats import Run, find_runs
from train.search.render import groups_table, plot_front, plot_latency, runs_table, write_hparams
from train.search.solve import Group, group_runs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train.search.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", help="folder holding run dirs (outputs/, a multirun folder, …)")
    parser.add_argument("--png", help="draw the metric-versus-score front into this PNG")
    parser.add_argument("--latency-png", help="draw the score against the measured latency (runs with a "
                                              "measured.json) into this PNG")
    parser.add_argument("--tensorboard", metavar="DIR", help="write the runs for TensorBoard's HParams view into DIR")
    parser.add_argument("--json", help="also write runs and configurations as JSON")
    return parser


def write_comparison(runs: Sequence[Run], groups: Sequence[Group], path: str | Path) -> None:
    """``--json``: every run as read, and every configuration with the paths of its runs."""
    Path(path).write_text(json.dumps({
        "runs": [vars(run) for run in runs],
        "configurations": [{"task": g.task, "model": g.model, "compress": g.compress, "variant": g.variant,
                            "runs": [run.path for run in g.runs]} for g in groups]}, indent=1, default=str) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with command():
        runs = find_runs(args.runs)
        groups = group_runs(runs)
        if args.tensorboard:
            write_hparams(runs, args.tensorboard)
        drawn = plot_latency(runs, args.latency_png) if args.latency_png else 0
    print(f"## Runs ({len(runs)})\n\n{runs_table([run for g in groups for run in g.runs])}\n\n"
          f"## Configurations, seeds aggregated (by mean score)\n\n{groups_table(groups)}")
    if args.png:
        plot_front(groups, args.png)
        print(f"\nfront drawn in {args.png}")
    if args.latency_png:
        print(f"score against latency drawn in {args.latency_png} ({drawn} of {len(runs)} runs measured)")
    if args.tensorboard:
        print(f"HParams written: tensorboard --logdir {args.tensorboard}")
    if args.json:
        write_comparison(runs, groups, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
