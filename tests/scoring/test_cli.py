"""`python -m scoring`: the architecture mode and the dispatch to the verifier."""
from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest
import torch

from models import create_model
from scoring import count_model
from scoring.__main__ import main


def refused(argv: list[str]) -> int:
    """The exit status of a command line the scorer refuses (the error boundary exits)."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    return stopped.value.code


def test_architecture_mode_prints_table_and_totals_and_writes_json(tmp_path, capsys):
    assert main(["--model", "digits_cnn", "--task", "digits", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("digits_cnn on digits (1×8×8, untrained)")
    assert "| conv3.0 | Conv2d | 36,864 | 1,179,648 | 1,177,600 |" in out
    assert "ops    3,576,128 (32-bit equivalents; 2,390,400 mults + 2,380,928 adds" in out
    report = json.loads((tmp_path / "r.json").read_text())
    fresh = count_model(create_model("digits_cnn", num_classes=10), torch.zeros(1, 1, 8, 8))
    assert (report["params"], report["ops"], report["model"]) == (fresh.params, fresh.ops, "digits_cnn")
    assert report["gate"] is None


def test_input_size_and_classes_can_be_overridden(capsys):
    assert main(["--model", "resnet18_cifar", "--task", "cifar100", "--input-size", "16", "--num-classes", "7"]) == 0
    out = capsys.readouterr().out
    assert "resnet18_cifar on cifar100 (3×16×16, untrained)" in out
    assert "| fc | Linear | 1,795.50 | 3,584 | 3,584 |" in out  # (512·7 weights + 7 biases) · 16/32


def test_a_language_model_is_counted_per_token_on_zipf_tokens_after_its_memory(tmp_path, capsys):
    from data.streams import zipf_tokens
    from scoring import count_stream

    assert main(["--model", "lstm_lm", "--task", "wikitext_demo", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("lstm_lm on wikitext_demo (64 Zipf-distributed tokens fed on-line after 0 that fill its "
                          "memory, untrained)")
    report = json.loads((tmp_path / "r.json").read_text())
    tokens = torch.from_numpy(zipf_tokens(64, 13_329).astype("int64"))
    fresh = count_stream(create_model("lstm_lm", num_classes=13_329), tokens)
    assert (report["params"], report["ops"], report["example"], report["examples"]) == (
        fresh.params, fresh.ops, "token", 64)
    assert "per token" in report["project_rules"]
    assert refused(["--model", "lstm_lm", "--task", "wikitext_demo", "--input-size", "8"]) == 2
    assert "--input-size does not apply" in capsys.readouterr().err


@pytest.mark.slow
def test_unknown_model_is_one_line_and_exit_2():
    result = subprocess.run([sys.executable, "-m", "scoring", "--model", "nope", "--task", "digits"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown model 'nope'; choose one of: " + ", ".join(__import__("models").list_models())]


def test_unknown_task_is_one_line_and_exit_2(capsys):
    assert refused(["--model", "digits_cnn", "--task", "mnist"]) == 2
    assert capsys.readouterr().err == "error: unknown task 'mnist'; choose one of: cifar100, digits, imagenet, wikitext103, wikitext_demo\n"


def test_verify_and_paths_dispatch_to_the_verifier(monkeypatch, tmp_path):
    calls = []
    fake = types.SimpleNamespace(main=lambda argv: calls.append(("verify", argv)) or 0,
                                 score_main=lambda argv: calls.append(("score", argv)) or 0)
    monkeypatch.setitem(sys.modules, "scoring.entry.verify", fake)
    assert main(["verify", "bundle", "--data-root", "d"]) == 0
    assert main([str(tmp_path), "--data-root", "d"]) == 0
    assert calls == [("verify", ["bundle", "--data-root", "d"]), ("score", [str(tmp_path), "--data-root", "d"])]


@pytest.mark.parametrize("flag", ["--input-size", "--num-classes"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_a_size_that_is_not_positive_is_one_line_and_exit_2(capsys, flag, value):
    """`--input-size 0` used to count at the task's size (8) without a word."""
    assert refused(["--model", "digits_cnn", "--task", "digits", flag, value]) == 2
    assert capsys.readouterr().err == f"error: {flag} {value} must be > 0 ; fix: omit it for the task's own\n"
