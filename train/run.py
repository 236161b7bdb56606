"""``python train/run.py [overrides]``: train, compress, evaluate and score one MicroNet entry.

The flow of docs/design.md, top to bottom:
compose + validate the config → the task (data/tasks.py), its data and the model → stage "train" (the
baseline; skipped when finished, or when ``init=PATH`` is given) → the compress stages in order (each epoch
evaluated on the validation split, when there is one) → evaluate on the test split, once (exact sums) → gate →
score → report.json / report.md / TensorBoard → the entry in ``<run dir>/entry``.

Every stage checkpoints each epoch under ``<run dir>/checkpoints/<index>_<stage>/``; re-running the same
command resumes from the newest good checkpoint, mid-stage included. Under ``torchrun`` only rank 0
writes. Problems a user can fix print one line, ``error: … ; fix: …``, and no traceback.

Exit status: 0 finished · 2 error · 143 stopped by SIGTERM after saving a checkpoint (re-run to resume).
"""
from __future__ import annotations

import copy
import logging
import signal
import sys
import threading
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterator

if not __package__:  # run as a file (`python train/run.py`): import the repository's packages, not train/*
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import hydra
import torch.nn as nn
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException
from torch.utils.tensorboard import SummaryWriter

import conf
import models
from compress import DistillTechnique, Stage, apply_compression_state, build_stages, compression_state, \
    finalize_for_export, mask_zeros
from compress.stages import BASELINE_STAGE
from data import DatasetError, Loaders
from data.tasks import Evaluation
from scoring import UnsupportedOpError, count_inputs
from scoring.entry import EntryError, save_entry
from scoring.report import format_summary, log_report, write_report
from train import distributed
from train.build import build_model, data_options, restore_model, task_of
from train.checkpoint import CheckpointError, load_latest, save_checkpoint
from train.config import ConfigError, check_same_run, stage_train_config, to_container, validate
from train.loop import NonFiniteLossError, Trainer, make_deterministic
from train.objectives import Objective, build_objective

log = logging.getLogger("micronet.train")

CONF_DIR = str(Path(conf.__file__).resolve().parent)
PREEMPTED_EXIT = 143  # 128 + SIGTERM: schedulers see "interrupted", not "finished"
#: Errors the user can fix; printed as one line.
USER_ERRORS = (ConfigError, CheckpointError, NonFiniteLossError, DatasetError,
               models.UnknownModelError, EntryError, UnsupportedOpError)


def fail(message: str) -> None:
    """Print one line to stderr and exit with status 2."""
    print("error: " + " ".join(message.split()), file=sys.stderr)
    sys.exit(2)


def main() -> None:
    """Console entry point: check the overrides compose, then hand over to Hydra."""
    overrides = sys.argv[1:]
    if not any(arg.startswith("-") for arg in overrides):  # flags (--multirun, --cfg, …): Hydra's own path
        try:
            with initialize_config_dir(CONF_DIR, version_base="1.3"):
                compose("config", overrides=overrides)
        except (HydraException, OmegaConfBaseException) as err:
            fail(describe_composition_error(err))
    hydra_main()


def describe_composition_error(err: Exception) -> str:
    """Hydra's multi-line composition message (and its omegaconf cause) as one line with a fix."""
    text = str(err).split("Config search path")[0]
    cause = err.__cause__
    if cause is not None:
        detail = str(cause).splitlines()
        key = next((line.split(":", 1)[1].strip() for line in detail if "full_key:" in line), None)
        text += f": {detail[0]}" + (f" (key {key})" if key else "")
    fix = ("pick one of the available options listed" if "Available options" in text else
           "correct the override; `python train/run.py --help` lists groups and conf/*.yaml documents each key")
    return f"{text} ; fix: {fix}"


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    try:
        code = run(cfg)
    except USER_ERRORS as err:
        fail(str(err))
    finally:
        distributed.teardown()
    if code:
        sys.exit(code)


