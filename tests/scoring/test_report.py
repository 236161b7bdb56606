"""report.json / report.md, the printed summary and the TensorBoard log."""
from __future__ import annotations

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from models import create_model
from scoring import count_model
from scoring.report import format_summary, log_report, write_report


@pytest.fixture(scope="module")
def digits_count():
    return count_model(create_model("digits_cnn", num_classes=10), torch.randn(8, 1, 8, 8))


def test_report_json_has_the_design_schema_and_consistent_numbers(tmp_path, digits_count):
    report = write_report(tmp_path, task="digits", count=digits_count, correct=342, total=360, extra={"model": "digits_cnn"})
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk == report
    for key in ("task", "correct", "total", "top1", "gate_passed", "params", "ops", "mults", "adds", "param_bits",
                "freebie", "score", "baseline", "layers", "score_params_term", "score_ops_term", "project_rules",
                "accumulator_bits", "examples"):
        assert key in report
    assert (report["correct"], report["total"], report["gate_passed"], report["model"]) == (342, 360, True, "digits_cnn")
    assert report["top1"] == 342 / 360
    assert report["score_params_term"] == pytest.approx(digits_count.params / 93_962)
    assert report["score"] == pytest.approx(report["score_params_term"] + report["score_ops_term"])
    assert report["freebie"] and report["examples"] == 8
    assert sum(layer["params"] for layer in report["layers"]) == report["params"]
    assert {"name", "type", "params", "mults", "adds", "sparsity", "weight_bits", "input_bits"} <= set(report["layers"][0])
    assert "max_pool2d_with_indices" in report["project_rules"]


def test_report_md_has_totals_score_terms_layer_table_and_rules(tmp_path, digits_count):
    write_report(tmp_path, task="digits", count=digits_count, correct=300, total=360)
    text = (tmp_path / "report.md").read_text()
    assert "gate FAILED: top-1 300/360" in text
    assert "| conv2.0 | Conv2d | 9,216 | 1,179,648 | 1,175,552 |" in text
    assert "| conv2.1 | BatchNorm2d |" in text and "folded into conv2.0" in text
    assert "score  1.249504 = params 0.500000 (46,981 / 93,962) + ops 0.749504" in text
    assert "`max_pool2d_with_indices`: max pool" in text


def test_summary_shows_the_verdict_with_exact_counts(digits_count, tmp_path):
    report = write_report(tmp_path, task="digits", count=digits_count, correct=343, total=361)
    summary = format_summary(report)
    assert summary.splitlines()[0] == "[digits] gate PASSED: top-1 343/361 = 95.0139% (needs >= 95.00%: at least 343 correct)"
    assert "score  1.249504" in summary


def test_extra_fields_cannot_overwrite_computed_ones(tmp_path, digits_count):
    with pytest.raises(ValueError, match="'score' would overwrite"):
        write_report(tmp_path, task="digits", count=digits_count, correct=1, total=2, extra={"score": 0})


def test_log_report_writes_scalars_and_text(tmp_path, digits_count):
    report = write_report(tmp_path, task="digits", count=digits_count, correct=350, total=360)
    with SummaryWriter(tmp_path / "tb") as writer:
        log_report(writer, report, step=7)
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0}).Reload()
    assert events.Scalars("score/total")[0].value == pytest.approx(report["score"])
    assert events.Scalars("score/ops_term")[0].step == 7
    assert events.Scalars("gate/top1")[0].value == pytest.approx(350 / 360)
    assert "report/text_summary" in events.Tags()["tensors"]
