"""The ONNX export of an entry and its measurement on ONNX Runtime (scoring/entry/deploy/, ``python -m scoring
measure``), on the session's pruned + 4-bit entry: the file computes what the fake-quantized model computes, the
measurement JSON has every field, a run dir gets measured.json and the table in report.md, a bundle is left sealed,
and without onnxruntime the command is one line naming the extra. Timing values are not asserted (the machine is
shared and noisy)."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

from compress.base import put_parametrization
from compress.quantization import WeightQuantizer
from scoring.__main__ import main as scoring_main
from scoring.entry import MEASURED_JSON, REPORT_MD, build_model_from_entry, load_entry
from scoring.entry.deploy.measure import _task
from scoring.entry.deploy.qdq import export_onnx
from scoring.entry.deploy.runtime import agreement
from scoring.entry.kit import task_definition
from scoring.entry.manifest import MANIFEST_FILE, check_manifest
from scoring.errors import UserError
from tests.entry.conftest import exit_status



#: The file, run on ONNX Runtime's reference kernels, computes the fake-quantized model to float rounding.
FILE_TOLERANCE = 1e-4
#: Fast timing settings: the figures are only checked to exist.
TINY = ["--warmup", "1", "--runs", "3", "--batch", "4", "--batch-runs", "2"]


def _inputs(count: int = 32) -> torch.Tensor:
    return torch.randn(count, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def _reference_check(model: nn.Module, path: Path, inputs: torch.Tensor) -> dict:
    with torch.no_grad():
        expected = model(inputs).numpy()
    return agreement(path, inputs.numpy(), expected, threads=1)


def test_the_onnx_file_computes_the_fake_quantized_model(exported_bundle, tmp_path):
    model = build_model_from_entry(load_entry(exported_bundle))
    path = tmp_path / "entry.onnx"
    stored = export_onnx(model, _inputs(1), path)
    check = _reference_check(model, path, _inputs())
    assert check["file_max_abs_diff"] <= FILE_TOLERANCE and check["file_same_predictions"] == 32
    # PRUNE_Q4: 4-bit weights and inputs, the first and last layers (conv1, fc) at 8 bits
    assert [(w["layer"], w["bits"], w["container"]) for w in stored.weights] == [
        ("conv1.0", 8, "int8"), ("conv2.0", 4, "int8"), ("conv3.0", 4, "int8"), ("fc", 8, "int8")]
    assert [(i["layer"], i["bits"]) for i in stored.inputs] == [("conv1.0", 8), ("conv2.0", 4), ("conv3.0", 4),
                                                                ("fc", 8)]
    graph = onnx.load(str(path)).graph
    ops = [node.op_type for node in graph.node]
    assert ops.count("QuantizeLinear") == 4 and ops.count("DequantizeLinear") == 8  # 4 inputs, 4 weights
    assert "BatchNormalization" not in ops  # the three folded into their convs
    # a Clip wherever the grid is narrower than the container: the 4-bit inputs, and conv1's signed 8-bit one
    # (−127..127 in int8's −128..127); fc's input is unsigned 8-bit after a ReLU, uint8 exactly
    unsigned = [i["container"] == "uint8" for i in stored.inputs]
    assert ops.count("Clip") == 4 - sum(u and i["bits"] == 8 for u, i in zip(unsigned, stored.inputs)) == 3
    int8 = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert sorted(t.dims[0] for t in int8) == [10, 32, 64, 128]  # one integer tensor per layer, by out channels
    weights = {w["layer"]: w for w in stored.weights}
    assert weights["conv2.0"]["zeros"] == int((model.conv2[0].weight == 0).sum())


def test_a_batch_norm_with_negative_and_zero_scales_folds_exactly(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU()).eval()
    model[1].weight.data = torch.tensor([-1.5, 0.0, 0.5, 2.0])  # a flipped channel, a zeroed one
    model[1].running_mean.normal_()
    model[1].running_var.uniform_(0.5, 2.0)
    put_parametrization(model[0], WeightQuantizer(model[0].weight.detach(), 4, "lsq"))
    path = tmp_path / "folded.onnx"
    export_onnx(model, _inputs(1), path)
    assert "BatchNormalization" not in [node.op_type for node in onnx.load(str(path)).graph.node]
    assert _reference_check(model, path, _inputs())["file_max_abs_diff"] <= FILE_TOLERANCE


ROW_FIELDS = {"counted": {"params", "ops", "score", "param_bits", "freebie", "top1"},
              "measured": {"file_bytes", "latency_ms", "throughput", "peak_memory_bytes", "runtime_memory_bytes"},
              "kernels": {"integer", "float", "ops"},
              "check": {"examples", "file_max_abs_diff", "file_same_predictions", "runtime_max_abs_diff",
                        "runtime_same_predictions"}}


def test_measure_writes_every_field_and_the_table_into_a_run_dir_not_a_bundle(exported_bundle, tmp_path, capsys):
    run_dir = tmp_path / "run"  # a bundle's layout without its manifest is a run dir's
    shutil.copytree(exported_bundle, run_dir)
    (run_dir / MANIFEST_FILE).unlink()
    out = tmp_path / "measured.json"
    argv = ["measure", str(run_dir), str(exported_bundle), "--json", str(out), *TINY]
    assert exit_status(scoring_main, argv) == 0
    measurement = json.loads(out.read_text())
    assert [(row["role"], row["name"]) for row in measurement["models"]] == [
        ("dense", "digits_cnn dense float32"), ("entry", "digits_cnn prune_q4_test"),
        ("entry", "digits_cnn prune_q4_test")]  # the task's dense model once, then each entry
    assert set(measurement["settings"]) == {"warmup", "runs", "batch", "batch_runs", "threads"}
    assert {"torch", "onnx", "onnxruntime", "cpu"} <= set(measurement["versions"])
    for row in measurement["models"]:
        for section, fields in ROW_FIELDS.items():
            assert set(row[section]) == fields, (row["name"], section)
        measured = row["measured"]
        assert all(measured[key] > 0 for key in ("file_bytes", "latency_ms", "throughput", "peak_memory_bytes"))
        assert row["check"]["file_max_abs_diff"] <= FILE_TOLERANCE
    dense, entry = measurement["models"][:2]
    assert dense["counted"] == {"params": 93_962, "ops": 4_771_328, "score": 2.0, "param_bits": 32 * 93_962,
                                "freebie": False, "top1": None}  # the kit's digits baseline constants
    report = json.loads((run_dir / "report.json").read_text())
    assert entry["counted"]["score"] == report["score"] and entry["counted"]["params"] == report["params"]

    assert json.loads((run_dir / MEASURED_JSON).read_text())["models"] == measurement["models"][:2]
    markdown = (run_dir / REPORT_MD).read_text()
    weights = entry["stored"]["weights"]
    zeros = sum(w["zeros"] for w in weights) / sum(w["elements"] for w in weights)
    assert "## Counted vs measured" in markdown and "| digits_cnn prune_q4_test | " in markdown
    assert f"{zeros:.1%} of its {sum(w['elements'] for w in weights):,} weights are zeros" in markdown
    assert "4-bit weights of conv2.0, 4-bit weights of conv3.0, 4-bit inputs of conv2.0" in markdown
    assert all(check.ok for check in check_manifest(exported_bundle))  # the bundle was left as it was
    assert not (exported_bundle / MEASURED_JSON).exists()
    printed = capsys.readouterr().out
    assert "## Counted vs measured" in printed and f"{exported_bundle}: a bundle, sealed" in printed


def test_without_onnxruntime_measure_is_one_line_naming_the_extra(exported_bundle, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what `import onnxruntime` meets when it is missing
    assert exit_status(scoring_main, ["measure", str(exported_bundle)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and 'pip install -e ".[deploy]"' in err
    assert "onnxruntime is not installed" in err


def test_a_language_model_task_is_refused_in_one_line():
    with pytest.raises(UserError, match="wikitext_demo is a language model.*image classification"):
        _task({"task": task_definition("wikitext_demo")})


def test_the_dense_model_is_exported_as_float(tmp_path):
    from models import create_model

    model = create_model("digits_cnn", num_classes=10).eval()
    stored = export_onnx(model, _inputs(1), tmp_path / "dense.onnx")
    assert {w["container"] for w in stored.weights} == {"float32"} and stored.inputs == []
    assert np.isclose(_reference_check(model, tmp_path / "dense.onnx", _inputs())["file_max_abs_diff"], 0,
                      atol=FILE_TOLERANCE)


def test_a_json_path_in_a_missing_folder_is_refused_before_measuring(exported_bundle, tmp_path, capsys):
    argv = ["measure", str(exported_bundle), "--json", str(tmp_path / "absent" / "m.json")]
    assert exit_status(scoring_main, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"the folder {tmp_path / 'absent'} does not exist ; fix: create it" in err
