"""The challenge's constants per task, in one table: the baseline the score divides by, the quality gate, and the
metric the gate is on with its direction.

    from scoring.challenge import TASKS
    TASKS["cifar100"].baseline.params   # 36,500,000
    TASKS["cifar100"].gate              # Gate(metric="top1", threshold=Fraction(4, 5))
    TASKS["wikitext103"].higher_is_better   # False: perplexity

Everything else that needs one of these facts (the gate's verdict, the score, the report, the run config, verify)
reads it here; ``conf/task/*.yaml`` defines the data and the evaluation of a task, never its gate or baseline.
This module is the judge's and imports nothing of ours but :mod:`scoring.errors`.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from types import MappingProxyType
from typing import Mapping

from scoring.errors import UserError

#: Top-1 accuracy, on the exact count of correct predictions over the test set.
TOP1 = "top1"
#: Perplexity, exp(mean NLL), on the exact NLL sum over the predicted tokens of the test stream.
PERPLEXITY = "perplexity"
#: Whether a larger value of each metric is better.
HIGHER_IS_BETTER: Mapping[str, bool] = MappingProxyType({TOP1: True, PERPLEXITY: False})


class UnknownTaskError(UserError, ValueError):
    """A task name with no baseline or gate."""


@dataclass(frozen=True)
class Baseline:
    """A task's reference model and the constants the score divides by."""

    model: str
    params: int
    ops: int


@dataclass(frozen=True)
class Gate:
    """A task's gate: ``metric`` (:data:`TOP1` | :data:`PERPLEXITY`) against an exact ``threshold``."""

    metric: str
    threshold: Fraction


@dataclass(frozen=True)
class ChallengeTask:
    """A task as the challenge fixes it: its baseline and its gate."""

    name: str
    baseline: Baseline
    gate: Gate

    @property
    def metric(self) -> str:
        """The metric the task is judged on (its gate's)."""
        return self.gate.metric

    @property
    def higher_is_better(self) -> bool:
        """Whether a larger value of :attr:`metric` is better."""
        return HIGHER_IS_BETTER[self.metric]


def _table(*tasks: ChallengeTask) -> Mapping[str, ChallengeTask]:
    return MappingProxyType({task.name: task for task in tasks})


#: The rules doc's baselines and gates, plus the project's embedded demos: digits (digits_cnn counted dense at
#: 32 bits without the freebie, batch norm folded) and wikitext_demo (lstm_lm counted likewise per token, on-line,
#: on the first 256 test tokens: the adaptive input's cost depends on the tokens); tests re-count both from the
#: registry. A perplexity gate is strict (the rules doc's "below 35").
TASKS: Mapping[str, ChallengeTask] = _table(
    ChallengeTask("imagenet", Baseline("MobileNetV2 width 1.4", 6_900_000, 1_170_000_000),
                  Gate(TOP1, Fraction(75, 100))),
    ChallengeTask("cifar100", Baseline("WideResNet-28-10", 36_500_000, 10_490_000_000),
                  Gate(TOP1, Fraction(80, 100))),
    ChallengeTask("wikitext103", Baseline("1-layer LSTM, 2048 units, tied 512-d embedding", 159_000_000, 318_000_000),
                  Gate(PERPLEXITY, Fraction(35))),
    ChallengeTask("digits", Baseline("digits_cnn (dense, 32-bit, batch norm folded)", 93_962, 4_771_328),
                  Gate(TOP1, Fraction(95, 100))),
    ChallengeTask("wikitext_demo", Baseline("lstm_lm at the demo's 13,329 words (dense, 32-bit, per token of the "
                                            "first 256 test tokens, fed on-line)", 472_923, 974_021),
                  Gate(PERPLEXITY, Fraction(400))),
)
#: Each task's baseline (from :data:`TASKS`).
BASELINES: Mapping[str, Baseline] = MappingProxyType({name: task.baseline for name, task in TASKS.items()})
#: Each task's gate (from :data:`TASKS`).
GATES: Mapping[str, Gate] = MappingProxyType({name: task.gate for name, task in TASKS.items()})


def challenge_task(name: str) -> ChallengeTask:
    """The constants of task ``name``; :class:`UnknownTaskError` names the known tasks."""
    try:
        return TASKS[name]
    except KeyError:
        raise UnknownTaskError(f"the challenge defines no task {name!r}; known tasks: {', '.join(TASKS)}") from None


def baseline(task: str) -> Baseline:
    """The baseline of ``task``; :class:`UnknownTaskError` names the known tasks."""
    return challenge_task(task).baseline


def gate_for(task: str) -> Gate:
    """The gate of ``task``; :class:`UnknownTaskError` names the known tasks."""
    return challenge_task(task).gate
