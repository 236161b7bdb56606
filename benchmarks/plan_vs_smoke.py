"""The planned score of every recipe with compression against what a ``smoke=true`` run of it reports.

    python benchmarks/plan_vs_smoke.py                                   # every recipe, in a fresh scratch folder
    python benchmarks/plan_vs_smoke.py --only prune_q4 --work /tmp/pvs   # one recipe; fixtures kept in /tmp/pvs
    python benchmarks/plan_vs_smoke.py --json table.json                 # also write the table

For every ``conf/compress/*.yaml`` but ``none`` (on the default task and model, digits; the ``auto`` recipes with
``data.val_split=0.2``, as they are run) and every ``conf/experiment/*.yaml`` (on the tests' fixtures in the real
formats, tests/fixtures.py, with ``data.root`` pointed at them and the fixture-sized batches the smoke tests use), it
runs ``python train/run.py RECIPE plan=true`` and ``python train/run.py RECIPE smoke=true`` in fresh folders
(``hydra.run.dir``) with the same command line otherwise (seed, ``score.*``, data), reads ``score`` from plan.json and
report.json and prints one table: recipe, planned score, smoke score, their relative difference (plan against smoke),
the wall seconds of each process, and whether they agree within 1%. For a recipe outside 1% it also prints the layers
that differ most (read plan.md beside the smoke run's report.md for the whole tables).

The plan is the recipe's as a user plans it (``score.examples`` as written); the smoke run counts its 8 examples
(train/smoke.py), which changes nothing of an image model's count but a language model's (its adaptive input and
softmax cost what the counted tokens' frequencies make them cost).

The WikiText-103 recipe leaves its teacher to the command line (``???``). As its comment says, the teacher is
trained first (``task=wikitext103 model=txl_teacher``): here as a smoke run on the fixture, in ``WORK/runs/teacher``
(a finished one is reused), and both commands of the recipe are given it.

Timings are wall seconds of whole processes (Python start and imports included) on whatever load the machine has.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
if not __package__:  # run as a file: import the repository's packages (the fixtures are the tests')
    sys.path.insert(0, str(REPO))

from tests.fixtures import make_cifar100, make_imagenet, make_wikitext103  # noqa: E402

RUN_PY = str(REPO / "train" / "run.py")
#: Agreement asked of a plan and a smoke run of the same recipe (issue 20).
TOLERANCE = 0.01
#: The recipes whose allocate stage needs a validation split (conf/compress/auto.yaml), and auto_digits, which that
#: allocation wrote and whose run holds out the same split.
NEEDS_VALIDATION = ("auto", "auto_digits")
#: A smoke run's exit statuses: finished, and finished below the gate (two batches per stage cannot pass it).
SMOKE_EXITS = (0, 3)
#: Every command: in-process data loading (the processes are short, and the machine is shared).
COMMON = ("data.num_workers=0",)
#: The layers printed for a recipe outside the tolerance.
LAYERS_SHOWN = 5


@dataclass(frozen=True)
class Recipe:
    """One recipe: its name, its command-line arguments, and the fixture its ``data.root`` needs (or None)."""

    name: str
    args: tuple[str, ...]
    fixture: str | None = None


def _fixtures(data: Path) -> dict[str, Callable[[], Path]]:
    """The fixture makers under ``data``, each returning the ``data.root`` it wrote (the smoke tests' sizes)."""
    return {
        "cifar100": lambda: make_cifar100(data / "cifar", train_per_class=1, test_per_class=1).parent,
        "imagenet": lambda: make_imagenet(data / "imagenet", classes=3, train_per_class=4, val_per_class=2),
        "wikitext103": lambda: make_wikitext103(data / "wt103").parent,
    }


#: The experiments' fixture-sized settings, given to the plan and the smoke run alike: the smoke tests' batches
#: (tests/train/test_smoke.py, test_lm_runs.py); ImageNet's fixture holds 6 test images, so 4 are scored, and 12
#: training images, so its allocate stage holds out 4 (the recipe's 10,000 cannot come from them).
EXPERIMENT_ARGS = {
    "cifar100_densenet_micronet": ("cifar100", ("train.batch_size=16",)),
    "imagenet_mixnet_micronet": ("imagenet", ("train.batch_size=4", "train.eval_batch_size=6", "score.examples=4",
                                             "data.val_split=4")),
    "wikitext103_txl_distill_prune_q8": ("wikitext103", ("train.batch_size=4",)),
}


def recipes() -> list[Recipe]:
    """Every compress recipe but none on digits, then every experiment on its fixture."""
    found = [Recipe(path.stem, (f"compress={path.stem}",
                                *(("data.val_split=0.2",) if path.stem in NEEDS_VALIDATION else ())))
             for path in sorted((REPO / "conf" / "compress").glob("*.yaml")) if path.stem != "none"]
    for path in sorted((REPO / "conf" / "experiment").glob("*.yaml")):
        fixture, args = EXPERIMENT_ARGS[path.stem]
        found.append(Recipe(path.stem, (f"+experiment={path.stem}", *args), fixture))
    return found


def train(args: tuple[str, ...], run_dir: Path, exits: tuple[int, ...]) -> float:
    """Run ``train/run.py ARGS`` in ``run_dir``; its wall seconds. SystemExit with its output's tail when its exit
    status is not one of ``exits``."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, RUN_PY, *COMMON, *args, f"hydra.run.dir={run_dir}"], cwd=run_dir.parent,
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    seconds = time.perf_counter() - start
    if result.returncode not in exits:
        raise SystemExit(f"{' '.join(args)}: exit status {result.returncode}\n{result.stderr[-3000:]}")
    return seconds


def teacher_args(recipe: Recipe, work: Path, data_root: Path) -> tuple[str, ...]:
    """The WikiText-103 recipe's teacher, trained as a smoke run on the fixture (reused once finished)."""
    if not recipe.name.startswith("wikitext103"):
        return ()
    teacher = work / "runs" / "teacher"
    teacher.parent.mkdir(parents=True, exist_ok=True)
    train(("task=wikitext103", "model=txl_teacher", f"data.root={data_root}", "smoke=true", "train.batch_size=4"),
          teacher, SMOKE_EXITS)
    return (f"compress.stages.0.distill.teacher={teacher}",)


def compare(recipe: Recipe, work: Path, data_roots: dict[str, Path]) -> dict[str, Any]:
    """Plan and smoke-run ``recipe`` in fresh folders under ``work``; one row of the table."""
    args = recipe.args
    if recipe.fixture:
        root = data_roots[recipe.fixture]
        args += (f"data.root={root}", *teacher_args(recipe, work, root))
    folders = {kind: work / "runs" / recipe.name / kind for kind in ("plan", "smoke")}
    for folder in folders.values():
        if folder.exists():  # a finished run would be reprinted, not run
            raise SystemExit(f"error: {folder} exists ; fix: pass a new --work folder (a plan and a smoke run "
                             "each start in a fresh one)")
        folder.mkdir(parents=True)
    plan_seconds = train((*args, "plan=true"), folders["plan"], (0,))
    smoke_seconds = train((*args, "smoke=true"), folders["smoke"], SMOKE_EXITS)
    plan = json.loads((folders["plan"] / "plan.json").read_text())
    smoke = json.loads((folders["smoke"] / "report.json").read_text())
    difference = (plan["score"] - smoke["score"]) / smoke["score"]
    return {"recipe": recipe.name, "planned": plan["score"], "smoke": smoke["score"], "difference": difference,
            "plan_seconds": round(plan_seconds, 1), "smoke_seconds": round(smoke_seconds, 1),
            "within": abs(difference) <= TOLERANCE, "examples": [plan["examples"], smoke["examples"]],
            "layers": layer_differences(plan, smoke), "run_dirs": {k: str(v) for k, v in folders.items()}}


def layer_differences(plan: dict[str, Any], smoke: dict[str, Any]) -> list[dict[str, Any]]:
    """The layers of both tables by how much of the score they move (plan minus smoke), largest first."""
    base = plan["baseline"]
    theirs = {row["name"]: row for row in smoke["layers"]}

    def share(row: dict[str, Any] | None) -> float:
        return 0.0 if row is None else row["params"] / base["params"] + row["ops"] / base["ops"]

    rows = []
    for ours in plan["layers"]:
        other = theirs.get(ours["name"])
        rows.append({"name": ours["name"], "score_delta": share(ours) - share(other),
                     "plan": _settings(ours), "smoke": _settings(other)})
    rows += [{"name": name, "score_delta": -share(row), "plan": None, "smoke": _settings(row)}
             for name, row in theirs.items() if name not in {r["name"] for r in plan["layers"]}]
    return sorted(rows, key=lambda row: -abs(row["score_delta"]))


def _settings(row: dict[str, Any] | None) -> str | None:
    """A layer's row in a few words (None for a layer the table lacks)."""
    if row is None:
        return None
    sparsity = f", {row['sparsity']:.1%} sparse" if row.get("sparsity") is not None else ""
    bits = f", {row['weight_bits']}-bit weights, {row['input_bits']}-bit inputs" if row.get("weight_bits") else ""
    return f"{row['params']:g} params, {row['ops']:g} ops{sparsity}{bits}"


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table."""
    lines = ["| recipe | planned | smoke run | plan vs smoke | plan s | smoke s | within 1% |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    lines += [f"| {r['recipe']} | {r['planned']:.6f} | {r['smoke']:.6f} | {r['difference']:+.2%} | "
              f"{r['plan_seconds']:.1f} | {r['smoke_seconds']:.1f} | {'yes' if r['within'] else 'NO'} |" for r in rows]
    return "\n".join(lines)


def details(row: dict[str, Any]) -> str:
    """What moves the score of a recipe outside the tolerance: the layers that move it most."""
    lines = [f"{row['recipe']}: counted on {row['examples'][0]} (plan) and {row['examples'][1]} (smoke) examples; "
             f"layers by score moved (plan minus smoke), {row['run_dirs']['plan']}/plan.md against "
             f"{row['run_dirs']['smoke']}/report.md:"]
    lines += [f"  {layer['name']}: {layer['score_delta']:+.6f}  plan {layer['plan']}  smoke {layer['smoke']}"
              for layer in row["layers"][:LAYERS_SHOWN]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", metavar="NAME", help="run this recipe only (a compress or an experiment name)")
    parser.add_argument("--work", type=Path, help="scratch folder for the fixtures and the runs (default: a new one)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the table (with every layer) here")
    options = parser.parse_args(argv)
    chosen = [r for r in recipes() if options.only in (None, r.name)]
    if not chosen:
        parser.error(f"--only {options.only}: no such recipe; choose one of {', '.join(r.name for r in recipes())}")
    work = (options.work or Path(tempfile.mkdtemp(prefix="plan_vs_smoke-"))).resolve()
    makers = _fixtures(work / "data")
    data_roots = {name: makers[name]() for name in {r.fixture for r in chosen if r.fixture}}
    rows = []
    for recipe in chosen:
        print(f"{recipe.name}: plan, then smoke run ...", flush=True)
        rows.append(compare(recipe, work, data_roots))
    print(table(rows))
    for row in rows:
        if not row["within"]:
            print(details(row))
    if options.json:
        options.json.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"runs in {work / 'runs'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
