"""``python -m scoring --model NAME --task TASK``: count a registered architecture, untrained, on synthetic inputs
of the task (an image of its shape, or Zipf-distributed tokens fed on-line after the model's memory), under the
official score settings, and print its per-layer table, totals and score.

This module may import data/, models/, conf and scoring core, never train/.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

from data.tasks import ScoreInputs, build_task
from models import create_model
from scoring.entry.boundary import USER_ERRORS, command
from scoring.entry.kit import official_score_settings, task_definition
from scoring.entry.model_report import count_report
from scoring.entry.runfiles import write_report_json
from scoring.errors import UserError
from scoring.report import layer_table, rules_text, totals_text

PROG = "micronet-score"


def main(argv: Sequence[str]) -> int:
    """``--model NAME --task TASK [--input-size N] [--num-classes N] [--json PATH]``; exit 0, or 2 (one line)."""
    parser = argparse.ArgumentParser(prog=PROG, description="Count a registered architecture under the MicroNet rules.")
    parser.add_argument("--model", required=True, help="registered model name (models.list_models())")
    parser.add_argument("--task", required=True, help="task whose input shape, classes and baseline to use")
    parser.add_argument("--input-size", type=int, help="image tasks: input height = width (default: the task's)")
    parser.add_argument("--num-classes", type=int, help="classifier outputs (default: the task's)")
    parser.add_argument("--json", type=Path, help="also write the report (report.json schema, no gate) here")
    args = parser.parse_args(argv)
    with command():
        report = _count(args)
    print(f"{args.model} on {args.task} ({report['inputs']}, untrained)\n")
    print(layer_table(report["layers"]), totals_text(report), "Project rules used:\n" + rules_text(report), sep="\n\n")
    if args.json:
        with command():
            _write_json(args.json, report)
    return 0


def _count(args: argparse.Namespace) -> dict[str, Any]:
    """The report of the architecture ``args`` name; a bad size, task or model is a :class:`UserError`."""
    for flag, value in (("--input-size", args.input_size), ("--num-classes", args.num_classes)):
        if value is not None and value <= 0:
            raise UserError(f"{flag} {value} must be > 0", "omit it for the task's own")
    try:
        definition = task_definition(args.task)
        if args.num_classes is not None:
            definition = {**definition, "num_classes": args.num_classes}
        task = build_task(definition)
        model = create_model(args.model, num_classes=task.num_classes, **task.model_kwargs())
        inputs = task.synthetic_inputs(model, input_size=args.input_size)
    except USER_ERRORS:
        raise
    except ValueError as err:  # a task or model that does not take these sizes
        raise UserError(str(err)) from None
    return count_report(model, task, inputs, official_score_settings(), extra={
        "model": args.model, "inputs": _described(inputs), "num_classes": task.num_classes})


def _described(inputs: ScoreInputs) -> str:
    """What the architecture was counted on, in words."""
    if not inputs.stream:
        return "×".join(map(str, inputs.inputs.shape[1:]))
    return (f"{inputs.inputs.shape[1] - inputs.warmup} Zipf-distributed tokens fed on-line after {inputs.warmup} "
            "that fill its memory")


def _write_json(path: Path, report: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_report_json(path, report)
    except OSError as err:
        raise UserError(f"cannot write --json {path}: {err.strerror or err}", "choose a writable path") from None
