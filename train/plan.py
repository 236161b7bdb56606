"""``plan=true``: the final model of a recipe, built and counted without training it.

A plan starts from the run's model (the registry's, initialised with the run's seed, or the ``init=`` model) and
attaches every technique of every stage, in run order, at its end-of-schedule target (:func:`compress.attach_final`):
magnitude masks on the initial weights at each layer's final sparsity (with the stage's ranking, unit, first/last
and per-layer settings), weight quantizers at their bit widths, and input quantizers calibrated on a few batches
(:func:`compress.calibrate`, batch norms left as they are): training batches where the data is on disk,
synthetic inputs of the task's shape where it is not. A distillation teacher changes the weights a run trains, never
what the scorer counts, so none is loaded. An
``allocate`` stage (conf/compress/auto.yaml) leaves the stages after it as written (the template, whose per-layer
settings the allocation will replace), unless the run folder holds the allocation an earlier start of the run chose
(``RUN/sensitivity/allocation.json``), which then replaces them as in the run (:func:`planned_stages`). Before it,
plan.json's ``allocation`` gives the stage's ``max_score`` cap beside this plan's score (``template``: this score).

The model is finalized as for an entry and counted as the run's finish counts it (:func:`scoring.entry.count_report`
under ``score.*``): on the test split's first ``score.examples`` where the data is on disk, else on the task's
synthetic inputs (an image model's count depends on bit widths and shapes, not on values; a language model's
adaptive input and softmax depend on the test tokens' frequencies, so there the count is an estimate, and says so).
The score is the one the entry would get IF it reaches its gate: only what the trained weights decide differs
(masks ranked globally over layers, weights a quantizer rounds to zero). It is printed with the per-layer table and
the task's 2019 leaderboard (scoring/leaderboard.py), and written as ``plan.json`` and ``plan.md`` into the run
folder.

``plan`` does not define a run: a plan writes into the folder of the real run and nothing else there (no record,
log, checkpoint or entry), so the real run, started afterwards, trains as if the plan had not been. What the real
run would refuse at its start but a plan does not need (a teacher not given, a validation split an allocate stage
needs, the data) is listed in the plan, not raised.

Imports compress, data, scoring, train's config, objectives, preflight and session, and the search's allocate
stage.
"""
from __future__ import annotations

import copy
import itertools
import json
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf, open_dict

from compress import Stage, attach_final, calibrate, finalize_for_export
from compress.stages import ALLOCATE
from data import DatasetNotFoundError, Loaders
from data.tasks import ScoreInputs
from scoring.challenge import TOP1, gate_for
from scoring.entry import atomic_write, count_report
from scoring.leaderboard import compare, comparison_note, comparison_table
from scoring.report import layer_table, rules_text, totals_text
from scoring.rules import ADDER_TREE
from train.config import ConfigError, compress_fix, reported_as_config_error
from train.objectives import OBJECTIVES
from train.preflight import check_score_examples, check_teachers, stage_recipes
from train.search.stage import TEMPLATE, allocation_summary, check_allocation, planned_cap, read_back_allocation
from train.session import Session

log = logging.getLogger(__name__)

PLAN_JSON, PLAN_MD = "plan.json", "plan.md"
#: Batches that calibrate the input quantizers, and the examples (rows) used of each: a quantizer's sign and step
#: size come from them, and the count reads neither.
CALIBRATION_BATCHES, CALIBRATION_EXAMPLES = 2, 16
#: Optimizer steps per epoch assumed without the data: the stages' schedules are converted to steps with it, and a
#: plan only reads their ends (a schedule written in steps is then not checked against the stage's length).
STEPS_WITHOUT_DATA = 1_000_000
#: The teacher a plan reads where the recipe leaves it unset (``???``): a plan loads no teacher.
UNSET_TEACHER = "baseline"


@dataclass
class PlanInputs:
    """What a plan runs its model on, and how it says so."""

    calibration: list[torch.Tensor]
    score: ScoreInputs
    steps_per_epoch: int
    #: The run's loaders where the data is on disk; None where it is not.
    loaders: Loaders | None
    counted_on: str
    calibrated_on: str
    #: The count is an estimate (a language model counted on synthetic tokens).
    estimate: bool = False
    #: Where the data is not on disk: what the real run would say about it (one line with its fix).
    no_data: str | None = None


