"""Running one training stage of a run: resume it from its newest checkpoint, train its epochs, evaluate each on
the validation split, and checkpoint each (train/checkpoint.py). The stages' shared state is the run's
:class:`train.session.Session`."""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch.nn as nn
from omegaconf import DictConfig

from compress import Stage, apply_compression_state, compression_state
from train import distributed
from train.checkpoint import RUN_STATE, CheckpointError, latest_checkpoint, save_checkpoint
from train.config import check_same_run
from train.loop import Trainer
from train.objectives import Objective
from train.rundir import check_run_dir
from train.session import Session

log = logging.getLogger(__name__)


def run_stage(session: Session, stage: Stage, train_cfg: DictConfig, objective: Objective, model: nn.Module,
              should_stop: Callable[[], bool]) -> bool:
    """Train ``model`` through ``stage`` with recipe ``train_cfg``, resuming from its checkpoints.

    Returns False when stopped by SIGTERM (after saving a checkpoint)."""
    directory = session.stage_dirs[stage.name]
    found = latest_checkpoint(directory, RUN_STATE)
    saved = None if found is None else found[1]
    if saved is not None:
        check_same_run(saved["config"], session.config, directory)
        with restoring(found[0]):
            apply_compression_state(model, saved["compression"])
            if saved["finished"]:
                model.load_state_dict(saved["model"])
        if saved["finished"]:
            log.info("stage '%s' already finished (%s)", stage.name, directory)
            return True
    if should_stop():  # asked before this stage trained a step: its last checkpoint (if any) is current
        return False
    if found is not None:
        log.info("stage '%s': resuming from %s (epoch %d/%d, %d batches into it)", stage.name, found[0],
                 saved["epoch"] + 1, train_cfg.epochs, saved["batches_done"])
    else:
        log.info("stage '%s': %d epochs of %d steps", stage.name, train_cfg.epochs, len(session.loaders.train))
    trainer = Trainer(model, train_cfg, techniques=stage.techniques, loader=session.loaders.train, ctx=session.ctx,
                      objective=objective, writer=session.writer, tag=stage.name)
    if saved is not None:
        with restoring(found[0]):
            trainer.load_state_dict(saved)
    while trainer.epoch < train_cfg.epochs:
        if not trainer.train_epoch(should_stop):
            save(session, directory, trainer, finished=False)
            return False
        validate_epoch(session, stage, trainer, epochs=train_cfg.epochs)
        if trainer.epoch == train_cfg.epochs:
            trainer.finish()
        save(session, directory, trainer, finished=trainer.epoch == train_cfg.epochs)
        if should_stop() and trainer.epoch < train_cfg.epochs:  # asked during the epoch's evaluation
            return False
    return True


@contextmanager
def restoring(path: Path) -> Iterator[None]:
    """Restoring the checkpoint ``path``: a state that does not fit the run's model or trainer (its checksum and
    layout are right, its tensors are not this model's) is one line with the fix, the same on every re-run."""
    try:
        yield
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as err:
        text = str(err).strip()
        raise CheckpointError(f"{path} does not fit this run's model and trainer "
                              f"({text.splitlines()[0] if text else type(err).__name__})",
                              f"delete {path} and its {path.with_suffix('.sha256').name} to resume from the "
                              f"checkpoint before it, or delete {path.parent} to restart the stage") from None


def validate_epoch(session: Session, stage: Stage, trainer: Trainer, *, epochs: int) -> None:
    """Log the epoch's training metrics and its evaluation on the validation split (when there is one), and send
    the task's metric and the loss to TensorBoard. Never the test split: that is read once, for the report."""
    result = session.evaluate(trainer.eval_model, "val")
    trained = ", ".join(f"{key} {value:.4g}" for key, value in trainer.epoch_metrics.items())
    log.info("%s epoch %d/%d: train %s%s", stage.name, trainer.epoch, epochs, trained,
             f"; {result.describe()}" if result is not None else "")
    if session.writer is not None and result is not None:
        metric = session.task.metric
        session.writer.add_scalar(f"{stage.name}/val/{metric}", result.to_dict()[metric], trainer.global_step)
        session.writer.add_scalar(f"{stage.name}/val/loss", result.loss, trainer.global_step)


def save(session: Session, directory: Path, trainer: Trainer, *, finished: bool) -> None:
    """One checkpoint dict: trainer state + resolved config + compression structure (rank 0 writes)."""
    state = trainer.state_dict()  # on every rank: it gathers their RNG states
    if session.ctx.is_main:
        check_run_dir(session.run_dir)  # a deleted run folder is not made again by the checkpoint's write
        state.update(finished=finished, config=session.config, compression=compression_state(trainer.model))
        save_checkpoint(directory, trainer.global_step, state)
    distributed.barrier()
