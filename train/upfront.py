"""What a command is refused for before its run folder exists, beyond train/config.py's checks: what needs the
model and compress code but no data — the model against the task's input, the compress stages and each stage's
training recipe, the ``init=`` path. Without these, such a command would fail at the first step, with a traceback,
after its data loaded and its run folder was made.

``train/cli.py`` runs :func:`check_without_data` on a command line once train/config.py's cheap checks passed (its
imports, torch, the models and compress, take seconds, which the run would spend anyway); the pipeline runs it
again for each job of a ``--multirun``. Imports models, compress, data.tasks, scoring.entry and train's build,
checkpoint, config and objectives, and the allocate stage of the search.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
from omegaconf import DictConfig, ListConfig, OmegaConf

from compress import build_stages
from data.tasks import Task, build_task
from models import ModelArgumentError, UnknownModelError, check_model_kwargs, create_model
from train.build import is_entry, not_a_saved_model
from train.checkpoint import holds_checkpoints, is_checkpoint_file
from train.config import ConfigError, compress_fix, reported_as_config_error, stage_train_config, to_container
from train.objectives import OBJECTIVES
from train.search.stage import check_allocate_stages


def check_without_data(cfg: DictConfig) -> None:
    """Every check of this module on the composed, validated ``cfg``; :class:`ConfigError` on the first problem."""
    check_nothing_missing(cfg)
    config = to_container(cfg)
    with reported_as_config_error("correct the task.* override (conf/task/*.yaml documents each key)"):
        task = build_task(config["task"])
    model = model_for_task(config, task)
    with reported_as_config_error(compress_fix(cfg)):
        stages = build_stages(config["compress"], load_teacher=None)  # teachers load when their stage attaches
        check_allocate_stages(config["compress"].get("stages") or [], model, task.metric)
    for stage in stages:
        stage_train_config(cfg.train, stage.name, stage.epochs, stage.overrides)
    if cfg.init:
        check_init_path(Path(cfg.init))


def check_nothing_missing(cfg: DictConfig) -> None:
    """A value the recipe leaves for the command line (``???``, e.g. the WikiText-103 recipe's teacher) is set."""
    missing = _missing_keys(cfg)
    if missing:
        override = re.sub(r"\[(\d+)\]", r".\1", missing[0])
        raise ConfigError(f"{missing[0]} is not set: the recipe leaves it to the command line",
                          f"pass {override}=VALUE (the recipe's comment says what it takes)")


def _missing_keys(node: DictConfig | ListConfig, prefix: str = "") -> list[str]:
    """The keys below ``node`` whose value is ``???`` (interpolations left unresolved: they name their source)."""
    keys = node.keys() if isinstance(node, DictConfig) else range(len(node))
    found = []
    for key in keys:
        path = f"{prefix}.{key}" if isinstance(node, DictConfig) and prefix else (
            str(key) if isinstance(node, DictConfig) else f"{prefix}[{key}]")
        if OmegaConf.is_missing(node, key):
            found.append(path)
        elif not OmegaConf.is_interpolation(node, key) and isinstance(node[key], (DictConfig, ListConfig)):
            found += _missing_keys(node[key], path)
    return found


def model_for_task(config: Mapping[str, Any], task: Task) -> nn.Module:
    """The run's model (resolved ``config``) on the meta device (no memory, no data), after a forward pass of the
    task's synthetic input through it: a model that cannot be built for the task (an argument it does not take, such
    as an image task's ``in_chans`` for a language model), that cannot take the task's input (channels, tokens for an
    image model) or whose outputs are not the task's classes is refused here rather than at the first step."""
    name, kwargs = config["model"]["name"], dict(config["model"].get("kwargs") or {})
    given = task.model_kwargs()
    fix = (f"correct model.kwargs (conf/model/{name}.yaml documents them), or use a model made for task "
           f"{task.name} (model=default is {config['task']['default_model']})")
    for key, value in given.items():
        if key in kwargs and kwargs[key] != value:
            raise ConfigError(f"model.kwargs.{key}={kwargs[key]} but task {task.name} gives its models {key}={value} "
                              "(its data's)", f"remove model.kwargs.{key}: the task sets it")
    arguments = {**given, **kwargs}
    try:
        check_model_kwargs(name, arguments, task.num_classes)
        with torch.device("meta"):
            model = create_model(name, num_classes=task.num_classes, **arguments)
    except (UnknownModelError, ModelArgumentError, TypeError, ValueError) as err:
        problem, own_fix = _problem_and_fix(err)
        raise ConfigError(f"model={name} cannot be built for task {task.name}: {problem}", own_fix or fix) from None
    inputs = task.synthetic_inputs(model).inputs.to("meta")
    try:
        outputs, _ = OBJECTIVES[task.kind].predict(model.eval(), torch.cat([inputs, inputs]), None)
    except NotImplementedError:  # an operation the meta device cannot run without values: the first step tells
        return model
    except (TypeError, RuntimeError, ValueError, IndexError) as err:
        problem, own_fix = _problem_and_fix(err)
        raise ConfigError(f"model={name} cannot run on the input of task {task.name} ({task.kind}, a batch of "
                          f"shape {list(inputs.shape)}): {problem}", own_fix or fix) from None
    if outputs.shape[-1] != task.num_classes:
        raise ConfigError(f"model={name} gives {outputs.shape[-1]} outputs per {task.example}, and task {task.name} "
                          f"has {task.num_classes} classes", fix)
    return model


def check_init_path(path: Path) -> None:
    """``init=``: an entry, a folder of checkpoints or a checkpoint file (train/build.py restores it, when the run
    builds its model); :class:`ConfigError` for anything else."""
    if not (is_entry(path) or is_checkpoint_file(path) or path.is_dir() and holds_checkpoints(path)):
        raise not_a_saved_model(path)


def _problem_and_fix(err: BaseException) -> tuple[str, str]:
    """The first line of a library's error, and the fix it names ("" when none)."""
    text = str(err).strip()
    problem, _, fix = (text.splitlines()[0] if text else type(err).__name__).partition(" ; fix: ")
    return problem, fix