def run(cfg: DictConfig) -> int:
    """The whole pipeline for one composed config; returns the exit status."""
    validate(cfg, models.list_models())
    ctx = distributed.setup(cfg.device)
    if not ctx.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    # Each rank its own random streams (dropout, drop-path); DDP starts every rank from rank 0's weights.
    make_deterministic(cfg.seed + ctx.rank, ctx.device)
    session = Session(cfg, ctx, Path(HydraConfig.get().runtime.output_dir))

    if cfg.init:
        model = session.load_init(cfg.init)
        stages = []
    else:
        model = build_model(cfg)
        stages = [Stage(name="train", epochs=cfg.train.epochs, overrides={}, techniques=[])]
    compress_fix = f"edit conf/compress/{cfg.compress.name}.yaml or the compress.* override"
    with reported_as_config_error(compress_fix):
        stages += build_stages(session.config["compress"], load_teacher=session.load_teacher)
    session.check_teachers(stages)
    # Each stage's recipe and objective, checked now rather than after hours of training the stages before it.
    recipes = [stage_train_config(cfg.train, stage.name, stage.epochs, stage.overrides) for stage in stages]
    with reported_as_config_error("correct task.augment (conf/task/*.yaml documents its keys)"):
        objectives = [build_objective(recipe, session.config["task"]) for recipe in recipes]
    with reported_as_config_error(compress_fix):
        rehearse_attach(model, stages, steps_per_epoch=len(session.loaders.train))
    model.to(ctx.device)

    with session, sigterm_flag() as preempted:
        for stage, recipe, objective in zip(stages, recipes, objectives):
            if not session.run_stage(stage, recipe, objective, model, should_stop=preempted):
                log.warning("SIGTERM: checkpoint saved in stage '%s'; re-run the same command to resume",
                            stage.name)
                return PREEMPTED_EXIT
        # Evaluate and score exactly what the entry will hold (masks baked in, quantizers frozen). The test split
        # is read here, once.
        finalize_for_export(model)
        validation = session.evaluate(model, "val")
        result = session.evaluate(model, "test")
        if ctx.is_main:
            session.finish(model, result, validation)
    return 0


def rehearse_attach(model: nn.Module, stages: list[Stage], *, steps_per_epoch: int) -> None:
    """Configure and attach every stage's pruning and quantization to a copy of ``model``, in run order, so that
    what only the model can reveal (a layer pattern matching nothing, a layer N:M cannot divide, a step past the
    stage's end) stops the run now rather than after the stages before it trained. Teachers are not loaded."""
    probe = copy.deepcopy(model)
    for stage in stages:
        for technique in stage.techniques:
            if not isinstance(technique, DistillTechnique):
                technique.configure(steps_per_epoch=steps_per_epoch)
                technique.attach(probe)


@contextmanager
def reported_as_config_error(fix: str) -> Iterator[None]:
    """Turn the ValueError a library raises for a bad config value into a one-line ConfigError."""
    try:
        yield
    except ValueError as err:
        raise ConfigError(str(err), fix) from None


@contextmanager
def sigterm_flag() -> Iterator[Callable[[], bool]]:
    """While active, SIGTERM (cluster preemption) sets a flag the loop polls, instead of killing the process."""
    requested = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: requested.set())
    try:
        yield requested.is_set
    finally:
        signal.signal(signal.SIGTERM, previous)


