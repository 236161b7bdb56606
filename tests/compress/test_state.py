"""Compression state: JSON description, rebuild on a fresh model with a strict load, export finalisation."""
from __future__ import annotations

import json

import pytest
import torch

from compress import PruneTechnique, QuantizeTechnique, WeightMask, apply_compression_state, compression_state, \
    finalize_for_export, mask_zeros
from compress.base import find_parametrization, weight_parametrizations
from models import create_model

from .loop import Digits, train


@pytest.fixture
def compressed(digits: Digits):
    """digits_cnn pruned (80%), then 4-bit LSQ QAT with frozen BatchNorm, short."""
    model = create_model("digits_cnn", num_classes=10)
    prune = PruneTechnique({"final_sparsity": 0.8, "end": 0.5, "frequency": 0.25}, stage_epochs=1, where="prune")
    train(model, digits, epochs=1, techniques=[prune])
    quantize = QuantizeTechnique({"weight_bits": 4, "activation_bits": 4, "unit": "epoch", "freeze_bn": 1},
                                 stage_epochs=2, where="quantize")
    train(model, digits, epochs=2, techniques=[quantize], lr=0.02)
    return model


def test_round_trip_restores_the_exact_model(compressed, digits: Digits):
    state = json.loads(json.dumps(compression_state(compressed)))  # JSON-able
    assert state["weights"]["conv2.0"] == [{"kind": "mask"}, {"kind": "weight_quantizer", "bits": 4, "method": "lsq"}]
    assert state["weights"]["conv1.0"] == [{"kind": "weight_quantizer", "bits": 8, "method": "lsq"}]
    assert state["inputs"]["fc"]["bits"] == 8 and state["inputs"]["conv3.0"]["bits"] == 4

    fresh = create_model("digits_cnn", num_classes=10)
    apply_compression_state(fresh, state)
    fresh.load_state_dict(compressed.state_dict(), strict=True)
    compressed.eval(), fresh.eval()
    assert torch.equal(fresh(digits.test_x), compressed(digits.test_x))
    apply_compression_state(fresh, state)  # idempotent
    assert compression_state(fresh) == state


def test_finalize_bakes_masks_and_keeps_quantizers(compressed, digits: Digits):
    compressed.eval()
    before = compressed(digits.test_x)
    mask = find_parametrization(compressed.conv3[0], WeightMask).mask.clone()
    finalize_for_export(compressed)
    assert find_parametrization(compressed.conv3[0], WeightMask) is None
    assert [p.kind for p in weight_parametrizations(compressed.conv3[0])] == ["weight_quantizer"]
    stored = compressed.conv3[0].parametrizations["weight"].original
    assert (stored[~mask] == 0).all() and (compressed.conv3[0].weight[~mask] == 0).all()
    assert torch.equal(compressed(digits.test_x), before)
    state = compression_state(compressed)
    fresh = create_model("digits_cnn", num_classes=10)
    apply_compression_state(fresh, state)
    fresh.load_state_dict(compressed.state_dict(), strict=True)
    assert torch.equal(fresh.eval()(digits.test_x), before)
    finalize_for_export(compressed)  # idempotent
    assert compression_state(compressed) == state


def test_mask_only_layers_become_plain_weights_on_export():
    model = create_model("digits_cnn", num_classes=10)
    prune = PruneTechnique({"final_sparsity": 0.5, "unit": "step", "start": 0, "end": 0, "frequency": 1},
                           stage_epochs=1, where="prune")
    prune.configure(steps_per_epoch=1)
    prune.attach(model)
    prune.on_step_end(model, 0)
    finalize_for_export(model)
    assert compression_state(model)["weights"] == {}
    assert isinstance(model.conv2[0].weight, torch.nn.Parameter)
    assert float((model.conv2[0].weight == 0).float().mean()) == 0.5
    assert set(create_model("digits_cnn", num_classes=10).state_dict()) == set(model.state_dict())


def test_state_for_another_architecture_fails_clearly(compressed):
    state = compression_state(compressed)
    with pytest.raises(ValueError, match="names layer 'conv1.0', which this model does not have"):
        apply_compression_state(create_model("resnet18_cifar", num_classes=10), state)
    with pytest.raises(ValueError, match="compression state format 7 is not supported; expected 1"):
        apply_compression_state(create_model("digits_cnn", num_classes=10), {**state, "format": 7})


def test_a_later_stage_structure_extends_an_earlier_one(compressed):
    """Resuming the QAT stage: the model already carries the prune stage's masks (restored from that stage's
    checkpoint), and the QAT checkpoint's description adds the quantizers on top of them."""
    state = compression_state(compressed)
    earlier = {**state, "weights": {name: chain[:1] for name, chain in state["weights"].items()
                                    if chain[0]["kind"] == "mask"}, "inputs": {}}
    fresh = create_model("digits_cnn", num_classes=10)
    apply_compression_state(fresh, earlier)
    apply_compression_state(fresh, state)
    assert compression_state(fresh) == state
    fresh.load_state_dict(compressed.state_dict(), strict=True)
    with pytest.raises(ValueError, match="already carries"):  # a chain that is not a prefix is still refused
        apply_compression_state(fresh, earlier | {"weights": {"conv2.0": [{"kind": "mask"}]}})


def test_masks_come_back_from_an_entrys_zeros_and_keep_them_through_training(compressed, digits: Digits):
    """``init=<pruned entry>``: the entry has its masks baked in; further training must not revive the zeros."""
    masks = {name: find_parametrization(compressed.get_submodule(name), WeightMask).mask.clone()
             for name in ("conv2.0", "conv3.0")}
    finalize_for_export(compressed)
    assert all(find_parametrization(compressed.get_submodule(name), WeightMask) is None for name in masks)
    assert mask_zeros(compressed) == ["conv2.0", "conv3.0"]  # the dense first and last layers get none
    for name, mask in masks.items():
        restored = find_parametrization(compressed.get_submodule(name), WeightMask)
        assert torch.equal(restored.mask, mask)
        assert [p.kind for p in weight_parametrizations(compressed.get_submodule(name))] == ["mask", "weight_quantizer"]
    quantize = QuantizeTechnique({"weight_bits": 4, "activation_bits": 4}, stage_epochs=1, where="quantize")
    train(compressed, digits, epochs=1, techniques=[quantize], lr=0.02)
    for name, mask in masks.items():
        assert (compressed.get_submodule(name).weight[~mask] == 0).all()
    assert mask_zeros(compressed) == []  # idempotent
