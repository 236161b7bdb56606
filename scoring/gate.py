"""The quality gate: decided on integer counts (or the exact perplexity), never on a rounded percentage.

An entry passes a top-1 gate when ``correct / total >= threshold``, checked in integers as
``correct * denominator >= numerator * total``; a perplexity gate needs perplexity strictly below the
threshold.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from fractions import Fraction
from types import MappingProxyType
from typing import Mapping

from scoring.rules import UnknownTaskError

TOP1 = "top1"
PERPLEXITY = "perplexity"


@dataclass(frozen=True)
class Gate:
    """A task's gate: ``metric`` (top1 | perplexity) against an exact ``threshold``."""

    metric: str
    threshold: Fraction


#: The rules doc's gates, plus the project's digits task.
GATES: Mapping[str, Gate] = MappingProxyType({
    "imagenet": Gate(TOP1, Fraction(75, 100)),
    "cifar100": Gate(TOP1, Fraction(80, 100)),
    "digits": Gate(TOP1, Fraction(95, 100)),
    "wikitext103": Gate(PERPLEXITY, Fraction(35)),
})


@dataclass(frozen=True)
class GateResult:
    """The verdict, with what it was decided on."""

    task: str
    metric: str
    threshold: Fraction
    passed: bool
    correct: int | None = None
    total: int | None = None
    perplexity: float | None = None

    @property
    def value(self) -> float:
        """The measured top-1 accuracy or perplexity."""
        return self.correct / self.total if self.metric == TOP1 else self.perplexity

    def describe(self) -> str:
        """One line: the verdict with the exact numbers behind it."""
        verdict = "PASSED" if self.passed else "FAILED"
        if self.metric == TOP1:
            needed = -(-self.threshold.numerator * self.total // self.threshold.denominator)
            return (f"gate {verdict}: top-1 {self.correct}/{self.total} = {self.value:.4%} "
                    f"(needs >= {float(self.threshold):.2%}: at least {needed} correct)")
        return f"gate {verdict}: perplexity {self.perplexity:.4f} (needs < {float(self.threshold):g})"


def gate_for(task: str) -> Gate:
    """The gate of ``task``; :class:`UnknownTaskError` names the known tasks."""
    try:
        return GATES[task]
    except KeyError:
        raise UnknownTaskError(f"no quality gate for task {task!r}; known tasks: {', '.join(GATES)}") from None


def check_gate(task: str, *, correct: int | None = None, total: int | None = None,
               perplexity: float | None = None) -> GateResult:
    """Decide the gate of ``task`` from exact counts (top-1 tasks) or the perplexity (language tasks)."""
    gate = gate_for(task)
    if gate.metric == PERPLEXITY:
        if perplexity is None or correct is not None or total is not None:
            raise ValueError(f"task {task!r} is gated on perplexity: pass perplexity= only")
        if not perplexity > 0:
            raise ValueError(f"perplexity must be positive, got {perplexity}")
        return GateResult(task, gate.metric, gate.threshold, perplexity < gate.threshold, perplexity=perplexity)
    if correct is None or total is None or perplexity is not None:
        raise ValueError(f"task {task!r} is gated on top-1: pass correct= and total= (integers) only")
    try:  # exact integers only (numpy/torch integer scalars are fine, floats are not)
        correct, total = operator.index(correct), operator.index(total)
    except TypeError:
        raise TypeError(f"correct and total must be integers, got {correct!r} and {total!r}") from None
    if not 0 <= correct <= total or total == 0:
        raise ValueError(f"need 0 <= correct <= total and total > 0, got correct={correct}, total={total}")
    passed = correct * gate.threshold.denominator >= gate.threshold.numerator * total
    return GateResult(task, gate.metric, gate.threshold, passed, correct=correct, total=total)