class Session:
    """What the stages of one run share: config, process context, run dir, task, loaders, TensorBoard writer."""

    def __init__(self, cfg: DictConfig, ctx: distributed.Context, run_dir: Path) -> None:
        self.cfg, self.ctx, self.run_dir = cfg, ctx, run_dir
        self.writer = SummaryWriter(run_dir / "tensorboard") if ctx.is_main else None
        self.config = to_container(cfg)
        self.task = task_of(cfg)
        # Stage folders by name, in run order: index 0 is the baseline, compress stages follow.
        stages = self.config["compress"].get("stages") or []  # validated by build_stages, so read defensively
        names = ["train"] + [stage.get("name") for stage in stages if isinstance(stage, dict)]
        self.stage_dirs = {name: run_dir / "checkpoints" / f"{i}_{name}" for i, name in enumerate(names)}

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc_info) -> None:
        if self.writer is not None:
            self.writer.close()

    @cached_property
    def loaders(self) -> Loaders:
        """The task's training, validation and test loaders, built on first use."""
        cfg = self.cfg
        with reported_as_config_error("adjust the train.* / data.* / task.augment value it names"):
            return self.task.loaders(data_options(cfg, self.ctx), batch_size=cfg.train.batch_size,
                                     eval_batch_size=cfg.train.eval_batch_size, seed=cfg.seed,
                                     distributed=self.ctx.distributed, device=self.ctx.device)

    def evaluate(self, model: nn.Module, split: str) -> Evaluation | None:
        """The task's exact evaluation of ``model`` on ``split`` ("val" or "test"); None when there is no such split."""
        loader = getattr(self.loaders, split)
        return None if loader is None else self.task.evaluate(model, loader, self.ctx.device, split)

    def run_stage(self, stage: Stage, train_cfg: DictConfig, objective: Objective, model: nn.Module,
                  should_stop: Callable[[], bool]) -> bool:
        """Train ``model`` through ``stage`` with recipe ``train_cfg``, resuming from its checkpoints.

        Returns False when stopped by SIGTERM (after saving a checkpoint)."""
        directory = self.stage_dirs[stage.name]
        saved = load_latest(directory)
        if saved is not None:
            check_same_run(saved["config"], self.config, directory)
            apply_compression_state(model, saved["compression"])
            if saved["finished"]:
                model.load_state_dict(saved["model"])
                log.info("stage '%s' already finished (%s)", stage.name, directory)
                return True
        trainer = Trainer(model, train_cfg, techniques=stage.techniques, loader=self.loaders.train, ctx=self.ctx,
                          objective=objective, writer=self.writer, tag=stage.name)
        if saved is not None:
            trainer.load_state_dict(saved)
        while trainer.epoch < train_cfg.epochs:
            if not trainer.train_epoch(should_stop):
                self.save(directory, trainer, finished=False)
                return False
            # Per-epoch evaluation on the validation split only: the test split is for the final report.
            result = self.evaluate(trainer.eval_model, "val")
            trained = ", ".join(f"{key} {value:.4g}" for key, value in trainer.epoch_metrics.items())
            log.info("%s epoch %d/%d: train %s%s", stage.name, trainer.epoch, train_cfg.epochs, trained,
                     f"; {result.describe()}" if result is not None else "")
            if self.writer is not None and result is not None:
                metric = "acc" if result.correct is not None else "perplexity"
                value = result.accuracy if result.correct is not None else result.perplexity
                self.writer.add_scalar(f"{stage.name}/val/{metric}", value, trainer.global_step)
                self.writer.add_scalar(f"{stage.name}/val/loss", result.loss, trainer.global_step)
            if trainer.epoch == train_cfg.epochs:
                trainer.finish()
            self.save(directory, trainer, finished=trainer.epoch == train_cfg.epochs)
        return True

    def save(self, directory: Path, trainer: Trainer, *, finished: bool) -> None:
        """One checkpoint dict: trainer state + resolved config + compression structure (rank 0 writes)."""
        state = trainer.state_dict()  # on every rank: it gathers their RNG states
        if self.ctx.is_main:
            state.update(finished=finished, config=self.config, compression=compression_state(trainer.model))
            save_checkpoint(directory, trainer.global_step, state)
        distributed.barrier()

    def load_init(self, path: str) -> nn.Module:
        """``init=PATH``: the starting model instead of the baseline stage; must be this run's architecture.

        Weights an entry stores as exact zeros (pruned, masks baked in) get their masks back, so they stay pruned."""
        model, config = restore_model(path)
        if config["model"]["name"] != self.cfg.model.name:
            raise ConfigError(f"init={path} holds a {config['model']['name']} model, not {self.cfg.model.name}",
                              f"pass model={config['model']['name']}")
        masked = mask_zeros(model)
        if masked:
            log.info("init: the zero weights of %s stay pruned (masked)", ", ".join(masked))
        return model

    def check_teachers(self, stages: list[Stage]) -> None:
        """Refuse now, not after hours of training, a distillation teacher that will not exist when its stage
        starts: a path that is not there, or a stage that is not an earlier one."""
        earlier = {"baseline", BASELINE_STAGE}
        for stage in stages:
            for technique in stage.techniques:
                spec = technique.teacher_spec if isinstance(technique, DistillTechnique) else None
                if spec in self.stage_dirs and spec not in earlier:
                    raise ConfigError(f"stage {stage.name}: distill.teacher={spec!r} is not a stage before it",
                                      "use baseline, the name of an earlier stage, or a path to a run dir / entry")
                if spec is not None and spec not in earlier | set(self.stage_dirs) and not Path(spec).exists():
                    raise ConfigError(f"stage {stage.name}: distill.teacher={spec!r} is neither baseline, a stage "
                                      "name nor an existing path", "correct the path to the teacher's run dir, "
                                      "entry or checkpoint")
            earlier.add(stage.name)

    def load_teacher(self, spec: str) -> nn.Module:
        """Teacher for distillation: "baseline", an earlier stage's name, or a path (run dir, entry, checkpoint)."""
        if spec in ("baseline", BASELINE_STAGE):
            spec = self.cfg.init or str(self.stage_dirs["train"])
        elif spec in self.stage_dirs:
            spec = str(self.stage_dirs[spec])
        teacher, _ = restore_model(spec)
        return teacher.to(self.ctx.device).eval().requires_grad_(False)

    def finish(self, model: nn.Module, result: Evaluation, validation: Evaluation | None) -> None:
        """Score, gate verdict (decided by write_report), report and entry for the final model (rank 0)."""
        cfg = self.cfg
        inputs = self.task.score_inputs(self.loaders.test, cfg.score.examples, self.ctx.device, model)
        count = count_inputs(model.eval(), inputs, accumulator_bits=cfg.score.accumulator_bits,
                             freebie=None if cfg.score.freebie == "auto" else bool(cfg.score.freebie))
        report = write_report(self.run_dir, task=cfg.task.name, count=count, evaluation=result.to_dict(),
                              validation=validation.to_dict() if validation is not None else None,
                              example=self.task.example,
                              extra={"model": cfg.model.name, "compress": cfg.compress.name, "seed": cfg.seed})
        if self.writer is not None:
            log_report(self.writer, report, step=0)
        print(format_summary(report))
        save_entry(self.run_dir / "entry", model, config=self.config)
        log.info("entry written to %s", self.run_dir / "entry")


if __name__ == "__main__":
    main()
