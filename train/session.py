"""What the stages of one run share (:class:`Session`): its config, process context, run folder, task, loaders,
TensorBoard writer and log file; with the allocate stage and the final scoring, which work on all of them."""
from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import torch.nn as nn
from omegaconf import DictConfig
from torch.utils.tensorboard import SummaryWriter

from compress import Stage
from data import Loaders
from data.tasks import Evaluation, read_in_shares
from scoring.entry import recount, run_record, save_entry, write_report
from scoring.report import format_summary, log_report
from train import distributed
from train.build import data_options, load_teacher, task_of
from train.config import reported_as_config_error, to_container
from train.rundir import RunLogHandler, check_run_dir, write_record
from train.search.stage import allocation_summary, run_allocate_stage
from train.smoke import smoke_loaders

log = logging.getLogger(__name__)


class Session:
    """What the stages of one run share: config, process context, run dir, task, loaders, TensorBoard writer."""

    def __init__(self, cfg: DictConfig, ctx: distributed.Context, run_dir: Path) -> None:
        self.cfg, self.ctx, self.run_dir = cfg, ctx, run_dir
        self.log_handler: RunLogHandler | None = None
        #: The record of the run's allocate stage (train/search/stage.py), once it has run or been read back.
        self.allocation: dict[str, Any] | None = None
        #: The command line's overrides (:meth:`accept`).
        self.overrides: list[str] = []
        self.config = to_container(cfg)
        self.task = task_of(cfg)
        # Stage folders by name, in run order: index 0 is the baseline, compress stages follow.
        stages = self.config["compress"].get("stages") or []  # validated by build_stages, so read defensively
        names = ["train"] + [stage.get("name") for stage in stages if isinstance(stage, dict)]
        self.stage_dirs = {name: run_dir / "checkpoints" / f"{i}_{name}" for i, name in enumerate(names)}

    def __enter__(self) -> Session:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc_info: Any) -> None:
        writer = self.__dict__.get("writer")
        try:
            if writer is not None:
                writer.close()
        except OSError:
            if kind is None:  # a full disk shows here too; it must not hide the error already on its way out
                raise
        finally:
            if self.log_handler is not None:
                logging.getLogger().removeHandler(self.log_handler)
                self.log_handler.close()

    @cached_property
    def writer(self) -> SummaryWriter | None:
        """TensorBoard's writer (rank 0), created on first use: a command that trains nothing adds no event file."""
        return SummaryWriter(self.run_dir / "tensorboard") if self.ctx.is_main else None

    def accept(self, overrides: list[str]) -> None:
        """The run passed every check: record its command line (once per folder) and log to run.log (rank 0)."""
        self.overrides = list(overrides)
        if self.ctx.is_main:
            write_record(self.run_dir, list(overrides), self.config)
            self.log_handler = RunLogHandler(self.run_dir)
            logging.getLogger().addHandler(self.log_handler)

    @cached_property
    def loaders(self) -> Loaders:
        """The task's training, validation and test loaders, built on first use (a few batches each when smoke)."""
        cfg = self.cfg
        with reported_as_config_error("adjust the train.* / data.* / task.augment value it names"):
            loaders = self.task.loaders(data_options(cfg, self.ctx), batch_size=cfg.train.batch_size,
                                        eval_batch_size=cfg.train.eval_batch_size, seed=cfg.seed,
                                        distributed=self.ctx.distributed, device=self.ctx.device)
        if not cfg.smoke:
            return loaders
        return smoke_loaders(loaders)

    def evaluate(self, model: nn.Module, split: str) -> Evaluation | None:
        """The task's exact evaluation of ``model`` on ``split`` ("val" or "test"); None when there is no such split."""
        loader = getattr(self.loaders, split)
        if loader is None:
            return None
        if read_in_shares(loader):  # the processes evaluate it together, each its share: all on rank 0's model
            distributed.share_buffers(model)
        return self.task.evaluate(model, loader, self.ctx.device, split)

    def load_teacher(self, spec: str) -> nn.Module:
        """Teacher for distillation: "baseline", an earlier stage's name, or a path (run dir, entry, checkpoint)."""
        return load_teacher(spec, baseline=self.cfg.init or str(self.stage_dirs["train"]), stage_dirs=self.stage_dirs,
                            device=self.ctx.device)

    def allocate(self, stage: Stage, model: nn.Module, later: list[Stage], should_stop: Callable[[], bool]
                 ) -> tuple[bool, list[Stage]]:
        """An allocate stage (train/search/stage.py): the stages ``later`` built anew with per-layer settings chosen
        on the validation split, or read back from the run folder when an earlier start chose them.

        Returns (False, ``later``) when a stop was asked before it started or between two layers it measures (the
        layers measured so far are kept in the run folder: the next start measures the others)."""
        allocated = run_allocate_stage(stage.name, model, config=self.config, task=self.task, loaders=self.loaders,
                                       device=self.ctx.device, run_dir=self.run_dir,
                                       baseline=self.cfg.init or str(self.stage_dirs["train"]),
                                       command=" ".join(["python train/run.py", *self.overrides]),
                                       load_teacher=self.load_teacher, should_stop=should_stop)
        if allocated is None:
            return False, later
        self.allocation, built = allocated
        return True, built

    def finish(self, model: nn.Module, result: Evaluation, validation: Evaluation | None) -> dict[str, Any]:
        """Score, gate verdict and report of the final model (:func:`scoring.entry.recount`, as verify recounts it),
        then its entry (rank 0); returns the report. The entry is written last: a run dir with ``entry/entry.json``
        has finished."""
        check_run_dir(self.run_dir)
        report = recount(model, self.task, self.loaders.test, self.ctx.device, self.config["score"],
                         evaluation=result, validation=validation,
                         extra={**run_record(self.config),
                                **({"allocation": self.allocation} if self.allocation else {})})
        report = write_report(self.run_dir, report)
        if self.writer is not None:
            log_report(self.writer, report, step=0)
        print(format_summary(report))
        if self.allocation:
            print(allocation_summary(self.allocation))
        save_entry(self.run_dir / "entry", model, config=self.config)
        log.info("entry written to %s", self.run_dir / "entry")
        return report
