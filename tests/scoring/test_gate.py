"""The quality gate, decided on integer counts."""
from __future__ import annotations

import math

import numpy as np
import pytest

from scoring import check_gate
from scoring.challenge import UnknownTaskError


@pytest.mark.parametrize("task, total, needed", [("imagenet", 50_000, 37_500), ("cifar100", 10_000, 8_000),
                                                 ("digits", 360, 342), ("digits", 361, 343)])
def test_top1_gate_is_exact_at_the_boundary(task, total, needed):
    assert check_gate(task, correct=needed, total=total).passed
    assert not check_gate(task, correct=needed - 1, total=total).passed


def test_no_float_rounding_decides_the_gate():
    # 0.8 is not exact in binary; 8 of 10 must pass and 80000001/100000002 must fail.
    assert check_gate("cifar100", correct=8, total=10).passed
    assert not check_gate("cifar100", correct=80_000_000, total=100_000_001).passed


def test_perplexity_gate_is_strict_and_decided_on_the_sums():
    # 10 tokens at perplexity exactly 35 sum to 10 · ln 35 = 35.55348061489414 nats: that fails (strictly below 35);
    # the nearest double below passes.
    at_35 = 10 * math.log(35)
    assert not check_gate("wikitext103", nll_sum=at_35, total=10).passed
    assert check_gate("wikitext103", nll_sum=math.nextafter(at_35, 0), total=10).passed
    assert check_gate("wikitext103", nll_sum=10 * math.log(34.999), total=10).passed


def test_describe_names_exact_counts():
    result = check_gate("imagenet", correct=np.int64(37_499), total=50_000)
    assert result.describe() == "gate FAILED: top-1 37499/50000 = 74.9980% (needs >= 75.00%: at least 37500 correct)"
    assert check_gate("wikitext103", nll_sum=4 * math.log(30.0), total=4).describe() == (
        "gate PASSED: perplexity 30.0000 = exp(13.605 / 4 tokens) (needs < 35: NLL below 4 · ln 35 = 14.221)")


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(task="mnist", correct=1, total=2), UnknownTaskError, "known tasks: imagenet"),
    (dict(task="digits", correct=0.9, total=1), TypeError, "must be integers"),
    (dict(task="digits", correct=3, total=2), ValueError, "0 <= correct <= total"),
    (dict(task="digits", correct=0, total=0), ValueError, "total > 0"),
    (dict(task="digits", nll_sum=3.0, total=2), ValueError, "gated on top-1"),
    (dict(task="wikitext103", correct=1, total=1), ValueError, "gated on perplexity"),
    (dict(task="wikitext103", nll_sum=3.0), ValueError, "gated on perplexity"),
    (dict(task="wikitext103", nll_sum=float("nan"), total=4), ValueError, "finite nll_sum"),
    (dict(task="wikitext103", nll_sum=1.0, total=0), ValueError, "total > 0"),
])
def test_bad_gate_input_is_refused(kwargs, error, message):
    with pytest.raises(error, match=message):
        check_gate(**kwargs)
