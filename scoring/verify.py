"""Reproduce an entry's numbers: ``python -m scoring verify BUNDLE`` and ``python -m scoring PATH``.

``verify`` is what an organizer runs on a contestant's bundle: it rebuilds the model from
``entry/entry.json`` (registry architecture + compression structure), loads ``entry/model.safetensors``
(never unpickled; see :mod:`scoring.entry`), evaluates it on the task's test set, recounts it with the
score settings of the run, and compares with the bundle's ``report.json``:

* correct, total, gate verdict, freebie, parameter bits: exactly;
* params, ops, mults, adds, score: to 1e-9 relative;
* the per-layer table (params, mults, adds, sparsity, bit widths), layer by layer.

Exit status 0 when everything agrees, 1 when something differs (a table of field / reported /
recounted / status is printed either way), 2 when the bundle cannot be loaded (refused weights,
missing files, missing dataset).

``python -m scoring PATH`` (a run dir, a bundle or an entry folder) evaluates and scores the entry and
prints the summary, without comparing.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf

from scoring.entry import Entry, EntryError, build_model_from_entry, load_entry, read_report

#: Relative tolerance for counts that go through floating point (params, ops, score, ...).
REL_TOL = 1e-9
#: Report totals compared exactly, and to REL_TOL.
EXACT_FIELDS = ("task", "correct", "total", "gate_passed", "freebie", "param_bits", "accumulator_bits", "examples")
CLOSE_FIELDS = ("params", "ops", "mults", "adds", "score")
#: Per-layer counts compared (not the module type: removing a mask parametrization at export renames it).
LAYER_EXACT = ("param_bits", "weight_bits", "input_bits")
LAYER_CLOSE = ("params", "mults", "adds", "sparsity")
#: Exit statuses.
AGREE, DIFFER, CANNOT_LOAD = 0, 1, 2


@dataclass
class Row:
    """One line of the comparison table."""

    field: str
    reported: Any
    recounted: Any

    @property
    def close(self) -> bool:
        """Whether the two values agree (exactly, or to REL_TOL for floats)."""
        a, b = self.reported, self.recounted
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
        if numbers and (isinstance(a, float) or isinstance(b, float)):
            return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=0.0)
        return type(a) is type(b) and a == b


def recount(entry: Entry, *, data_root: str | None = None, examples: int | None = None,
            device: str = "auto") -> dict[str, Any]:
    """Evaluate and count ``entry`` as ``train/run.py`` did at the end of its run; return the report dict.

    ``data_root`` replaces the config's ``data.root`` (datasets live elsewhere on the organizer's machine);
    ``examples`` replaces ``score.examples``. Nothing is downloaded.
    """
    from scoring import count_model
    from scoring.report import build_report
    from train.build import build_data, score_inputs
    from train.distributed import Context, resolve_device
    from train.loop import evaluate

    cfg = OmegaConf.create(entry.config)
    cfg.data.download = False
    if data_root is not None:
        cfg.data.root = data_root
    ctx = Context(resolve_device(device))
    _, test_loader = build_data(cfg, ctx)
    model = build_model_from_entry(entry).to(ctx.device)
    result = evaluate(model, test_loader, ctx.device)
    score = cfg.score
    count = count_model(model, score_inputs(test_loader, examples or score.examples, ctx.device),
                        accumulator_bits=score.accumulator_bits,
                        freebie=None if score.freebie == "auto" else bool(score.freebie))
    return build_report(task=cfg.task.name, count=count, correct=result.correct, total=result.total)


def compare(reported: dict[str, Any], recounted: dict[str, Any]) -> list[Row]:
    """Rows for every compared field: totals, then each layer's counts."""
    rows = [Row(key, reported.get(key), recounted[key]) for key in EXACT_FIELDS + CLOSE_FIELDS]
    reported_layers = {layer.get("name"): layer for layer in reported.get("layers") or []}
    for layer in recounted["layers"]:
        mine = reported_layers.pop(layer["name"], {})
        rows += [Row(f"layers[{layer['name']}].{key}", mine.get(key), layer[key]) for key in LAYER_EXACT + LAYER_CLOSE]
    rows += [Row(f"layers[{name}]", "present", None) for name in reported_layers]  # layers the model lacks
    return rows


def format_table(rows: Sequence[Row]) -> str:
    """The comparison as an aligned text table: every total, and the layer fields that differ."""
    shown = [row for row in rows if not (row.field.startswith("layers[") and row.close)]
    cells = [("field", "reported", "recounted", "status")]
    cells += [(row.field, repr(row.reported), repr(row.recounted), "ok" if row.close else "DIFFERS") for row in shown]
    widths = [max(len(line[i]) for line in cells) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in cells)


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-root", help="dataset folder (default: data.root of the entry's config)")
    parser.add_argument("--examples", type=int,
                        help="test examples run through the scorer (default: score.examples of the entry's config)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda | cuda:N")


def _recount_or_fail(path: Path, args: argparse.Namespace) -> tuple[Entry, dict[str, Any]] | None:
    """Load and recount; print one line and return None for the problems a user can fix."""
    from data import DatasetNotFoundError

    if args.examples is not None and args.examples <= 0:
        print(f"error: --examples {args.examples} must be > 0", file=sys.stderr)
        return None
    try:
        entry = load_entry(path)
        return entry, recount(entry, data_root=args.data_root, examples=args.examples, device=args.device)
    except (EntryError, DatasetNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return None


def main(argv: Sequence[str] | None = None) -> int:
    """``verify BUNDLE [--data-root PATH] [--examples N] [--device D]``; exit 0 when everything agrees."""
    parser = argparse.ArgumentParser(prog="python -m scoring verify",
                                     description="Re-evaluate and recount an entry bundle; compare with its report.")
    parser.add_argument("bundle", type=Path, help="bundle folder (python -m scoring.export) or finished run dir")
    _common_arguments(parser)
    args = parser.parse_args(argv)
    try:
        reported = read_report(args.bundle)
    except EntryError as err:
        print(f"error: {err}", file=sys.stderr)
        return CANNOT_LOAD
    outcome = _recount_or_fail(args.bundle, args)
    if outcome is None:
        return CANNOT_LOAD
    rows = compare(reported, outcome[1])
    differing = [row for row in rows if not row.close]
    print(format_table(rows))
    if differing:
        print(f"NOT VERIFIED: {len(differing)} of {len(rows)} fields differ from {args.bundle / 'report.json'}")
        return DIFFER
    print(f"verified: all {len(rows)} fields agree with {args.bundle / 'report.json'}")
    return AGREE


def score_main(argv: Sequence[str]) -> int:
    """``python -m scoring PATH [--data-root PATH] [--examples N] [--device D]``: evaluate, score, print."""
    from scoring.report import format_summary

    parser = argparse.ArgumentParser(prog="python -m scoring",
                                     description="Evaluate and score a finished run dir, bundle or entry.")
    parser.add_argument("path", type=Path, help="run dir, bundle or entry folder")
    _common_arguments(parser)
    args = parser.parse_args(argv)
    outcome = _recount_or_fail(args.path, args)
    if outcome is None:
        return CANNOT_LOAD
    entry, report = outcome
    print(f"{entry.meta['model']['name']} on {entry.task} (compress={entry.config['compress']['name']})")
    print(format_summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
