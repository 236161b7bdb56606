"""Solving: the exact allocation of one (bits, sparsity) per layer, and, across finished runs, the configurations
and their front.

**Allocation.** From a sensitivity measurement (sensitivity.json, train/search/measure.py) :func:`allocate` picks
for every measured layer one setting of the grid that minimises the predicted score

    score = rest + Σ_layers cost(layer, setting)      (params/baseline_params + ops/baseline_ops, from the scorer's
                                                       per-layer table: see train/search/measure.py)

subject to a budget on the predicted increase of the validation loss, ``Σ_layers max(0, loss_increase)`` (nats per
example), or to a target validation metric (top-1 predicted as the reference minus the sum of the per-layer drops;
perplexity as exp(reference loss + the sum of the loss increases)). The reverse problem caps the score instead
(``max_score``): the least predicted loss increase whose predicted score is at most the cap, and among the
choices with that increase the cheapest.

**Additivity assumption.** Each layer's loss increase was measured with that layer alone changed; their sum is
taken as the increase of the combination (interactions between layers are ignored, and a measured improvement
counts as no change). The score side is additive exactly, as long as the freebie is settled: it is lost for the
whole model once any tensor is quantized below 16 bits, so the problem is solved twice, with every setting
costed freebie off, and with only the unquantized settings costed freebie on; the better of the two wins. The
allocation is then checked (:func:`train.search.measure.check`): the model with every chosen setting is counted
(and evaluated one-shot on the validation split), and the counted score is printed next to the predicted one.

**Exact solver.** A multiple-choice knapsack, solved as an integer program with ``scipy.optimize.milp`` (HiGHS,
relative gap 0): binary x[l, s], one setting per layer (Σ_s x[l, s] = 1), Σ penalty·x ≤ budget, minimise Σ cost·x.
A score cap is the same knapsack with the roles swapped (penalty = score, budget = cap − rest, cost = loss
increase), then solved once more as usual with the least increase as the budget, for the cheapest among ties.

**Comparison.** Finished runs (train/search/formats.py) are one configuration when they agree on task, model,
compress and every other setting that defines a run (``train.config.run_settings``) except the seed and ``init``;
a setting that differs inside a (task, model, compress) group is the group's ``variant`` (a setting one run lacks,
e.g. one added since it was written, is no difference). The front is the configurations no other beats on both
mean score and mean test metric.

Imports the search's grid and formats, numpy (scipy where it solves); nothing that trains or draws.
"""
from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scoring.challenge import HIGHER_IS_BETTER, PERPLEXITY
from train.search.formats import Run
from train.search.grid import FREEBIE_OFF, FREEBIE_ON, Setting

#: A loss budget larger than any loss increase (nats per example): every layer takes its cheapest setting. Finite,
#: since the run's config is stored as strict JSON in its entry.
UNLIMITED = 1e9


def solve(costs: Sequence[Sequence[float]], penalties: Sequence[Sequence[float]], budget: float) -> list[int] | None:
    """The multiple-choice knapsack: for each group g one option k minimising Σ costs[g][k] subject to
    Σ penalties[g][k] ≤ budget. Returns the chosen option of each group, or None when no choice fits."""
    # Imported here: every run imports this module (through its allocate stage), and only an allocate stage solves.
    from scipy.optimize import Bounds, LinearConstraint, milp
    sizes = [len(group) for group in costs]
    if any(size == 0 for size in sizes):
        return None
    n = sum(sizes)
    one_each = np.zeros((len(sizes), n))
    start = 0
    for g, size in enumerate(sizes):
        one_each[g, start:start + size] = 1
        start += size
    penalty = np.concatenate([np.asarray(p, dtype=float) for p in penalties])[None, :]
    result = milp(np.concatenate([np.asarray(c, dtype=float) for c in costs]), integrality=np.ones(n),
                  bounds=Bounds(0, 1), constraints=[LinearConstraint(one_each, 1, 1),
                                                    LinearConstraint(penalty, -np.inf, budget)],
                  options={"mip_rel_gap": 0.0})
    if result.x is None:  # infeasible (status 2); milp raises nothing
        return None
    choice, start = [], 0
    for size in sizes:
        choice.append(int(np.argmax(result.x[start:start + size])))
        start += size
    return choice


