"""``python train/run.py [overrides]``: train, compress, evaluate and score one MicroNet entry.

The flow of docs/design.md, top to bottom:
compose + validate the config, then create and lock the run folder (train/cli.py, before the heavy imports) →
the task (data/tasks.py), its data and the model → stage "train" (the baseline; skipped when finished, or when
``init=PATH`` is given) → the compress stages in order (each epoch evaluated on the validation split, when there
is one; an ``allocate:`` stage measures the model on it and sets the later stages' per-layer sparsity and bits:
train/allocate.py) → evaluate on the test split, once (exact sums) → gate → score → report.json / report.md /
TensorBoard → the entry in ``<run dir>/entry``.

Every stage checkpoints each epoch under ``<run dir>/checkpoints/<index>_<stage>/``; re-running the same
command resumes from the newest good checkpoint, mid-stage included, and re-running a finished run only reprints
its summary. A refused command writes nothing (train/rundir.py: the folder's lock and record). Under
``torchrun`` only rank 0 writes. Problems a user can fix print one line, ``error: … ; fix: …``, and no traceback:
bad config values, a busy, read-only or full run folder, damaged checkpoints, missing data.

Exit status: 0 finished, the entry passes its gate · 2 error (one line) · 3 finished, but the entry fails its
gate (report and entry written; it does not qualify) · 130 a second Ctrl-C stopped it at once (the last
checkpoint is intact) · 143 stopped by SIGTERM or Ctrl-C (SIGINT) after saving a checkpoint (re-run to resume).
"""
from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a file (`python train/run.py`): import the repository's packages, not train/*
    sys.path[0] = str(Path(__file__).resolve().parents[1])

if __name__ == "__main__":  # a config error is one line before the pipeline's imports below (seconds)
    from train.cli import accept_command_line

    accept_command_line(sys.argv[1:])

import copy  # noqa: E402  (after the early check above, on purpose)
import logging  # noqa: E402
import signal  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from functools import cached_property  # noqa: E402
from typing import Any, Callable, Iterator  # noqa: E402

import hydra  # noqa: E402
import torch.nn as nn  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

import models  # noqa: E402
from compress import DistillTechnique, Stage, apply_compression_state, build_stages, compression_state, \
    finalize_for_export, mask_zeros  # noqa: E402
from compress.stages import BASELINE_STAGE  # noqa: E402
from data import Loaders  # noqa: E402
from data.tasks import Evaluation  # noqa: E402
from scoring.entry import model_spec, recount, save_entry, write_report  # noqa: E402
from scoring.report import format_summary, log_report  # noqa: E402
from scoring.rules import freebie_setting  # noqa: E402
from train import distributed  # noqa: E402
from train.build import build_model, data_options, restore_model, task_of  # noqa: E402
from train.checkpoint import latest_checkpoint, save_checkpoint  # noqa: E402
from scoring.entry.boundary import USER_ERRORS  # noqa: E402
from scoring.errors import fail  # noqa: E402
from conf import CONF_DIR  # noqa: E402
from train.cli import accept_command_line  # noqa: E402
from train.config import ConfigError, check_same_run, stage_train_config, to_container, validate  # noqa: E402
from train.loop import Trainer, make_deterministic  # noqa: E402
from train.objectives import Objective, build_objective  # noqa: E402
from train.allocate import Allocation, allocation_summary, check_allocate_stages, fill_stages, read_allocation, \
    run_allocate_stage  # noqa: E402
from train.rundir import RunLogHandler, finished_report, prepare_run_dir, quiet_thread_write_errors, write_problem, \
    write_record  # noqa: E402
from train.sensitivity import SENSITIVITY_DIR, Probe  # noqa: E402
from train.smoke import smoke_config, smoke_loaders  # noqa: E402

log = logging.getLogger("micronet.train")

GATE_FAILED_EXIT = 3  # finished, but the entry does not qualify: a script must not mistake it for success
INTERRUPTED_EXIT = 130  # 128 + SIGINT: a second Ctrl-C, no checkpoint taken
PREEMPTED_EXIT = 143  # 128 + SIGTERM: schedulers see "interrupted", not "finished"


def main() -> None:
    """Console entry point: check the command line and prepare the run folder, then hand over to Hydra."""
    accept_command_line(sys.argv[1:])
    hydra_main()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    quiet_thread_write_errors()
    try:
        code = run(cfg)
    except USER_ERRORS as err:
        fail(str(err))
    except KeyboardInterrupt:  # a second Ctrl-C (the first one asks for a checkpoint, see stop_signals)
        fail("stopped at once by a second Ctrl-C, without a new checkpoint; the last saved one is intact ; fix: "
             "re-run the same command to resume", INTERRUPTED_EXIT)
    except Exception as err:  # a full disk or a read-only folder, wherever it shows: one line; anything else is a bug
        problem = write_problem(err)
        if problem is None:
            raise
        fail(f"{problem[0]} ; fix: {problem[1]}")
    finally:
        distributed.teardown()
    if code:
        sys.exit(code)


