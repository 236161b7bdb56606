"""A real digits run with pruning + 8-bit QAT, exported and verified by fresh processes elsewhere on disk."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import HANG

REPO = Path(__file__).resolve().parents[2]


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``python ARGS`` in ``cwd``, importing this checkout (not whichever one the environment has installed)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=HANG, env=env)


@pytest.mark.slow
def test_prune_q8_run_exports_and_verifies(tmp_path):
    run_dir = tmp_path / "run"
    overrides = ["task=digits", "compress=prune_q8", "train.epochs=1", "device=cpu", "data.num_workers=0"]
    trained = run(["train/run.py", *overrides, f"hydra.run.dir={run_dir}"], REPO)
    assert trained.returncode in (0, 3), trained.stderr[-3000:]  # 3: finished, but the entry fails its gate
    assert trained.returncode == (0 if json.loads((run_dir / "report.json").read_text())["gate_passed"] else 3)

    bundle = tmp_path / "bundle"
    qualifies = trained.returncode == 0
    exported = run(["-m", "scoring.export", str(run_dir), "--out", str(bundle),
                    *([] if qualifies else ["--allow-gate-failure"])], tmp_path)
    assert exported.returncode == 0, exported.stderr
    assert f"python train/run.py {' '.join(overrides)}\n" in (bundle / "WRITEUP.md").read_text()

    # The organizer's copy: moved away from the run, checked from another working directory.
    organizer = tmp_path / "organizer" / "bundle"
    shutil.move(bundle, organizer)
    shutil.rmtree(run_dir)
    verified = run(["-m", "scoring", "verify", str(organizer), "--device", "cpu"], tmp_path / "organizer")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "verified: all" in verified.stdout
    assert verified.stdout.startswith("QUALIFIES: gate PASSED" if qualifies else "DOES NOT QUALIFY: gate FAILED")

    # The verified entry really is compressed: pruned layers and 8-bit weights, no freebie.
    report = json.loads((organizer / "report.json").read_text())
    weight_layers = [layer for layer in report["layers"] if layer["weight_bits"] is not None]
    assert weight_layers and all(layer["weight_bits"] <= 8 for layer in weight_layers)
    assert max(layer["sparsity"] for layer in weight_layers) > 0.3
    assert report["freebie"] is False

