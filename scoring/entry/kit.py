"""What the kit itself defines, and the check that an entry is judged by it (``micronet-score verify``).

A bundle records the config of the run that made it, but the task and the rules an entry is judged by are the
kit's, never the bundle's:

* the task: :func:`task_definition` reads ``conf/task/<name>.yaml`` of this repository, the one definition
  training composes too (dataset, classes, input, evaluation). ``verify`` evaluates on that definition alone, and
  refuses an entry whose recorded task differs from it at any key the file defines but those that shape training
  batches only (the task kind's ``data.tasks.Task.training_keys``: the augmentation but ``eval_resize``, the
  language models' training windows ``stream.bptt`` / ``stream.variable``): those are the entrant's recipe.
  Keys the file does not define (defaults a run's typed schema adds, the gate older runs recorded) are not
  compared, since nothing reads them. A recorded ``task.name: cifar100`` on a digits entry is refused, not scored
  against the CIFAR-100 baseline;
* the score settings: :func:`official_score_settings` reads ``score`` of ``conf/config.yaml`` (examples 256,
  accumulator_bits 32, freebie auto); ``accumulator_bits: adder_tree`` is official too (the 2019 winners' adder
  trees; the counter refuses it unless every dot product multiplies integers). An entry recorded with other
  settings is refused, unless the organizer
  passes ``--allow-score-settings``; then it is compared under its own settings and every line that would say
  "verified" says instead that the score is not an official one, naming the settings;
* the baseline and gate: the report must name the task, with the kit's baseline and gate for it (the judge's
  table, :mod:`scoring.challenge`);
* the data: the recorded ``data.root`` (a folder on the entrant's machine; CIFAR-100's files are pickles) and the
  other machine settings are never used: verify loads from ``--data-root`` only, downloads nothing, loads
  in-process (:data:`VERIFY_DATA`);
* the recorded seed, evaluation batch size and validation hold-out (``data.val_split``), which the evaluation
  reads, are range-checked (:func:`check_evaluation`; the scoring CLI checks them too).

Every refusal is an :class:`~scoring.entry.files.EntryError`: one line naming the field, the kit's value and the fix.
This module may import data/, conf and scoring core, never train/.
"""
from __future__ import annotations

import reprlib
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping

from omegaconf import OmegaConf

from conf import CONF_DIR
from scoring.challenge import UnknownTaskError, challenge_task
from scoring.entry.bundle import Entry
from scoring.entry.files import EntryError
from scoring.rules import ACCUMULATOR_OVERFLOWS, ADDER_TREE, accumulator_setting, freebie_setting

#: data.* settings that describe a machine, not a run: verify uses these, whatever the entry recorded
#: (``root`` is replaced by ``--data-root``).
VERIFY_DATA = {"root": None, "download": False, "num_workers": 0, "pin_memory": "auto", "gpu_resident": "auto"}
#: Largest evaluation batch and score example count verify runs (the kit's defaults are at most 1,000 and 256).
MAX_BATCH = 4096
#: A key absent from a mapping (None is a value).
_ABSENT = object()


def task_names() -> list[str]:
    """The tasks this kit defines (``conf/task/*.yaml``)."""
    return sorted(path.stem for path in (CONF_DIR / "task").glob("*.yaml"))


def task_definition(name: str) -> dict[str, Any]:
    """The kit's definition of task ``name`` (``conf/task/<name>.yaml``) as plain data.

    :class:`~scoring.challenge.UnknownTaskError` for a name the kit does not define; the name is matched against the
    files there, never joined into a path.
    """
    known = task_names()
    if name not in known:
        raise UnknownTaskError(f"unknown task {reprlib.repr(name)}; choose one of: {', '.join(known)}")
    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / "task" / f"{name}.yaml"), resolve=True)


def official_score_settings() -> dict[str, Any]:
    """The official score settings: ``score`` of the kit's ``conf/config.yaml``."""
    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml").score, resolve=True)


@dataclass(frozen=True)
class Judged:
    """An entry prepared for verification under the kit's definitions."""

    #: The entry with its config's task, data and score sections replaced by what verify evaluates with.
    entry: Entry
    #: Score settings of the entry that differ from the official ones (only with ``allow_score_settings``),
    #: as ``key=value (official value)``; empty for an official verification.
    unofficial: tuple[str, ...]


