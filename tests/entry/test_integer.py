"""The integer executor (scoring/entry/integer.py): exact integer sums, the declared accumulator (wrap, saturate,
overflows counted per layer), the comparison with the fake-quantized float model, and verify deciding on it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from compress import ActivationQuantizer, WeightQuantizer
from compress.base import put_parametrization
from compress.quantization import put_input_quantizer
from data.tasks import Evaluation
from scoring.entry import ENTRY_JSON, export, load_entry, verify, write_manifest
from scoring.entry.integer import Accumulator, IntegerRun, integer_copy, saturating_sum

from .conftest import exit_status, quantized_digits


def declare_score(bundle: Path, **settings) -> None:
    """Set score settings in the bundle's entry.json and reseal its SHA256SUMS, as an entrant would."""
    path = bundle / "entry" / ENTRY_JSON
    document = json.loads(path.read_text())
    document["config"]["score"].update(settings)
    path.write_text(json.dumps(document))
    write_manifest(bundle)


def hand_layer() -> nn.Linear:
    """Linear 3 → 2 without bias, 4-bit weights and inputs, both steps 1: the codes are the values themselves.
    Weights [[7, 7, -7], [1, 2, 3]]; the input quantizer is calibrated unsigned ([0, 15]) on non-negative data."""
    layer = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[7.0, 7.0, -7.0], [1.0, 2.0, 3.0]]))
    put_parametrization(layer, WeightQuantizer(layer.weight.detach(), 4, "lsq"))
    put_input_quantizer(layer, ActivationQuantizer(4, "lsq"))
    layer.train()(torch.full((1, 3), 7.0))  # calibrates the input quantizer
    with torch.no_grad():
        layer.parametrizations.weight[0].scale.fill_(1.0)
        layer.input_quantizer.scale.fill_(1.0)
    return layer.eval()


def run_hand_layer(accumulator: Accumulator) -> tuple[torch.Tensor, int]:
    executor, runs = integer_copy(nn.Sequential(hand_layer()), accumulator)
    out = executor(torch.full((1, 3), 7.0))
    return out, runs[0].overflows


def test_exact_sums_agree_with_the_float_layer_under_32_bits():
    # Sums: 7·7 + 7·7 - 7·7 = 49 and 7·1 + 7·2 + 7·3 = 42, far inside 32 bits.
    out, overflows = run_hand_layer(Accumulator(32, "wrap"))
    assert out.tolist() == [[49.0, 42.0]] and overflows == 0
    assert torch.equal(out, hand_layer()(torch.full((1, 3), 7.0)))


def test_a_6_bit_wrapping_accumulator_keeps_the_sums_modulo_64():
    # [-32, 31]: 49 - 64 = -15, 42 - 64 = -22; both outputs overflow.
    out, overflows = run_hand_layer(Accumulator(6, "wrap"))
    assert out.tolist() == [[-15.0, -22.0]] and overflows == 2


def test_a_6_bit_saturating_accumulator_clamps_every_partial_sum_in_order():
    # Row 1: 49 → clamped 31, then 31 - 49 = -18. Row 2: 7, 21, 42 → clamped 31.
    out, overflows = run_hand_layer(Accumulator(6, "saturate"))
    assert out.tolist() == [[-18.0, 31.0]] and overflows == 2


def test_an_adder_tree_sums_exactly():
    # score.accumulator_bits=adder_tree: every level of the sum at the width it needs, so 49 and 42 as they are.
    out, overflows = run_hand_layer(Accumulator.from_score({"accumulator_bits": "adder_tree"}))
    assert out.tolist() == [[49.0, 42.0]] and overflows == 0


def test_saturating_sum_by_hand():
    # 8 bits, [-128, 127]: 100 + 100 = 200 → 127, then 127 - 50 = 77 (saturated); 1 + 2 + 3 = 6 (not).
    sums, saturated = saturating_sum(torch.tensor([[100.0, 100.0, -50.0], [1.0, 2.0, 3.0]]), -128, 127)
    assert sums.tolist() == [77.0, 6.0] and saturated.tolist() == [True, False]


def test_an_input_off_its_grid_is_refused():
    executor, _ = integer_copy(nn.Sequential(hand_layer()), Accumulator())
    executor[0].input_quantizer.forward = lambda x: x  # the integer layer now receives 7.5: no code
    with pytest.raises(ValueError, match="input is not on its quantization grid"):
        executor(torch.full((1, 3), 7.5))


def test_the_digits_model_runs_in_integers_and_counts_its_overflows(compressed_model):
    """Every conv and the classifier run in integers; a 12-bit wrapping accumulator overflows exactly where the
    exact sums leave [-2048, 2047], counted per layer."""
    inputs = torch.randn(16, 1, 8, 8)
    wide, wide_runs = integer_copy(compressed_model, Accumulator())
    assert [run.mode for run in wide_runs] == ["integer"] * 4
    with torch.no_grad():
        reference, exact = compressed_model(inputs), wide(inputs)
        narrow, narrow_runs = integer_copy(compressed_model, Accumulator(12, "wrap"))
        narrow(inputs)
    assert (exact - reference).abs().max() < 1e-3 * reference.abs().max()  # float32 rounding only
    assert all(run.overflows == 0 for run in wide_runs)
    # The first layer sees the same inputs in both copies: it overflows 12 bits exactly when its sums need more.
    assert (narrow_runs[0].overflows > 0) == (wide_runs[0].max_abs > 2047)
    assert sum(run.overflows for run in narrow_runs) > 0


