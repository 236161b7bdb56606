"""The scorer's command line says what is wrong with what was typed, in one line: a path that does not exist, a
device this machine lacks, more examples than the test split holds; ``--help`` documents every mode, and how to
run verify so that a bundle's folder is never imported from."""
from __future__ import annotations

import pytest
import torch

from scoring.__main__ import main
from scoring.entry import verify

from .conftest import exit_status


def test_a_path_that_does_not_exist_is_named_in_one_line(capsys, tmp_path):
    missing = tmp_path / "nonexistent"
    assert exit_status(main, [str(missing)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == (f"error: {missing} does not exist ; fix: pass a run dir, bundle or entry folder, "
                                 "`verify BUNDLE`, `measure DIR`, or --model NAME --task TASK (micronet-score --help)\n")


@pytest.mark.parametrize("argv, status", [(["--help"], 0), (["-h"], 0), ([], 2)])
def test_help_documents_every_mode(capsys, argv, status):
    assert exit_status(main, argv) == status
    out, err = capsys.readouterr()
    text = out if status == 0 else err  # asked for: stdout; no arguments at all: the same overview on stderr
    assert (out if status else err) == ""
    for mode in ("micronet-score PATH", "micronet-score verify BUNDLE", "micronet-score measure DIR",
                 "micronet-score --model NAME --task TASK", "score an entry:", "verify an exported bundle",
                 "measure entries", "count a registered architecture"):
        assert mode in text
    words = " ".join(text.split())
    assert "`python -P -m scoring verify BUNDLE` (Python 3.11+), never as plain `python -m scoring` inside" in words


def _missing_device() -> str:
    """A CUDA device this machine does not have (cuda:7 but on a machine with 8 or more)."""
    return f"cuda:{max(7, torch.cuda.device_count())}"


@pytest.mark.parametrize("command", [verify.main, verify.score_main], ids=["verify", "score"])
def test_a_device_this_machine_lacks_is_named_as_such(exported_bundle, capsys, command):
    device, count = _missing_device(), torch.cuda.device_count() if torch.cuda.is_available() else 0
    has = f"{count} CUDA device(s): cuda:0..cuda:{count - 1}" if count else "no CUDA device"
    assert exit_status(command, [str(exported_bundle), "--device", device]) == 2
    assert capsys.readouterr().err == (f"error: --device {device} is not available: this machine has {has} ; fix: "
                                       "pass --device cpu\n")


def test_a_device_name_that_is_no_device_is_refused(exported_bundle, capsys):
    assert exit_status(verify.main, [str(exported_bundle), "--device", "tpu"]) == 2
    assert capsys.readouterr().err == "error: --device 'tpu' is not a device ; fix: pass auto, cpu, cuda or cuda:N\n"


def test_more_examples_than_the_test_split_holds_are_refused(exported_bundle, capsys):
    """Used to be capped at the 360 test images without a word, then reported NOT VERIFIED."""
    assert exit_status(verify.main, [str(exported_bundle), "--device", "cpu", "--examples", str(10**9)]) == 2
    out, err = capsys.readouterr()
    assert "verified" not in out.lower()
    assert err == ("error: --examples 1,000,000,000 asks for more examples than the 360 of the test split of task "
                   "digits ; fix: pass --examples 360 or fewer\n")


def test_verify_started_with_the_bundle_on_the_import_path_says_how_to_run_it(exported_bundle, capsys, monkeypatch):
    """What `cd BUNDLE && python -m scoring verify .` does: the bundle's folder first on sys.path."""
    monkeypatch.syspath_prepend(str(exported_bundle))
    assert verify.main([str(exported_bundle), "--device", "cpu"]) == 0
    assert capsys.readouterr().err == (f"warning: Python imports from {exported_bundle}, inside the bundle; run "
                                       "verify as `micronet-score verify BUNDLE` or `python -P -m scoring verify "
                                       "BUNDLE` (Python 3.11+), so that no module a bundle holds can run\n")
