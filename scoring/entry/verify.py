"""Reproduce an entry's numbers: ``python -m scoring verify BUNDLE`` and ``python -m scoring PATH``.

``verify`` is what an organizer runs on a contestant's bundle: it rebuilds the model from
``entry/entry.json`` (registry architecture + compression structure), loads ``entry/model.safetensors``
(never unpickled; see :mod:`scoring.entry.bundle`), evaluates it on the test set of the kit's own definition of the
task, recounts it with the official score settings, and compares with the bundle's ``report.json``:

* correct, total, gate verdict, freebie, parameter bits: exactly;
* params, ops, mults, adds, score: to 1e-9 relative;
* the per-layer table (params, mults, adds, sparsity, bit widths), layer by layer.

Before any of that it checks the bundle's ``SHA256SUMS`` (written last by the exporter): a changed, missing
or unlisted file stops verification with a table of file / manifest / on disk / status. A folder without a
manifest (a run dir, a bundle exported before manifests existed) is refused unless ``--allow-no-manifest``
is given; then a warning, and the final line, say that the files' integrity is unchecked.

Then, before any data is loaded, the entry is checked against the kit (:mod:`scoring.entry.kit`) and rebuilt once
(:func:`scoring.entry.build_model_from_entry`). Refused, each with one line on stderr and exit status 2:

* a bundle whose files are not what the kit writes: a link, FIFO or device anywhere it is read, a file over its
  size cap, a safetensors header over 4 MiB, folders nested too deep or too many files (:mod:`scoring.entry.files`);
* entry data that is not plain data: not strict JSON, or a string a config reader would interpolate (``${...}``);
* an entry of another task: its recorded task differs from ``conf/task/<name>.yaml`` at a key that file defines
  (but the training-only ones: augmentation, training windows), or report.json names another task, baseline or
  gate;
* score settings other than the official ones (``conf/config.yaml``: examples 256, accumulator_bits 32,
  freebie auto), unless ``--allow-score-settings`` is given: the entry is then compared under its own settings,
  the FIRST line of the output names them and says the score is not official, and so does the last line, which
  never reads "verified";
* a model that cannot be rebuilt: an unknown model, a keyword argument the model does not take or one that reads
  files (``checkpoint_path``, ``pretrained*``, ...), a compression state out of range or naming other layers,
  weights that do not fit, quantizers never calibrated; and an entry whose evaluation fails (a missing or damaged
  dataset, a model that does not run on the task's inputs).

The recorded ``data.root`` is never used (it names a folder on the entrant's machine): the dataset comes from
``--data-root``. Exit status 0 when everything agrees, 1 when something differs (a file from the manifest, or a
field: a table of field / reported / recounted / status is printed either way), 2 when the bundle is refused or
cannot be loaded. ``accumulator_bits: adder_tree`` is official too, but refused after the recount where a dot
product multiplies a float (:func:`scoring.entry.kit.accept_accumulator`).

``python -m scoring PATH`` (a run dir, a bundle or an entry folder) evaluates and scores the entry with its own
recorded config and prints the summary, without comparing. Both recount through
:func:`scoring.entry.model_report.recount`, as the run did. This module may import data/, models/, compress/, conf and
scoring core, never train/.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from scoring.entry.boundary import USER_ERRORS, command
from scoring.entry.bundle import Entry, build_model_from_entry, entry_storage, load_entry
from scoring.entry.files import EntryError, atomic_write
from scoring.entry.kit import Judged, accept_accumulator, judge
from scoring.entry.manifest import MANIFEST_FILE, FileCheck, check_manifest
from scoring.entry.runfiles import REPORT_JSON, read_report
from scoring.errors import UserError

#: Relative tolerance for counts that go through floating point (params, ops, score, ...).
REL_TOL = 1e-9
#: A language model's NLL sum is float32 arithmetic over ~10⁵ tokens, summed in float64: another processor's
#: kernels change it in the 7th digit, never the verdict's margin that matters (the gate is compared exactly).
NLL_REL_TOL = 1e-6
#: Report totals compared exactly, and to REL_TOL (``nll_sum``: to NLL_REL_TOL; None for classification).
EXACT_FIELDS = ("task", "correct", "total", "gate_passed", "freebie", "param_bits", "accumulator_bits", "examples")
CLOSE_FIELDS = ("params", "ops", "mults", "adds", "score", "nll_sum")
_TOLERANCES = {"nll_sum": NLL_REL_TOL}
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
            try:
                return math.isclose(a, b, rel_tol=_TOLERANCES.get(self.field, REL_TOL), abs_tol=0.0)
            except OverflowError:  # a reported integer beyond any float differs from every recount
                return False
        return type(a) is type(b) and a == b


def recount_entry(entry: Entry, *, data_root: str | None = None, examples: int | None = None,
                  device: str = "auto") -> dict[str, Any]:
    """Evaluate and count ``entry`` as ``train/run.py`` did at the end of its run; return the report dict.

    The task (its data, test split and evaluation) is built from the entry's task config through
    :func:`data.tasks.build_task`, the one definition training uses. ``data_root`` replaces the config's
    ``data.root`` (datasets live elsewhere on the organizer's machine); ``examples`` replaces ``score.examples``.
    Nothing is downloaded; the validation hold-out of the run is rebuilt only so the test split is the same.
    """
    from scoring.entry.model_report import load_test_split, recount

    config = entry.config
    task, test_loader, resolved = load_test_split(config, data_root=data_root, device=device)
    model = build_model_from_entry(entry).to(resolved)
    score = {**config["score"], "examples": examples or config["score"]["examples"]}
    return recount(model, task, test_loader, resolved, score)


def compare(reported: dict[str, Any], recounted: dict[str, Any]) -> list[Row]:
    """Rows for every compared field: totals, then each layer's counts."""
    rows = [Row(key, reported.get(key), recounted[key]) for key in EXACT_FIELDS + CLOSE_FIELDS]
    layers = reported.get("layers") if isinstance(reported.get("layers"), list) else []
    reported_layers = {layer["name"]: layer for layer in layers if isinstance(layer, dict) and isinstance(
        layer.get("name"), str)}  # anything else in the list is no layer of the model: it matches none
    for layer in recounted["layers"]:
        mine = reported_layers.pop(layer["name"], {})
        rows += [Row(f"layers[{layer['name']}].{key}", mine.get(key), layer[key]) for key in LAYER_EXACT + LAYER_CLOSE]
    rows += [Row(f"layers[{name}]", "present", None) for name in reported_layers]  # layers the model lacks
    return rows


def format_table(rows: Sequence[Row]) -> str:
    """The comparison as an aligned text table: every total, and the layer fields that differ."""
    shown = [row for row in rows if not (row.field.startswith("layers[") and row.close)]
    return _aligned([("field", "reported", "recounted", "status")] + [
        (_clip(row.field), _clip(repr(row.reported)), _clip(repr(row.recounted)), "ok" if row.close else "DIFFERS")
        for row in shown])


def _clip(text: str, limit: int = 80) -> str:
    """A table cell of at most ``limit`` characters: a report can hold anything, the table stays readable."""
    return text if len(text) <= limit else text[:limit - 1] + "…"


def format_manifest_table(checks: Sequence[FileCheck]) -> str:
    """Every file of the bundle as an aligned text table: path, listed and actual sha256 (16 hex digits), status."""
    def short(digest: str | None) -> str:
        return digest[:16] if digest else "-"
    return _aligned([("file", "manifest", "on disk", "status")] + [
        (check.path if check.path.isprintable() else ascii(check.path), short(check.listed), short(check.found),
         check.status) for check in checks])


def _aligned(cells: Sequence[tuple[str, ...]]) -> str:
    """Rows of cells as left-aligned columns two spaces apart."""
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in cells)


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-root", help="dataset folder on this machine (verify never uses the entry's recorded "
                                            "data.root; python -m scoring PATH defaults to it)")
    parser.add_argument("--examples", type=int,
                        help="test examples run through the scorer (default: score.examples, the official 256 for "
                             "verify)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda | cuda:N")


