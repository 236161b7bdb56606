"""``python -m scoring measure DIR [DIR ...] [--json PATH]``: entries measured on ONNX Runtime beside their task's
dense float32 model, in one run.

For each task among the entries, the task's default model (the challenge's baseline architecture), dense, float32
and untrained — its timing, memory and file size do not depend on the weights' values — is measured once and
counted as the kit's baseline constants; then every entry, rebuilt through
:func:`scoring.entry.build_model_from_entry` and exported with QDQ nodes (:mod:`scoring.entry.deploy.qdq`). Each
model gets: the file's size, batch-1 latency, batch throughput and peak memory (:mod:`.runtime`), the kernels the
runtime chose, and how its outputs compare with the torch model's on random inputs. The table is printed; ``--json``
writes every figure; a run dir also gets its own ``measured.json`` and the table in its ``report.md``
(:func:`scoring.entry.runfiles.write_measurement`). A bundle is sealed by its ``SHA256SUMS`` and is left as it is.

Image classification only: a language model's on-line token stream with a carried state is not exported.
May import data/, models/, compress/ and scoring core.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any, Sequence

from scoring.entry import MANIFEST_FILE, atomic_write, build_model_from_entry, load_entry, read_report, \
    write_measurement
from scoring.entry.boundary import command
from scoring.entry.deploy.runtime import Settings, require_runtime
from scoring.errors import UserError
from scoring.report import counted_vs_measured

#: Version of the measurement JSON (``measured.json``, ``--json``).
MEASUREMENT_FORMAT = 1
#: Random inputs on which each file's outputs are compared with the torch model's.
CHECK_EXAMPLES = 64
#: The counted figures of an entry's report that the measurement shows.
COUNTED = ("params", "ops", "score", "param_bits", "freebie", "top1")


def measure_model(name: str, role: str, model: Any, counted: dict[str, Any], shape: tuple[int, ...],
                  path: Path, settings: Settings) -> dict[str, Any]:
    """Export ``model`` to ``path`` and measure it; the row of the measurement for it (``role``: dense or
    entry)."""
    import torch

    from scoring.entry.deploy.qdq import export_onnx
    from scoring.entry.deploy.runtime import agreement, kernels, time_file

    inputs = torch.randn(CHECK_EXAMPLES, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.eval()(inputs).float().numpy()
    stored = export_onnx(model, inputs[:1], path)
    return {"name": name, "role": role, "counted": counted, "stored": stored.to_dict(),
            "measured": time_file(path, shape, settings), "kernels": kernels(path, settings.threads),
            "check": agreement(path, inputs.numpy(), expected, settings.threads)}


def _task(config: dict[str, Any]) -> Any:
    from data.tasks import build_task

    task = build_task(config["task"])
    if task.example != "image":
        raise UserError(f"task {task.name} is a language model: its token stream with a carried state is not "
                        "exported to ONNX here", "measure entries of an image classification task "
                        "(digits, cifar100, imagenet)")
    return task


def _dense_row(task: Any, out: Path, settings: Settings) -> dict[str, Any]:
    from models import create_model
    from scoring.challenge import challenge_task

    name = task.config["default_model"]
    model = create_model(name, num_classes=task.num_classes, **task.model_kwargs())
    baseline = challenge_task(task.name).baseline
    counted = {"params": baseline.params, "ops": baseline.ops, "score": 2.0, "param_bits": 32 * baseline.params,
               "freebie": False, "top1": None}
    return measure_model(f"{name} dense float32", "dense", model, counted, _shape(task, model),
                         out / f"{task.name}_dense.onnx", settings)


def _shape(task: Any, model: Any) -> tuple[int, ...]:
    return tuple(task.synthetic_inputs(model).inputs.shape[1:])


def measure(directories: Sequence[Path], settings: Settings, onnx_dir: Path) -> dict[str, Any]:
    """Measure every entry of ``directories`` (run dirs or bundles) and, once per task, its dense model, writing
    the ONNX files into ``onnx_dir``; the measurement (one row per model, dense first, then the entries in order;
    each entry row says which dense row it is compared with)."""
    import torch

    from scoring.entry.deploy.runtime import versions

    require_runtime()
    rows: list[dict[str, Any]] = []
    dense: dict[str, dict[str, Any]] = {}
    for index, directory in enumerate(directories):
        entry, report = load_entry(directory), read_report(directory)
        task = _task(entry.config)
        if task.name not in dense:
            dense[task.name] = _dense_row(task, onnx_dir, settings)
            rows.append(dense[task.name])
        model = build_model_from_entry(entry)
        name = f"{entry.meta['model']['name']} {entry.config['compress']['name']}"
        row = measure_model(name, "entry", model, {key: report.get(key) for key in COUNTED}, _shape(task, model),
                            onnx_dir / f"entry{index}_{entry.config['compress']['name']}.onnx", settings)
        rows.append({**row, "source": str(directory), "task": task.name,
                     "dense": dense[task.name]["name"]})
    return {"format": MEASUREMENT_FORMAT, "versions": {"torch": torch.__version__, **versions()},
            "settings": settings.to_dict(), "models": rows}


def _one_entry(measurement: dict[str, Any], source: str) -> dict[str, Any]:
    """The part of ``measurement`` about one entry: its row and its dense model's."""
    row = next(row for row in measurement["models"] if row.get("source") == source)
    dense = next(other for other in measurement["models"] if other["name"] == row["dense"])
    return {**measurement, "models": [dense, row]}


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be > 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m scoring measure``."""
    defaults = Settings()
    parser = argparse.ArgumentParser(prog="python -m scoring measure", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="run dir or bundle of a finished run")
    parser.add_argument("--json", type=Path, help="write every figure of the measurement as JSON here")
    parser.add_argument("--onnx-dir", type=Path, help="keep the exported ONNX files in this folder")
    for flag, help_text in (("warmup", "untimed batch-1 runs"), ("runs", "timed batch-1 runs (median)"),
                            ("batch", "batch of the throughput figure"), ("batch-runs", "timed batch runs"),
                            ("threads", "ONNX Runtime intra-op threads")):
        parser.add_argument(f"--{flag}", type=_positive, default=getattr(defaults, flag.replace("-", "_")),
                            help=f"{help_text} (default %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: measure, print the counted-vs-measured table, write the JSON and each run dir's measured.json."""
    args = build_parser().parse_args(argv)
    settings = Settings(warmup=args.warmup, runs=args.runs, batch=args.batch, batch_runs=args.batch_runs,
                        threads=args.threads)
    with command():
        if args.json and not args.json.parent.is_dir():  # refused before minutes of measuring, not after
            raise UserError(f"--json {args.json}: the folder {args.json.parent} does not exist",
                            "create it, or pass a path in an existing folder")
        with tempfile.TemporaryDirectory() as scratch:
            onnx_dir = args.onnx_dir or Path(scratch)
            onnx_dir.mkdir(parents=True, exist_ok=True)
            measurement = measure(args.dirs, settings, onnx_dir)
        if args.json:
            text = json.dumps(measurement, indent=1) + "\n"
            atomic_write(args.json, lambda tmp: tmp.write_text(text))
        notes = []
        for row in measurement["models"][1:]:
            if row["role"] != "entry":
                continue
            if (Path(row["source"]) / MANIFEST_FILE).exists():
                notes.append(f"{row['source']}: a bundle, sealed by {MANIFEST_FILE}: left as it is")
            else:
                write_measurement(row["source"], _one_entry(measurement, row["source"]))
                notes.append(f"{row['source']}: measured.json written, the table added to report.md")
    print(counted_vs_measured(measurement))
    print("\n".join(notes + ([f"measurement written to {args.json}"] if args.json else [])))
    return 0
