"""Build what a run needs from its config: the task, its data options, the registry model, or a trained model."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from compress import apply_compression_state
from data import gpu_resident_supported
from data.tasks import DataOptions, Task, build_task
from models import create_model
from scoring.entry import ENTRY_JSON, build_model_from_entry, load_entry, model_spec
from train.checkpoint import load_latest, read_checkpoint
from train.config import ConfigError, auto_switch
from train.distributed import Context


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
    """``data.*`` with every ``auto`` resolved for this device: pinned memory and the GPU-resident loader on CUDA
    (the latter only where it can apply the task's augmentation)."""
    cuda = ctx.device.type == "cuda"
    augment = OmegaConf.to_container(cfg.task.augment) if cfg.task.augment is not None else None
    resident_auto = cuda and cfg.task.dataset == "cifar100" and gpu_resident_supported(cfg.task.dataset, augment)
    return DataOptions(root=cfg.data.root, download=cfg.data.download, num_workers=cfg.data.num_workers,
                       pin_memory=auto_switch(cfg.data.pin_memory, cuda),
                       gpu_resident=auto_switch(cfg.data.gpu_resident, resident_auto), val_split=cfg.data.val_split)


def restore_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """A trained model and its resolved run config, from any of:

    an entry (a folder with entry.json, or a run dir / bundle holding ``entry/``), a stage checkpoint
    folder (``<run dir>/checkpoints/<i>_<stage>``: its newest usable checkpoint), or a checkpoint file.
    Nothing is unpickled: entries are safetensors, checkpoints load with ``weights_only=True``.
    """
    path = Path(path)
    if (path / ENTRY_JSON).is_file() or (path / "entry" / ENTRY_JSON).is_file():
        entry = load_entry(path)
        return build_model_from_entry(entry), entry.config
    state = read_checkpoint(path) if path.is_file() else load_latest(path) if path.is_dir() else None
    if state is None:
        raise ConfigError(f"{path} holds no entry and no training checkpoint",
                          "point to a finished run dir, an entry bundle, a checkpoints/<i>_<stage> folder "
                          "or a step*.pt file")
    model = model_from_config(state["config"])
    apply_compression_state(model, state["compression"])
    model.load_state_dict(state["model"])
    return model, state["config"]