@dataclass
class Allocation:
    """The chosen setting of every layer, and what the sensitivity predicts for it."""

    settings: dict[str, Setting]
    freebie: bool
    #: Predicted score and its parts (rest + the chosen settings' costs).
    score: float
    params: float
    ops: float
    #: Predicted validation-loss increase (sum of the layers' clamped increases) and validation metric.
    loss_increase: float
    metric: float
    constraint: str
    #: Filled by :func:`train.search.measure.check`: the counted score and the one-shot validation result of the combination.
    counted: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON: ``layers`` ({layer: {bits, sparsity}}), freebie, constraint, ``predicted`` and ``counted``."""
        return {"layers": {layer: dataclasses.asdict(s) for layer, s in self.settings.items()}, "freebie": self.freebie,
                "constraint": self.constraint, "predicted": {key: getattr(self, key) for key in _PREDICTED},
                "counted": self.counted}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Allocation:
        """The inverse of :meth:`to_dict` (other keys of ``data`` are ignored)."""
        return cls(settings={layer: Setting(**s) for layer, s in data["layers"].items()}, freebie=data["freebie"],
                   constraint=data["constraint"], counted=dict(data["counted"]), **data["predicted"])


#: The predictions of an :class:`Allocation`, as :meth:`Allocation.to_dict` groups them.
_PREDICTED = ("score", "params", "ops", "loss_increase", "metric")


def _loss_increases(layers: Sequence[Mapping[str, Any]]) -> list[list[float]]:
    """Every layer's settings' predicted validation-loss increases (a measured improvement counts as none)."""
    return [[max(0.0, s["loss_increase"]) for s in layer["settings"]] for layer in layers]


def _penalties(sensitivity: Mapping[str, Any], loss_budget: float | None,
               target_metric: float | None) -> tuple[str, float, list[list[float]]]:
    """(description, budget, penalty of every layer's settings) of the constraint."""
    ref = sensitivity["reference"]
    layers = sensitivity["layers"]
    if (loss_budget is None) == (target_metric is None):
        raise ValueError("give exactly one of a loss budget and a target metric")
    if loss_budget is not None or sensitivity["metric"] == PERPLEXITY:
        if loss_budget is None:  # perplexity = exp(mean loss): a target is a loss budget
            loss_budget = math.log(target_metric) - ref["loss"]
            description = f"validation perplexity <= {target_metric:g}"
        else:
            description = f"validation loss increase <= {loss_budget:g}"
        return description, loss_budget, _loss_increases(layers)
    if not sensitivity["higher_is_better"]:
        raise ValueError(f"a target for metric {sensitivity['metric']!r} is not supported; use --budget")
    penalties = [[max(0.0, -s["metric_change"]) for s in layer["settings"]] for layer in layers]
    return f"validation {sensitivity['metric']} >= {target_metric:g}", ref["metric"] - target_metric, penalties


def _capped(costs: Sequence[Sequence[float]], losses: Sequence[Sequence[float]], room: float) -> list[int] | None:
    """The least loss within ``room`` of score, and among the choices with that loss the cheapest: :func:`solve`
    with the roles of cost and penalty swapped, then as usual (the first choice keeps the second feasible)."""
    least = solve(losses, costs, room)
    if least is None:
        return None
    return solve(costs, losses, sum(loss[k] for loss, k in zip(losses, least))) or least


def allocate(sensitivity: Mapping[str, Any], *, loss_budget: float | None = None, target_metric: float | None = None,
             max_score: float | None = None) -> Allocation | None:
    """The exact optimum for one budget or target, the least score; or, with ``max_score``, the least predicted
    loss increase whose predicted score is at most ``max_score`` (see the module docstring). None when no choice
    meets the constraint."""
    layers, ref = sensitivity["layers"], sensitivity["reference"]
    if max_score is None:
        description, budget, penalties = _penalties(sensitivity, loss_budget, target_metric)
    elif loss_budget is None and target_metric is None:
        description, penalties = f"predicted score <= {max_score:.6f}", _loss_increases(layers)
    else:
        raise ValueError("give exactly one of a loss budget, a target metric and a score cap")
    best: tuple[tuple[float, float], bool, list[int]] | None = None
    for mode in ref["rest"]:
        # Freebie on: only the unquantized settings (their cost counted with the freebie) are allowed.
        allowed = [[k for k, s in enumerate(layer["settings"]) if mode in s["cost"]] for layer in layers]
        costs = [[layer["settings"][k]["cost"][mode]["score"] for k in ks] for layer, ks in zip(layers, allowed)]
        mode_penalties = [[p[k] for k in ks] for p, ks in zip(penalties, allowed)]
        choice = solve(costs, mode_penalties, budget) if max_score is None \
            else _capped(costs, mode_penalties, max_score - ref["rest"][mode]["score"])
        if choice is None:
            continue
        total = ref["rest"][mode]["score"] + sum(c[k] for c, k in zip(costs, choice))
        loss = sum(p[k] for p, k in zip(mode_penalties, choice))
        objective = (total, loss) if max_score is None else (loss, total)
        if best is None or objective < best[0]:
            best = (objective, mode == FREEBIE_ON, [ks[c] for ks, c in zip(allowed, choice)])
    if best is None:
        return None
    _, freebie, picked = best
    mode = FREEBIE_ON if freebie else FREEBIE_OFF
    chosen = [layer["settings"][k] for layer, k in zip(layers, picked)]
    total = ref["rest"][mode]["score"] + sum(s["cost"][mode]["score"] for s in chosen)
    loss = sum(max(0.0, s["loss_increase"]) for s in chosen)
    if sensitivity["metric"] == PERPLEXITY:
        metric = math.exp(ref["loss"] + loss)
    else:
        metric = ref["metric"] + sum(min(0.0, s["metric_change"]) for s in chosen)
    return Allocation(
        settings={layer["name"]: Setting(s["bits"], s["sparsity"]) for layer, s in zip(layers, chosen)},
        freebie=freebie, score=total,
        params=ref["rest"][mode]["params"] + sum(s["cost"][mode]["params"] for s in chosen),
        ops=ref["rest"][mode]["ops"] + sum(s["cost"][mode]["ops"] for s in chosen),
        loss_increase=loss, metric=metric, constraint=description)


# --- comparison ----------------------------------------------------------------------------------------
@dataclass
class Group:
    """The runs of one configuration."""

    task: str
    model: str
    compress: str
    variant: str
    runs: list[Run]

    @property
    def label(self) -> str:
        return self.compress + (f" [{self.variant}]" if self.variant else "")

    def values(self, key: str) -> list[float]:
        return [getattr(run, key) for run in self.runs if getattr(run, key) is not None]

    def worst(self) -> Run | None:
        """The run with the worst test metric."""
        scored = [run for run in self.runs if run.test is not None]
        if not scored:
            return None
        pick = min if HIGHER_IS_BETTER[scored[0].metric] else max
        return pick(scored, key=lambda run: run.test)


def group_runs(runs: Sequence[Run]) -> list[Group]:
    """Runs grouped by (task, model, compress) and the run settings that differ within that, by mean score."""
    by_name: dict[tuple[str, str, str], list[Run]] = {}
    for run in runs:
        by_name.setdefault((run.task, run.model, run.compress), []).append(run)
    groups = []
    for (task, model, compress), members in by_name.items():
        keys = sorted({key for run in members for key in run.settings})
        # None is what a run written before a setting existed reads for it (train.config._select): no difference
        differing = [key for key in keys if len({json.dumps(run.settings[key], sort_keys=True) for run in members
                                                  if run.settings.get(key) is not None}) > 1]
        variants: dict[str, list[Run]] = {}
        for run in members:
            run.variant = ", ".join(f"{key}={run.settings.get(key)}" for key in differing)
            variants.setdefault(run.variant, []).append(run)
        groups += [Group(task, model, compress, variant, sorted(group, key=lambda r: (r.seed is None, r.seed or 0)))
                   for variant, group in variants.items()]
    return sorted(groups, key=lambda g: (g.task, statistics.fmean(g.values("score"))))


def front(groups: Sequence[Group]) -> list[Group]:
    """The configurations no other beats on both mean score (lower) and mean test metric, by score."""
    scored = [g for g in groups if g.values("test")]
    if not scored:
        return []
    sign = 1.0 if HIGHER_IS_BETTER[scored[0].runs[0].metric] else -1.0
    points = [(statistics.fmean(g.values("score")), sign * statistics.fmean(g.values("test")), g) for g in scored]
    kept = [g for s, m, g in points
            if not any(s2 <= s and m2 >= m and (s2 < s or m2 > m) for s2, m2, _ in points)]
    return sorted(kept, key=lambda g: statistics.fmean(g.values("score")))
