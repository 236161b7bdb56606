"""save_entry / load_entry / build_model_from_entry: exact round trip, and nothing is ever unpickled."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from compress import WeightMask
from scoring import count_model
from scoring.entry import ENTRY_JSON, WEIGHTS_FILE, EntryError, build_model_from_entry, load_entry, save_entry, \
    sha256_file

from .conftest import make_compressed_model, plant_pickle


def save(directory: Path, model: nn.Module, config: dict) -> Path:
    return save_entry(directory, model, config=config)


def test_round_trip_gives_identical_outputs_and_counts(tmp_path, run_config, compressed_model):
    save(tmp_path, compressed_model, run_config)
    rebuilt = build_model_from_entry(load_entry(tmp_path))
    inputs = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(rebuilt(inputs), compressed_model(inputs))
    assert not rebuilt.training
    # The pruned zeros and the bit widths survive: the scorer counts both models the same.
    before, after = count_model(compressed_model, inputs), count_model(rebuilt, inputs)
    assert (after.param_bits, after.ops, after.freebie) == (before.param_bits, before.ops, before.freebie)
    sparsity = {layer["name"]: layer["sparsity"] for layer in after.layers}
    assert sparsity["conv2.0"] == pytest.approx(0.5, abs=1 / rebuilt.conv2[0].weight.numel())
    assert {layer["weight_bits"] for layer in after.layers if layer["name"] == "conv2.0"} == {4}


def test_stored_weights_have_masks_baked_in(tmp_path, run_config, compressed_model):
    save(tmp_path, compressed_model, run_config)
    entry = load_entry(tmp_path)
    mask = compressed_model.conv2[0].parametrizations.weight[0]
    assert isinstance(mask, WeightMask)
    stored = entry.state_dict["conv2.0.parametrizations.weight.original"]
    assert torch.equal(stored == 0, ~mask.mask)  # zero exactly where pruned (trained weights are never 0.0)
    assert not any(".mask" in key for key in entry.state_dict)
    chains = entry.compression_state["weights"].values()
    assert [p["kind"] for p in entry.compression_state["weights"]["conv2.0"]] == ["weight_quantizer"]
    assert all(p["kind"] != "mask" for chain in chains for p in chain)
    # The caller's model keeps its masks: export works on a copy.
    assert isinstance(compressed_model.conv2[0].parametrizations.weight[0], WeightMask)


def test_entry_json_records_model_hash_and_versions(tmp_path, run_config, compressed_model):
    save(tmp_path, compressed_model, run_config)
    document = json.loads((tmp_path / ENTRY_JSON).read_text())
    assert document["format_version"] == 1
    assert document["model"] == {"name": "digits_cnn", "num_classes": 10, "kwargs": {"in_chans": 1}}  # the task's input
    assert document["weights"]["sha256"] == sha256_file(tmp_path / WEIGHTS_FILE)
    assert document["versions"]["torch"] == torch.__version__
    assert document["config"] == run_config
    assert sorted(p.name for p in tmp_path.iterdir()) == [ENTRY_JSON, WEIGHTS_FILE]  # no temporary files left


class TiedAndStrided(nn.Module):
    """Weights shared between two layers and a non-contiguous buffer, which safetensors cannot store as is."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 6, bias=False)
        self.decoder = nn.Linear(6, 4, bias=False)
        self.tied = nn.Linear(4, 6, bias=False)
        self.tied.weight = self.encoder.weight
        self.register_buffer("transposed", torch.arange(12.0).reshape(3, 4).t())


def test_shared_and_non_contiguous_tensors_are_stored(tmp_path, run_config):
    model = TiedAndStrided()
    save(tmp_path, model, run_config)
    loaded = load_entry(tmp_path).state_dict
    expected = model.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[key], expected[key]) for key in expected)
    fresh = TiedAndStrided()
    fresh.load_state_dict(loaded, strict=True)
    assert fresh.tied.weight is fresh.encoder.weight and torch.equal(fresh.encoder.weight, model.encoder.weight)


