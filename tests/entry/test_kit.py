"""scoring.entry.kit: what a run records holds the kit's definitions, so that verify refuses only real changes."""
from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from data.tasks import build_task
from scoring.challenge import TASKS, UnknownTaskError
from scoring.entry.kit import _first_difference, official_score_settings, task_definition, task_names
from train.config import to_container
from tests.conftest import CONF_DIR


@pytest.mark.parametrize("task", task_names())
def test_a_runs_recorded_task_and_score_are_the_kits_definitions(task):
    """An untouched run of every task records the kit's value at every key of its task file (the typed schema adds
    defaults of its own: those verify does not compare), and the official score settings."""
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        recorded = to_container(compose("config", overrides=[f"task={task}"]))
    keys = build_task(task_definition(task)).training_keys
    assert _first_difference(recorded["task"], task_definition(task), "task", keys) is None
    assert _first_difference(recorded["task"], {**task_definition(task), "kind": "x"}, "task", keys)[0] == "task.kind"
    assert recorded["score"] == official_score_settings() == {"examples": 256, "accumulator_bits": 32,
                                                              "accumulator_overflow": "wrap", "freebie": "auto"}


def test_the_judges_table_has_every_task_of_the_kit_and_each_kind_measures_the_judged_metric():
    """The gate and baseline live in the judge's table only (scoring/challenge.py); conf/task defines the rest."""
    assert set(task_names()) == set(TASKS)
    for name in task_names():
        assert "gate" not in task_definition(name)
        assert build_task(task_definition(name)).metric == TASKS[name].metric


@pytest.mark.parametrize("name", ["mnist", "../config", "digits/../digits", "", "${oc.env:HOME}"])
def test_a_task_name_is_matched_never_joined_into_a_path(name):
    with pytest.raises(UnknownTaskError, match=rf"unknown task .*; choose one of: {', '.join(task_names())}$"):
        task_definition(name)


@pytest.mark.parametrize("task, change, difference", [
    ("cifar100", {"augment": {"cutout": 16, "hflip": False, "auto_augment": "rand-m9-mstd0.5"}}, None),
    ("imagenet", {"augment": {"eval_resize": 288}}, "task.augment.eval_resize"),  # shapes the test inputs
    ("wikitext_demo", {"stream": {"bptt": 70, "variable": True}}, None),
    ("wikitext_demo", {"stream": {"eval_window": 64}}, "task.stream.eval_window"),
    ("digits", {"in_chans": 3}, "task.in_chans"),
    ("digits", {"gate": {"metric": "top1", "threshold": 0.5}}, None),  # recorded before the gate left the task
])
def test_only_what_shapes_training_batches_may_differ(task, change, difference):
    kits = task_definition(task)
    recorded = {**kits, **{key: {**kits[key], **value} if isinstance(value, dict) and key in kits else value
                           for key, value in change.items()}}
    found = _first_difference(recorded, kits, "task", build_task(kits).training_keys)
    assert (found and found[0]) == difference
