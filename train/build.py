"""Build what a run needs from its config: the task, its data options, and every model the run starts from or
refers to — the registry model, the ``init=`` model, a distillation teacher, any trained model it restores."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from compress import apply_compression_state, mask_zeros
from compress.stages import BASELINE_STAGE
from data import gpu_resident_by_default
from data.tasks import DataOptions, Task, build_task
from models import create_model
from scoring.entry import ENTRY_JSON, build_model_from_entry, load_entry, model_spec
from train.checkpoint import RUN_STATE, is_checkpoint_file, load_latest, read_checkpoint
from train.config import ConfigError, auto_switch
from train.distributed import Context

log = logging.getLogger(__name__)


def model_from_config(config: Mapping[str, Any]) -> nn.Module:
    """A freshly initialised registry model for a (resolved) run config (see :func:`scoring.entry.model_spec`)."""
    spec = model_spec(dict(config))
    return create_model(spec["name"], num_classes=spec["num_classes"], **spec["kwargs"])


def build_model(cfg: DictConfig) -> nn.Module:
    """The run's model, freshly initialised from the registry."""
    return model_from_config(OmegaConf.to_container(cfg, resolve=True))


def task_of(cfg: DictConfig) -> Task:
    """The run's task (data, evaluation, scorer inputs), from its resolved ``task`` config."""
    return build_task(OmegaConf.to_container(cfg.task, resolve=True, enum_to_str=True))


def data_options(cfg: DictConfig, ctx: Context) -> DataOptions:
    """``data.*`` with every ``auto`` resolved for this device: pinned memory on CUDA, and the GPU-resident loader
    where data/ says it is the better choice (:func:`data.gpu_resident_by_default`)."""
    cuda = ctx.device.type == "cuda"
    augment = OmegaConf.to_container(cfg.task.augment) if cfg.task.augment is not None else None
    resident_auto = gpu_resident_by_default(cfg.task.dataset, augment, cuda=cuda)
    return DataOptions(root=cfg.data.root, download=cfg.data.download, num_workers=cfg.data.num_workers,
                       pin_memory=auto_switch(cfg.data.pin_memory, cuda),
                       gpu_resident=auto_switch(cfg.data.gpu_resident, resident_auto), val_split=cfg.data.val_split)


def is_entry(path: Path) -> bool:
    """Whether ``path`` is an entry: a folder with entry.json, or a run dir / bundle holding ``entry/``."""
    return (path / ENTRY_JSON).is_file() or (path / "entry" / ENTRY_JSON).is_file()


def not_a_saved_model(path: Path) -> ConfigError:
    """The error for a ``path`` (``init=``, a teacher, a run to measure) that holds no model to restore."""
    what = "does not exist" if not path.exists() else "is neither an entry nor a training checkpoint" \
        if path.is_file() else "holds no entry and no training checkpoint"
    return ConfigError(f"{path} {what}", "point to a finished run dir, an entry bundle, a checkpoints/<i>_<stage> "
                                         "folder or a step*.pt file")


def restore_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """A trained model and its resolved run config, from any of:

    an entry (a folder with entry.json, or a run dir / bundle holding ``entry/``), a stage checkpoint
    folder (``<run dir>/checkpoints/<i>_<stage>``: its newest usable checkpoint), or a checkpoint file.
    Nothing is unpickled: entries are safetensors, checkpoints load with ``weights_only=True``.
    """
    path = Path(path)
    if is_entry(path):
        entry = load_entry(path)
        return build_model_from_entry(entry), entry.config
    state = read_checkpoint(path, RUN_STATE) if is_checkpoint_file(path) else \
        load_latest(path, RUN_STATE) if path.is_dir() else None
    if state is None:
        raise not_a_saved_model(path)
    model = model_from_config(state["config"])
    apply_compression_state(model, state["compression"])
    model.load_state_dict(state["model"])
    return model, state["config"]


def _model_inputs(spec: dict[str, Any]) -> dict[str, Any]:
    """What a registry model was told about its task: class count and keyword arguments (in_chans, ...)."""
    return {"num_classes": spec["num_classes"], **spec["kwargs"]}


def load_init(path: str, config: Mapping[str, Any]) -> nn.Module:
    """``init=PATH``: the starting model instead of the baseline stage; it must be the architecture of the run
    whose resolved config is ``config``.

    Weights an entry stores as exact zeros (pruned, masks baked in) get their masks back, so they stay pruned."""
    model, trained = restore_model(path)
    task, name = config["task"]["name"], config["model"]["name"]
    if trained["task"]["name"] != task:
        raise ConfigError(f"init={path} was trained on task {trained['task']['name']}, and this run is task={task}",
                          f"pass task={trained['task']['name']}, or an init= run of task {task}")
    if trained["model"]["name"] != name:
        raise ConfigError(f"init={path} holds a {trained['model']['name']} model, not {name}",
                          f"pass model={trained['model']['name']}")
    theirs, ours = (_model_inputs(model_spec(dict(c))) for c in (trained, config))
    differ = [f"{key}={theirs.get(key)!r} where this run needs {ours.get(key)!r}"
              for key in sorted(theirs.keys() | ours.keys()) if theirs.get(key) != ours.get(key)]
    if differ:
        raise ConfigError(f"init={path} holds a model built with {', '.join(differ)}",
                          "use the task.* and model.kwargs of the init run, or train a new baseline")
    log.info("init: starting from the model in %s", path)
    masked = mask_zeros(model)
    if masked:
        log.info("init: the zero weights of %s stay pruned (masked)", ", ".join(masked))
    return model


def load_teacher(spec: str, *, baseline: str, stage_dirs: Mapping[str, Path], device: torch.device) -> nn.Module:
    """Teacher for distillation, frozen on ``device``: "baseline" (the model at ``baseline``), the name of a stage
    (its folder in ``stage_dirs``), or a path (run dir, entry, checkpoint)."""
    if spec in ("baseline", BASELINE_STAGE):
        spec = baseline
    elif spec in stage_dirs:
        spec = str(stage_dirs[spec])
    teacher, _ = restore_model(spec)
    log.info("distillation teacher: the model in %s", spec)
    return teacher.to(device).eval().requires_grad_(False)
