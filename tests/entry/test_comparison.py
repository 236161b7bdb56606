"""verify compares every field of report.json with its recount, and report.md and WRITEUP.md with their rebuilds:
a forged field, a field the recount does not have, or an edited document is never verified."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

from scoring.entry import REPORT_JSON, load_entry, read_report, verify, write_manifest
from scoring.entry.comparison import compare

from .conftest import exit_status


@pytest.fixture(scope="module")
def bundle_and_recount(exported_bundle: Path) -> tuple[dict, dict]:
    """The session bundle's report.json and verify's recount of its entry (made once: the rows are compared)."""
    recount = verify.recount_entry(load_entry(exported_bundle), device="cpu", with_validation=True)
    return read_report(exported_bundle), recount


def _set(path: str, value):
    """An edit of report.json: ``path`` (``a.b`` for a nested field, ``layers[name].field`` for a layer's) set to
    ``value``, or, given a function, to what it makes of the current value."""
    def edit(report: dict) -> None:
        if path.startswith("layers["):
            name, last = path[len("layers["):].split("].")
            where = next(row for row in report["layers"] if row["name"] == name)
        else:
            *parents, last = path.split(".")
            where = report
            for name in parents:
                where = where[name]
        where[last] = value(where.get(last)) if callable(value) else value
    return edit


# Each a field the old verify never compared (it compared 14 totals and 7 fields per layer).
FORGED = {
    "top1": _set("top1", lambda v: v + 0.01),
    "perplexity": _set("perplexity", 1.5),
    "nll_sum": _set("nll_sum", 0.0),
    "loss": _set("loss", lambda v: v * 0.9),
    "gate.summary": _set("gate.summary", "gate PASSED: top-1 359/360 = 99.7222% (needs >= 95.00%)"),
    "validation": _set("validation", {"split": "val", "correct": 99, "total": 100}),
    "score_params_term": _set("score_params_term", lambda v: v / 2),
    "score_ops_term": _set("score_ops_term", lambda v: v / 2),
    "model": _set("model", "resnet50"),
    "compress": _set("compress", "none"),
    "seed": _set("seed", 1),
    "split": _set("split", "val"),
    "example": _set("example", "token"),
    "project_rules.bias width": _set("project_rules.bias width", "biases are free"),
    "project_rules.free lunch": _set("project_rules.free lunch", "every op after the first is free"),
    "note": _set("note", "hand-checked by the organizers"),
    "freebie": _set("freebie", 0),  # 0 for false: not the same JSON value
    "layers[conv2.0].type": _set("layers[conv2.0].type", "Identity"),
    "layers[conv2.0].note": _set("layers[conv2.0].note", "free"),
    "layers[conv1.1].input_bits": _set("layers[conv1.1].input_bits", 1),
}


def test_the_untouched_report_agrees_in_every_field(bundle_and_recount):
    report, recount = bundle_and_recount
    rows = compare(report, recount)
    assert all(row.close for row in rows)
    # format_version is the reader's; every other field of report.json has its row.
    assert {row.field.split(".")[0].split("[")[0] for row in rows} == set(report) - {"format_version"}


@pytest.mark.parametrize("field", FORGED)
def test_each_forged_field_differs(bundle_and_recount, field):
    report, recount = bundle_and_recount
    forged = copy.deepcopy(report)
    FORGED[field](forged)
    assert [row.field for row in compare(forged, recount) if not row.close] == [field]


def test_a_field_the_report_lacks_differs(bundle_and_recount):
    report, recount = bundle_and_recount
    lacking = {key: value for key, value in report.items() if key != "score_ops_term"}
    assert [(row.field, repr(row.reported)) for row in compare(lacking, recount) if not row.close] == [
        ("score_ops_term", "absent")]


@pytest.fixture
def copied(exported_bundle: Path, tmp_path: Path) -> Path:
    bundle = tmp_path / "bundle"
    shutil.copytree(exported_bundle, bundle)
    return bundle


@pytest.mark.parametrize("name, edit, field", [
    (REPORT_JSON, lambda text: text.replace('"seed": 0', '"seed": 0, "reviewed": true'), "reviewed"),
    ("report.md", lambda text: text.replace("params", "parameters", 1), "report.md"),
    ("WRITEUP.md", lambda text: text.replace("_To write:", "Trained on the test set.", 1), "WRITEUP.md"),
    ("WRITEUP.md", None, "WRITEUP.md"),  # removed
], ids=["unknown-field", "report-md", "writeup-md", "writeup-removed"])
def test_verify_does_not_verify_a_forged_field_or_document(copied, capsys, name, edit, field):
    path = copied / name
    if edit is None:
        path.unlink()
    else:
        path.write_text(edit(path.read_text()))
    write_manifest(copied)  # resealed, as a forger would
    assert verify.main([str(copied), "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines() if line.endswith("DIFFERS")] == [field]
    assert out.splitlines()[-1].startswith("NOT VERIFIED: 1 of ")


def test_a_report_with_the_runs_own_record_is_refused(copied, capsys):
    report = json.loads((copied / REPORT_JSON).read_text())
    (copied / REPORT_JSON).write_text(json.dumps({**report, "allocation": {"layers": {}}}))
    write_manifest(copied)
    assert exit_status(verify.main, [str(copied), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {copied / REPORT_JSON} holds allocation, the run's own "
                                                   "record, which no recount can check;")