def _load_and_recount(source: Path | Entry, args: argparse.Namespace) -> tuple[Entry, dict[str, Any]]:
    """Load (unless given an entry) and recount; what only running the entry shows (e.g. a model that does not
    take the task's inputs) is an :class:`EntryError` too."""
    if args.examples is not None and args.examples <= 0:
        raise UserError(f"--examples {args.examples} must be > 0", "omit it to count score.examples")
    try:
        entry = source if isinstance(source, Entry) else load_entry(source)
        return entry, recount_entry(entry, data_root=args.data_root, examples=args.examples, device=args.device)
    except USER_ERRORS:  # a damaged entry, a missing or damaged dataset: their own one line
        raise
    except (ValueError, RuntimeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise EntryError(f"the entry cannot be evaluated on its task ({type(err).__name__}: {reason[:300]}); "
                         "re-export the entry of a finished run of this kit") from None


def _report_integrity(manifest: Path, checks: Sequence[FileCheck]) -> bool:
    """True when every file matches the manifest; else print the file table and why, and return False."""
    bad = sum(not check.ok for check in checks)
    if not bad:
        return True
    print(format_manifest_table(checks))
    print(f"NOT VERIFIED: {bad} of {len(checks)} files differ from {manifest} (changed, missing, not listed or "
          "not plain files): the bundle was altered after export; get an intact copy or re-export it")
    return False


def main(argv: Sequence[str] | None = None) -> int:
    """``verify BUNDLE [--allow-no-manifest] [--allow-score-settings] [--data-root PATH] [--examples N] [--device D]``;
    exit 0 when all agree."""
    parser = argparse.ArgumentParser(prog="python -m scoring verify",
                                     description="Re-evaluate and recount an entry bundle; compare with its report.")
    parser.add_argument("bundle", type=Path, help="bundle folder (python -m scoring.export) or finished run dir")
    parser.add_argument("--allow-no-manifest", action="store_true",
                        help=f"verify a folder without {MANIFEST_FILE} (a run dir, a bundle exported before "
                             "manifests existed); the files' integrity is then unchecked")
    parser.add_argument("--allow-score-settings", action="store_true",
                        help="compare an entry recorded with other score settings than the official ones under its "
                             "own; the output then says, first and last, that the score is not official")
    parser.add_argument("--json", type=Path, metavar="PATH",
                        help="also write the verdict as JSON: status, the integer execution, counted and packed bytes")
    _common_arguments(parser)
    args = parser.parse_args(argv)
    with command(CANNOT_LOAD):
        return _verify(args)


def _verify(args: argparse.Namespace) -> int:
    """The manifest, the kit's checks, the rebuild, then the recount compared with report.json; the exit status."""
    checks = check_manifest(args.bundle)
    if checks is None and not args.allow_no_manifest:
        raise EntryError(f"{args.bundle} has no {MANIFEST_FILE}, so its files cannot be checked against the "
                         "export; re-export it with `python -m scoring.export RUN_DIR --out BUNDLE --force`, or "
                         "pass --allow-no-manifest to verify a run dir or an older bundle without that check")
    if checks is not None and not _report_integrity(args.bundle / MANIFEST_FILE, checks):
        _write_json(args.json, {"status": DIFFER, "integrity": False})
        return DIFFER  # a bundle altered after export is not recounted: its numbers would prove nothing
    reported = read_report(args.bundle)
    judged = judge(load_entry(args.bundle), reported, allow_score_settings=args.allow_score_settings)
    from scoring.entry.integer import integer_check

    model = build_model_from_entry(judged.entry)  # every failure to rebuild shows here, before any data is loaded
    recounted = _load_and_recount(judged.entry, args)[1]
    judged = accept_accumulator(judged, recounted, args.allow_score_settings)
    integer = integer_check(judged.entry, model, data_root=args.data_root, device=args.device)
    qualifies = recounted["gate_passed"] and (integer is None or integer.gate.passed) and not judged.unofficial
    caveat = _print_verdict(judged, recounted, checks, args.bundle, qualifies)
    # The entry's report says it passes its gate: so must its integer execution.
    rows = compare(reported, recounted) + ([] if integer is None else [
        Row("integer.gate_passed", reported.get("gate_passed"), integer.gate.passed)])
    differing = [row for row in rows if not row.close]
    print(format_table(rows))
    if integer is not None:
        print(integer.describe())
    _write_json(args.json, {"status": DIFFER if differing else AGREE, "integrity": checks is not None,
                            "qualifies": qualifies, "differing_fields": [row.field for row in differing],
                            "integer": None if integer is None else integer.to_dict(),
                            "storage": entry_storage(args.bundle, judged.entry, model, recounted["param_bits"])})
    if differing:
        print(f"NOT VERIFIED: {len(differing)} of {len(rows)} fields differ from {args.bundle / REPORT_JSON}{caveat}")
        return DIFFER
    verdict = "agrees" if judged.unofficial else "verified"  # only an official comparison is called verified
    print(f"{verdict}: all {len(rows)} fields agree with {args.bundle / REPORT_JSON}{caveat}")
    return AGREE


def _write_json(path: Path | None, result: dict[str, Any]) -> None:
    """``--json``: the verdict as strict JSON, written atomically."""
    if path is not None:
        text = json.dumps(result, indent=2, allow_nan=False) + "\n"
        atomic_write(path, lambda tmp: tmp.write_text(text))


def _print_verdict(judged: Judged, recounted: dict[str, Any], checks: Sequence[FileCheck] | None,
                   bundle: Path, qualifies: bool) -> str:
    """The verdict's first line: whether the entry ``qualifies`` (as recounted and as run in integers; an unofficial
    comparison never does), then the integrity of its files; returns the caveat the last line repeats."""
    caveat = ""
    if judged.unofficial:
        caveat = f" under the entry's own score settings {', '.join(judged.unofficial)}: NOT AN OFFICIAL SCORE"
        print(f"NOT AN OFFICIAL SCORE: compared under the entry's own score settings {', '.join(judged.unofficial)} "
              f"(--allow-score-settings); {recounted['gate']['summary']}")
    else:
        print(f"{'QUALIFIES' if qualifies else 'DOES NOT QUALIFY'}: {recounted['gate']['summary']}")
    if checks is None:
        caveat += f" (file integrity unchecked: no {MANIFEST_FILE})"
        print(f"warning: {bundle} has no {MANIFEST_FILE}; the integrity of its files is unchecked", file=sys.stderr)
    else:
        print(f"integrity: all {len(checks)} files match {bundle / MANIFEST_FILE}")
    return caveat


def score_main(argv: Sequence[str]) -> int:
    """``python -m scoring PATH [--data-root PATH] [--examples N] [--device D]``: evaluate, score, print."""
    from scoring.report import format_summary

    parser = argparse.ArgumentParser(prog="python -m scoring",
                                     description="Evaluate and score a finished run dir, bundle or entry.")
    parser.add_argument("path", type=Path, help="run dir, bundle or entry folder")
    _common_arguments(parser)
    args = parser.parse_args(argv)
    with command(CANNOT_LOAD):
        entry, report = _load_and_recount(args.path, args)
    print(f"{entry.meta['model']['name']} on {entry.task} (compress={entry.config['compress']['name']})")
    print(format_summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