def unset_teachers(cfg: DictConfig) -> tuple[DictConfig, list[str]]:
    """``cfg`` with every distillation teacher the recipe leaves unset (``???``, e.g. the WikiText-103 recipe's) read
    as :data:`UNSET_TEACHER`, and one line for each saying the real run needs it; a plan loads no teacher."""
    unset = [index for index, stage in enumerate(cfg.compress.get("stages") or [])
             if isinstance(stage, DictConfig) and isinstance(stage.get("distill"), DictConfig)
             and OmegaConf.is_missing(stage.distill, "teacher")]
    if not unset:
        return cfg, []
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        for index in unset:
            cfg.compress.stages[index].distill.teacher = UNSET_TEACHER
    return cfg, [f"compress.stages[{index}].distill.teacher is not set ; fix: pass compress.stages.{index}.distill."
                 "teacher=PATH (the trained teacher's run dir)" for index in unset]


def planned_stages(session: Session, stages: list[Stage]) -> tuple[list[Stage], dict[str, Any] | None]:
    """The stages whose techniques the final model carries: ``stages`` without the allocate stage, the stages after it
    as written, or built with the allocation an earlier start of the run chose (then also its record)."""
    index = next((i for i, stage in enumerate(stages) if stage.kind == ALLOCATE), None)
    if index is None:
        return stages, None
    found = read_back_allocation(stages[index].name, config=session.config, run_dir=session.run_dir,
                                 load_teacher=session.load_teacher)
    if found is None:
        return stages[:index] + stages[index + 1:], None
    record, later = found
    return stages[:index] + later, record


def plan_inputs(session: Session, model: nn.Module) -> PlanInputs:
    """The calibration batches and scorer inputs of the run's data where it is on disk, else synthetic ones."""
    cfg, task = session.cfg, session.task
    loaders, no_data = None, ConfigError(f"task={cfg.task.name} needs data.root (the {cfg.task.dataset} folder)",
                                         f"pass data.root=/path/to/{cfg.task.dataset}")
    if not (cfg.task.needs_root and not cfg.data.root):
        try:
            loaders = session.loaders
        except DatasetNotFoundError as err:
            no_data = err
    if loaders is not None:
        with reported_as_config_error("lower score.examples"):
            score = task.score_inputs(loaders.test, cfg.score.examples, session.ctx.device, model)
        batches = [inputs[:CALIBRATION_EXAMPLES] for inputs, _ in itertools.islice(loaders.train, CALIBRATION_BATCHES)]
        counted = (f"the first {_examples(score)} {task.example}s of the test split" +
                   (f", after {score.warmup} that fill the model's memory" if score.warmup else "") +
                   ", as the run's finish counts them")
        return PlanInputs(batches, score, len(loaders.train), loaders, counted,
                          f"{len(batches)} training batches ({CALIBRATION_EXAMPLES} rows each)")
    score = task.synthetic_inputs(model)
    batches = [task.synthetic_inputs(model, seed=seed).inputs for seed in range(CALIBRATION_BATCHES)]
    why = f"the data is not on disk: {str(no_data).split(' ; fix:')[0]}"
    if score.stream:
        counted = (f"{_examples(score)} synthetic tokens drawn by Zipf's law over the "
                   f"{task.num_classes:,}-word vocabulary, after {score.warmup} that fill the model's memory ({why}); "
                   "an estimate: the adaptive input and softmax costs depend on the test tokens' frequencies")
    else:
        counted = (f"a synthetic image of {'x'.join(map(str, score.inputs.shape[1:]))} ({why}); bit widths and "
                   "shapes, not values, decide an image model's count")
    return PlanInputs(batches, score, STEPS_WITHOUT_DATA, None, counted, f"{len(batches)} synthetic batches",
                      estimate=score.stream, no_data=str(no_data))


def _examples(inputs: ScoreInputs) -> int:
    """The examples the scorer counts in ``inputs``: images of a batch, or the tokens of a stream after its warm-up."""
    return inputs.inputs.shape[1] - inputs.warmup if inputs.stream else len(inputs.inputs)


