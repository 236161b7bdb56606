"""build_mixup: timm's Mixup/CutMix from the augment options."""
import numpy as np
import pytest
import torch

from data import build_loaders, build_mixup

from .conftest import loader_kwargs


def test_off_by_default():
    assert build_mixup({}, 100) is None
    assert build_mixup({"mixup": 0.0, "cutmix": 0}, 100) is None


@pytest.mark.parametrize("augment", [{"mixup": 0.8}, {"cutmix": 1.0}, {"mixup": 0.8, "cutmix": 1.0}])
def test_mixes_inputs_and_gives_soft_targets(augment):
    np.random.seed(0)  # timm draws lambda from NumPy's global RNG
    mix = build_mixup(augment, num_classes=10)
    inputs = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 8, 8).clone()
    targets = torch.tensor([0, 1, 2, 3])
    mixed, soft = mix(inputs.clone(), targets)
    assert soft.shape == (4, 10)
    assert torch.allclose(soft.sum(1), torch.ones(4))  # no label smoothing here: it belongs to the loss
    # Example i is mixed with example 3 - i (timm flips the batch): exactly those two labels carry weight.
    for i in range(4):
        assert set(soft[i].nonzero().flatten().tolist()) <= {i, 3 - i}
    lam = soft[0, 0].item()
    assert 0 < lam < 1
    # The input weights equal the target weights (mixup: blend; CutMix: area fraction).
    assert mixed[0].mean().item() == pytest.approx(lam * 0 + (1 - lam) * 3, abs=1e-5)


def test_bad_alpha_fails():
    with pytest.raises(ValueError, match="augment.cutmix must be an alpha >= 0"):
        build_mixup({"cutmix": "strong"}, 10)


@pytest.mark.parametrize("augment", [{"mixup": 0.2}, {"cutmix": 1.0}])
def test_an_odd_batch_size_is_refused_at_build_time(augment):
    """timm's Mixup asserts an even batch at the first training step; the loaders refuse it before training."""
    with pytest.raises(ValueError, match="augment.mixup / augment.cutmix need an even batch_size .* got 63"):
        build_loaders("digits", **loader_kwargs(batch_size=63, augment=augment))
    train, _, _ = build_loaders("digits", **loader_kwargs(batch_size=64, augment=augment))
    assert len(train) == 1437 // 64
