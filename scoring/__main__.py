"""Command line of the scorer.

    python -m scoring --model NAME --task TASK [--input-size N] [--num-classes N] [--json PATH]
        count a registered architecture (untrained) and print its per-layer table, totals and score;
    python -m scoring verify BUNDLE [...]          verify an exported entry (scoring/verify.py);
    python -m scoring CHECKPOINT_OR_BUNDLE [...]   evaluate and score a trained entry (scoring/verify.py).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROG = "python -m scoring"


def architecture_main(argv: list[str]) -> int:
    """Count a registered architecture, untrained, on synthetic inputs of the task (an image of its shape, or
    Zipf-distributed tokens fed on-line after the model's memory)."""
    from data.tasks import build_task
    from models import UnknownModelError, create_model
    from scoring.counter import count_inputs
    from scoring.kit import task_definition
    from scoring.report import build_report, layer_table, rules_text, totals_text
    from scoring.rules import UnknownTaskError

    parser = argparse.ArgumentParser(prog=PROG, description="Count a registered architecture under the MicroNet rules.")
    parser.add_argument("--model", required=True, help="registered model name (models.list_models())")
    parser.add_argument("--task", required=True, help="task whose input shape, classes and baseline to use")
    parser.add_argument("--input-size", type=int, help="image tasks: input height = width (default: the task's)")
    parser.add_argument("--num-classes", type=int, help="classifier outputs (default: the task's)")
    parser.add_argument("--json", type=Path, help="also write the report (report.json schema, no gate) here")
    args = parser.parse_args(argv)
    for flag, value in (("--input-size", args.input_size), ("--num-classes", args.num_classes)):
        if value is not None and value <= 0:
            print(f"{PROG}: error: {flag} {value} must be > 0 (omit it for the task's own)", file=sys.stderr)
            return 2
    try:
        definition = task_definition(args.task)
        if args.num_classes is not None:
            definition = {**definition, "num_classes": args.num_classes}
        task = build_task(definition)
        model = create_model(args.model, num_classes=task.num_classes, **task.model_kwargs())
        inputs = task.synthetic_inputs(model, input_size=args.input_size)
    except (UnknownTaskError, UnknownModelError, ValueError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    described = ("×".join(map(str, inputs.inputs.shape[1:])) if not inputs.stream else
                 f"{inputs.inputs.shape[1] - inputs.warmup} Zipf-distributed tokens fed on-line after "
                 f"{inputs.warmup} that fill its memory")
    report = build_report(task=args.task, count=count_inputs(model, inputs), example=task.example, extra={
        "model": args.model, "inputs": described, "num_classes": task.num_classes})
    print(f"{args.model} on {args.task} ({described}, untrained)\n")
    print(layer_table(report["layers"]), totals_text(report), "Project rules used:\n" + rules_text(report), sep="\n\n")
    if args.json:
        from scoring.entry import atomic_write

        text = json.dumps(report, indent=2) + "\n"
        try:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(args.json, lambda tmp: tmp.write_text(text))
        except OSError as exc:
            print(f"{PROG}: error: cannot write --json {args.json}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """Dispatch: ``verify`` → scoring.verify.main; an existing path → scoring.verify.score_main; else counting."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "verify":
        from scoring.verify import main as verify_main
        return verify_main(argv[1:])
    if argv and not argv[0].startswith("-") and Path(argv[0]).exists():
        from scoring.verify import score_main
        return score_main(argv)
    return architecture_main(argv)


if __name__ == "__main__":
    sys.exit(main())
