"""``python -m train.search.allocate SENSITIVITY --budget B``: one (bits, sparsity) per layer, chosen exactly,
written as a compress config.

From a sensitivity measurement (``python -m train.search.sensitivity``, its sensitivity.json) the exact allocation
(train/search/solve.py) minimises the predicted score under a budget on the predicted increase of the validation
loss (``--budget``, nats per example) or a target validation metric (``--target-metric``). The model with every
chosen setting is then counted and evaluated one-shot on the validation split (skipped by ``--no-check``).

The result is a compress config (train/search/configs.py): the stages of a template (``--template``, default
``prune_q4``: gradual pruning, then QAT; ``distill_prune_q8`` for both distilled) with the chosen per-layer
sparsity and bits, written to ``CONFIG_DIR/compress/NAME.yaml``; the command that trains it from the measured run
is printed. Several budgets give several configs: the front of score against validation metric.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from conf import CONF_DIR
from scoring.entry.boundary import command
from train.config import ConfigError
from train.search.configs import compress_config, load_template, write_config
from train.search.formats import read_sensitivity
from train.search.measure import Probe, check
from train.search.render import allocation_header, allocation_row
from train.search.solve import allocate
from train.search.stage import layer_keys

PROG = "python -m train.search.allocate"
#: The budgets to sweep first, in nats per example: on digits 1.5 was the best of the three on the validation split
#: (README, "Finding the best entry"), the budget compress=auto allocates with.
FIRST_BUDGETS = (1, 1.5, 2)


def suggested_command(sensitivity: str | Path) -> str:
    """The allocation to run after measuring ``sensitivity`` (its json or run dir): a sweep of
    :data:`FIRST_BUDGETS`, one config each."""
    return f"{PROG} {shlex.quote(str(sensitivity))} --budget {' '.join(f'{budget:g}' for budget in FIRST_BUDGETS)}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("sensitivity", help="sensitivity.json, or the run dir / folder holding it")
    constraint = parser.add_mutually_exclusive_group(required=True)
    constraint.add_argument("--budget", type=float, nargs="+", metavar="NATS",
                            help="allowed predicted increase of the validation loss (several: one config each)")
    constraint.add_argument("--target-metric", type=float, nargs="+", metavar="VALUE",
                            help="validation metric to keep (top-1 fraction, or perplexity)")
    parser.add_argument("--name", default="auto", help="compress config name (suffixed per budget when several)")
    parser.add_argument("--template", default="prune_q4",
                        help="compress config whose stages train the allocation (name or yaml path; default prune_q4)")
    parser.add_argument("--config-dir", help="folder of config groups to write compress/NAME.yaml into (default: "
                                             "next to sensitivity.json; pass conf to add it to this repository)")
    parser.add_argument("--no-check", action="store_true",
                        help="skip counting and evaluating the allocated model (needs the run's data)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (for the check)")
    return parser


def check_probe(sensitivity: Mapping[str, Any], device: str) -> Probe:
    """The probe of the measured run, on the validation split it was measured on, to check allocations with."""
    if not sensitivity.get("run"):
        raise ConfigError(f"{sensitivity['path']} names no run to check the allocation on",
                          "pass --no-check, or measure with `python -m train.search.sensitivity RUN_DIR`")
    validation = sensitivity["validation"]
    return Probe.from_run(sensitivity["run"], device=device,
                          val_split=validation["val_split"] if validation["trained_on"] else None,
                          calibration_batches=sensitivity["calibration_batches"],
                          score_examples=sensitivity["score_examples"])


def check_measured_template(sensitivity: Mapping[str, Any], template: Mapping[str, Any]) -> None:
    """Refuse a measurement whose costs assume what ``template`` will not do: an allocate stage's measurement keeps
    the layers it does not allocate at its own template's settings (this command leaves them uncompressed) and
    quantizes with that template's step-size, bias and other-ops keys (the config written would be counted
    otherwise than predicted unless ``template`` has the same)."""
    measured = sensitivity.get("template")
    if measured is None:  # measured by python -m train.search.sensitivity: every layer, the technique's defaults
        return
    assumed = [f"{len(measured['kept_layers'])} layer(s) at its template's settings "
               f"({', '.join(measured['kept_layers'][:3])}{', ...' if len(measured['kept_layers']) > 3 else ''})"
               ] if measured["kept_layers"] else []
    keys = layer_keys(template["stages"])
    if measured["quantize"] != keys:
        assumed.append(f"quantize keys {measured['quantize']} (--template has {keys})")
    if assumed:
        raise ConfigError(f"{sensitivity['path']} was measured by an allocate stage with {' and '.join(assumed)}: "
                          "its costs do not hold for the config this command would write",
                          "allocate in the run (re-run it with another compress.stages[N].allocate budget, "
                          "target_metric or max_score), or measure the run anew with `python -m "
                          "train.search.sensitivity RUN`")


def train_command(sensitivity: Mapping[str, Any], config_dir: Path, names: Sequence[str]) -> str:
    """The train/run.py command that trains the written configs from the measured run (a multirun for several)."""
    parts = ["python train/run.py"] + (["-m"] if len(names) > 1 else [])
    run = sensitivity.get("run")
    if run:
        parts.append(f"init={run}")
    if sensitivity["validation"]["val_split"] and not sensitivity["validation"]["trained_on"]:
        parts.append(f"data.val_split={sensitivity['validation']['val_split']}")
    if config_dir.resolve() != CONF_DIR:
        parts.append(f"hydra.searchpath=[file://{config_dir.resolve()}]")
    parts.append(f"compress={','.join(names)}")
    return " ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    values = args.budget or args.target_metric
    written = " ".join([PROG, *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    with command():
        sensitivity = read_sensitivity(args.sensitivity)
        template = load_template(args.template)
        check_measured_template(sensitivity, template)
        if not args.name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"--name {args.name!r}", "use letters, digits, '_' or '-'")
        config_dir = Path(args.config_dir) if args.config_dir else Path(sensitivity["path"]).parent / "conf"
        probe = None if args.no_check else check_probe(sensitivity, args.device)
        lines, names = allocation_header(sensitivity["metric"]), []
        for value in values:
            name = args.name if len(values) == 1 else f"{args.name}_{value:g}".replace(".", "p")
            try:
                allocation = allocate(sensitivity, **({"loss_budget": value} if args.budget else
                                                      {"target_metric": value}))
            except ValueError as err:
                raise ConfigError(str(err), "pass --budget NATS instead") from None
            if allocation is None:
                print(f"{name}: no setting of the grid meets {'budget' if args.budget else 'target'} {value:g} "
                      "(the reference itself is in the grid: is the target better than the trained model?)")
                continue
            if probe is not None:
                check(allocation, probe)
            path = config_dir / "compress" / f"{name}.yaml"
            write_config(compress_config(allocation, template, name), allocation, sensitivity, path, args.template,
                         written)
            names.append(name)
            lines.append(allocation_row(name, allocation, sensitivity["reference"]["loss"]))
    print("\n".join(lines))
    if names:
        print(f"\nwrote {len(names)} config(s) into {config_dir / 'compress'}; train with:\n"
              f"  {train_command(sensitivity, config_dir, names)}")
    return 0 if names else 1


if __name__ == "__main__":
    sys.exit(main())