def run(cfg: DictConfig) -> int:
    """The whole pipeline for one composed config; returns the exit status. From the start, SIGTERM and SIGINT
    ask it to stop at the next checkpoint (:func:`stop_signals`)."""
    with stop_signals() as stop:
        return _pipeline(cfg, stop)


def _pipeline(cfg: DictConfig, stop: StopRequest) -> int:
    validate(cfg, models.list_models())
    ctx = distributed.setup(cfg.device)
    if not ctx.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if ctx.is_main:
        prepare_run_dir(run_dir)  # locked until this process ends (already done when main() checked the command)
        log.info("run folder: %s", run_dir)
    if cfg.smoke:
        cfg = smoke_config(cfg)
    report = finished_report(run_dir, to_container(cfg))
    if report is not None:  # nothing to do: reprint, write nothing
        if ctx.is_main:
            reprint(report, cfg, run_dir)
        return exit_status(report)
    # Each rank its own random streams (dropout, drop-path); DDP starts every rank from rank 0's weights.
    make_deterministic(cfg.seed + ctx.rank, ctx.device)
    session = Session(cfg, ctx, run_dir)

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
    with reported_as_config_error(compress_fix):
        session.check_allocation(model)
    # Each stage's recipe and objective, checked now rather than after hours of training the stages before it.
    recipes = [stage_train_config(cfg.train, stage.name, stage.epochs, stage.overrides) for stage in stages]
    with reported_as_config_error("correct task.augment (conf/task/*.yaml documents its keys)"):
        objectives = [build_objective(recipe, session.config["task"]) for recipe in recipes]
    with reported_as_config_error(compress_fix):
        rehearse_attach(model, stages, steps_per_epoch=len(session.loaders.train))
    session.check_score_examples()
    model.to(ctx.device)

    session.accept(HydraConfig.get().overrides.task)
    with session:
        for index, (stage, recipe, objective) in enumerate(zip(stages, recipes, objectives)):
            if stage.allocate is not None:  # trains nothing: chooses the techniques of the stages after it
                done = session.allocate(stage, model, later=stages[index + 1:], should_stop=stop)
            else:
                done = session.run_stage(stage, recipe, objective, model, should_stop=stop)
            if not done:
                log.warning("%s: stopped in stage '%s' with its progress checkpointed; re-run the same command to "
                            "resume", stop.signal, stage.name)
                return PREEMPTED_EXIT
        if stop():  # every stage is saved; the final evaluation runs again on the next start
            log.warning("%s: stopped before the final evaluation; re-run the same command to finish", stop.signal)
            return PREEMPTED_EXIT
        # Evaluate and score exactly what the entry will hold (masks baked in, quantizers frozen). The test split
        # is read here, once.
        finalize_for_export(model)
        validation = session.evaluate(model, "val")
        result = session.evaluate(model, "test")
        report = session.finish(model, result, validation) if ctx.is_main else None
        passed = distributed.all_gather_object(report["gate_passed"] if report is not None else None)[0]
    if cfg.smoke:
        log.warning("smoke run: every stage was cut to %d epoch(s) of a few batches; its numbers are not an "
                    "entry's", cfg.train.epochs)
    return 0 if passed else GATE_FAILED_EXIT


def exit_status(report: dict[str, Any]) -> int:
    """0 for a finished run whose entry passes its gate, :data:`GATE_FAILED_EXIT` for one that does not."""
    return 0 if report["gate_passed"] else GATE_FAILED_EXIT


def reprint(report: dict[str, Any], cfg: DictConfig, run_dir: Path) -> None:
    """A finished run's summary again; a note where this command asks for a count the report does not have."""
    print(format_summary(report))
    if report.get("allocation"):
        print(allocation_summary(report["allocation"]))
    log.info("run already finished in %s: its summary above is reprinted; nothing was written", run_dir)
    asked = {"examples": cfg.score.examples, "accumulator_bits": cfg.score.accumulator_bits}
    freebie = freebie_setting(cfg.score.freebie)
    if freebie is not None:
        asked["freebie"] = freebie
    differ = [f"score.{key}={value} (the report has {report.get(key)})" for key, value in asked.items()
              if report.get(key) != value]
    if differ:
        log.warning("this command asks for %s, but a finished run is not counted again; recount it with "
                    "`python -m scoring %s --examples N`, or train a new run", ", ".join(differ), run_dir)


def _model_inputs(spec: dict[str, Any]) -> dict[str, Any]:
    """What a registry model was told about its task: class count and keyword arguments (in_chans, ...)."""
    return {"num_classes": spec["num_classes"], **spec["kwargs"]}


def rehearse_attach(model: nn.Module, stages: list[Stage], *, steps_per_epoch: int) -> None:
    """Configure and attach every stage's pruning and quantization to a copy of ``model``, in run order, so that
    what only the model can reveal (a layer pattern matching nothing, a layer N:M cannot divide, a step past the
    stage's end) stops the run now rather than after the stages before it trained. Teachers are not loaded.
    The copy lives on the meta device: shapes are all a rehearsal checks, and calibrating a quantizer's step sizes
    on real weights cost seconds of a CIFAR run's start-up."""
    probe = copy.deepcopy(model).to("meta")
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
    except ConfigError:  # has its own fix
        raise
    except ValueError as err:
        raise ConfigError(str(err), fix) from None