@pytest.mark.parametrize("torch_archive", [False, True], ids=["raw-pickle", "torch-save"])
def test_planted_pickle_is_refused_and_never_runs(tmp_path, run_config, compressed_model, torch_archive):
    control = tmp_path / "control-marker"
    payload = tmp_path / "payload"
    plant_pickle(payload, control, torch_archive=torch_archive)
    # Control: the payload really runs code when unpickled.
    torch.load(payload, weights_only=False) if torch_archive else pickle.loads(payload.read_bytes())
    assert control.exists()

    entry_dir = save(tmp_path / "entry", compressed_model, run_config)
    marker = tmp_path / "marker"
    plant_pickle(entry_dir / WEIGHTS_FILE, marker, torch_archive=torch_archive)
    with pytest.raises(EntryError, match="is not a safetensors file") as refused:
        load_entry(entry_dir)
    assert "\n" not in str(refused.value)
    # An attacker who also rewrites entry.json's sha256 is refused the same way.
    document = json.loads((entry_dir / ENTRY_JSON).read_text())
    document["weights"]["sha256"] = sha256_file(entry_dir / WEIGHTS_FILE)
    (entry_dir / ENTRY_JSON).write_text(json.dumps(document))
    with pytest.raises(EntryError, match="is not a safetensors file"):
        load_entry(entry_dir)
    assert not marker.exists()


def test_changed_weights_are_refused_by_sha256(tmp_path, run_config, compressed_model):
    entry_dir = save(tmp_path, compressed_model, run_config)
    tampered = load_entry(entry_dir).state_dict
    tampered["fc.bias"] = tampered["fc.bias"] + 1  # still a valid safetensors file, different content
    save_file(tampered, str(entry_dir / WEIGHTS_FILE))
    with pytest.raises(EntryError, match="sha256 .* the weights were changed after export"):
        load_entry(entry_dir)


def test_truncated_safetensors_is_refused(tmp_path, run_config, compressed_model):
    entry_dir = save(tmp_path, compressed_model, run_config)
    weights = entry_dir / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:20])
    with pytest.raises(EntryError, match="is not a safetensors file"):
        load_entry(entry_dir)


def test_missing_entry_says_what_to_run(tmp_path):
    with pytest.raises(EntryError, match=r"holds no entry\.json .*python train/run\.py"):
        load_entry(tmp_path)
    with pytest.raises(EntryError, match="does not exist"):
        load_entry(tmp_path / "nowhere")


def test_unknown_format_version_is_refused(tmp_path, run_config, compressed_model):
    entry_dir = save(tmp_path, compressed_model, run_config)
    document = json.loads((entry_dir / ENTRY_JSON).read_text())
    document["format_version"] = 99
    (entry_dir / ENTRY_JSON).write_text(json.dumps(document))
    with pytest.raises(EntryError, match="format_version 99"):
        load_entry(entry_dir)


def test_weights_that_do_not_fit_the_architecture_are_refused(tmp_path, run_config, compressed_model):
    entry_dir = save(tmp_path, compressed_model, run_config)
    document = json.loads((entry_dir / ENTRY_JSON).read_text())
    document["model"]["num_classes"] = 5
    (entry_dir / ENTRY_JSON).write_text(json.dumps(document))
    with pytest.raises(EntryError, match="do not fit the model rebuilt from entry.json: .*fc") as refused:
        build_model_from_entry(load_entry(entry_dir))
    assert "\n" not in str(refused.value)


def test_resaving_replaces_the_entry_consistently(tmp_path, run_config, compressed_model):
    second = make_compressed_model(seed=1)
    save(tmp_path, compressed_model, run_config)
    save(tmp_path, second, run_config)
    inputs = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(build_model_from_entry(load_entry(tmp_path))(inputs), second(inputs))
