"""``train.search.sensitivity``: one layer changed at a time, measured on validation, costed from the scorer's table."""
from __future__ import annotations

import json
from collections import OrderedDict
from fractions import Fraction
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from compress import calibrate
from compress.base import predict_outputs
from compress.quantization import ActivationQuantizer, least_error_scale
from data import Loaders
from data.tasks import ClassificationTask
from scoring.entry import save_entry
from scoring.challenge import baseline
from train.build import build_model
from train.config import ConfigError, to_container
from train.search.formats import read_sensitivity
from train.search.grid import FREEBIE_OFF, FREEBIE_ON, Setting, grid
from train.search.measure import Probe, measure
from train.search.render import write_sensitivity
from train.search.sensitivity import main

TASK = ClassificationTask({"name": "digits", "kind": "classification", "dataset": "digits", "num_classes": 3,
                           "in_chans": 1})


class _Unreadable:
    """A loader that fails the test if anything iterates it (the test split)."""

    def __iter__(self):
        raise AssertionError("the test split was read")


def _tiny() -> nn.Sequential:
    """fc1 (4→8) → ReLU → fc2 (8→3); every row of fc1 has two large and two small weights, so 50% magnitude pruning
    keeps exactly two per row and 4-bit quantization rounds none of the kept ones to zero."""
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(4, 8), relu=nn.ReLU(), fc2=nn.Linear(8, 3)))
    with torch.no_grad():
        model.fc1.weight.copy_(torch.tensor([[1.0, -0.75, 0.05, -0.03]]).repeat(8, 1).roll(1, 1) *
                               torch.linspace(1, 2, 8)[:, None])
    return model


def _probe(model: nn.Module | None = None, examples: int = 48) -> Probe:
    torch.manual_seed(1)
    x, y = torch.randn(examples, 4), torch.randint(0, 3, (examples,))
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, examples, 16)]
    return Probe(model or _tiny(), {"model": {"name": "tiny"}, "score": {"accumulator_bits": 32, "freebie": "auto"}},
                 TASK, Loaders(train=batches, val=batches[:2], test=_Unreadable()), device=torch.device("cpu"),
                 calibration_batches=2, score_examples=16, val_split=0.2)


@pytest.fixture(scope="module")
def tiny_result() -> dict:
    return measure(_probe(), settings=grid([None, 4], [0.0, 0.5]), progress=lambda line: None)


def _setting(result: dict, layer: str, bits: int | None, sparsity: float) -> dict:
    entry = next(e for e in result["layers"] if e["name"] == layer)
    return next(s for s in entry["settings"] if s["bits"] == bits and s["sparsity"] == sparsity)


def test_a_layer_cost_is_read_from_the_scorers_table_and_matches_a_hand_count(tiny_result):
    cost = _setting(tiny_result, "fc1", 4, 0.5)["cost"][FREEBIE_OFF]
    # fc1 at 4 bits, 50% pruned (16 of 32 weights kept, 2 per output), freebie off:
    #   stored: 16 weights x 4 bits + a 1-bit mask over 32 weights = 96 (cheaper than 32 x 4 = 128 dense)
    #           + 8 per-channel weight scales x 32 + 1 input scale x 32 + 8 biases x 32 = 256 + 32 + 256
    assert cost["param_bits"] == 96 + 256 + 32 + 256 == 640
    # ops per example: 16 mults at max(4, 4) bits = 16 x 4/32 = 2; adds (2 - 1) x 8 dot + 8 bias = 16 at 32 bits
    assert cost["ops"] == 2 + 16 == 18
    base = baseline("digits")
    assert cost["score"] == pytest.approx(float(Fraction(640, 32) / base.params + Fraction(18) / base.ops), rel=1e-12)
    dense = _setting(tiny_result, "fc1", None, 0.0)["cost"]
    # unquantized and dense: 32 weights + 8 biases at 32 bits; 32 mults + (4 - 1) x 8 + 8 adds; halved by the freebie
    assert dense[FREEBIE_OFF]["param_bits"] == 40 * 32 and dense[FREEBIE_OFF]["ops"] == 32 + 24 + 8
    assert dense[FREEBIE_ON]["param_bits"] == 40 * 16 and dense[FREEBIE_ON]["ops"] == 32 / 2 + 24 + 8
    assert FREEBIE_ON not in _setting(tiny_result, "fc1", 4, 0.0)["cost"]  # a quantized model has no freebie
    assert _setting(tiny_result, "fc1", 4, 0.5)["measured_sparsity"] == 0.5
    assert _setting(tiny_result, "fc1", 4, 0.5)["weight_bits"] == 4


