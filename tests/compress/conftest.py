"""Fixtures of the compress tests: the digits data and a trained digits_cnn (trained once per session)."""
from __future__ import annotations

import copy

import pytest
import torch.nn as nn

from models import create_model

from .loop import Digits, correct, load_digits_split, train


@pytest.fixture(scope="session")
def digits() -> Digits:
    return load_digits_split()


@pytest.fixture(scope="session")
def _trained_digits_cnn(digits: Digits) -> tuple[nn.Module, int]:
    model = create_model("digits_cnn", num_classes=10)
    train(model, digits, epochs=12)
    return model, correct(model, digits)


@pytest.fixture
def trained(_trained_digits_cnn: tuple[nn.Module, int]) -> tuple[nn.Module, int]:
    """A fresh copy of the trained digits_cnn and its correct test predictions."""
    model, score = _trained_digits_cnn
    return copy.deepcopy(model), score
