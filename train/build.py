"""Build what a run needs from its config: the registry model, the data loaders, or a trained model on disk."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from compress import apply_compression_state
from data import build_loaders, gpu_resident_supported
from models import create_model
from scoring.entry import ENTRY_JSON, build_model_from_entry, load_entry
from train.checkpoint import load_latest, read_checkpoint
from train.config import ConfigError, auto_switch
from train.distributed import Context


def model_from_config(config: Mapping[str, Any]) -> nn.Module:
    """A freshly initialised registry model for a (resolved) run config: ``model.name``, ``task.num_classes``."""
    model = config["model"]
    return create_model(model["name"], num_classes=int(config["task"]["num_classes"]), **(model["kwargs"] or {}))


def build_model(cfg: DictConfig) -> nn.Module:
    """The run's model, freshly initialised from the registry."""
    return model_from_config(OmegaConf.to_container(cfg, resolve=True))


def build_data(cfg: DictConfig, ctx: Context) -> tuple[Any, Any]:
    """Train and test loaders of the task; GPU-resident and pinned-memory choices resolved for this device."""
    cuda = ctx.device.type == "cuda"
    augment = OmegaConf.to_container(cfg.task.augment)
    # "auto" turns the GPU-resident loader on only where it can apply the task's augmentation.
    resident_auto = cuda and cfg.task.dataset == "cifar100" and gpu_resident_supported(cfg.task.dataset, augment)
    return build_loaders(
        cfg.task.dataset, root=cfg.data.root, batch_size=cfg.train.batch_size,
        eval_batch_size=cfg.train.eval_batch_size, augment=augment,
        num_workers=cfg.data.num_workers, pin_memory=auto_switch(cfg.data.pin_memory, cuda),
        download=cfg.data.download, seed=cfg.seed, distributed=ctx.distributed, device=ctx.device,
        gpu_resident=auto_switch(cfg.data.gpu_resident, resident_auto))


def score_inputs(loader: Iterable, examples: int, device: torch.device) -> torch.Tensor:
    """The first ``examples`` test inputs, the batch the scorer runs the model on."""
    batches, seen = [], 0
    for inputs, _ in loader:
        batches.append(inputs)
        seen += len(inputs)
        if seen >= examples:
            break
    return torch.cat(batches)[:examples].to(device)


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