def test_the_reference_is_in_the_grid_with_no_increase_and_the_test_split_is_never_read(tiny_result):
    for layer in ("fc1", "fc2"):
        reference = _setting(tiny_result, layer, None, 0.0)
        assert reference["loss_increase"] == 0.0 and reference["metric_change"] == 0.0
    assert [(s["bits"], s["sparsity"]) for s in tiny_result["layers"][0]["settings"]] == \
        [(None, 0.0), (None, 0.5), (4, 0.0), (4, 0.5)]
    assert tiny_result["validation"]["examples"] == 32 and tiny_result["metric"] == "top1"
    assert tiny_result["calibration_batches"] == 2 and tiny_result["calibration_examples"] == 32
    assert all(s["changed_rows"] == [] for e in tiny_result["layers"] for s in e["settings"])


@pytest.mark.parametrize("choice, freebie", [
    ({"fc1": Setting(4, 0.5), "fc2": Setting(8, 0.0)}, False),
    ({"fc1": Setting(None, 0.5), "fc2": Setting(2, 0.5)}, False),
    ({"fc1": Setting(None, 0.5), "fc2": Setting(None, 0.0)}, True),
])
def test_per_layer_costs_add_up_to_the_count_of_the_combined_model(choice, freebie):
    probe = _probe()
    bits = sorted({s.bits for s in choice.values()}, key=lambda b: b or 0)
    result = measure(probe, settings=grid(bits, sorted({s.sparsity for s in choice.values()})),
                     progress=lambda line: None)
    mode = FREEBIE_ON if freebie else FREEBIE_OFF
    parts = [result["reference"]["rest"][mode]] + [_setting(result, layer, s.bits, s.sparsity)["cost"][mode]
                                                   for layer, s in choice.items()]
    count = probe.count(probe.prepared(choice), freebie=freebie)
    assert sum(p["param_bits"] for p in parts) == count.param_bits
    assert sum(p["ops"] for p in parts) == pytest.approx(count.ops, rel=1e-12)
    assert sum(p["score"] for p in parts) == pytest.approx(count.score("digits"), rel=1e-12)


def test_calibration_initialises_input_quantizers_and_re_estimates_batch_norm():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()
    probe = _probe(model)
    prepared = probe.prepared({"3": Setting(4, 0.0)})
    first, second = (prepared[0](batch) for batch in probe.calibration)  # the two calibration batches of 16
    norm = prepared[1]
    # momentum None: the cumulative average of the two batches' statistics (unbiased variances)
    assert torch.allclose(norm.running_mean, (first.mean(0) + second.mean(0)) / 2, atol=1e-6)
    assert torch.allclose(norm.running_var, (first.var(0) + second.var(0)) / 2, atol=1e-5)
    assert norm.momentum == 0.1 and not norm.training and int(norm.num_batches_tracked) == 2
    quantizer = prepared[3].input_quantizer
    assert isinstance(quantizer, ActivationQuantizer) and bool(quantizer.calibrated) and not quantizer.signed
    # LSQ's initial step: least squared error on the inputs of the first batch only, as a QAT stage's first step
    inputs = torch.relu(nn.functional.batch_norm(first, norm.running_mean * 0, norm.running_var * 0 + 1, norm.weight,
                                                 norm.bias, training=True))
    assert torch.allclose(quantizer.scale, least_error_scale(inputs, 0, 15, per_channel=False))
    assert not torch.equal(model[1].running_mean, norm.running_mean)  # the probe's own model is untouched
    step = quantizer.scale.clone()
    calibrate(prepared, probe.calibration[::-1], predict_outputs)  # the quantizer keeps its step
    assert torch.equal(quantizer.scale, step)


def test_outputs_json_markdown_and_heat_map(tiny_result, tmp_path: Path):
    paths = write_sensitivity({**tiny_result, "run": "somewhere"}, tmp_path)
    again = read_sensitivity(tmp_path)
    assert again["layers"] == json.loads(json.dumps(tiny_result["layers"]))
    text = paths["md"].read_text()
    fc1 = _setting(tiny_result, "fc1", 4, 0.5)
    assert "## fc1 (Linear, 32 weights)" in text
    assert f"{fc1['loss_increase']:+.3f} · {fc1['cost'][FREEBIE_OFF]['score']:.4f}" in text
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def untrained_entry(tiny_config, tmp_path: Path):
    """A digits_cnn entry (untrained) whose config is a run's: with and without a validation split."""
    def make(*overrides: str) -> Path:
        cfg = tiny_config(*overrides)
        return save_entry(tmp_path / "_".join(overrides or ("plain",)), build_model(cfg), config=to_container(cfg))
    return make


