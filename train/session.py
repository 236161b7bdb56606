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

from compress import Stage, build_stages
from data import Loaders
from data.tasks import Evaluation
from scoring import count_inputs
from scoring.entry import save_entry
from scoring.report import format_summary, log_report, write_report
from train import distributed
from train.allocate import Allocation, allocation_summary, check_allocate_stages, fill_stages, read_allocation, \
    run_allocate_stage
from train.build import data_options, load_teacher, task_of
from train.config import ConfigError, reported_as_config_error, to_container
from train.rundir import RunLogHandler, write_record
from train.sensitivity import SENSITIVITY_DIR, Probe
from train.smoke import smoke_loaders

log = logging.getLogger(__name__)


class Session:
    """What the stages of one run share: config, process context, run dir, task, loaders, TensorBoard writer."""

    def __init__(self, cfg: DictConfig, ctx: distributed.Context, run_dir: Path) -> None:
        self.cfg, self.ctx, self.run_dir = cfg, ctx, run_dir
        self.log_handler: RunLogHandler | None = None
        #: The record of the run's allocate stage (train/allocate.py), once it has run or been read back.
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
        return smoke_loaders(loaders, world_size=self.ctx.world_size)

    def evaluate(self, model: nn.Module, split: str) -> Evaluation | None:
        """The task's exact evaluation of ``model`` on ``split`` ("val" or "test"); None when there is no such split."""
        loader = getattr(self.loaders, split)
        return None if loader is None else self.task.evaluate(model, loader, self.ctx.device, split)

    def load_teacher(self, spec: str) -> nn.Module:
        """Teacher for distillation: "baseline", an earlier stage's name, or a path (run dir, entry, checkpoint)."""
        return load_teacher(spec, baseline=self.cfg.init or str(self.stage_dirs["train"]), stage_dirs=self.stage_dirs,
                            device=self.ctx.device)

    def check_allocation(self, model: nn.Module) -> None:
        """Refuse now what would stop an allocate stage after the baseline trained: bad settings, no template after
        it, a compressed model, no validation split (the test split never chooses settings), several processes."""
        specs = check_allocate_stages(self.config["compress"].get("stages") or [], model, self.task.metric)
        if specs and self.loaders.val is None:
            raise ConfigError(f"compress={self.cfg.compress.name} allocates per-layer settings on the validation "
                              "split, and this run has none", "pass data.val_split=0.2")
        if specs and self.ctx.distributed:
            raise ConfigError(f"compress={self.cfg.compress.name}: an allocate stage runs in one process",
                              "run it without torchrun, or torchrun the written compress config with init=")

    def allocate(self, stage: Stage, model: nn.Module, later: list[Stage], should_stop: Callable[[], bool]) -> bool:
        """An allocate stage (train/allocate.py): per-layer settings for the stages ``later``, measured on the
        validation split and chosen exactly; read back from the run folder when an earlier start chose them.

        Returns False when a stop was asked before it started (it runs to its end once started: a stop during it
        stops the run before the next stage; a kill during it measures again on the next start)."""
        stages = self.config["compress"]["stages"]
        index = [s["name"] for s in stages].index(stage.name)
        where = f"compress.stages[{index}]"
        out = self.run_dir / SENSITIVITY_DIR
        record = read_allocation(out, self.config)
        if record is not None:
            log.info("stage '%s' already finished: allocation read back from %s", stage.name, out)
        elif should_stop():
            return False
        else:
            spec = check_allocate_stages(stages, model, self.task.metric)[index]
            log.info("stage '%s': measuring every layer on the validation split, then allocating", stage.name)
            probe = Probe(model, self.config, self.task, self.loaders, device=self.ctx.device,
                          calibration_batches=spec.calibration_batches, score_examples=self.cfg.score.examples,
                          val_split=self.cfg.data.val_split)
            record = run_allocate_stage(spec, probe, where=where, later=stages[index + 1:], out=out,
                                        config=self.config, baseline=self.cfg.init or str(self.stage_dirs["train"]),
                                        command=" ".join(["python train/run.py", *self.overrides]))
            log.info("stage '%s' finished in %.0f s: %s", stage.name, record["seconds"], out)
        filled = build_stages({"stages": fill_stages(stages[index + 1:], Allocation.from_dict(record))},
                              load_teacher=self.load_teacher)
        for target, built in zip(later, filled):
            target.techniques = built.techniques
        self.allocation = {key: value for key, value in record.items() if key not in ("config", "format")}
        log.info("%s", allocation_summary(record))
        return True

    def finish(self, model: nn.Module, result: Evaluation, validation: Evaluation | None) -> dict[str, Any]:
        """Score, gate verdict (decided by write_report), report and entry for the final model (rank 0); returns
        the report. The entry is written last: a run dir with ``entry/entry.json`` has finished."""
        cfg = self.cfg
        inputs = self.task.score_inputs(self.loaders.test, cfg.score.examples, self.ctx.device, model)
        count = count_inputs(model.eval(), inputs, accumulator_bits=cfg.score.accumulator_bits,
                             freebie=None if cfg.score.freebie == "auto" else bool(cfg.score.freebie))
        report = write_report(self.run_dir, task=cfg.task.name, count=count, evaluation=result.to_dict(),
                              validation=validation.to_dict() if validation is not None else None,
                              example=self.task.example,
                              extra={"model": cfg.model.name, "compress": cfg.compress.name, "seed": cfg.seed,
                                     **({"allocation": self.allocation} if self.allocation else {})})
        if self.writer is not None:
            log_report(self.writer, report, step=0)
        print(format_summary(report))
        if self.allocation:
            print(allocation_summary(self.allocation))
        save_entry(self.run_dir / "entry", model, config=self.config)
        log.info("entry written to %s", self.run_dir / "entry")
        return report