def judge(entry: Entry, report: Mapping[str, Any], *, allow_score_settings: bool = False) -> Judged:
    """Check ``entry`` and its ``report`` against the kit (see the module docstring); :class:`EntryError` if refused."""
    config = entry.config
    name = config["task"]["name"]
    try:
        task = task_definition(name)
        judged = challenge_task(name)
    except UnknownTaskError as err:
        raise EntryError(f"entry.json's task: {err}; verify entries of this kit's tasks only") from None
    _check_task(config["task"], task)
    if "num_classes" in task and entry.meta["model"]["num_classes"] != task["num_classes"]:
        raise EntryError(f"entry.json's model has {entry.meta['model']['num_classes']} classes, task {name} has "
                         f"{task['num_classes']}; re-export a run of task={name}")
    gate_found = report.get("gate") if isinstance(report.get("gate"), dict) else {}
    base, gate = judged.baseline, judged.gate
    kits_baseline = {"model": base.model, "params": base.params, "ops": base.ops}
    for key, found, value in (
            ("task", report.get("task", _ABSENT), name),
            ("baseline", report.get("baseline", _ABSENT), kits_baseline),
            ("gate.metric", gate_found.get("metric", _ABSENT), gate.metric),
            ("gate.threshold", gate_found.get("threshold", _ABSENT), float(gate.threshold))):
        if not _same(found, value):
            raise EntryError(f"report.json's {key} is {_show(found)}, the kit's for task {name} is {value!r}; the "
                             "report was not written for this entry's task — re-export the run")
    score, unofficial = _score_settings(config["score"], allow_score_settings)
    check_evaluation(config)
    data = {**config["data"], **VERIFY_DATA}
    return Judged(replace(entry, config={**config, "task": task, "score": score, "data": data}), unofficial)


def _check_task(recorded: Mapping[str, Any], task: Mapping[str, Any]) -> None:
    """The recorded task has the kit's value at every key the kit's file defines, but its kind's training-only
    ones (``data.tasks.Task.training_keys``; a recorded augmentation must still be valid). Keys the file does not
    define (the defaults a run's typed schema adds, e.g. ``stream: null`` for an image task) are not compared
    either: the evaluation is built from the kit's definition alone, so no recorded task value reaches it."""
    from data import AugmentOptions

    name = task["name"]
    augment = recorded.get("augment")
    if augment is not None and not isinstance(augment, Mapping):
        raise EntryError(f"entry.json's task.augment is {_show(augment)}, not a mapping; re-export the run")
    try:
        AugmentOptions.from_mapping(augment)
    except ValueError as err:
        raise EntryError(f"entry.json's task.augment: {err}; re-export the run") from None
    from data.tasks import build_task

    try:
        training_keys = build_task(task).training_keys
    except (KeyError, ValueError) as err:
        raise EntryError(f"the kit's task {name!r} cannot be built ({err}); the kit's conf/task/{name}.yaml is "
                         "damaged — reinstall the kit") from None
    difference = _first_difference(recorded, task, "task", training_keys)
    if difference:
        where, mine, kits = difference
        raise EntryError(f"entry.json's task differs from this kit's definition of {name!r} (conf/task/{name}.yaml) "
                         f"at {where}: {mine} in the entry, {kits} in the kit; only entries of the kit's task are "
                         f"verified — retrain with task={name} (only the training augmentation and windows may "
                         "differ)")


#: Checks of each score setting, for an entry compared under its own settings (--allow-score-settings).
_SCORE_CHECKS = {
    "examples": (lambda v: _is_int(v) and 1 <= v <= MAX_BATCH, f"an integer in 1..{MAX_BATCH}"),
    "accumulator_bits": (lambda v: _parses(accumulator_setting, v), f"an integer in 1..32 or {ADDER_TREE}"),
    "accumulator_overflow": (lambda v: v in ACCUMULATOR_OVERFLOWS, " or ".join(ACCUMULATOR_OVERFLOWS)),
    "freebie": (lambda v: _parses(freebie_setting, v), "auto, true or false"),
}


#: Score settings that entries written before them lack, with what such an entry did: its accumulator wrapped.
_LATER_SETTINGS = {"accumulator_overflow": "wrap"}


#: Score settings an official score may take besides the kit's own.
_OFFICIAL_ALTERNATIVES = {"accumulator_bits": (ADDER_TREE,)}


