"""scoring.kit: what a run records is exactly the kit's definitions, so that verify refuses only real changes."""
from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from scoring.kit import official_score_settings, task_definition, task_names
from scoring.rules import UnknownTaskError
from train.config import to_container
from train.run import CONF_DIR


@pytest.mark.parametrize("task", task_names())
def test_a_runs_recorded_task_and_score_are_the_kits_definitions(task):
    """The typed schema adds nothing a task file lacks: an untouched run of every task passes verify's comparison."""
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        recorded = to_container(compose("config", overrides=[f"task={task}"]))
    assert recorded["task"] == task_definition(task)
    assert recorded["score"] == official_score_settings() == {"examples": 256, "accumulator_bits": 32,
                                                              "freebie": "auto"}


@pytest.mark.parametrize("name", ["mnist", "../config", "digits/../digits", "", "${oc.env:HOME}"])
def test_a_task_name_is_matched_never_joined_into_a_path(name):
    with pytest.raises(UnknownTaskError, match=rf"unknown task .*; choose one of: {', '.join(task_names())}$"):
        task_definition(name)
