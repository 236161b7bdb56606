"""Gradual magnitude pruning: the schedule, exact per-layer sparsity, structure, masks that stay zero."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from compress import CubicSchedule, PruneTechnique, QuantizeTechnique, WeightMask, mask_sparsity
from compress.base import find_parametrization, original_weight
from models import create_model

from .loop import Digits, train


def prune(cfg: dict, *, epochs: int = 1, steps: int = 10) -> PruneTechnique:
    technique = PruneTechnique(cfg, stage_epochs=epochs, where="prune")
    technique.configure(steps_per_epoch=steps)
    return technique


def pruned_fraction(module: nn.Module) -> float:
    weight = module.weight.detach()
    return float((weight == 0).sum()) / weight.numel()


def test_schedule_equals_zhu_gupta_formula_at_its_steps():
    s_i, s_f, t0, dt, n = 0.1, 0.85, 40, 7, 12
    schedule = CubicSchedule(initial=s_i, final=s_f, start=t0, end=t0 + n * dt, frequency=dt)
    for k in range(n + 1):
        t = t0 + k * dt
        assert schedule.updates_at(t)
        assert schedule.sparsity(t) == pytest.approx(s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3, abs=1e-12)
    assert [t for t in range(t0 + n * dt + 20) if schedule.updates_at(t)] == [t0 + k * dt for k in range(n + 1)]
    assert schedule.sparsity(0) == pytest.approx(s_i) and schedule.sparsity(10_000) == s_f


def test_stage_fractions_and_epochs_convert_to_steps():
    by_fraction = prune({"final_sparsity": 0.5, "start": 0.1, "end": 0.5, "frequency": 0.05}, epochs=10, steps=20)
    assert by_fraction.schedule == CubicSchedule(0.0, 0.5, start=20, end=100, frequency=10)
    by_epoch = prune({"final_sparsity": 0.5, "unit": "epoch", "start": 1, "end": 10, "frequency": 0.5},
                     epochs=10, steps=20)
    # an end at the very end of the stage is reached at its last step (199)
    assert by_epoch.schedule == CubicSchedule(0.0, 0.5, start=20, end=199, frequency=10)


@pytest.mark.parametrize("ranking", ["layer", "global"])
def test_zero_fraction_matches_target_within_one_weight(ranking: str):
    torch.manual_seed(0)
    model = create_model("resnet18_cifar", num_classes=100)
    technique = prune({"final_sparsity": 0.7, "unit": "step", "start": 0, "end": 0, "frequency": 1,
                       "ranking": ranking, "layer_sparsity": {"layer4.1.conv2": 0.3}})
    technique.attach(model)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    before = {name: m.weight.detach().abs() for name, m in layers.items()}
    technique.on_step_end(model, 0)
    assert pruned_fraction(layers["conv1"]) == 0 and pruned_fraction(layers["fc"]) == 0  # first / last kept
    special = layers.pop("layer4.1.conv2")
    assert abs(pruned_fraction(special) - 0.3) * special.weight.numel() <= 1
    pooled = [m for name, m in layers.items() if name not in ("conv1", "fc")]
    if ranking == "layer":
        for module in pooled:
            assert abs(pruned_fraction(module) - 0.7) * module.weight.numel() <= 1
    else:
        total = sum(m.weight.numel() for m in pooled)
        zeros = sum(int((m.weight == 0).sum()) for m in pooled)
        assert abs(zeros - 0.7 * total) <= 1
        assert len({round(pruned_fraction(m), 2) for m in pooled}) > 1  # one threshold, different fractions
        pooled_names = [name for name in layers if name not in ("conv1", "fc")]
        kept = torch.cat([before[n][layers[n].weight != 0] for n in pooled_names])
        pruned = torch.cat([before[n][layers[n].weight == 0] for n in pooled_names])
        assert pruned.max() <= kept.min()  # one magnitude threshold across the pooled layers


def test_block_and_nm_structure():
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 16, 3), nn.Conv2d(16, 4, 1))
    technique = prune({"final_sparsity": 0.5, "unit": "step", "start": 0, "end": 0, "frequency": 1,
                       "structure": "block", "block_shape": [2, 8], "first_last_sparsity": None})
    technique.attach(conv)
    technique.on_step_end(conv, 0)
    blocks = conv[1].weight.detach().flatten(1).unflatten(1, (-1, 8)).unflatten(0, (-1, 2))  # 8 x 2 x 9 x 8
    per_block = (blocks != 0).sum((1, 3))
    assert set(per_block.unique().tolist()) == {0, 16}  # every 2x8 block all zero or all kept
    assert (per_block == 0).sum() == per_block.numel() // 2

    nm = prune({"structure": "nm", "nm": [2, 4], "unit": "step", "start": 0, "end": 0, "frequency": 1,
                "first_last_sparsity": None})
    fresh = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Linear(8, 4))
    nm.attach(fresh)
    nm.on_step_end(fresh, 0)
    for module in fresh:
        groups = module.weight.detach().flatten(1).unflatten(1, (-1, 4))
        assert ((groups != 0).sum(2) == 2).all()


def test_masks_never_revive_and_state_is_a_bool_buffer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.Linear(30, 30), nn.Linear(30, 5))
    technique = prune({"final_sparsity": 0.6, "initial_sparsity": 0.2, "unit": "step", "start": 0, "end": 8,
                       "frequency": 2}, steps=10)
    technique.attach(model)
    previous = torch.ones(30, 30, dtype=torch.bool)
    for step in range(10):
        with torch.no_grad():
            original_weight(model[1]).add_(torch.randn(30, 30))  # reshuffle magnitudes
        technique.on_step_end(model, step)
        mask = find_parametrization(model[1], WeightMask).mask
        assert mask.dtype == torch.bool and not (mask & ~previous).any()
        previous = mask.clone()
    assert mask_sparsity(model) == {"1": pytest.approx(540 / 900)}
    assert "1.parametrizations.weight.0.mask" in model.state_dict()


def test_pruned_weights_stay_zero_through_training_and_qat(digits: Digits):
    model = create_model("digits_cnn", num_classes=10)
    technique = PruneTechnique({"final_sparsity": 0.8, "unit": "epoch", "start": 0, "end": 1, "frequency": 0.25},
                               stage_epochs=2, where="prune")
    train(model, digits, epochs=2, techniques=[technique])
    masks = {name: find_parametrization(m, WeightMask).mask.clone() for name, m in model.named_modules()
             if find_parametrization(m, WeightMask) is not None}
    assert set(masks) == {"conv2.0", "conv3.0"}
    for name, mask in masks.items():
        module = model.get_submodule(name)
        assert (original_weight(module)[~mask] == 0).all()  # zeroed after every step of the pruning stage
        assert abs(float((~mask).float().mean()) - 0.8) * mask.numel() <= 1
    # A later QAT stage (no pruning technique), with momentum and weight decay: the executed weights stay zero.
    quantize = QuantizeTechnique({"weight_bits": 4, "activation_bits": 8}, stage_epochs=2, where="quantize")
    train(model, digits, epochs=2, techniques=[quantize], lr=0.05, weight_decay=5e-3)
    for name, mask in masks.items():
        module = model.get_submodule(name)
        assert torch.equal(find_parametrization(module, WeightMask).mask, mask)
        assert (module.weight[~mask] == 0).all()
        assert (module.weight[mask] != 0).float().mean() > 0.5  # the kept weights are still alive


@pytest.mark.parametrize("cfg, message", [
    ({"final_sparsity": 1.0}, "prune.final_sparsity=1.0: expected a number in [0.0, 1.0)"),
    ({"final_sparsity": 0.5, "initial_sparsity": 0.7}, "prune.initial_sparsity=0.7: expected a number in [0.0, 0.5]"),
    ({"final_sparsity": 0.5, "ranking": "best"}, "prune.ranking='best': expected one of layer, global"),
    ({"final_sparsity": 0.5, "end": 1.5}, "prune.end=1.5: expected a number in [0.0, 1.0]"),
    ({"final_sparsity": 0.5, "unit": "epoch", "start": 0, "end": 1}, "prune.frequency is missing"),
    ({"final_sparsity": 0.5, "sparsity": 0.5}, "prune: unknown key(s) sparsity"),
    ({"final_sparsity": 0.5, "block_shape": [1, 4]}, "prune.block_shape=[1, 4]: expected nothing"),
    ({"structure": "nm", "nm": [4, 2]}, "prune.nm=[4, 2]: expected [n, m] with n < m"),
    ({"final_sparsity": 0.5, "unit": "step", "start": 0, "end": 10, "frequency": 2.5},
     "prune.frequency=2.5: expected a whole number of steps (unit=step)"),
])
def test_bad_config_names_key_value_and_range(cfg: dict, message: str):
    with pytest.raises(ValueError) as err:
        PruneTechnique(cfg, stage_epochs=4, where="prune")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_pattern_matching_no_layer_is_an_error():
    technique = prune({"final_sparsity": 0.5, "exclude": ["conv9"]})
    with pytest.raises(ValueError, match="exclude pattern 'conv9' matches no Conv/Linear/Embedding layer; layers are: conv1.0"):
        technique.attach(create_model("digits_cnn", num_classes=10))


def test_step_unit_end_beyond_the_stage_is_an_error():
    technique = PruneTechnique({"final_sparsity": 0.5, "unit": "step", "start": 0, "end": 50, "frequency": 5},
                               stage_epochs=2, where="prune")
    with pytest.raises(ValueError, match=r"prune.end=50.0: expected a step within the stage \(at most 19"):
        technique.configure(steps_per_epoch=10)



def test_exact_zeros_tied_with_pruned_weights_do_not_prune_past_the_target():
    layer = nn.Sequential(nn.Linear(1000, 1, bias=False))
    prune = PruneTechnique({"final_sparsity": 0.5, "first_last_sparsity": None, "unit": "step", "start": 0,
                            "end": 0, "frequency": 1}, stage_epochs=1, where="prune")
    prune.configure(steps_per_epoch=1)
    prune.attach(layer)
    with torch.no_grad():  # 600 exact zeros, and the first 100 weights already pruned by an earlier update
        original_weight(layer[0]).copy_(torch.cat([torch.arange(1.0, 401.0), torch.zeros(600)]).view(1, -1))
    mask = find_parametrization(layer[0], WeightMask)
    keep = torch.ones(1, 1000, dtype=torch.bool)
    keep[0, :100] = False
    mask.restrict(keep)
    prune.on_step_end(layer, 0)
    assert int((~mask.mask).sum()) == 500 and not mask.mask[0, :100].any()