def _score_settings(recorded: Mapping[str, Any], allow: bool) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The score settings to count with, and those of the entry that differ from the official ones."""
    recorded = {**_LATER_SETTINGS, **recorded}
    official = {**official_score_settings(), **{key: recorded[key] for key, values in _OFFICIAL_ALTERNATIVES.items()
                                               if recorded.get(key, _ABSENT) in values}}
    unofficial = tuple(f"{key}={_show(recorded.get(key, _ABSENT))} (official {_show(official.get(key, _ABSENT))})"
                       for key in sorted(official.keys() | recorded.keys(), key=str)
                       if not _same(recorded.get(key, _ABSENT), official.get(key, _ABSENT)))
    if not unofficial:
        return official, ()
    if not allow:
        raise EntryError(f"entry.json's score settings differ from the official ones: {', '.join(unofficial)}; an "
                         "official score uses the kit's (conf/config.yaml score) — re-export a run with the default "
                         "score settings, or pass --allow-score-settings to compare under the entry's own (then not "
                         "an official score)")
    for key in sorted(recorded.keys() | _SCORE_CHECKS.keys(), key=str):
        valid, expected = _SCORE_CHECKS.get(key, (lambda v: False, f"absent (settings: {', '.join(_SCORE_CHECKS)})"))
        if not valid(recorded.get(key, _ABSENT)):
            raise EntryError(f"entry.json's score.{key}={_show(recorded.get(key, _ABSENT))} must be {expected}; "
                             "re-export the run")
    return dict(recorded), unofficial


def accept_accumulator(judged: Judged, recounted: Mapping[str, Any], allow_score_settings: bool) -> Judged:
    """``judged`` once the recount shows its accumulation holds: an adder tree is official only where both inputs
    of every dot product are integer-quantized (the recounted report's ``float_dot_products`` is empty). Else
    :class:`EntryError`, or with ``allow_score_settings`` ``judged`` compared as not official."""
    floats = recounted.get("float_dot_products") or {}
    if recounted.get("accumulator_bits") != ADDER_TREE or not floats:
        return judged
    if allow_score_settings:
        return replace(judged, unofficial=(*judged.unofficial, f"accumulator_bits={ADDER_TREE} over float operands "
                                                               f"in {len(floats)} layer(s)"))
    named = ", ".join(f"{name!r} ({operand})" for name, operand in list(floats.items())[:3])
    raise EntryError(f"score.accumulator_bits={ADDER_TREE} is official only where both inputs of every dot product "
                     f"are integer-quantized, but {len(floats)} layer(s) multiply a float: {named}"
                     f"{', ...' if len(floats) > 3 else ''}",
                     "quantize their inputs and weights (compress quantize: activation_bits, attention_bits), "
                     "re-export a run counted with score.accumulator_bits=32, or pass --allow-score-settings to "
                     "compare it as not official")


def check_evaluation(config: Mapping[str, Any]) -> None:
    """The recorded values the evaluation reads: seed, evaluation batch size and validation hold-out, in range
    (a run's own checks, made again on what an entry recorded)."""
    seed, batch, split = config.get("seed"), config["train"].get("eval_batch_size"), config["data"].get("val_split", 0)
    if not (_is_int(seed) and 0 <= seed < 2**32):
        raise EntryError(f"entry.json's seed={reprlib.repr(seed)} must be an integer in [0, 2**32); re-export the run")
    if not (_is_int(batch) and 1 <= batch <= MAX_BATCH):
        raise EntryError(f"entry.json's train.eval_batch_size={reprlib.repr(batch)} must be an integer in "
                         f"1..{MAX_BATCH}; re-export the run with a smaller train.eval_batch_size")
    if not (_is_int(split) and split >= 0 or isinstance(split, float) and 0 <= split < 1):
        raise EntryError(f"entry.json's data.val_split={reprlib.repr(split)} must be a fraction in [0, 1) or a count "
                         ">= 0 of training examples; re-export the run")


def _parses(parse: Callable[[Any], Any], value: Any) -> bool:
    """Whether the scorer's parser ``parse`` accepts ``value`` (it raises ValueError otherwise)."""
    try:
        parse(value)
    except ValueError:
        return False
    return True


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON data: numbers by value (1 == 1.0), but a bool is never a number, and containers item by item."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[key], b[key]) for key in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
    return a == b if numbers else type(a) is type(b) and a == b


def _first_difference(mine: Any, kits: Any, where: str, training_keys: frozenset[str]) -> tuple[str, str, str] | None:
    """(path, entry's value, kit's value) of the first key the kit's task defines where the entry's differs, or
    None. Keys only the entry has, and ``training_keys``, are not compared (see :func:`_check_task`)."""
    if isinstance(mine, dict) and isinstance(kits, dict):
        for key in sorted((key for key in kits if f"{where}.{key}".removeprefix("task.") not in training_keys),
                          key=str):
            difference = _first_difference(mine.get(key, _ABSENT), kits.get(key, _ABSENT), f"{where}.{key}",
                                           training_keys)
            if difference:
                return difference
        return None
    if _same(mine, kits):
        return None
    return where, _show(mine), _show(kits)


def _show(value: Any) -> str:
    """A value for a one-line message: short, and "absent" for a missing key."""
    return "absent" if value is _ABSENT else reprlib.repr(value)
