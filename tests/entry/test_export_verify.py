"""Export a run dir as a bundle, verify it, and refuse edited reports and planted pickles."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from scoring.entry import ENTRY_JSON, MANIFEST_FILE, export, load_entry, verify, write_manifest
from scoring.entry.packed import PACKED_FILE
from tests.conftest import HANG

from .conftest import exit_status, plant_pickle

REPO = Path(__file__).resolve().parents[2]


def layer(report: dict, name: str) -> dict:
    return next(row for row in report["layers"] if row["name"] == name)


def edit_report(bundle: Path, edit) -> None:
    """Edit report.json and rewrite SHA256SUMS to match, as someone who knows the format would: the recount
    must still catch it."""
    path = bundle / "report.json"
    report = json.loads(path.read_text())
    edit(report)
    path.write_text(json.dumps(report))
    write_manifest(bundle)


def test_bundle_holds_entry_reports_and_writeup(bundle, run_dir):
    assert sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*")) == [
        MANIFEST_FILE, "WRITEUP.md", "entry", f"entry/{ENTRY_JSON}", f"entry/{PACKED_FILE}", "report.json",
        "report.md"]
    assert (bundle / "report.json").read_text() == (run_dir / "report.json").read_text()
    report = json.loads((bundle / "report.json").read_text())
    writeup = (bundle / "WRITEUP.md").read_text()
    for layer in report["layers"]:  # the per-layer table
        assert f"| {layer['name']} | {layer['type']} |" in writeup
    # The score split into its two terms, with the numbers that make them.
    assert f"= {report['score_params_term']:.6g} + {report['score_ops_term']:.6g}" in writeup
    assert f"{report['params']:.6g} / {report['baseline']['params']:.6g}" in writeup
    assert report["gate"]["summary"] in writeup
    for rule in report["project_rules"]:
        assert f"`{rule}`" in writeup
    # No .hydra/overrides.yaml in this run dir: the command is rebuilt from the config's choices.
    assert "python train/run.py task=digits model=digits_cnn compress=prune_q4_test seed=0" in writeup
    assert "python -m scoring verify BUNDLE" in writeup and "`sha256sum -c SHA256SUMS`" in writeup
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".bundle")]  # no staging left


def test_train_command_comes_from_hydra_overrides(run_dir, tmp_path):
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "overrides.yaml").write_text(
        "- task=digits\n- compress=prune_q8\n- train.epochs=3\n- hydra.run.dir=/tmp/somewhere\n")
    assert export.main([str(run_dir), "--out", str(tmp_path / "b"), "--allow-gate-failure"]) == 0
    assert "    python train/run.py task=digits compress=prune_q8 train.epochs=3\n" in \
        (tmp_path / "b" / "WRITEUP.md").read_text()


def test_existing_bundle_needs_force(bundle, run_dir, capsys):
    (bundle / "WRITEUP.md").write_text("old")
    assert exit_status(export.main, [str(run_dir), "--out", str(bundle), "--allow-gate-failure"]) == 2
    assert "already exists; choose another --out or pass --force" in capsys.readouterr().err
    assert (bundle / "WRITEUP.md").read_text() == "old"
    assert export.main([str(run_dir), "--out", str(bundle), "--force", "--allow-gate-failure"]) == 0
    assert (bundle / "WRITEUP.md").read_text().startswith("# MicroNet entry: digits")


def test_failed_export_leaves_nothing(run_dir, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export, "writeup", broken)
    with pytest.raises(OSError, match="disk full"):
        export.export(run_dir, tmp_path / "out" / "bundle", allow_gate_failure=True)
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("remove, expected", [
    ("entry", r"holds no entry\.json .*python train/run\.py"),
    ("report.json", r"has no report\.json; .*python train/run\.py"),
])
def test_unfinished_run_dir_says_what_to_run(run_dir, tmp_path, capsys, remove, expected):
    target = run_dir / remove
    if target.is_dir():
        for child in target.iterdir():
            child.unlink()
        target.rmdir()
    else:
        target.unlink()
    assert exit_status(export.main, [str(run_dir), "--out", str(tmp_path / "b"), "--allow-gate-failure"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert re.search(expected, err)
    assert not (tmp_path / "b").exists()


def test_a_run_that_fails_its_gate_is_not_exported_unless_asked_and_its_writeup_says_so(run_dir, tmp_path, capsys):
    summary = json.loads((run_dir / "report.json").read_text())["gate"]["summary"]
    assert summary.startswith("gate FAILED")
    assert exit_status(export.main, [str(run_dir), "--out", str(tmp_path / "b")]) == 2
    assert capsys.readouterr().err == (f"error: {run_dir} does not qualify ({summary}); an entry must pass its gate: "
                                       "train further, or pass --allow-gate-failure to export it anyway for "
                                       "inspection\n")
    assert not (tmp_path / "b").exists()
    assert export.main([str(run_dir), "--out", str(tmp_path / "b"), "--allow-gate-failure"]) == 0
    assert "**This run fails its gate: it does not qualify.**" in (tmp_path / "b" / "WRITEUP.md").read_text()


def test_verify_accepts_an_untouched_bundle(bundle, capsys):
    assert verify.main([str(bundle), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "verified: all" in out and "DIFFERS" not in out
    report = json.loads((bundle / "report.json").read_text())
    # The first line says whether the entry qualifies, as recounted: this untrained one does not.
    assert out.splitlines()[0] == f"DOES NOT QUALIFY: {report['gate']['summary']}"
    assert out.splitlines()[1] == f"integrity: all 5 files match {bundle / MANIFEST_FILE}"
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[3:-1]}
    assert rows["correct"] == [str(report["correct"]), str(report["correct"]), "ok"]
    assert rows["ops"] == [repr(report["ops"]), repr(report["ops"]), "ok"]
    assert not [name for name in rows if name.startswith("layers[")]  # agreeing layer fields are not listed
    # 14 totals, 7 fields per layer, and the integer execution's gate verdict (its layers are integer).
    assert out.splitlines()[-1] == (f"verified: all {7 * len(report['layers']) + 14 + 1} fields agree with "
                                    f"{bundle / 'report.json'}")


@pytest.mark.parametrize("fields, edit", [
    (["ops"], lambda r: r.update(ops=r["ops"] * 0.999)),
    (["correct"], lambda r: r.update(correct=r["correct"] + 1)),
    (["score"], lambda r: r.update(score=r["score"] * (1 - 1e-8))),
    # A report claiming the gate is contradicted by the recount and by the integer execution.
    (["gate_passed", "integer.gate_passed"], lambda r: r.update(gate_passed=not r["gate_passed"])),
    (["layers[conv2.0].sparsity"], lambda r: layer(r, "conv2.0").update(sparsity=0.9)),
])
def test_verify_refuses_an_edited_report_with_a_diff_table(bundle, capsys, fields, edit):
    edit_report(bundle, edit)
    assert verify.main([str(bundle), "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()[2:]]  # after the verdict and integrity lines (resealed)
    assert rows[0] == ["field", "reported", "recounted", "status"]
    differing = [row for row in rows[1:-1] if row[-1] == "DIFFERS"]
    assert [row[0] for row in differing] == fields
    assert out.splitlines()[-1].startswith(f"NOT VERIFIED: {len(fields)} of ")


def test_verify_refuses_a_planted_pickle_and_runs_no_code(bundle, tmp_path, capsys):
    marker = tmp_path / "marker"
    plant_pickle(bundle / "entry" / PACKED_FILE, marker, torch_archive=True)
    assert verify.main([str(bundle), "--device", "cpu"]) == 1  # the manifest catches the swap first
    assert f"entry/{PACKED_FILE}" in capsys.readouterr().out
    write_manifest(bundle)  # an attacker who rewrites SHA256SUMS too: the loader refuses the pickle itself
    assert exit_status(verify.main, [str(bundle), "--device", "cpu"]) == 2
    assert "is not a packed weights file" in capsys.readouterr().err
    assert not marker.exists()


def test_scoring_cli_refuses_a_planted_pickle_in_a_fresh_process(bundle, tmp_path):
    marker = tmp_path / "marker"
    plant_pickle(bundle / "entry" / PACKED_FILE, marker, torch_archive=False)
    write_manifest(bundle)
    done = subprocess.run([sys.executable, "-m", "scoring", "verify", str(bundle), "--device", "cpu"], cwd=REPO,
                          capture_output=True, text=True, timeout=HANG)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: ") and "is not a packed weights file" in done.stderr
    assert "Traceback" not in done.stderr
    assert not marker.exists()


def test_score_main_prints_the_summary(bundle, capsys):
    assert verify.score_main([str(bundle), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    report = json.loads((bundle / "report.json").read_text())
    assert out.startswith("digits_cnn on digits (compress=prune_q4_test)")
    assert report["gate"]["summary"] in out
    assert f"score  {report['score']:.6f}" in out


def test_verify_reads_the_entry_of_a_run_dir_too(run_dir, capsys):
    assert load_entry(run_dir).task == "digits"
    assert verify.main([str(run_dir), "--device", "cpu", "--allow-no-manifest"]) == 0  # run dirs have no manifest
    out, err = capsys.readouterr()
    assert out.splitlines()[-1].endswith("(file integrity unchecked: no SHA256SUMS)")
    assert err == f"warning: {run_dir} has no SHA256SUMS; the integrity of its files is unchecked\n"