def test_per_tensor_steps_are_used_as_stored_rounded_to_powers_of_two():
    """scale_bits 8: learned steps 0.3 (weights, one per tensor) and 0.9 (inputs) compute as 2^-2 and 2^0. Weights
    0.25 · [[7, 7, -7], [1, 2, 3]], input 7: sums 49 and 42 (the codes), outputs 0.25 · 1 · (49, 42) = 12.25,
    10.5."""
    layer = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(0.25 * torch.tensor([[7.0, 7.0, -7.0], [1.0, 2.0, 3.0]]))
    put_parametrization(layer, WeightQuantizer(layer.weight.detach(), 4, "lsq", per_channel=False, scale_bits=8))
    put_input_quantizer(layer, ActivationQuantizer(4, "lsq", scale_bits=8))
    layer.train()(torch.full((1, 3), 7.0))
    with torch.no_grad():
        layer.parametrizations.weight[0].scale.fill_(0.3)
        layer.input_quantizer.scale.fill_(0.9)
    executor, runs = integer_copy(nn.Sequential(layer.eval()), Accumulator())
    with torch.no_grad():
        out = executor(torch.full((1, 3), 7.0))
        assert out.tolist() == [[12.25, 10.5]] and torch.equal(out, layer(torch.full((1, 3), 7.0)))
    assert runs[0].max_abs == 49


def test_the_integer_layers_run_exactly_inside_a_model_whose_other_ops_run_in_fp16():
    """other_ops fp16 rounds what reads a layer's output, not the integer layer's own arithmetic (its input codes
    would come out off their grid): the integer logits equal the float ones up to float32 rounding."""
    model = quantized_digits(scale="per_tensor", scale_bits=16, bias_bits=16, other_ops="fp16")
    executor, runs = integer_copy(model, Accumulator())
    inputs = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        exact, reference = executor(inputs), model(inputs)
    assert [run.mode for run in runs] == ["integer"] * 4
    assert (exact - reference).abs().max() <= 1e-5 * reference.abs().max()


def test_the_gate_is_decided_on_the_integer_count():
    """Digits needs 342 of 360: an integer run at 341 fails even where the float model passed."""
    float_pass = Evaluation("test", 360, 10.0, 350)
    failing = IntegerRun("digits", Accumulator(12, "wrap"), Evaluation("test", 360, 90.0, 341), float_pass)
    passing = IntegerRun("digits", Accumulator(12, "wrap"), Evaluation("test", 360, 11.0, 342), float_pass)
    assert not failing.gate.passed and passing.gate.passed


def test_verify_runs_a_12_bit_wrapping_accumulator_and_reports_its_overflows(exported_bundle, tmp_path, capsys):
    """A digits bundle declaring a 12-bit wrapping accumulator (an unofficial setting, compared under its own
    settings): verify runs it in integers at 12 bits, prints and writes the overflows per layer, and decides the
    integer gate on the integer count."""
    bundle = tmp_path / "bundle"
    shutil.copytree(exported_bundle, bundle)
    declare_score(bundle, accumulator_bits=12, accumulator_overflow="wrap")
    report = json.loads((bundle / "report.json").read_text())
    status = exit_status(verify.main, [str(bundle), "--device", "cpu", "--allow-score-settings",
                                       "--json", str(tmp_path / "v.json")])
    result = json.loads((tmp_path / "v.json").read_text())
    integer = result["integer"]
    assert integer["accumulator_bits"] == 12 and integer["accumulator_overflow"] == "wrap"
    assert set(integer["overflows"]) == {"conv1.0", "conv2.0", "conv3.0", "fc"}
    assert sum(integer["overflows"].values()) > 0
    assert integer["gate_passed"] == (integer["correct"] >= 342)  # 95% of 360, on the integer count
    assert integer["float_correct"] == report["correct"]
    assert not result["qualifies"]  # unofficial settings never qualify
    out = capsys.readouterr().out
    assert "accumulator 12-bit, wrap" in out and "overflows: " in out
    # The report was counted at 32 bits: its totals differ from the 12-bit recount, and so does the status.
    assert status == 1 and "ops" in result["differing_fields"]


def test_verify_json_of_a_packed_bundle(bundle, tmp_path):
    """``--json``: the integer result beside the float one, and counted beside packed bytes."""
    assert verify.main([str(bundle), "--device", "cpu", "--json", str(tmp_path / "v.json")]) == 0
    result = json.loads((tmp_path / "v.json").read_text())
    report = json.loads((bundle / "report.json").read_text())
    assert result["status"] == 0 and result["integer"]["float_correct"] == report["correct"]
    assert result["integer"]["total"] == 360 and result["integer"]["differs"] == len(result["integer"]["differing"])
    storage = result["storage"]
    assert storage["counted_bytes"] == report["param_bits"] / 8
    assert storage["packed_bytes"] == (bundle / "entry" / "model.packed").stat().st_size


def test_verify_reads_a_bundle_of_the_float_format(exported_bundle, tmp_path):
    """Bundles exported before the packed format (model.safetensors) stay verifiable."""
    assert load_entry(exported_bundle).meta["weights"]["file"] == "model.safetensors"
    assert verify.main([str(exported_bundle), "--device", "cpu", "--json", str(tmp_path / "v.json")]) == 0
    storage = json.loads((tmp_path / "v.json").read_text())["storage"]
    assert storage["packed_bytes"] is None
    assert storage["weights_file_bytes"] == (exported_bundle / "entry" / "model.safetensors").stat().st_size


def test_export_writes_the_packed_format_by_default(run_dir, tmp_path, capsys):
    assert export.main([str(run_dir), "--out", str(tmp_path / "b"), "--allow-gate-failure"]) == 0
    assert (tmp_path / "b" / "entry" / "model.packed").is_file()
    assert not (tmp_path / "b" / "entry" / "model.safetensors").exists()
    assert "bytes on disk" in capsys.readouterr().out
