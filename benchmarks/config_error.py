"""How long ``python train/run.py`` takes to report a config error, and which imports that costs.

    python benchmarks/config_error.py [--repeats 3] [--limit 3.0]

Runs ``train/run.py`` with a few bad command lines (a type error, an out-of-range value, an unknown option of a
config group) in fresh processes from a scratch folder, and prints for each the best of ``--repeats`` wall times
and the CPU time (user + system) of that process, then the slowest imports of the first case
(``python -X importtime``). CPU time is the steadier figure on a machine shared with other jobs: wall time
includes the waits for a core. Exits 1 when a best wall time exceeds ``--limit`` seconds.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUN_PY = str(Path(__file__).resolve().parents[1] / "train" / "run.py")
CASES = (["train.epochs=abc"], ["train.batch_size=0"], ["compress=prune_q9"])


def timed(args: list[str], cwd: str) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds, stderr) of one ``train/run.py ARGS`` process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, RUN_PY, *args], cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 2:
        raise SystemExit(f"{args}: expected exit status 2, got {result.returncode}: {result.stderr[-500:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), result.stderr


def slowest_imports(args: list[str], cwd: str, count: int = 8) -> list[tuple[float, str]]:
    """The ``count`` top-level imports with the largest cumulative time (seconds) on the error path."""
    result = subprocess.run([sys.executable, "-X", "importtime", RUN_PY, *args], cwd=cwd, capture_output=True,
                            text=True)
    found = []
    for line in result.stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            _, cumulative, name = line.split(":", 1)[1].split("|")
            if name.startswith(" ") and not name.startswith("  ") and cumulative.strip().isdigit():  # top level
                found.append((int(cumulative) / 1e6, name.strip()))
    return sorted(found, reverse=True)[:count]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--limit", type=float, default=3.0, help="seconds of wall time allowed per case")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; best of {args.repeats}")
    slow = False
    with tempfile.TemporaryDirectory() as scratch:
        for case in CASES:
            runs = [timed(case, scratch) for _ in range(args.repeats)]
            wall, cpu = min(r[0] for r in runs), min(r[1] for r in runs)
            slow |= wall > args.limit
            print(f"{' '.join(case):<22} wall {wall:5.2f} s  cpu {cpu:5.2f} s  {runs[0][2].strip()[:90]}")
        print("slowest imports of the first case (cumulative):")
        for seconds, name in slowest_imports(CASES[0], scratch):
            print(f"  {seconds:6.3f} s  {name}")
        assert not os.listdir(scratch), "a refused command wrote into the folder it ran in"
    return 1 if slow else 0


if __name__ == "__main__":
    sys.exit(main())
