"""The one path from a model to its report: evaluate → count → report.

``train/run.py`` scores its final model through :func:`recount`, ``verify`` and ``python -m scoring PATH`` rebuild
an entry and score it through the same function, so that what a run reports and what an organizer recounts can
only differ where the model or the data differ. ``python -m scoring --model`` counts an untrained architecture on
synthetic inputs through :func:`count_report`, the count → report half.

:func:`load_test_split` reads a run's test split as the run read it, for verify's recount and integer execution.

The score settings are the run config's ``score`` section: ``examples`` (test examples run through the scorer),
``accumulator_bits`` and ``freebie`` (auto | true | false). This module may import data/ and scoring core.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Mapping

import torch
import torch.nn as nn

from data.tasks import DataOptions, Evaluation, ScoreInputs, Task, build_task
from scoring.counter import count_inputs
from scoring.report import build_report
from scoring.rules import freebie_setting


def count_report(model: nn.Module, task: Task, inputs: ScoreInputs, score: Mapping[str, Any], *,
                 evaluation: Evaluation | None = None, validation: Evaluation | None = None,
                 extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The report of ``model`` counted on ``inputs`` under the score settings ``score`` (its ``accumulator_bits``
    and ``freebie``); the gate is decided on ``evaluation`` when one is given (see
    :func:`scoring.report.build_report`)."""
    count = count_inputs(model.eval(), inputs, accumulator_bits=score["accumulator_bits"],
                         freebie=freebie_setting(score["freebie"]))
    return build_report(task=task.name, count=count, example=task.example, extra=extra,
                        evaluation=None if evaluation is None else evaluation.to_dict(),
                        validation=None if validation is None else validation.to_dict())


def load_test_split(config: Mapping[str, Any], *, data_root: str | None = None, device: str = "auto"
                    ) -> tuple[Task, Iterable, torch.device]:
    """The task of a run's resolved ``config``, its test loader as the run read it, and the device ``device`` names
    (``auto``: cuda when available). ``data_root`` replaces the recorded ``data.root`` (datasets live elsewhere on
    an organizer's machine); nothing is downloaded, and the validation hold-out is rebuilt only so that the test
    split is the same."""
    resolved = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                            "cpu" if device == "auto" else device)
    task = build_task(config["task"])
    options = DataOptions(root=config["data"].get("root") if data_root is None else data_root,
                          val_split=config["data"].get("val_split", 0))
    test = task.loaders(options, batch_size=1, eval_batch_size=config["train"]["eval_batch_size"],
                        seed=config["seed"], device=resolved).test
    return task, test, resolved


def recount(model: nn.Module, task: Task, test: Iterable, device: torch.device, score: Mapping[str, Any], *,
            evaluation: Evaluation | None = None, validation: Evaluation | None = None,
            extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The report of ``model`` on ``task``: its exact evaluation on the test loader ``test`` (or ``evaluation``,
    when the caller has it already), and its count on the first ``score["examples"]`` examples of that split.

    ``validation`` (the validation split's evaluation) and ``extra`` (fields such as the model's name) are
    recorded in the report as they are."""
    if evaluation is None:
        evaluation = task.evaluate(model, test, device, "test")
    inputs = task.score_inputs(test, score["examples"], device, model)
    return count_report(model, task, inputs, score, evaluation=evaluation, validation=validation, extra=extra)
