"""Schemas and validation of the run configuration.

The dataclasses below are registered in Hydra's ConfigStore as ``micronet_schema`` and merged first in
``conf/config.yaml``'s defaults list, so every YAML file and command-line override is type-checked when
the config is composed (``train.epochs=abc`` fails at start). :func:`validate` then checks what types
cannot: ranges, names that must exist, files the task needs. Every problem is a :class:`ConfigError`
whose text is one line saying what is wrong and how to fix it.

Importing this module is cheap (no torch): ``train/cli.py`` composes and validates a command line with it
before the pipeline's imports, so that a typo is reported in about a second.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Iterable, Iterator, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from conf import CONF_DIR
from scoring.errors import UserError
from scoring.rules import ACCUMULATOR_OVERFLOWS, ADDER_TREE, accumulator_setting, freebie_setting


class ConfigError(UserError, ValueError):
    """A configuration value that cannot work; ``str()`` is one line with the fix."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(problem, fix)


@contextmanager
def reported_as_config_error(fix: str) -> Iterator[None]:
    """Turn the ValueError a library raises for a bad config value into a one-line ConfigError."""
    try:
        yield
    except ConfigError:  # has its own fix
        raise
    except ValueError as err:  # a library's message may carry its own fix ("... ; fix: ..."), which is the better one
        problem, _, own_fix = str(err).partition(" ; fix: ")
        raise ConfigError(problem, own_fix or fix) from None


def compress_fix(cfg: DictConfig) -> str:
    """The fix of a problem in the run's compress stages: where they are written."""
    return f"edit conf/compress/{cfg.compress.name}.yaml or the compress.* override"


class Optimizer(str, Enum):
    sgd = "sgd"
    adamw = "adamw"


class Schedule(str, Enum):
    cosine = "cosine"
    step = "step"


class Amp(str, Enum):
    auto = "auto"  # bf16 on CUDA, fp32 on CPU
    bf16 = "bf16"
    off = "off"


@dataclass
class AugmentConfig:
    crop_padding: int = 0
    hflip: bool = False
    auto_augment: Optional[str] = None
    cutout: int = 0
    mixup: float = 0.0
    cutmix: float = 0.0
    random_resized_crop: bool = False
    eval_resize: Optional[int] = None


@dataclass
class StreamConfig:
    bptt: int = MISSING
    variable: bool = False
    eval_window: int = 512


@dataclass
class TaskConfig:
    name: str = MISSING
    kind: str = MISSING  # a key of data.tasks.TASK_KINDS
    dataset: str = MISSING
    num_classes: int = MISSING
    default_model: str = MISSING
    needs_root: bool = False  # the data is not shipped with the code: data.root must point at it
    downloadable: bool = False  # data.download=true can fetch it into data.root
    # classification
    in_chans: Optional[int] = None
    input_size: Optional[int] = None
    augment: Optional[AugmentConfig] = None
    # language modelling
    stream: Optional[StreamConfig] = None


@dataclass
class ModelConfig:
    name: str = MISSING
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    epochs: int = MISSING
    batch_size: int = MISSING
    eval_batch_size: int = MISSING
    optimizer: Optimizer = Optimizer.sgd
    lr: float = MISSING
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0
    schedule: Schedule = Schedule.cosine
    warmup_epochs: float = 0.0
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    label_smoothing: float = 0.0
    ema_decay: Optional[float] = None
    grad_clip: Optional[float] = None
    amp: Amp = Amp.auto
    channels_last: Any = "auto"  # auto | true | false
    compile: bool = False
    log_every: int = 50


@dataclass
class DataConfig:
    root: Optional[str] = None
    download: bool = False
    num_workers: int = 2
    pin_memory: Any = "auto"  # auto | true | false
    gpu_resident: Any = "auto"  # auto | true | false
    val_split: Any = 0  # a fraction in (0, 1) or a count of training examples held out for validation; 0 = none


@dataclass
class ScoreConfig:
    examples: int = 256
    accumulator_bits: Any = 32  # 1..32 | adder_tree
    accumulator_overflow: str = "wrap"  # wrap | saturate (scoring/entry/integer.py)
    freebie: Any = "auto"  # auto | true | false


