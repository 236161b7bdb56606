"""Export a finished run as an entry bundle: ``python -m scoring.export RUN_DIR --out BUNDLE``.

A bundle has the layout of a run dir, reduced to what an organizer needs::

    BUNDLE/entry/model.packed        weights at the widths the scorer counts (``--format float``: the run's
                                     model.safetensors; see :mod:`scoring.entry.packed`)
    BUNDLE/entry/entry.json          resolved config, compression state, sha256 of the weights (and their layout)
    BUNDLE/report.json, report.md    the run's evaluation and count
    BUNDLE/WRITEUP.md                the write-up skeleton: metric calculation in full, how to reproduce
    BUNDLE/SHA256SUMS                sha256 of every other file (``sha256sum -c SHA256SUMS`` checks it), written last

The manifest records the bundle as exported, so damage or edits on the way to the organizer show:
``python -m scoring verify`` checks it before anything else and refuses a bundle with a changed, missing
or unlisted file. (It is a checksum list, not a signature: whoever edits a bundle can rewrite it too, which
is why verify also re-evaluates and recounts everything.)

The packed weights are rebuilt and compared with the run's entry before the bundle is written: every executed
weight and every other tensor must come back exactly. The command prints the parameter bytes the scorer counts
beside the bytes on disk, and what makes the difference.

The bundle is assembled in a temporary folder next to ``--out`` and renamed into place, so a failure
leaves nothing half-written; an existing bundle is replaced only with ``--force``. This module may import data/,
models/, compress/, conf and scoring core, never train/.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

from scoring.challenge import PERPLEXITY, challenge_task
from scoring.entry.boundary import command
from scoring.entry.bundle import ENTRY_JSON, WEIGHTS_FILE, Entry, build_model_from_entry, find_entry_dir, load_entry, \
    save_entry
from scoring.entry.files import EntryError
from scoring.entry.manifest import write_manifest
from scoring.entry.packed import PACKED_FILE, StorageSummary, check_round_trip, storage_summary
from scoring.entry.runfiles import REPORT_JSON, REPORT_MD, read_report
from scoring.report import layer_table, rules_text, totals_text

WRITEUP_FILE = "WRITEUP.md"


def _train_command(run_dir: Path, config: dict[str, Any]) -> str:
    """The command that trains this entry again.

    Hydra records the run's command-line overrides in ``.hydra/overrides.yaml``; the ``hydra.*`` ones only
    say where outputs go. Without that file the config group choices and the seed are given, which
    reproduce the run when no other value was overridden (the full resolved config is in entry.json).
    """
    from omegaconf import OmegaConf

    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    if overrides_file.is_file():
        overrides = [o for o in OmegaConf.to_container(OmegaConf.load(overrides_file))
                     if not o.lstrip("+~").startswith("hydra.")]
    else:
        overrides = [f"task={config['task']['name']}", f"model={config['model']['name']}",
                     f"compress={config['compress']['name']}", f"seed={config['seed']}",
                     "  # from the config's group choices (no .hydra/overrides.yaml): check entry/entry.json"]
    return " ".join(["python train/run.py", *overrides])


def _result(report: dict[str, Any]) -> str:
    """The Result section: the verdict, on what it was decided, and whether the entry qualifies."""
    if challenge_task(report["task"]).metric == PERPLEXITY:
        basis = (f"Test stream, {report['total']:,} predicted tokens (read on-line, the state carried): "
                 f"{report['gate']['summary']}. The gate is decided on the exact NLL sum, never on a rounded "
                 "perplexity.")
    else:
        basis = (f"Test set, {report['total']:,} examples: {report['gate']['summary']}. The gate is decided on the "
                 "integer count of correct predictions, never on a rounded percentage.")
    return basis if report.get("gate_passed") else basis + " **This run fails its gate: it does not qualify.**"


def writeup(entry: Entry, report: dict[str, Any], train_command: str) -> str:
    """The WRITEUP.md skeleton: result, the metric calculation in full, reproduction and verification."""
    config = entry.config
    base = report["baseline"]
    data_flag = " --data-root PATH" if config["data"].get("root") else ""
    sections = [
        f"# MicroNet entry: {report['task']}, {entry.meta['model']['name']}, compress={config['compress']['name']}",
        "## Method\n\n_To write: architecture, training recipe, compression stages and why they were chosen, with "
        "citations of the published methods used. Training used only the task's own training data._",
        f"## Result\n\n{_result(report)}",
        "## Score\n\n"
        "    score = params / baseline_params + ops / baseline_ops\n"
        f"          = {report['params']:.6g} / {base['params']:.6g} + {report['ops']:.6g} / {base['ops']:.6g}\n"
        f"          = {report['score_params_term']:.6g} + {report['score_ops_term']:.6g}\n"
        f"          = {report['score']:.6g}\n\n"
        f"Baseline: {base['model']} (the organizers' constants for {report['task']}). Parameters and operations are "
        "in 32-bit equivalents: a parameter stored in b bits counts b/32 (sparse tensors: nonzeros × bits plus a "
        "1-bit mask over the full tensor; batch norm folded into the preceding layer); an operation counts the "
        "width of its widest input / 32; additions count at the accumulator width; ops are averaged per "
        f"{report.get('example', 'example')} over the test inputs given to the scorer"
        + (" (tokens fed one at a time, the state carried)" if report.get("example") == "token" else "") + ".\n\n"
        + "\n".join(f"    {line}" for line in totals_text(report).splitlines()),
        "## Per-layer count\n\n" + layer_table(report["layers"]),
        "## Rules used\n\nThe official rules of the challenge's scoring page and reference calculator, as tabulated "
        "in `scoring/rules.py`, and these project rules for ops the official page does not cover:\n\n"
        + rules_text(report),
        f"## How to reproduce\n\n    pip install -e .\n    {train_command}\n\n"
        "The resolved config of the run (every value, defaults included) is in `entry/entry.json`.",
        f"## How to verify\n\n    python -m scoring verify BUNDLE{data_flag}\n\n"
        "first checks every file against `SHA256SUMS` (a changed, missing or unlisted file fails; "
        "`sha256sum -c SHA256SUMS` inside the bundle checks the same), then checks the entry against the kit "
        "(its task as the kit defines it, the official score settings), "
        "rebuilds the model from `entry/entry.json`, loads `entry/model.safetensors` (never unpickled), evaluates "
        "it on the test set, recounts it and compares with `report.json`: exact correct/total and gate verdict; "
        "params, ops and score to 1e-9 relative; every layer's counts. Exit status 0 when all agree.",
    ]
    return "\n\n".join(sections) + "\n"


def export(run_dir: Path, out: Path, *, force: bool = False, allow_gate_failure: bool = False,
           packed: bool = True) -> Path:
    """Write the bundle of ``run_dir`` to ``out`` and return it; a run that fails its gate is no entry, and is
    exported only with ``allow_gate_failure`` (to inspect or share it: its WRITEUP.md says it does not qualify).
    ``packed`` writes the weights packed (:mod:`scoring.entry.packed`), else the run's safetensors file as is."""
    source = find_entry_dir(run_dir)
    if source != run_dir / "entry":
        raise EntryError(f"{run_dir} is an entry folder, not a run dir; pass the run dir that holds entry/ "
                         "and report.json")
    entry = load_entry(source)  # refuses damaged or replaced weights before anything is copied
    report = read_report(run_dir)
    if report.get("gate_passed") is not True and not allow_gate_failure:
        summary = (report.get("gate") or {}).get("summary", "no gate verdict in report.json")
        raise EntryError(f"{run_dir} does not qualify ({summary}); an entry must pass its gate: train further, or "
                         "pass --allow-gate-failure to export it anyway for inspection")
    if out.resolve() == run_dir.resolve() or out.resolve() in run_dir.resolve().parents:
        raise EntryError(f"--out {out} would contain the run dir itself; choose a folder outside {run_dir}")
    if out.exists() and not force:
        raise EntryError(f"{out} already exists; choose another --out or pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    replaced = staging.with_name(staging.name + ".old")
    try:
        if packed:
            write_packed(entry, staging / "entry")
        else:
            (staging / "entry").mkdir()
            for name in (WEIGHTS_FILE, ENTRY_JSON):
                shutil.copy2(source / name, staging / "entry" / name)
        for name in (REPORT_JSON, REPORT_MD):
            if (run_dir / name).is_file():
                shutil.copy2(run_dir / name, staging / name)
        (staging / WRITEUP_FILE).write_text(writeup(entry, report, _train_command(run_dir, entry.config)))
        load_entry(staging)  # the copy must load as the source did
        write_manifest(staging)  # last: it covers every file above
        if out.exists():
            out.rename(replaced)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(replaced, ignore_errors=True)
    return out


def write_packed(entry: Entry, directory: Path) -> None:
    """Write ``entry`` into ``directory`` with its weights packed, after checking that the packed weights rebuild
    exactly the model ``entry`` holds (:func:`scoring.entry.packed.check_round_trip`)."""
    model = build_model_from_entry(entry)
    save_entry(directory, model, config=entry.config, packed=True)
    check_round_trip(model, build_model_from_entry(load_entry(directory)))


def bundle_storage(bundle: Path) -> StorageSummary | None:
    """Counted parameter bytes beside the bytes of the bundle's packed weights file (None: not packed)."""
    entry = load_entry(bundle)
    if entry.meta["weights"]["file"] != PACKED_FILE:
        return None
    size = (find_entry_dir(bundle) / PACKED_FILE).stat().st_size
    return storage_summary(build_model_from_entry(entry), entry.meta["weights"]["tensors"], size,
                           read_report(bundle)["param_bits"])


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m scoring.export RUN_DIR --out BUNDLE [--force] [--allow-gate-failure] [--format F]``."""
    parser = argparse.ArgumentParser(prog="python -m scoring.export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="finished run dir (holds entry/ and report.json)")
    parser.add_argument("--out", type=Path, required=True, help="bundle folder to create")
    parser.add_argument("--force", action="store_true", help="replace an existing bundle")
    parser.add_argument("--allow-gate-failure", action="store_true",
                        help="export a run that fails its gate (it does not qualify; for inspection)")
    parser.add_argument("--format", choices=("packed", "float"), default="packed",
                        help="weights packed at the counted widths (default), or the run's float safetensors file")
    args = parser.parse_args(argv)
    with command():
        bundle = export(args.run_dir, args.out, force=args.force, allow_gate_failure=args.allow_gate_failure,
                        packed=args.format == "packed")
        storage = bundle_storage(bundle)
    if storage is not None:
        print(storage.describe())
    print(f"bundle written to {bundle}; check it with: python -m scoring verify {bundle}")
    return 0