def run_refusals(session: Session, model: nn.Module, stages: list[Stage], inputs: PlanInputs) -> list[str]:
    """What the real run would refuse at its start (train/preflight.py's checks) that a plan does not need, one line
    each: teachers, the stages' recipes, an allocate stage's validation split, the scorer's examples, the data."""
    cfg, loaders = session.cfg, inputs.loaders
    checks: list[Callable[[], Any]] = [
        lambda: check_teachers(stages, session.stage_dirs),
        lambda: stage_recipes(session, stages),
        # without the data, whether there will be a validation split is the data's to say: not checked here
        lambda: check_allocation(session.config["compress"], model, session.task.metric,
                                 validation=lambda: loaders.val if loaders is not None else "unknown",
                                 distributed=session.ctx.distributed)]
    if loaders is not None:
        checks.append(lambda: check_score_examples(session.task, loaders.test, cfg.score.examples))
    refusals = []
    for check in checks:
        try:
            with reported_as_config_error(compress_fix(cfg)):
                check()
        except ConfigError as err:
            refusals.append(str(err))
    return refusals + ([inputs.no_data] if inputs.no_data else [])


def make_plan(session: Session, model: nn.Module, stages: list[Stage], unset: list[str]) -> dict[str, Any]:
    """Plan the run of ``session`` from its starting ``model`` and ``stages`` (:func:`train.pipeline.build`'s; the
    model is changed), print it and write plan.json and plan.md; returns plan.json's content. ``unset``: lines
    of :func:`unset_teachers`."""
    cfg, device = session.cfg, session.ctx.device
    model.to(device)
    inputs = plan_inputs(session, model)
    refusals = unset + run_refusals(session, model, stages, inputs)
    final, allocation = planned_stages(session, stages)
    with reported_as_config_error(compress_fix(cfg)):
        attached = attach_final(model, final, steps_per_epoch=inputs.steps_per_epoch)
    # input quantizers as at a QAT stage's first step; batch norms keep their statistics
    calibrate(model, [batch.to(device) for batch in inputs.calibration], OBJECTIVES[session.task.kind].predict,
              batch_norms=False)
    finalize_for_export(model)
    plan = plan_record(session, count_report(model, session.task, inputs.score, session.config["score"]),
                       inputs=inputs, stages=attached, allocation=allocation, refusals=refusals,
                       allocates=any(stage.kind == ALLOCATE for stage in stages),
                       cap=planned_cap(session.config["compress"], session.task.metric))
    write_plan(session, plan)
    print(plan_text(plan))
    log.info("plan written to %s and %s; nothing was trained", session.run_dir / PLAN_JSON, PLAN_MD)
    return plan


def _allocation_entry(record: dict[str, Any] | None, allocates: bool, cap: float | str | None,
                      score: float) -> dict[str, Any] | None:
    """plan.json's ``allocation``: where the per-layer settings after an allocate stage come from, and, before
    the run allocates, the cap (``max_score``) it allocates under: ``cap`` beside ``score``, this plan's."""
    if not allocates:
        return None
    if record is not None:
        return {"source": "sensitivity/allocation.json", "summary": allocation_summary(record)}
    entry = {"source": "template", "summary": "no allocation yet (the run's allocate stage writes "
             "sensitivity/allocation.json): the stages after it are planned as written, and the allocation will "
             "replace their per-layer settings"}
    if cap == TEMPLATE:
        entry["cap"] = {"max_score": cap, "score": score, "template_score": score}
        entry["summary"] += (f", capped at this planned score (max_score: template): the run's predicted score "
                             f"stays <= {score:.6f}")
    elif cap is not None:
        entry["cap"] = {"max_score": cap, "score": cap, "template_score": score}
        entry["summary"] += f", capped at max_score {cap:g} (the stages after it as written: {score:.6f})"
    else:
        entry["summary"] += (": what its loss budget buys is known only once the layers are measured, so this score "
                             "is the template's, neither a prediction nor a bound of the run's (max_score bounds it)")
    return entry


def _gate_text(task: str) -> str:
    gate = gate_for(task)
    if gate.metric == TOP1:
        return f"test top-1 >= {float(gate.threshold):.2%}"
    return f"test perplexity < {float(gate.threshold):g}"


#: The fields of the scorer's report a plan keeps (the others are the evaluation's, which a plan has not run).
_COUNT_FIELDS = ("params", "ops", "mults", "adds", "param_bits", "freebie", "accumulator_bits", "examples", "example",
                 "score_params_term", "score_ops_term", "baseline", "project_rules")