class StopRequest:
    """Set by SIGTERM or SIGINT while :func:`stop_signals` is active; calling it says whether a stop was asked."""

    def __init__(self) -> None:
        #: Name of the first stop signal received ("SIGTERM", "SIGINT"), or None.
        self.signal: str | None = None

    def __call__(self) -> bool:
        return self.signal is not None


@contextmanager
def stop_signals() -> Iterator[StopRequest]:
    """While active, SIGTERM (cluster preemption) and SIGINT (Ctrl-C) ask the loop to checkpoint and stop, instead
    of killing the process; a second SIGINT interrupts at once (KeyboardInterrupt), for whoever will not wait.
    (DataLoader workers ignore both: see data/workers.py.)"""
    request = StopRequest()

    def handle(signum: int, frame: Any) -> None:
        if request() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        request.signal = request.signal or signal.Signals(signum).name

    previous = {signum: signal.signal(signum, handle) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield request
    finally:  # once stopped, the process is on its way out: a late signal has nothing left to ask
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_IGN if request() else handler)


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

    def check_score_examples(self) -> None:
        """Refuse now a ``score.examples`` the test split cannot give the scorer (rank 0 counts its share), rather
        than count fewer at the end without a word. A token stream's examples are bounded by its task."""
        size = getattr(self.loaders.test, "dataset_size", None)
        if self.task.example != "image" or size is None:
            return
        available = -(-size // self.ctx.world_size)
        if self.cfg.score.examples > available:
            raise ConfigError(f"score.examples={self.cfg.score.examples} but the {self.task.name} test split has "
                              f"{available} examples" + (" per process" if self.ctx.distributed else ""),
                              f"pass score.examples={available} or fewer")

    def evaluate(self, model: nn.Module, split: str) -> Evaluation | None:
        """The task's exact evaluation of ``model`` on ``split`` ("val" or "test"); None when there is no such split."""
        loader = getattr(self.loaders, split)
        return None if loader is None else self.task.evaluate(model, loader, self.ctx.device, split)

    def run_stage(self, stage: Stage, train_cfg: DictConfig, objective: Objective, model: nn.Module,
                  should_stop: Callable[[], bool]) -> bool:
        """Train ``model`` through ``stage`` with recipe ``train_cfg``, resuming from its checkpoints.

        Returns False when stopped by SIGTERM (after saving a checkpoint)."""
        directory = self.stage_dirs[stage.name]
        found = latest_checkpoint(directory)
        saved = None if found is None else found[1]
        if saved is not None:
            check_same_run(saved["config"], self.config, directory)
            apply_compression_state(model, saved["compression"])
            if saved["finished"]:
                model.load_state_dict(saved["model"])
                log.info("stage '%s' already finished (%s)", stage.name, directory)
                return True
        if should_stop():  # asked before this stage trained a step: its last checkpoint (if any) is current
            return False
        if found is not None:
            log.info("stage '%s': resuming from %s (epoch %d/%d, %d batches into it)", stage.name, found[0],
                     saved["epoch"] + 1, train_cfg.epochs, saved["batches_done"])
        else:
            log.info("stage '%s': %d epochs of %d steps", stage.name, train_cfg.epochs, len(self.loaders.train))
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
            if should_stop() and trainer.epoch < train_cfg.epochs:  # asked during the epoch's evaluation
                return False
        return True

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
        trained_on = config["task"]["name"]
        if trained_on != self.task.name:
            raise ConfigError(f"init={path} was trained on task {trained_on}, and this run is task={self.task.name}",
                              f"pass task={trained_on}, or an init= run of task {self.task.name}")
        if config["model"]["name"] != self.cfg.model.name:
            raise ConfigError(f"init={path} holds a {config['model']['name']} model, not {self.cfg.model.name}",
                              f"pass model={config['model']['name']}")
        theirs, ours = (_model_inputs(model_spec(c)) for c in (config, self.config))
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
        log.info("distillation teacher: the model in %s", spec)
        return teacher.to(self.ctx.device).eval().requires_grad_(False)

    def finish(self, model: nn.Module, result: Evaluation, validation: Evaluation | None) -> dict[str, Any]:
        """Score, gate verdict and report of the final model (:func:`scoring.entry.recount`, as verify recounts it),
        then its entry (rank 0); returns the report. The entry is written last: a run dir with ``entry/entry.json``
        has finished."""
        cfg = self.cfg
        report = recount(model, self.task, self.loaders.test, self.ctx.device, self.config["score"],
                         evaluation=result, validation=validation,
                         extra={"model": cfg.model.name, "compress": cfg.compress.name, "seed": cfg.seed,
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


if __name__ == "__main__":
    main()
