"""``python -m train.search.sensitivity RUN_DIR``: what each layer alone costs in validation loss and saves in score.

Every Conv, Linear and Embedding of a trained, uncompressed run, at every (bits, sparsity) of a grid, the other
layers as trained: evaluated on the run's validation split (never the test split) and counted by the scorer
(the method: train/search/measure.py). Output in ``--out`` (default ``RUN_DIR/sensitivity``): ``sensitivity.json``
(read by ``python -m train.search.allocate``), ``sensitivity.md`` (a table per layer) and ``sensitivity.png`` (a
heat map per layer: the validation-loss increase, annotated with the layer's score contribution).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from compress.base import matches, weight_layers
from scoring.entry.boundary import command
from train.config import ConfigError
from train.search.allocate import suggested_command
from train.search.formats import SENSITIVITY_DIR
from train.search.grid import DEFAULT_BITS, DEFAULT_SPARSITY, grid, grid_bits, grid_sparsity
from train.search.measure import Probe, measure
from train.search.render import write_sensitivity

log = logging.getLogger("micronet.sensitivity")


def parse_bits(text: str) -> list[int | None]:
    """``float,8,4,2`` → [None, 8, 4, 2] (argparse type)."""
    try:
        return grid_bits([int(item) if item.strip().isdigit() else item.strip() for item in text.split(",")])
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parse_sparsity(text: str) -> list[float]:
    """``0,0.5,0.9`` → [0.0, 0.5, 0.9] (argparse type)."""
    try:
        return grid_sparsity([float(item) for item in text.split(",")])
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected fractions in [0, 1), e.g. 0,0.5,0.8,0.9,0.95") from None


def parse_split(text: str) -> float | int:
    """A validation split as ``data.val_split`` takes it: a fraction in (0, 1) or a count (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value.is_integer() and value >= 1:
        return int(value)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a fraction in (0, 1) or a count of examples")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train.search.sensitivity", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a trained, uncompressed run dir (or entry / checkpoint)")
    parser.add_argument("--out", help="output folder (default RUN/sensitivity)")
    parser.add_argument("--bits", type=parse_bits, default=list(DEFAULT_BITS),
                        help="bit widths (weight and input), float = unquantized; default float,8,6,4,3,2")
    parser.add_argument("--sparsity", type=parse_sparsity, default=list(DEFAULT_SPARSITY),
                        help="sparsities; default 0,0.5,0.7,0.8,0.9,0.95,0.98")
    parser.add_argument("--layers", nargs="+", default=["*"], metavar="PATTERN",
                        help="fnmatch patterns of the layers to measure (default every Conv/Linear/Embedding)")
    parser.add_argument("--exclude", nargs="+", default=[], metavar="PATTERN", help="layers not to measure")
    parser.add_argument("--val-split", type=parse_split, default=None,
                        help="a validation hold-out for a run trained without one (never the test split)")
    parser.add_argument("--calibration-batches", type=int, default=2,
                        help="training batches that initialise the input quantizers and re-estimate batch-norm "
                             "statistics after each change (default 2)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    with command():
        if args.calibration_batches < 1:
            raise ConfigError(f"--calibration-batches {args.calibration_batches}", "use a positive count, e.g. 2")
        probe = Probe.from_run(args.run, val_split=args.val_split, device=args.device,
                               calibration_batches=args.calibration_batches)
        layers = [name for name in weight_layers(probe.model)
                  if matches(name, args.layers) and not matches(name, args.exclude)]
        if not layers:
            raise ConfigError(f"no Conv/Linear/Embedding layer matches --layers {' '.join(args.layers)}"
                              + (f" --exclude {' '.join(args.exclude)}" if args.exclude else ""),
                              f"layers are: {', '.join(list(weight_layers(probe.model))[:12])}")
        if probe.trained_on_validation:
            log.warning("warning: the run was trained on these %s validation examples (it has no val split): the "
                        "loss increases are measured on training data", args.val_split)
        result = measure(probe, layers=layers, settings=grid(args.bits, args.sparsity))
        result["run"] = str(args.run)
        paths = write_sensitivity(result, args.out or Path(args.run) / SENSITIVITY_DIR)
    print(f"{len(result['layers'])} layers x {len(result['layers'][0]['settings'])} settings measured in "
          f"{time.perf_counter() - start:.0f} s; wrote {paths['json']}, {paths['md'].name}, {paths['png'].name}\n"
          f"next: {suggested_command(paths['json'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