@dataclass
class RunConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # Stage lists are validated by compress.build_stages, which owns their format.
    compress: dict[str, Any] = field(default_factory=lambda: {"name": "none", "stages": []})
    data: DataConfig = field(default_factory=DataConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    seed: int = 0
    device: str = "auto"
    init: Optional[str] = None
    smoke: bool = False  # shrink every stage to try a recipe end to end (train/smoke.py)
    plan: bool = False  # build and count the recipe's final model without training it (train/plan.py)


# Hydra's convention: register at import, so any composer of conf/ (run.py, tests) gets the schema.
ConfigStore.instance().store(name="micronet_schema", node=RunConfig)


def closest_key(key: str) -> str | None:
    """None when the dotted ``key`` is a key of the schema, or lies in one of its open dictionaries (``dict`` typed:
    ``model.kwargs``, ``compress``, whose owners check what they hold); otherwise the nearest schema key (the first
    unknown part replaced by its closest sibling), or "" when none is close."""
    node: Any = RunConfig
    parts = key.split(".")
    for index, part in enumerate(parts):
        if typing.get_origin(node) is dict:
            return None
        fields = typing.get_type_hints(node) if dataclasses.is_dataclass(node) else {}
        if part not in fields:
            match = difflib.get_close_matches(part, fields, n=1)
            return ".".join([*parts[:index], match[0], *parts[index + 1:]]) if match else ""
        node = fields[part]
        if typing.get_origin(node) is typing.Union:  # Optional[X]
            node = next(arg for arg in typing.get_args(node) if arg is not type(None))
    return None


def check_added_keys(overrides: list[str]) -> None:
    """Refuse a ``+key=value`` (or ``++``) override whose key the schema does not have, outside its open
    dictionaries (:func:`closest_key`): the composed config would carry it, and nothing would read it. Config groups
    (``+experiment=...``) and Hydra's own keys are Hydra's."""
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        if not (override.is_add() or override.is_force_add()) or key.split(".")[0] == "hydra" \
                or (CONF_DIR / key).is_dir():
            continue
        near = closest_key(key)
        if near is not None:
            raise ConfigError(f"{override.input_line}: {key} is not a key of the config, so nothing would read it",
                              unknown_key_fix(near, override.input_line.partition("=")[2]))


def unknown_key_fix(near: str, value: str) -> str:
    """The fix for a key the schema lacks whose closest key is ``near`` (:func:`closest_key`), set to ``value``."""
    where = "conf/config.yaml and conf/<group>/*.yaml document every key"
    return f"did you mean {near}={value}? ({where})" if near else f"correct the key ({where})"


_AUTO_SWITCH = ("auto", True, False)
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def auto_switch(value: Any, when_auto: bool) -> bool:
    """Resolve an ``auto | true | false`` setting."""
    return when_auto if value == "auto" else bool(value)


def validate_train(train: DictConfig, where: str = "train") -> None:
    """Range checks of a training recipe (also used on each stage's merged recipe)."""
    checks = [
        (train.epochs >= 0, "epochs", "must be >= 0", "set it to 0 or more"),
        (train.batch_size > 0, "batch_size", "must be > 0", "use a positive batch size"),
        (train.eval_batch_size > 0, "eval_batch_size", "must be > 0", "use a positive batch size"),
        (train.lr > 0, "lr", "must be > 0", "use a positive learning rate"),
        (0 <= train.momentum < 1, "momentum", "must be in [0, 1) (SGD momentum, AdamW beta1)", "use e.g. 0.9"),
        (train.weight_decay >= 0, "weight_decay", "must be >= 0", "use 0 to disable it"),
        (train.warmup_epochs >= 0, "warmup_epochs", "must be >= 0", "use 0 to disable warmup"),
        (0 <= train.label_smoothing < 1, "label_smoothing", "must be in [0, 1)", "use e.g. 0.1"),
        (train.ema_decay is None or 0 < train.ema_decay < 1, "ema_decay", "must be in (0, 1) or null",
         "use e.g. 0.9998, or null to disable EMA"),
        (train.grad_clip is None or train.grad_clip > 0, "grad_clip", "must be > 0 or null",
         "use e.g. 5.0, or null to disable clipping"),
        (train.channels_last in _AUTO_SWITCH, "channels_last", "must be auto, true or false",
         "use one of auto|true|false"),
        (train.log_every > 0, "log_every", "must be > 0", "log every N steps, N >= 1"),
        (train.schedule != Schedule.step or len(train.milestones) > 0, "milestones",
         "must list epochs when schedule=step", "e.g. train.milestones=[60,120,160]"),
        (all(m >= 1 for m in train.milestones), "milestones", "must be epochs >= 1", "e.g. train.milestones=[60,120,160]"),
        (train.gamma > 0, "gamma", "must be > 0", "use e.g. 0.1 (the factor applied at each milestone)"),
    ]
    for ok, key, problem, fix in checks:
        if not ok:
            value = OmegaConf.select(train, key)
            raise ConfigError(f"{where}.{key}={value} {problem}", fix)


def validate(cfg: DictConfig, known_models: list[str]) -> None:
    """Check what the schema's types cannot; raise :class:`ConfigError` on the first problem."""
    validate_train(cfg.train)
    if cfg.model.name not in known_models:
        raise ConfigError(f"unknown model '{cfg.model.name}'",
                          f"use model=<name> with one of: {', '.join(sorted(known_models))}")
    if cfg.task.needs_root and not cfg.data.root and not cfg.plan:  # a plan counts on synthetic inputs
        raise ConfigError(f"task={cfg.task.name} needs data.root (the {cfg.task.dataset} folder)",
                          f"pass data.root=/path/to/{cfg.task.dataset}"
                          + (" (add data.download=true to fetch it)" if cfg.task.downloadable else ""))
    validate_task(cfg.task)
    if not _DEVICE.match(cfg.device):
        raise ConfigError(f"device={cfg.device} is not a device", "use auto, cpu, cuda or cuda:N")
    if cfg.device.startswith("cuda"):
        import torch

        index, count = int(cfg.device.partition(":")[2] or 0), torch.cuda.device_count()
        if index >= count:
            raise ConfigError(f"device={cfg.device} but this machine has {count} CUDA device(s) available to torch "
                              f"{torch.__version__}", "use device=auto or cpu, or a cuda:N that exists")
    if not 0 <= cfg.seed < 2**32:
        raise ConfigError(f"seed={cfg.seed} must be in [0, 2**32)", "use a non-negative seed, e.g. seed=0")
    for key in ("pin_memory", "gpu_resident"):
        if cfg.data[key] not in _AUTO_SWITCH:
            raise ConfigError(f"data.{key}={cfg.data[key]} must be auto, true or false",
                              "use one of auto|true|false")
    split = cfg.data.val_split
    if isinstance(split, bool) or not (isinstance(split, int) and split >= 0 or isinstance(split, float) and 0 <= split < 1):
        raise ConfigError(f"data.val_split={split!r} must be a fraction in [0, 1) or a count >= 0 of training examples",
                          "use e.g. data.val_split=0.1, or 0 for no validation split")
    if cfg.data.num_workers < 0:
        raise ConfigError(f"data.num_workers={cfg.data.num_workers} must be >= 0", "use 0 to load in-process")
    if cfg.score.examples <= 0:
        raise ConfigError(f"score.examples={cfg.score.examples} must be > 0", "score on e.g. 256 examples")
    try:
        accumulator_setting(cfg.score.accumulator_bits)
    except ValueError:
        raise ConfigError(f"score.accumulator_bits={cfg.score.accumulator_bits} must be in 1..32 or {ADDER_TREE}",
                          "use 32 unless the entry really accumulates narrower, or adder_tree for a model whose "
                          "dot products all multiply quantized values") from None
    if cfg.score.accumulator_overflow not in ACCUMULATOR_OVERFLOWS:
        raise ConfigError(f"score.accumulator_overflow={cfg.score.accumulator_overflow} must be one of "
                          f"{', '.join(ACCUMULATOR_OVERFLOWS)}",
                          "use wrap (two's complement) or saturate (clamped partial sums)")
    try:
        freebie_setting(cfg.score.freebie)
    except ValueError:
        raise ConfigError(f"score.freebie={cfg.score.freebie} must be auto, true or false",
                          "use one of auto|true|false") from None


#: Keys of a task that describe its data (the classes and the input's shape): the dataset fixes them, and the
#: model is built from them, so a value other than the task's definition fails at the first step.
_DATA_KEYS = ("kind", "dataset", "num_classes", "in_chans", "input_size")


def validate_task(task: DictConfig) -> None:
    """What the schema cannot check of a task: the keys describing its data are those of its definition
    (``conf/task/<name>.yaml``, where there is one), and a language model's windows hold at least one token."""
    path = CONF_DIR / "task" / f"{task.name}.yaml"
    definition = OmegaConf.load(path) if path.is_file() else OmegaConf.create()
    for key in _DATA_KEYS:
        if key in definition and task[key] != definition[key]:
            raise ConfigError(f"task.{key}={task[key]} but the {task.name} data has {key}={definition[key]} "
                              f"(conf/task/{task.name}.yaml)", f"remove the task.{key} override: the dataset fixes "
                              "it, and the model is built from it")
    for key, use in (("bptt", "the training window"), ("eval_window", "tokens fed per evaluation step")):
        value = OmegaConf.select(task, f"stream.{key}")
        if value is not None and value < 1:
            raise ConfigError(f"task.stream.{key}={value} must be >= 1 ({use})",
                              f"use e.g. task.stream.{key}={definition.get('stream', {}).get(key, 256)}")


def to_container(cfg: DictConfig) -> dict:
    """The resolved config as plain JSON-able Python (enums as strings): saved in checkpoints and entries."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


#: What defines a run: a checkpoint may only be resumed by a command that agrees on these (dotted paths) ...
RUN_DEFINING = ("task", "model", "train", "compress", "seed", "init", "data.val_split", "smoke")
#: ... except these, which change how a run is watched, not what it trains.
RESUME_FREE = frozenset({"train.log_every", "train.compile", "train.eval_batch_size"})
#: Keys that runs recorded and the config no longer has, so that those runs still resume and reprint: the gate
#: left the task config for the judge's table (scoring.challenge), which decides it by the task's name.
RETIRED = ("task.gate",)


def _under(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == prefix or key.startswith(prefix + ".") for prefix in prefixes)


def is_run_defining(key: str) -> bool:
    """Whether the dotted config ``key`` (e.g. an override's ``train.lr``) is part of what defines a run."""
    return _under(key, RUN_DEFINING) and not _under(key, RESUME_FREE)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b[0].c": leaf}``: lists too, so that a difference is named down to one value (empty ones are leaves)."""
    if isinstance(tree, dict) and tree:
        items = [(f"{prefix}.{key}" if prefix else str(key), value) for key, value in tree.items()]
    elif isinstance(tree, list) and tree:
        items = [(f"{prefix}[{index}]", value) for index, value in enumerate(tree)]
    else:
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in items:
        flat.update(_flatten(value, key))
    return flat


def _select(tree: dict, path: str) -> Any:
    """The value at a dotted ``path`` of a nested dict (None where a key is missing)."""
    for key in path.split("."):
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def run_settings(config: dict) -> dict[str, Any]:
    """The settings that define a run (what a resume must agree on), flattened: ``{"train.lr": 0.1, …}``."""
    flat = _flatten({key: _select(config, key) for key in RUN_DEFINING})
    return {key: value for key, value in flat.items() if key not in RESUME_FREE and not _under(key, RETIRED)}


def _with_schema_defaults(config: dict, schema: dict) -> dict:
    """``config`` with every key it lacks taken from ``schema`` (nested dicts merged; ``???`` defaults skipped)."""
    filled = dict(config)
    for key, default in schema.items():
        if key not in filled:
            if default != MISSING:
                filled[key] = default
        elif isinstance(default, dict) and isinstance(filled[key], dict):
            filled[key] = _with_schema_defaults(filled[key], default)
    return filled


def check_same_run(saved: dict, current: dict, where: Any) -> None:
    """Refuse to resume a checkpoint written by a different run configuration.

    A key the saved config lacks is read as the schema's default: a config is saved whole, so a key it lacks is
    one its writer's schema did not have, and that run ran with the behaviour the default stands for."""
    schema = OmegaConf.to_container(OmegaConf.structured(RunConfig), enum_to_str=True)
    old, new = run_settings(_with_schema_defaults(saved, schema)), run_settings(current)
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            raise ConfigError(f"{where} holds a run with {key}={old.get(key)!r} but this command has "
                              f"{key}={new.get(key)!r}", "re-run with the same settings to resume, or pass "
                              "hydra.run.dir=<new folder> to start a separate run")


#: Train keys a stage cannot change: the data loaders, built once from ``train.*``, serve every stage.
_RUN_WIDE = ("batch_size", "eval_batch_size")


def stage_train_config(train: DictConfig, stage: str, epochs: int, overrides: dict[str, Any]) -> DictConfig:
    """The training recipe of one stage: ``train`` with the stage's epochs and overrides, type-checked.

    ``lr_scale`` (not a train key) sets the stage's lr to that multiple of the run's ``train.lr``: one recipe then
    fine-tunes at, say, a tenth of whatever rate the task trains at (SGD 0.1 on images, AdamW 3e-3 on text)."""
    overrides = dict(overrides)
    if "lr_scale" in overrides:
        scale = overrides.pop("lr_scale")
        if "lr" in overrides:
            raise ConfigError(f"stage {stage}: both lr={overrides['lr']!r} and lr_scale={scale!r}",
                              "keep one: lr sets the rate, lr_scale multiplies train.lr")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise ConfigError(f"stage {stage}: lr_scale={scale!r} is not a positive number",
                              "set lr_scale to a multiple of train.lr such as 0.1")
        overrides["lr"] = float(train.lr) * scale
    for key in _RUN_WIDE:
        if key in overrides:
            raise ConfigError(f"stage {stage}: {key}={overrides[key]!r} cannot be set per stage (one data loader "
                              "serves every stage)", f"remove it from the stage and set train.{key} instead")
    try:
        merged = OmegaConf.merge(train, {"epochs": epochs, **overrides})
    except OmegaConfBaseException as err:
        problem = str(err).splitlines()[0]
        raise ConfigError(f"stage {stage}: {problem}",
                          "a stage may override only train.* keys, with values of their type") from None
    validate_train(merged, where=f"stage {stage}: train")
    return merged
