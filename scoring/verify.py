"""Reproduce an entry's numbers: ``python -m scoring verify BUNDLE`` and ``python -m scoring PATH``.

``verify`` is what an organizer runs on a contestant's bundle: it rebuilds the model from
``entry/entry.json`` (registry architecture + compression structure), loads ``entry/model.safetensors``
(never unpickled; see :mod:`scoring.entry`), evaluates it on the task's test set, recounts it with the
score settings of the run, and compares with the bundle's ``report.json``:

* correct, total, gate verdict, freebie, parameter bits: exactly;
* params, ops, mults, adds, score: to 1e-9 relative;
* the per-layer table (params, mults, adds, sparsity, bit widths), layer by layer.

Before any of that it checks the bundle's ``SHA256SUMS`` (written last by the exporter): a changed, missing
or unlisted file stops verification with a table of file / manifest / on disk / status. A folder without a
manifest (a run dir, a bundle exported before manifests existed) is refused unless ``--allow-no-manifest``
is given; then a warning, and the final line, say that the files' integrity is unchecked.

Exit status 0 when everything agrees, 1 when something differs (a file from the manifest, or a field:
a table of field / reported / recounted / status is printed either way), 2 when the bundle cannot be
loaded (no or malformed manifest, refused weights, missing report or entry, missing dataset).

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

from scoring.entry import MANIFEST_FILE, Entry, EntryError, FileCheck, build_model_from_entry, check_manifest, \
    load_entry, read_report

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

    The task (its data, test split and evaluation) is built from the entry's task config through
    :func:`data.tasks.build_task`, the one definition training uses. ``data_root`` replaces the config's
    ``data.root`` (datasets live elsewhere on the organizer's machine); ``examples`` replaces ``score.examples``.
    Nothing is downloaded; the validation hold-out of the run is rebuilt only so the test split is the same.
    """
    import torch

    from data.tasks import DataOptions, build_task
    from scoring import count_inputs
    from scoring.report import build_report

    config = entry.config
    resolved = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                            "cpu" if device == "auto" else device)
    task = build_task(config["task"])
    options = DataOptions(root=config["data"].get("root") if data_root is None else data_root,
                          val_split=config["data"].get("val_split", 0))
    test_loader = task.loaders(options, batch_size=1, eval_batch_size=config["train"]["eval_batch_size"],
                               seed=config["seed"], device=resolved).test
    model = build_model_from_entry(entry).to(resolved)
    result = task.evaluate(model, test_loader, resolved, "test")
    score = config["score"]
    count = count_inputs(model, task.score_inputs(test_loader, examples or score["examples"], resolved, model),
                         accumulator_bits=score["accumulator_bits"],
                         freebie=None if score["freebie"] == "auto" else bool(score["freebie"]))
    return build_report(task=task.name, count=count, evaluation=result.to_dict(), example=task.example)


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
    return _aligned([("field", "reported", "recounted", "status")] + [
        (row.field, repr(row.reported), repr(row.recounted), "ok" if row.close else "DIFFERS") for row in shown])


def format_manifest_table(checks: Sequence[FileCheck]) -> str:
    """Every file of the bundle as an aligned text table: path, listed and actual sha256 (16 hex digits), status."""
    def short(digest: str | None) -> str:
        return digest[:16] if digest else "-"
    return _aligned([("file", "manifest", "on disk", "status")] + [
        (check.path, short(check.listed), short(check.found), check.status) for check in checks])


def _aligned(cells: Sequence[tuple[str, ...]]) -> str:
    """Rows of cells as left-aligned columns two spaces apart."""
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in cells)


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-root", help="dataset folder (default: data.root of the entry's config)")
    parser.add_argument("--examples", type=int,
                        help="test examples run through the scorer (default: score.examples of the entry's config)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda | cuda:N")


def _recount_or_fail(path: Path, args: argparse.Namespace) -> tuple[Entry, dict[str, Any]] | None:
    """Load and recount; print one line and return None for the problems a user can fix."""
    from data import DatasetError

    if args.examples is not None and args.examples <= 0:
        print(f"error: --examples {args.examples} must be > 0", file=sys.stderr)
        return None
    try:
        entry = load_entry(path)
        return entry, recount(entry, data_root=args.data_root, examples=args.examples, device=args.device)
    except (EntryError, DatasetError) as err:  # missing, damaged or inconsistent dataset files
        print(f"error: {err}", file=sys.stderr)
        return None


def _report_integrity(manifest: Path, checks: Sequence[FileCheck]) -> bool:
    """Print one line when every file matches the manifest, else the file table and why; True when all match."""
    bad = sum(not check.ok for check in checks)
    if not bad:
        print(f"integrity: all {len(checks)} files match {manifest}")
        return True
    print(format_manifest_table(checks))
    print(f"NOT VERIFIED: {bad} of {len(checks)} files differ from {manifest} (changed, missing, not listed or "
          "not plain files): the bundle was altered after export; get an intact copy or re-export it")
    return False


def main(argv: Sequence[str] | None = None) -> int:
    """``verify BUNDLE [--allow-no-manifest] [--data-root PATH] [--examples N] [--device D]``; exit 0 when all agree."""
    parser = argparse.ArgumentParser(prog="python -m scoring verify",
                                     description="Re-evaluate and recount an entry bundle; compare with its report.")
    parser.add_argument("bundle", type=Path, help="bundle folder (python -m scoring.export) or finished run dir")
    parser.add_argument("--allow-no-manifest", action="store_true",
                        help=f"verify a folder without {MANIFEST_FILE} (a run dir, a bundle exported before "
                             "manifests existed); the files' integrity is then unchecked")
    _common_arguments(parser)
    args = parser.parse_args(argv)
    try:
        checks = check_manifest(args.bundle)
        if checks is None and not args.allow_no_manifest:
            raise EntryError(f"{args.bundle} has no {MANIFEST_FILE}, so its files cannot be checked against the "
                             "export; re-export it with `python -m scoring.export RUN_DIR --out BUNDLE --force`, or "
                             "pass --allow-no-manifest to verify a run dir or an older bundle without that check")
        if checks is not None and not _report_integrity(args.bundle / MANIFEST_FILE, checks):
            return DIFFER  # a bundle altered after export is not recounted: its numbers would prove nothing
        reported = read_report(args.bundle)
    except EntryError as err:
        print(f"error: {err}", file=sys.stderr)
        return CANNOT_LOAD
    caveat = ""
    if checks is None:
        caveat = f" (file integrity unchecked: no {MANIFEST_FILE})"
        print(f"warning: {args.bundle} has no {MANIFEST_FILE}; the integrity of its files is unchecked", file=sys.stderr)
    outcome = _recount_or_fail(args.bundle, args)
    if outcome is None:
        return CANNOT_LOAD
    rows = compare(reported, outcome[1])
    differing = [row for row in rows if not row.close]
    print(format_table(rows))
    if differing:
        print(f"NOT VERIFIED: {len(differing)} of {len(rows)} fields differ from {args.bundle / 'report.json'}{caveat}")
        return DIFFER
    print(f"verified: all {len(rows)} fields agree with {args.bundle / 'report.json'}{caveat}")
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
