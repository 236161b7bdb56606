"""The quality gate, decided on integer counts."""
from __future__ import annotations

import numpy as np
import pytest

from scoring import check_gate
from scoring.rules import UnknownTaskError


@pytest.mark.parametrize("task, total, needed", [("imagenet", 50_000, 37_500), ("cifar100", 10_000, 8_000),
                                                 ("digits", 360, 342), ("digits", 361, 343)])
def test_top1_gate_is_exact_at_the_boundary(task, total, needed):
    assert check_gate(task, correct=needed, total=total).passed
    assert not check_gate(task, correct=needed - 1, total=total).passed


def test_no_float_rounding_decides_the_gate():
    # 0.8 is not exact in binary; 8 of 10 must pass and 80000001/100000002 must fail.
    assert check_gate("cifar100", correct=8, total=10).passed
    assert not check_gate("cifar100", correct=80_000_000, total=100_000_001).passed


def test_perplexity_gate_is_strict():
    assert check_gate("wikitext103", perplexity=34.999).passed
    assert not check_gate("wikitext103", perplexity=35.0).passed


def test_describe_names_exact_counts():
    result = check_gate("imagenet", correct=np.int64(37_499), total=50_000)
    assert result.describe() == "gate FAILED: top-1 37499/50000 = 74.9980% (needs >= 75.00%: at least 37500 correct)"
    assert check_gate("wikitext103", perplexity=30.0).describe() == "gate PASSED: perplexity 30.0000 (needs < 35)"


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(task="mnist", correct=1, total=2), UnknownTaskError, "known tasks: imagenet"),
    (dict(task="digits", correct=0.9, total=1), TypeError, "must be integers"),
    (dict(task="digits", correct=3, total=2), ValueError, "0 <= correct <= total"),
    (dict(task="digits", correct=0, total=0), ValueError, "total > 0"),
    (dict(task="digits", perplexity=3.0), ValueError, "gated on top-1"),
    (dict(task="wikitext103", correct=1, total=1), ValueError, "gated on perplexity"),
])
def test_bad_gate_input_is_refused(kwargs, error, message):
    with pytest.raises(error, match=message):
        check_gate(**kwargs)
