"""The pipeline of ``python train/run.py``, one Hydra job, as named steps (docs/design.md, "A run"):
prepare the run folder → build the model and its stages → preflight checks → accept (record the command) →
train the stages → evaluate on the test split, once → finish (score, gate, report, entry). With ``plan=true`` it is
prepare → build → plan (train/plan.py): the final model counted untrained, nothing else written.

:func:`run_job` is the job's error boundary: a problem a user can fix is one line and exit status 2; the other
exit statuses are below and in train/run.py. Its imports (torch, the models, TensorBoard) take seconds, which is
why train/run.py imports this module only once the command line passed.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import torch.nn as nn
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import models
from compress import Stage, build_stages, finalize_for_export
from compress.stages import ALLOCATE
from scoring.entry.boundary import USER_ERRORS
from scoring.errors import fail
from scoring.report import format_summary
from scoring.rules import freebie_setting
from train import distributed
from train.search.stage import allocation_summary
from train.build import build_model, load_init
from train.config import check_added_keys, compress_fix, reported_as_config_error, to_container, validate
from train.distributed import Context
from train.loop import make_deterministic
from train.objectives import Objective
from train.plan import make_plan, unset_teachers
from train.preflight import preflight
from train.rundir import discard_unaccepted, fail_on_write_problem, finished_report, prepare_run_dir, \
    quiet_thread_write_errors
from train.session import Session
from train.signals import StopRequest, stop_signals
from train.smoke import smoke_config
from train.stages import run_stage
from train.upfront import check_without_data

log = logging.getLogger(__name__)

GATE_FAILED_EXIT = 3  # finished, but the entry does not qualify: a script must not mistake it for success
INTERRUPTED_EXIT = 130  # 128 + SIGINT: a second Ctrl-C, no checkpoint taken
PREEMPTED_EXIT = 143  # 128 + SIGTERM: schedulers see "interrupted", not "finished"


def run_job(cfg: DictConfig) -> None:
    """Run one composed config and exit with its status; every error a user can fix is one line."""
    quiet_thread_write_errors()
    try:
        code = run(cfg)
    except USER_ERRORS as err:
        discard_unaccepted(Path(HydraConfig.get().runtime.output_dir))  # a refused run leaves nothing behind
        fail(str(err))
    except KeyboardInterrupt:  # a second Ctrl-C (the first one asks for a checkpoint, see stop_signals)
        fail("stopped at once by a second Ctrl-C, without a new checkpoint; the last saved one is intact ; fix: "
             "re-run the same command to resume", INTERRUPTED_EXIT)
    except Exception as err:  # a full disk or a read-only folder, wherever it shows: one line; anything else is a bug
        fail_on_write_problem(err)
        raise
    finally:
        distributed.teardown()
    if code:
        sys.exit(code)


def run(cfg: DictConfig) -> int:
    """The whole pipeline for one composed config; returns the exit status. From the start, SIGTERM and SIGINT
    ask it to stop at the next checkpoint (:func:`train.signals.stop_signals`)."""
    if cfg.plan:
        cfg, unset = unset_teachers(cfg)
        return plan(*prepare(cfg), unset)
    with stop_signals() as stop:
        cfg, ctx, run_dir = prepare(cfg)
        report = finished_report(run_dir, to_container(cfg))
        if report is not None:  # nothing to do: reprint, write nothing
            if ctx.is_main:
                reprint(report, cfg, run_dir)
            return exit_status(report)
        # Each rank its own random streams (dropout, drop-path); DDP starts every rank from rank 0's weights.
        make_deterministic(cfg.seed + ctx.rank, ctx.device)
        session = Session(cfg, ctx, run_dir)
        model, stages = build(session)
        recipes, objectives = preflight(session, model, stages)
        model.to(ctx.device)
        session.accept(HydraConfig.get().overrides.task)
        with session:
            if not train_stages(session, model, stages, recipes, objectives, stop):
                return PREEMPTED_EXIT
            passed = evaluate_and_finish(session, model)
        if cfg.smoke:
            log.warning("smoke run: every stage was cut to %d epoch(s) of a few batches; its numbers are not an "
                        "entry's", cfg.train.epochs)
        return 0 if passed else GATE_FAILED_EXIT


def prepare(cfg: DictConfig) -> tuple[DictConfig, Context, Path]:
    """Validate ``cfg``, join the processes of a torchrun job, and lock the run folder (rank 0). Returns the config
    to run (shortened when ``smoke``), the process context and the run folder."""
    validate(cfg, models.list_models())
    check_added_keys(HydraConfig.get().overrides.task)
    shortened = smoke_config(cfg) if cfg.smoke else cfg
    check_without_data(shortened)  # train/cli.py checked a command line; a --multirun's jobs are checked here
    ctx = distributed.setup(cfg.device)
    if not ctx.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if ctx.is_main:
        prepare_run_dir(run_dir)  # held until this process ends; train/cli.py took it, but not for multirun jobs
        log.info("run folder: %s", run_dir)
    return shortened, ctx, run_dir


def plan(cfg: DictConfig, ctx: Context, run_dir: Path, unset: list[str]) -> int:
    """``plan=true``: the recipe's final model built from the run's starting model and counted, untrained
    (train/plan.py; ``unset``: the teachers the recipe leaves unset). Rank 0 plans, and writes only plan.json and
    plan.md into the run folder."""
    make_deterministic(cfg.seed + ctx.rank, ctx.device)  # the initial weights of the real run
    session = Session(cfg, ctx, run_dir)
    model, stages = build(session)
    if ctx.is_main:
        make_plan(session, model, stages, unset)
    return 0


def build(session: Session) -> tuple[nn.Module, list[Stage]]:
    """The starting model and the stages to run: the baseline stage "train" from a fresh registry model, or the
    ``init=`` model without it; then the compress stages."""
    cfg = session.cfg
    if cfg.init:
        model, stages = load_init(cfg.init, session.config), []
    else:
        model = build_model(cfg)
        stages = [Stage(name="train", epochs=cfg.train.epochs, overrides={}, techniques=[])]
    with reported_as_config_error(compress_fix(cfg)):
        stages += build_stages(session.config["compress"], load_teacher=session.load_teacher)
    return model, stages


def train_stages(session: Session, model: nn.Module, stages: list[Stage], recipes: list[DictConfig],
                 objectives: list[Objective], stop: StopRequest) -> bool:
    """Run the stages in order, each from its newest checkpoint; False when a stop signal stopped the run (every
    stage's progress is then checkpointed)."""
    for index, (stage, recipe, objective) in enumerate(zip(stages, recipes, objectives)):
        if stage.kind == ALLOCATE:  # trains nothing: the stages after it, built anew, replace the planned ones
            done, stages[index + 1:] = session.allocate(stage, model, later=stages[index + 1:], should_stop=stop)
        else:
            done = run_stage(session, stage, recipe, objective, model, should_stop=stop)
        if not done:
            log.warning("%s: stopped in stage '%s' with its progress checkpointed; re-run the same command to "
                        "resume", stop.signal, stage.name)
            return False
    if stop():  # every stage is saved; the final evaluation runs again on the next start
        log.warning("%s: stopped before the final evaluation; re-run the same command to finish", stop.signal)
        return False
    return True


def evaluate_and_finish(session: Session, model: nn.Module) -> bool:
    """Evaluate and score exactly what the entry will hold (masks baked in, quantizers frozen), reading the test
    split here, once. Every process evaluates its share of the validation split; the test split is evaluated and
    counted whole by rank 0 alone, as ``verify`` recounts it, so the report does not depend on how many processes
    trained the model. Rank 0 writes the report and the entry. Returns whether the entry passes its gate."""
    finalize_for_export(model)
    validation = session.evaluate(model, "val")
    report = None
    if session.ctx.is_main:
        report = session.finish(model, session.evaluate(model, "test"), validation)
    return distributed.from_main(report["gate_passed"] if report is not None else None)


def exit_status(report: dict[str, Any]) -> int:
    """0 for a finished run whose entry passes its gate, :data:`GATE_FAILED_EXIT` for one that does not."""
    return 0 if report["gate_passed"] else GATE_FAILED_EXIT


def reprint(report: dict[str, Any], cfg: DictConfig, run_dir: Path) -> None:
    """A finished run's summary again; a note where this command asks for a count the report does not have."""
    print(format_summary(report))
    if report.get("allocation"):
        print(allocation_summary(report["allocation"]))
    log.info("run already finished in %s: its summary above is reprinted; nothing was written", run_dir)
    asked = {"examples": cfg.score.examples, "accumulator_bits": cfg.score.accumulator_bits}
    freebie = freebie_setting(cfg.score.freebie)
    if freebie is not None:
        asked["freebie"] = freebie
    differ = [f"score.{key}={value} (the report has {report.get(key)})" for key, value in asked.items()
              if report.get(key) != value]
    if differ:
        log.warning("this command asks for %s, but a finished run is not counted again; recount it with "
                    "`python -m scoring %s --examples N`, or train a new run", ", ".join(differ), run_dir)
