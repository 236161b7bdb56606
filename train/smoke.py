"""``smoke=true``: a recipe end to end in minutes, to try it (on a fixture, or the real data) before the real run.

Every stage is shortened to :data:`EPOCHS` epoch(s) of at most :data:`BATCHES` training batches, its schedules
rescaled to keep their shape (``compress.stages.rescale_stages``); a stage that trains nothing is shortened by the
module that runs it (an allocate stage: :func:`train.search.stage.smoke_stages`); validation and test read a few
batches (a language model's: the first windows of each stream); the scorer counts :data:`EXAMPLES` examples.
Everything else runs as in the real recipe: every stage and technique, checkpoints, evaluation, the gate, the
report and the entry. A smoke run is a run of its own (``smoke=true`` is part of the run folder's name) and its
numbers are not an entry's: the gate is decided on a few test batches.
"""
from __future__ import annotations

import copy
import itertools
import math
from typing import Any, Iterator

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from compress import build_stages
from compress.stages import rescale_stages
from data import Loaders
from train.build import build_model, task_of
from train.config import ConfigError
from train.search.stage import smoke_stages

#: Epochs of every stage (the baseline included).
EPOCHS = 1
#: Training batches per epoch, and at least this many evaluation batches per split.
BATCHES = 2
#: Test examples the scorer counts.
EXAMPLES = 8


def smoke_config(cfg: DictConfig) -> DictConfig:
    """``cfg`` with every stage and the scorer shortened; :class:`ConfigError` for a recipe that cannot be."""
    compress = OmegaConf.to_container(cfg.compress, resolve=True)
    fix = f"edit conf/compress/{cfg.compress.name}.yaml or the compress.* override"
    try:
        build_stages(compress, load_teacher=lambda spec: None)  # the recipe as written must be valid first
        shortened = smoke_stages(rescale_stages(compress, EPOCHS), task_of(cfg).metric, lambda: _meta_model(cfg))
    except ValueError as err:
        raise ConfigError(f"smoke=true: {err}", fix) from None
    smoke = copy.deepcopy(cfg)
    with open_dict(smoke):
        smoke.train.epochs = min(cfg.train.epochs, EPOCHS)
        smoke.compress = shortened
        smoke.score.examples = min(cfg.score.examples, EXAMPLES)
    return smoke


def _meta_model(cfg: DictConfig) -> torch.nn.Module:
    """The run's model built without memory (its layers' names and kinds, for the allocate stage)."""
    with torch.device("meta"):
        return build_model(cfg)


def smoke_loaders(loaders: Loaders) -> Loaders:
    """The task's loaders cut to a few batches each (enough evaluation batches for the scorer's examples). A
    language model's evaluation stream is cut to its first windows, read with the state carried as ever: the
    perplexity of a prefix, which a smoke run reports as a smoke run's (it is not the entry's metric)."""
    def cut(loader: Any, batches: int) -> _FirstBatches | None:
        return None if loader is None else _FirstBatches(loader, batches)
    evaluation = max(BATCHES, math.ceil(EXAMPLES / max(1, getattr(loaders.test, "batch_size", None) or 1)))
    return Loaders(cut(loaders.train, BATCHES), cut(loaders.val, evaluation), cut(loaders.test, evaluation))


class _FirstBatches:
    """The first ``batches`` batches of a loader, with the loader interface the trainer and the tasks use."""

    def __init__(self, loader: Any, batches: int) -> None:
        self.loader, self.batches = loader, batches
        #: Processes sharing the loader, each cut to its first batches (see data.loaders.build_loaders).
        self.world_size = getattr(loader, "world_size", 1)
        self.batch_size = getattr(loader, "batch_size", None)

    def __len__(self) -> int:
        return min(len(self.loader), self.batches)

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.loader), len(self))

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    @property
    def dataset_size(self) -> int:
        """Examples these batches hold over all the processes sharing the loader, at most."""
        size = self.loader.dataset_size
        return size if self.batch_size is None else min(size, len(self) * self.batch_size * self.world_size)
