"""What a run refuses before its first stage trains: everything that would otherwise stop it after hours of
training the stages before — a teacher that will not exist, an allocate stage that cannot run, a stage's recipe or
objective, a technique the model cannot take, more scored examples than the test split holds."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping

import torch.nn as nn
from omegaconf import DictConfig

from compress import DistillTechnique, Stage
from compress.stages import BASELINE_STAGE
from data.tasks import Task
from train.config import ConfigError, compress_fix, reported_as_config_error, stage_train_config
from train.objectives import Objective, build_objective
from train.search.stage import check_allocation
from train.session import Session


def preflight(session: Session, model: nn.Module, stages: list[Stage]) -> tuple[list[DictConfig], list[Objective]]:
    """Every check of this module on the run's ``model`` and ``stages``, in the order a user would fix them;
    returns each stage's training recipe and objective."""
    cfg = session.cfg
    check_teachers(stages, session.stage_dirs)
    with reported_as_config_error(compress_fix(cfg)):
        check_allocate_stage(session, model)
    recipes, objectives = stage_recipes(session, stages)
    with reported_as_config_error(compress_fix(cfg)):
        rehearse_attach(model, stages, steps_per_epoch=len(session.loaders.train))
    check_score_examples(session.task, session.loaders.test, cfg.score.examples)
    return recipes, objectives


def check_allocate_stage(session: Session, model: nn.Module) -> None:
    """Refuse what would stop an allocate stage after the baseline trained (train/search/stage.py); the validation
    loader is built only for a config with such a stage."""
    check_allocation(session.config["compress"], model, session.task.metric, validation=lambda: session.loaders.val,
                     distributed=session.ctx.distributed)


def stage_recipes(session: Session, stages: list[Stage]) -> tuple[list[DictConfig], list[Objective]]:
    """Each stage's training recipe (``train.*`` with the stage's overrides, checked) and objective; ConfigError
    names the first problem."""
    recipes = [stage_train_config(session.cfg.train, stage.name, stage.epochs, stage.overrides) for stage in stages]
    with reported_as_config_error("correct task.augment (conf/task/*.yaml documents its keys)"):
        objectives = [build_objective(recipe, session.config["task"]) for recipe in recipes]
    return recipes, objectives


def check_teachers(stages: list[Stage], stage_dirs: Mapping[str, Path]) -> None:
    """Refuse a distillation teacher that will not exist when its stage starts: a path that is not there, or a
    stage (a name of ``stage_dirs``) that is not an earlier one."""
    earlier = {"baseline", BASELINE_STAGE}
    for stage in stages:
        for technique in stage.techniques:
            spec = technique.teacher_spec if isinstance(technique, DistillTechnique) else None
            if spec in stage_dirs and spec not in earlier:
                raise ConfigError(f"stage {stage.name}: distill.teacher={spec!r} is not a stage before it",
                                  "use baseline, the name of an earlier stage, or a path to a run dir / entry")
            if spec is not None and spec not in earlier | set(stage_dirs) and not Path(spec).exists():
                raise ConfigError(f"stage {stage.name}: distill.teacher={spec!r} is neither baseline, a stage "
                                  "name nor an existing path", "correct the path to the teacher's run dir, "
                                  "entry or checkpoint")
        earlier.add(stage.name)


def rehearse_attach(model: nn.Module, stages: list[Stage], *, steps_per_epoch: int) -> None:
    """Configure and attach every stage's pruning and quantization to a copy of ``model``, in run order, so that
    what only the model can reveal (a layer pattern matching nothing, a layer N:M cannot divide, a step past the
    stage's end) stops the run now rather than after the stages before it trained. Teachers are not loaded.
    The copy lives on the meta device: shapes are all a rehearsal checks, and calibrating a quantizer's step sizes
    on real weights would cost seconds of a CIFAR run's start-up."""
    probe = copy.deepcopy(model).to("meta")
    for stage in stages:
        for technique in stage.techniques:
            if not isinstance(technique, DistillTechnique):
                technique.configure(steps_per_epoch=steps_per_epoch)
                technique.attach(probe)


def check_score_examples(task: Task, test: Any, examples: int) -> None:
    """Refuse a ``score.examples`` the test split (loader ``test``, whole on every process) cannot give the scorer,
    rather than count fewer at the end without a word. Where only the model can tell how many there are, the
    task's scorer inputs check it (:meth:`data.tasks.Task.score_examples_available`)."""
    available = task.score_examples_available(test)
    if available is not None and examples > available:
        raise ConfigError(f"score.examples={examples} but the {task.name} test split has {available} examples",
                          f"pass score.examples={available} or fewer")
