"""report.json / report.md, the printed summary and the TensorBoard log."""
from __future__ import annotations

import json
import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from models import create_model
from scoring import count_model
from scoring.entry import write_report
from scoring.report import build_report, format_summary, log_report


@pytest.fixture(scope="module")
def digits_count():
    return count_model(create_model("digits_cnn", num_classes=10), torch.randn(8, 1, 8, 8))


def _test(correct: int, total: int) -> dict:
    """An evaluation of the test split as data.tasks.Evaluation.to_dict() gives it (mean loss 0.25)."""
    return {"split": "test", "total": total, "loss_sum": 0.25 * total, "loss": 0.25, "correct": correct,
            "top1": correct / total}


def test_report_json_has_the_design_schema_and_consistent_numbers(tmp_path, digits_count):
    report = write_report(tmp_path, build_report(task="digits", count=digits_count, evaluation=_test(342, 360),
                                                  extra={"model": "digits_cnn"}))
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
    assert report["split"] == "test" and report["loss"] == 0.25 and report["validation"] is None
    assert report["nll_sum"] is None and report["perplexity"] is None


def test_a_language_model_report_is_gated_on_the_nll_sum_and_names_its_splits(tmp_path, digits_count):
    # 245,568 predicted tokens (the 245,569 test tokens but the first); ln 35 = 3.5553480614894135, so the gate
    # needs NLL < 245,568 × 3.5553480614894135 = 873,079.713...; 873,079 nats pass, 873,080 do not.
    validation = {"split": "val", "total": 217_645, "loss_sum": 700_000.0, "loss": 700_000 / 217_645,
                  "perplexity": 24.92}
    for nll, passed in ((873_079.0, True), (873_080.0, False)):
        evaluation = {"split": "test", "total": 245_568, "loss_sum": nll, "loss": nll / 245_568}
        report = write_report(tmp_path, build_report(task="wikitext103", count=digits_count, validation=validation,
                                                      evaluation=evaluation))
        assert report["gate_passed"] is passed and report["nll_sum"] == nll and report["total"] == 245_568
        assert report["perplexity"] == pytest.approx(math.exp(nll / 245_568)) and report["correct"] is None
        assert report["split"] == "test" and report["validation"]["split"] == "val"
    assert report["gate"]["summary"] == ("gate FAILED: perplexity 35.0000 = exp(873080.000 / 245,568 tokens) "
                                         "(needs < 35: NLL below 245,568 · ln 35 = 873079.713)")


def test_report_md_has_totals_score_terms_layer_table_and_rules(tmp_path, digits_count):
    write_report(tmp_path, build_report(task="digits", count=digits_count, evaluation=_test(300, 360)))
    text = (tmp_path / "report.md").read_text()
    assert "gate FAILED: top-1 300/360" in text
    assert "| conv2.0 | Conv2d | 9,216 | 1,179,648 | 1,175,552 |" in text
    assert "| conv2.1 | BatchNorm2d |" in text and "folded into conv2.0" in text
    assert "score  1.249504 = params 0.500000 (46,981 / 93,962) + ops 0.749504" in text
    assert "`max_pool2d_with_indices`: max pool" in text


def test_summary_shows_the_verdict_with_exact_counts(digits_count, tmp_path):
    report = write_report(tmp_path, build_report(task="digits", count=digits_count, evaluation=_test(343, 361)))
    summary = format_summary(report)
    assert summary.splitlines()[0] == "[digits] gate PASSED: top-1 343/361 = 95.0139% (needs >= 95.00%: at least 343 correct)"
    assert "score  1.249504" in summary


def test_extra_fields_cannot_overwrite_computed_ones(digits_count):
    with pytest.raises(ValueError, match="'score' would overwrite"):
        build_report(task="digits", count=digits_count, evaluation=_test(1, 2), extra={"score": 0})


def test_log_report_writes_scalars_and_text(tmp_path, digits_count):
    report = write_report(tmp_path, build_report(task="digits", count=digits_count, evaluation=_test(350, 360)))
    with SummaryWriter(tmp_path / "tb") as writer:
        log_report(writer, report, step=7)
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0}).Reload()
    assert events.Scalars("score/total")[0].value == pytest.approx(report["score"])
    assert events.Scalars("score/ops_term")[0].step == 7
    assert events.Scalars("gate/top1")[0].value == pytest.approx(350 / 360)
    assert "report/text_summary" in events.Tags()["tensors"]


def test_reports_written_atomically_leave_no_temporary_file_and_older_ones_still_print(tmp_path, digits_count):
    report = write_report(tmp_path, build_report(task="digits", count=digits_count, evaluation=_test(343, 361),
                                                  example="image"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md"]
    older = {key: value for key, value in report.items() if key != "example"}  # before reports named the example
    assert format_summary(older) == format_summary(report).replace("per image", "per example").replace(
        "8 images", "8 examples")
