"""The quality gate: decided on integer counts, or on the exact NLL sum, never on a rounded percentage.

An entry passes a top-1 gate when ``correct / total >= threshold``, checked in integers as
``correct * denominator >= numerator * total``. A perplexity gate needs perplexity strictly below the
threshold (the rules doc's strict reading of "below 35"), decided on the sums as
``nll_sum < tokens · ln(threshold)``: the summed negative log-likelihood (nats, float64) of the predicted
tokens against their count, so no rounded perplexity can tip the verdict. Each task's gate is in the table of
:mod:`scoring.challenge`.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from fractions import Fraction

from scoring.challenge import PERPLEXITY, TOP1, gate_for


@dataclass(frozen=True)
class GateResult:
    """The verdict, with what it was decided on."""

    task: str
    metric: str
    threshold: Fraction
    passed: bool
    correct: int | None = None
    total: int | None = None
    nll_sum: float | None = None

    @property
    def value(self) -> float:
        """The measured top-1 accuracy or perplexity."""
        return self.correct / self.total if self.metric == TOP1 else self.perplexity

    @property
    def perplexity(self) -> float | None:
        """exp(nll_sum / tokens) for a perplexity gate (``total`` counts the predicted tokens)."""
        return math.exp(self.nll_sum / self.total) if self.nll_sum is not None else None

    def describe(self) -> str:
        """One line: the verdict with the exact numbers behind it."""
        verdict = "PASSED" if self.passed else "FAILED"
        if self.metric == TOP1:
            needed = -(-self.threshold.numerator * self.total // self.threshold.denominator)
            return (f"gate {verdict}: top-1 {self.correct}/{self.total} = {self.value:.4%} "
                    f"(needs >= {float(self.threshold):.2%}: at least {needed} correct)")
        threshold = float(self.threshold)
        return (f"gate {verdict}: perplexity {self.perplexity:.4f} = exp({self.nll_sum:.3f} / {self.total:,} tokens) "
                f"(needs < {threshold:g}: NLL below {self.total:,} · ln {threshold:g} = "
                f"{self.total * math.log(threshold):.3f})")


def check_gate(task: str, *, correct: int | None = None, total: int | None = None,
               nll_sum: float | None = None) -> GateResult:
    """Decide the gate of ``task`` from exact counts: ``correct`` of ``total`` (top-1 tasks), or the summed
    NLL ``nll_sum`` (nats) of ``total`` predicted tokens (perplexity tasks)."""
    gate = gate_for(task)
    try:  # exact integers only (numpy/torch integer scalars are fine, floats are not)
        total = operator.index(total) if total is not None else None
        correct = operator.index(correct) if correct is not None else None
    except TypeError:
        raise TypeError(f"correct and total must be integers, got {correct!r} and {total!r}") from None
    if gate.metric == PERPLEXITY:
        if nll_sum is None or total is None or correct is not None:
            raise ValueError(f"task {task!r} is gated on perplexity: pass nll_sum= and total= (predicted tokens) only")
        if not (total > 0 and math.isfinite(nll_sum) and nll_sum >= 0):
            raise ValueError(f"need total > 0 predicted tokens and a finite nll_sum >= 0, got total={total}, "
                             f"nll_sum={nll_sum}")
        passed = float(nll_sum) < total * math.log(gate.threshold)
        return GateResult(task, gate.metric, gate.threshold, passed, total=total, nll_sum=float(nll_sum))
    if correct is None or total is None or nll_sum is not None:
        raise ValueError(f"task {task!r} is gated on top-1: pass correct= and total= (integers) only")
    if not 0 <= correct <= total or total == 0:
        raise ValueError(f"need 0 <= correct <= total and total > 0, got correct={correct}, total={total}")
    passed = correct * gate.threshold.denominator >= gate.threshold.numerator * total
    return GateResult(task, gate.metric, gate.threshold, passed, correct=correct, total=total)
