"""The bundle's SHA256SUMS: readable by ``sha256sum -c``, checked first by verify, file by file."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from scoring.entry import ENTRY_JSON, MANIFEST_FILE, EntryError, check_manifest, verify, write_manifest
from scoring.entry.packed import PACKED_FILE
from tests.conftest import HANG

from .conftest import exit_status


def sha256sum_check(bundle: Path) -> subprocess.CompletedProcess:
    """``sha256sum -c --strict SHA256SUMS`` run inside the bundle (coreutils: required, never skipped)."""
    program = shutil.which("sha256sum")
    assert program, "sha256sum (GNU coreutils) is required by this test"
    return subprocess.run([program, "-c", "--strict", MANIFEST_FILE], cwd=bundle, capture_output=True, text=True,
                          timeout=HANG)


def statuses(out: str) -> dict[str, str]:
    """The file table printed by verify, as {path: status} (cells are two or more spaces apart)."""
    lines = out.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("file ")))
    rows = [re.split(r" {2,}", line.strip()) for line in lines[header + 1:-1]]
    return {row[0]: row[-1] for row in rows}


@pytest.fixture
def never_recounted(monkeypatch):
    """verify must stop at the manifest: recounting an altered bundle would prove nothing."""
    def recount(*args, **kwargs):
        raise AssertionError("recount ran on a bundle that does not match its manifest")
    monkeypatch.setattr(verify, "recount_entry", recount)


def test_manifest_lists_every_file_and_sha256sum_accepts_it(bundle):
    lines = (bundle / MANIFEST_FILE).read_text().splitlines()
    assert [line.split("  ", 1)[1] for line in lines] == [
        "WRITEUP.md", f"entry/{ENTRY_JSON}", f"entry/{PACKED_FILE}", "report.json", "report.md"]
    assert all(re.fullmatch(r"[0-9a-f]{64}  \S+", line) for line in lines)
    done = sha256sum_check(bundle)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count(": OK\n") == 5
    assert [check.status for check in check_manifest(bundle)] == ["ok"] * 5


def edit_one_byte(path: Path) -> None:
    """Change one digit of the file: ``"examples": 256`` becomes ``"examples": 556`` (still valid JSON)."""
    data = path.read_bytes()
    at = data.index(b'"examples": 256') + len(b'"examples": ')
    path.write_bytes(data[:at] + b"5" + data[at + 1:])


def move_away(path: Path) -> None:
    path.rename(path.parent.parent / f"moved-{path.name}")


def symlink_to_a_copy(path: Path) -> None:
    """Same content, but a link: it could point anywhere, so a bundle holds plain files only."""
    copy = path.parent.parent / f"copy-{path.name}"
    shutil.copy2(path, copy)
    path.unlink()
    path.symlink_to(copy)


# sha256sum -c checks listed files only, through links: verify is stricter on unlisted files and links.
@pytest.mark.parametrize("alter, name, status, sha256sum_fails", [
    (lambda b: edit_one_byte(b / "entry" / ENTRY_JSON), f"entry/{ENTRY_JSON}", "CHANGED", True),
    (lambda b: move_away(b / "report.md"), "report.md", "MISSING", True),
    (lambda b: (b / "notes.txt").write_text("stray"), "notes.txt", "NOT LISTED", False),
    (lambda b: (b / "entry" / ".DS_Store").write_bytes(b"\0"), "entry/.DS_Store", "NOT LISTED", False),
    (lambda b: symlink_to_a_copy(b / "WRITEUP.md"), "WRITEUP.md", "NOT A PLAIN FILE", False),
], ids=["changed", "missing", "stray", "hidden-stray", "symlink"])
def test_verify_names_each_file_that_differs_and_exits_1(bundle, capsys, never_recounted, alter, name, status,
                                                         sha256sum_fails):
    alter(bundle)
    assert verify.main([str(bundle), "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    table = statuses(out)
    assert table.pop(name) == status
    assert set(table.values()) == {"ok"}  # every other file is listed, and found intact
    assert out.splitlines()[-1].startswith(f"NOT VERIFIED: 1 of {len(table) + 1} files differ from "
                                           f"{bundle / MANIFEST_FILE}")
    assert (sha256sum_check(bundle).returncode != 0) == sha256sum_fails


def test_several_problems_are_all_listed(bundle, capsys, never_recounted):
    edit_one_byte(bundle / "entry" / ENTRY_JSON)
    (bundle / "report.json").unlink()  # the table, not "has no report.json": the manifest is checked first
    (bundle / "extra.bin").write_bytes(b"x")
    assert verify.main([str(bundle), "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert {name: status for name, status in statuses(out).items() if status != "ok"} == {
        f"entry/{ENTRY_JSON}": "CHANGED", "report.json": "MISSING", "extra.bin": "NOT LISTED"}
    assert "NOT VERIFIED: 3 of 6 files differ" in out.splitlines()[-1]


@pytest.mark.parametrize("line", [
    f"{'0' * 64}  ../outside.txt",
    f"{'0' * 64}  /etc/passwd",
    f"{'0' * 64}  ./report.json",
    "not a checksum line",
])
def test_malformed_manifest_cannot_be_checked_exit_2(bundle, capsys, never_recounted, line):
    with open(bundle / MANIFEST_FILE, "a") as manifest:
        manifest.write(line + "\n")
    assert exit_status(verify.main, [str(bundle), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert f"{MANIFEST_FILE} line 6 is not '<sha256> <relative path>'" in err  # one line: spaces collapsed


def test_bundle_without_manifest_is_refused_unless_allowed(bundle, capsys):
    (bundle / MANIFEST_FILE).unlink()  # a bundle exported before manifests existed
    assert check_manifest(bundle) is None
    assert exit_status(verify.main, [str(bundle), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"has no {MANIFEST_FILE}" in err and "--force" in err and "--allow-no-manifest" in err

    assert verify.main([str(bundle), "--device", "cpu", "--allow-no-manifest"]) == 0
    out, err = capsys.readouterr()
    assert err == f"warning: {bundle} has no {MANIFEST_FILE}; the integrity of its files is unchecked\n"
    assert re.fullmatch(r"verified: all \d+ fields agree with .*report\.json \(file integrity unchecked: no "
                        r"SHA256SUMS\)", out.splitlines()[-1])


def test_a_present_manifest_is_checked_even_when_its_absence_is_allowed(bundle, capsys, never_recounted):
    (bundle / "notes.txt").write_text("stray")
    assert verify.main([str(bundle), "--device", "cpu", "--allow-no-manifest"]) == 1
    assert statuses(capsys.readouterr().out)["notes.txt"] == "NOT LISTED"


def test_verify_of_a_missing_folder_says_so(tmp_path, capsys):
    assert exit_status(verify.main, [str(tmp_path / "nowhere"), "--device", "cpu"]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nowhere'} does not exist\n"


def test_write_manifest_refuses_what_sha256sum_would_escape(tmp_path):
    (tmp_path / "a\\b").write_text("x")
    with pytest.raises(EntryError, match="must not contain backslashes or newlines"):
        write_manifest(tmp_path)
    assert not (tmp_path / MANIFEST_FILE).exists()
    (tmp_path / "a\\b").unlink()
    (tmp_path / "fine.txt").write_text("x")
    write_manifest(tmp_path)
    assert sha256sum_check(tmp_path).returncode == 0
