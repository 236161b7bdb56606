"""report.json as a file: written with its format version, read back within bounds, older reports still read."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models import create_model
from scoring import count_model
from scoring.entry import REPORT_JSON, REPORT_MD, EntryError, read_report, write_report
from scoring.entry.runfiles import REPORT_FORMAT_VERSION
from scoring.report import build_report, markdown


@pytest.fixture(scope="module")
def report() -> dict:
    count = count_model(create_model("digits_cnn", num_classes=10), torch.zeros(2, 1, 8, 8))
    return build_report(task="digits", count=count, evaluation={"split": "test", "total": 10, "loss_sum": 2.5,
                                                                "loss": 0.25, "correct": 9, "top1": 0.9})


def test_a_written_report_names_its_format_version_and_reads_back(tmp_path: Path, report: dict):
    written = write_report(tmp_path, report)
    assert next(iter(written)) == "format_version" and written["format_version"] == REPORT_FORMAT_VERSION == 1
    assert written == {"format_version": 1, **report}
    assert read_report(tmp_path) == json.loads((tmp_path / REPORT_JSON).read_text()) == written
    assert (tmp_path / REPORT_MD).read_text() == markdown(report)


def test_a_report_written_before_the_format_version_reads_as_version_1(tmp_path: Path, report: dict):
    (tmp_path / REPORT_JSON).write_text(json.dumps(report))
    assert read_report(tmp_path) == report


@pytest.mark.parametrize("version", [2, "1", None])
def test_another_format_version_is_refused(tmp_path: Path, report: dict, version):
    (tmp_path / REPORT_JSON).write_text(json.dumps({"format_version": version, **report}))
    with pytest.raises(EntryError, match=rf"format_version {version!r}; this micronet-kit reads version 1"):
        read_report(tmp_path)
