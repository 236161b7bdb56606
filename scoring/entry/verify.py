"""Reproduce an entry's numbers: ``micronet-score verify BUNDLE`` and ``python -m scoring PATH``.

``verify`` is what an organizer runs on a contestant's bundle, as the console script or ``python -P -m scoring
verify BUNDLE`` (Python 3.11+): never plain ``python -m scoring`` with the bundle as working folder, which puts that
folder first on the import path, so that a planted ``argparse.py`` would run before any of this code. It rebuilds
the model from ``entry/entry.json`` (registry architecture + compression structure), loads ``entry/model.packed``
or ``entry/model.safetensors`` (never unpickled; see :mod:`scoring.entry.bundle`), evaluates it on the test set (and
the validation split, when the run held one out) of the kit's own definition of the task, recounts it with the
official score settings, runs it in integers where it is quantized (:mod:`scoring.entry.integer`: its gate verdict
is one more field), and compares every field of the bundle's ``report.json`` with its recount
(:mod:`scoring.entry.comparison`):

* counts, verdicts, settings, names and texts (the gate's summary, the project rules): exactly;
* params, ops, mults, adds, score and its terms, top-1: to 1e-9 relative; the NLL sums and mean losses of a
  float32 evaluation to 1e-6 (a perplexity to what that makes of it);
* the per-layer table, every field of every layer, the layers by name and in order;
* a field the recount lacks differs; a run's own record that no recount can check (``runfiles.RUN_ONLY_FIELDS``:
  the allocate stage's) is refused — the exporter leaves it out of a bundle.

When all agree, ``report.md`` and ``WRITEUP.md`` are rebuilt from the report and must be the bundle's (WRITEUP.md's
training command, which comes from the run's .hydra/overrides.yaml, is taken as written).

Before any of that it checks that the bundle holds the files of its layout and nothing else
(:data:`~scoring.entry.export.BUNDLE_FILES`: any other file or folder is refused), then its ``SHA256SUMS``
(written last by the exporter): a changed, missing or unlisted file stops verification with a table of file /
manifest / on disk / status. A folder without a manifest (a run dir, a bundle exported before manifests existed)
is refused unless ``--allow-no-manifest`` is given; then a warning, and the final line, say that the files'
integrity is unchecked. A ``--device`` this machine lacks is refused first, and ``--examples`` beyond the test
split before the evaluation. ``--json PATH`` also writes the verdict as JSON.

Then, before any data is loaded, the entry is checked against the kit (:mod:`scoring.entry.kit`) and rebuilt once
(:func:`scoring.entry.build_model_from_entry`). Refused, each with one line on stderr and exit status 2:

* a bundle whose files are not what the kit writes: a link, FIFO or device anywhere it is read, a file over its
  size cap, a safetensors header over 4 MiB, folders nested too deep or too many files (:mod:`scoring.entry.files`);
* entry data that is not plain data: not strict JSON (a key twice in one object included), or a string a config
  reader would interpolate (``${...}``);
* an entry of another task: its recorded task differs from ``conf/task/<name>.yaml`` at a key that file defines
  (but the training-only ones: augmentation, training windows), or report.json names another task, baseline or
  gate;
* score settings other than the official ones (``conf/config.yaml``: examples 256, accumulator_bits 32,
  freebie auto), unless ``--allow-score-settings`` is given: the entry is then compared under its own settings,
  the FIRST line of the output names them and says the score is not official, and so does the last line, which
  never reads "verified";
* a model that cannot be rebuilt: an unknown model, a keyword argument the model does not take or one that reads
  files (``checkpoint_path``, ``pretrained*``, ...), a compression state out of range or naming other layers,
  weights that do not fit, quantizers never calibrated, a model that would cost more to run than an entry may
  (:mod:`scoring.entry.cost`); and an entry whose evaluation fails (a missing or damaged dataset, a model that does
  not run on the task's inputs).

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
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from scoring.entry.boundary import USER_ERRORS, command
from scoring.entry.bundle import Entry, build_model_from_entry, entry_storage, load_entry
from scoring.entry.comparison import Row, aligned, compare, document_row, format_table
from scoring.entry.cost import evaluation_failure
from scoring.entry.export import BUNDLE_FILES, VERIFY_COMMAND, WRITEUP_FILE, train_command_in, writeup
from scoring.entry.files import EntryError, atomic_write
from scoring.entry.kit import Judged, accept_accumulator, check_evaluation, judge
from scoring.entry.manifest import MANIFEST_FILE, FileCheck, check_manifest
from scoring.entry.model_report import load_splits, recount, resolve_device, run_record
from scoring.entry.runfiles import REPORT_JSON, REPORT_MD, RUN_ONLY_FIELDS, read_markdown, read_measurement, \
    read_report
from scoring.errors import UserError

if TYPE_CHECKING:
    import torch.nn as nn

    from data.tasks import Task

#: Exit statuses.
AGREE, DIFFER, CANNOT_LOAD = 0, 1, 2


def recount_entry(entry: Entry, *, data_root: str | None = None, examples: int | None = None, device: str = "auto",
                  model: nn.Module | None = None, with_validation: bool = False) -> dict[str, Any]:
    """Evaluate and count ``entry`` (``model``, when it is built already) as ``train/run.py`` did at the end of its
    run; return the report dict, with the run's record of itself (:func:`scoring.entry.model_report.run_record`).

    The task (its data, test split and evaluation) is built from the entry's task config through
    :func:`data.tasks.build_task`, the one definition training uses. ``data_root`` replaces the config's
    ``data.root`` (datasets live elsewhere on the organizer's machine); ``examples`` replaces ``score.examples``,
    and must not exceed what the test split holds. Nothing is downloaded; the validation hold-out of the run is
    rebuilt so the test split is the same, and evaluated with ``with_validation``, as the run did.
    """
    config = entry.config
    check_evaluation(config)
    model = build_model_from_entry(entry) if model is None else model  # its refusals before any data is read
    task, loaders, resolved = load_splits(config, data_root=data_root, device=device)
    model = model.to(resolved)
    score = {**config["score"], "examples": examples or config["score"]["examples"]}
    _check_examples(task, loaders.test, score["examples"], model, given=examples is not None)
    validation = task.evaluate(model, loaders.val, resolved, "val") \
        if with_validation and loaders.val is not None else None
    return recount(model, task, loaders.test, resolved, score, validation=validation, extra=run_record(config))


def _check_examples(task: Task, test: Any, examples: int, model: nn.Module, *, given: bool) -> None:
    """The test split holds the ``examples`` the scorer is to count (it would otherwise count fewer)."""
    import torch

    available = task.score_examples_available(test)
    if available is not None and examples > available:
        asked = f"--examples {examples:,}" if given else f"the entry's score.examples={examples:,}"
        raise UserError(f"{asked} asks for more examples than the {available:,} of the test split of task "
                        f"{task.name}", f"pass --examples {available} or fewer")
    if available is None:  # only the model tells (a language model's warm-up): its scorer inputs, taken now, say
        try:
            task.score_inputs(test, examples, torch.device("cpu"), model)
        except ValueError as err:
            raise UserError(str(err) + (f" (--examples {examples:,} sets score.examples)" if given else "")) \
                from None


def format_manifest_table(checks: Sequence[FileCheck]) -> str:
    """Every file of the bundle as an aligned text table: path, listed and actual sha256 (16 hex digits), status."""
    def short(digest: str | None) -> str:
        return digest[:16] if digest else "-"
    return aligned([("file", "manifest", "on disk", "status")] + [
        (check.path if check.path.isprintable() else ascii(check.path), short(check.listed), short(check.found),
         check.status) for check in checks])


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-root", help="dataset folder on this machine (verify never uses the entry's recorded "
                                            "data.root; python -m scoring PATH defaults to it)")
    parser.add_argument("--examples", type=int,
                        help="test examples run through the scorer (default: score.examples, the official 256 for "
                             "verify)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda | cuda:N")


def _load_and_recount(source: Path | Entry, args: argparse.Namespace, *, model: nn.Module | None = None,
                      with_validation: bool = False) -> tuple[Entry, dict[str, Any]]:
    """Load (unless given an entry) and recount; what only running the entry shows (e.g. a model that does not
    take the task's inputs) is an :class:`EntryError` too."""
    if args.examples is not None and args.examples <= 0:
        raise UserError(f"--examples {args.examples} must be > 0", "omit it to count score.examples")
    try:
        entry = source if isinstance(source, Entry) else load_entry(source)
        return entry, recount_entry(entry, data_root=args.data_root, examples=args.examples, device=args.device,
                                    model=model, with_validation=with_validation)
    except USER_ERRORS:  # a damaged entry, a missing or damaged dataset: their own one line
        raise
    except (ValueError, RuntimeError) as err:
        raise evaluation_failure(err) from None


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
    parser = argparse.ArgumentParser(
        prog="micronet-score verify",
        description="Re-evaluate and recount an entry bundle; compare every field of its report with the recount. "
                    f"Run it as `{VERIFY_COMMAND}` or `python -P -m scoring verify BUNDLE` (Python 3.11+), never as "
                    "plain `python -m scoring` inside the bundle: that imports from the bundle's folder first.")
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
    """The device, the bundle's layout and manifest, the kit's checks, the rebuild, then the recount compared with
    report.json and the documents rebuilt; the exit status."""
    resolve_device(args.device)  # before anything is read
    _warn_if_importing_from(args.bundle)
    checks = check_manifest(args.bundle, layout=BUNDLE_FILES)
    if checks is None and not args.allow_no_manifest:
        raise EntryError(f"{args.bundle} has no {MANIFEST_FILE}, so its files cannot be checked against the "
                         "export; re-export it with `python -m scoring.export RUN_DIR --out BUNDLE --force`, or "
                         "pass --allow-no-manifest to verify a run dir or an older bundle without that check")
    if checks is not None and not _report_integrity(args.bundle / MANIFEST_FILE, checks):
        _write_json(args.json, {"status": DIFFER, "integrity": False})
        return DIFFER  # a bundle altered after export is not recounted: its numbers would prove nothing
    reported = read_report(args.bundle)
    _refuse_run_records(args.bundle, reported)
    entry = load_entry(args.bundle)
    judged = judge(entry, reported, allow_score_settings=args.allow_score_settings)
    from scoring.entry.integer import integer_check

    model = build_model_from_entry(judged.entry)  # every failure to rebuild shows here, before any data is loaded
    recounted = _load_and_recount(judged.entry, args, model=model, with_validation=True)[1]
    judged = accept_accumulator(judged, recounted, args.allow_score_settings)
    integer = integer_check(judged.entry, model, data_root=args.data_root, device=args.device)
    qualifies = recounted["gate_passed"] and (integer is None or integer.gate.passed) and not judged.unofficial
    caveat = _print_verdict(judged, recounted, checks, args.bundle, qualifies)
    # The entry's report says it passes its gate: so must its integer execution.
    rows = compare(reported, recounted) + ([] if integer is None else [
        Row("integer.gate_passed", reported.get("gate_passed"), integer.gate.passed)])
    if all(row.close for row in rows):  # the documents are rebuilt from a report that agrees, and only then
        rows += _document_rows(args.bundle, entry, reported, required=checks is not None)
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


def _warn_if_importing_from(bundle: Path) -> None:
    """Say so when Python imports from inside ``bundle`` (``python -m scoring`` started in it puts it first on the
    import path): too late to stop what ran, but the layout check refuses any module there, and the next run
    should not do it again."""
    inside = [entry for entry in sys.path if Path(entry or ".").resolve().is_relative_to(bundle.resolve())]
    if inside and not sys.flags.safe_path:
        print(f"warning: Python imports from {inside[0] or '.'}, inside the bundle; run verify as "
              f"`{VERIFY_COMMAND}` or `python -P -m scoring verify BUNDLE` (Python 3.11+), so that no module a "
              "bundle holds can run", file=sys.stderr)


def _refuse_run_records(bundle: Path, reported: dict[str, Any]) -> None:
    """A report holding what only the run can make (``runfiles.RUN_ONLY_FIELDS``) is no bundle's report."""
    run_only = [key for key in RUN_ONLY_FIELDS if key in reported]
    if run_only:
        raise EntryError(f"{bundle / REPORT_JSON} holds {', '.join(run_only)}, the run's own record, which no "
                         "recount can check; verify the bundle `python -m scoring.export RUN_DIR --out BUNDLE` makes "
                         "of the run, which leaves it out")


def _document_rows(bundle: Path, entry: Entry, report: dict[str, Any], *, required: bool) -> list[Row]:
    """report.md and WRITEUP.md each compared with its rebuild from ``report`` (report.md with the folder's
    measured.json, as it was written: a run dir may hold one, a bundle never); one that is absent differs when
    ``required`` (a bundle holds both; a run dir has no WRITEUP.md)."""
    from scoring.report import markdown

    rows = []
    for name, rebuild in ((REPORT_MD, lambda text: markdown(report, read_measurement(bundle))),
                          (WRITEUP_FILE, lambda text: writeup(entry, report, train_command_in(text) or ""))):
        text = read_markdown(bundle, name)
        if text is not None or required:
            rows.append(document_row(name, text, rebuild(text or "")))
    return rows


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

    parser = argparse.ArgumentParser(prog="micronet-score",
                                     description="Evaluate and score a finished run dir, bundle or entry.")
    parser.add_argument("path", type=Path, help="run dir, bundle or entry folder")
    _common_arguments(parser)
    args = parser.parse_args(argv)
    with command(CANNOT_LOAD):
        resolve_device(args.device)
        entry, report = _load_and_recount(args.path, args)
    print(f"{entry.meta['model']['name']} on {entry.task} (compress={entry.config['compress']['name']})")
    print(format_summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