def plan_record(session: Session, report: dict[str, Any], *, inputs: PlanInputs, stages: list[dict[str, Any]],
                allocation: dict[str, Any] | None, refusals: list[str], allocates: bool,
                cap: float | str | None) -> dict[str, Any]:
    """plan.json's content: the scorer's ``report`` of the planned model (its count fields), what was planned on
    what, and the task's 2019 leaderboard beside it."""
    cfg = session.cfg
    return {
        "plan": True, "task": cfg.task.name, "model": cfg.model.name, "compress": cfg.compress.name, "seed": cfg.seed,
        "init": cfg.init, "smoke": cfg.smoke, "score": report["score"], "if_gate": _gate_text(cfg.task.name),
        "accumulator": report["accumulator"],
        **{key: report[key] for key in _COUNT_FIELDS},
        "counted_on": inputs.counted_on, "estimate": inputs.estimate, "calibrated_on": inputs.calibrated_on,
        "stages": stages, "allocation": _allocation_entry(allocation, allocates, cap, report["score"]),
        "run_would_refuse": refusals,
        "leaderboard": compare(cfg.task.name, report["score"], report["accumulator_bits"]),
        "layers": report["layers"],
    }


def _headline(plan: dict[str, Any]) -> str:
    estimate = " (an ESTIMATE: see what it is counted on)" if plan["estimate"] else ""
    return (f"PLAN, nothing trained: {plan['task']} / {plan['model']} / compress={plan['compress']}: score "
            f"{plan['score']:.6f}{estimate} IF the entry reaches its gate ({plan['if_gate']}), additions counted "
            f"{'in adder trees' if plan['accumulator_bits'] == ADDER_TREE else 'at ' + plan['accumulator']}")


def _details(plan: dict[str, Any]) -> list[str]:
    lines = [f"counted on {plan['counted_on']}", f"input quantizers calibrated on {plan['calibrated_on']}"]
    for stage in plan["stages"]:
        attached = f"{', '.join(stage['attached'])} at the end of its schedule" if stage["attached"] else "nothing"
        skipped = (f" ({', '.join(stage['skipped'])}: changes the weights a run trains, not what is counted)"
                   if stage["skipped"] else "")
        lines.append(f"stage {stage['stage']}: {attached}{skipped}")
    if plan["allocation"]:
        lines.append(f"allocation: {plan['allocation']['summary']}")
    return lines


def _leaderboard_text(plan: dict[str, Any]) -> str:
    comparison = plan["leaderboard"]
    if comparison is None:
        return f"No 2019 leaderboard: {plan['task']} was not a challenge task."
    return (f"The 2019 verified leaderboard ({plan['task']}). {comparison_note(comparison)}\n\n"
            + comparison_table(comparison, "this plan") + "\n\nSources: " + "; ".join(comparison["sources"]) + ".")


def plan_text(plan: dict[str, Any]) -> str:
    """The plan for the console: headline, totals, what it was planned on, the per-layer table, the leaderboard."""
    refusals = ["the real run would refuse at its start:", *(f"  - {line}" for line in plan["run_would_refuse"])]
    return "\n\n".join([_headline(plan), totals_text(plan),
                        "\n".join(_details(plan) + (refusals if plan["run_would_refuse"] else [])),
                        layer_table(plan["layers"]), _leaderboard_text(plan)])


def plan_markdown(plan: dict[str, Any]) -> str:
    """The content of plan.md."""
    refusals = "\n".join(f"- {line}" for line in plan["run_would_refuse"]) or "Nothing."
    return "\n\n".join([
        f"# MicroNet plan: {plan['task']} (nothing trained)", _headline(plan) + ".",
        "## Totals\n\n" + "\n".join(f"    {line}" for line in totals_text(plan).splitlines()),
        "## What was planned\n\n" + "\n".join(f"- {line}" for line in _details(plan)),
        "## What the real run would refuse at its start\n\n" + refusals,
        "## Layers\n\n" + layer_table(plan["layers"]),
        "## The 2019 leaderboard\n\n" + _leaderboard_text(plan),
        "## Project rules used\n\n" + rules_text(plan),
    ]) + "\n"


def write_plan(session: Session, plan: dict[str, Any]) -> None:
    """Write plan.json and plan.md into the run folder, each atomically."""
    for name, text in ((PLAN_JSON, json.dumps(plan, indent=2) + "\n"), (PLAN_MD, plan_markdown(plan))):
        atomic_write(session.run_dir / name, lambda tmp, text=text: tmp.write_text(text))