def test_a_run_without_a_validation_split_is_refused_unless_one_is_chosen(untrained_entry, capsys):
    entry = untrained_entry()
    with pytest.raises(ConfigError, match="has no validation split .* test split must not be used .* fix: retrain "
                                          "with data.val_split=0.2, or pass --val-split 0.2"):
        Probe.from_run(entry)
    with pytest.raises(SystemExit) as stopped:
        main([str(entry)])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and " ; fix: " in err and err.count("\n") == 1 and "Traceback" not in err
    probe = Probe.from_run(entry, val_split=0.2)
    # 20% of digits' 1437 training images (stratified), never the 360 test images
    assert probe.trained_on_validation and probe.evaluate(probe.model).total == round(0.2 * 1437) == 287


def test_a_runs_own_validation_split_is_fixed(untrained_entry):
    entry = untrained_entry("data.val_split=0.1")
    probe = Probe.from_run(entry)
    assert not probe.trained_on_validation and probe.evaluate(probe.model).total == round(0.1 * 1437)
    with pytest.raises(ConfigError, match="trained with data.val_split=0.1: its validation split is fixed"):
        Probe.from_run(entry, val_split=0.2)


@pytest.mark.slow
def test_a_language_model_is_measured_like_any_other_model(tmp_path: Path):
    """The LSTM's matrices and the adaptive softmax's clusters are layers; the validation split is the corpus's
    valid file (no hold-out: --val-split is refused); the metric is perplexity (lower is better); per-token counts
    (count_stream) add up like per-image ones; a perplexity target is a loss budget, met by the allocation."""
    import itertools

    from tests.conftest import compose_config
    from train.search.measure import check
    from train.search.solve import allocate

    cfg = compose_config("task=wikitext_demo", "model=lstm_lm", "model.kwargs.embed_dim=16",
                         "model.kwargs.hidden_size=16", "data.num_workers=0", "score.examples=32",
                         "train.batch_size=4", "train.eval_batch_size=1")
    entry = save_entry(tmp_path / "lm", build_model(cfg), config=to_container(cfg))
    with pytest.raises(ConfigError, match="validates on its corpus's valid file.* fix: drop --val-split"):
        Probe.from_run(entry, val_split=0.1, device="cpu")
    probe = Probe.from_run(entry, device="cpu", calibration_batches=2)
    assert probe.val_split == 0 and not probe.trained_on_validation and probe.score_inputs.stream
    assert len(probe.calibration) == 2 and probe.calibration[0].shape == (4, 35)  # 4 streams x bptt 35
    probe.val = list(itertools.islice(probe.val, 2))  # two 256-token windows of the valid stream: enough here
    layers = ["layers.0.recurrent", "decoder.clusters.1"]  # an LSTM matrix and a tail cluster of the softmax
    result = measure(probe, layers=layers, settings=grid([None, 4], [0.0, 0.5]), progress=lambda line: None)
    assert result["metric"] == "perplexity" and result["higher_is_better"] is False
    assert result["validation"]["examples"] == 2 * 256
    assert [(e["name"], e["type"]) for e in result["layers"]] == [(layers[0], "Linear"), (layers[1], "Linear")]
    choice = {layers[0]: Setting(4, 0.5), layers[1]: Setting(None, 0.5)}
    parts = [result["reference"]["rest"][FREEBIE_OFF]] + [_setting(result, layer, s.bits, s.sparsity)["cost"][FREEBIE_OFF]
                                                          for layer, s in choice.items()]
    count = probe.count(probe.prepared(choice), freebie=False)
    assert count.examples == 32 and sum(p["param_bits"] for p in parts) == count.param_bits
    assert sum(p["ops"] for p in parts) == pytest.approx(count.ops, rel=1e-12)
    target = float(torch.tensor(result["reference"]["loss"] + 0.5).exp())  # perplexity exp(loss + 0.5)
    allocation = allocate(result, target_metric=target)
    assert allocation.constraint == f"validation perplexity <= {target:g}" and allocation.loss_increase <= 0.5 + 1e-9
    check(allocation, probe)  # the combination counted: the predicted score, to rounding
    assert allocation.counted["score"] == pytest.approx(allocation.score, rel=1e-9)
