"""``python train/run.py`` on the language-modelling tasks, as a user runs it: the embedded demo end to end with
compression, export and verify; WikiText-103 on a fixture generated in the real format and sizes."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from data.wikitext import user_cache_dir
from tests.conftest import HANG, REPO, run_train
from tests.data.conftest import edit_token_cache
from tests.fixtures import make_wikitext103

pytestmark = pytest.mark.slow

#: A small demo model and short stages: the pipeline, not the perplexity, is under test here.
SMALL = ("model=lstm_lm", "model.kwargs.embed_dim=32", "model.kwargs.hidden_size=32", "train.log_every=50",
         "data.num_workers=0")


def _report(run_dir: Path) -> dict:
    return json.loads((run_dir / "report.json").read_text())


def test_the_demo_trains_compresses_gates_scores_exports_and_verifies(tmp_path: Path):
    run_dir = tmp_path / "run"
    # 128 streams of 70-token windows: 48 steps an epoch instead of 386, the same tokens (the steps' overhead, not
    # the 32-unit model's arithmetic, is what a small demo run spends its time on); no baseline epoch, one epoch
    # of each compress stage: what is checked is the pipeline, not the perplexity
    result = run_train("task=wikitext_demo", "compress=lm_prune_q8", "train.epochs=0", "compress.stages.0.epochs=1",
                       "compress.stages.1.epochs=1", "train.batch_size=128", "task.stream.bptt=70", *SMALL,
                       f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode in (0, 3), result.stderr[-3000:]  # 3: finished, fails the gate (a tiny model)
    report = _report(run_dir)
    # The test stream is 30,336 tokens: every one but the first is predicted, on-line.
    assert report["task"] == "wikitext_demo" and report["split"] == "test" and report["total"] == 30_335
    assert report["correct"] is None and report["perplexity"] == pytest.approx(math.exp(report["nll_sum"] / 30_335))
    assert report["gate_passed"] is (report["nll_sum"] < 30_335 * math.log(400)) and report["gate"]["metric"] == "perplexity"
    assert report["validation"]["split"] == "val" and report["validation"]["total"] == 39_564
    assert report["example"] == "token" and report["examples"] == 256 and "per token" in report["project_rules"]
    # Pruned and quantized: 8-bit weights, ~85% of them zero, so no freebie.
    weights = [layer for layer in report["layers"] if layer["weight_bits"] is not None]
    assert weights and {layer["weight_bits"] for layer in weights} == {8} and report["freebie"] is False
    assert max(layer["sparsity"] or 0.0 for layer in weights) > 0.8
    assert f"perplexity {report['perplexity']:.4f}" in result.stdout

    bundle = tmp_path / "bundle"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    exported = subprocess.run([sys.executable, "-m", "scoring.export", str(run_dir), "--out", str(bundle),
                               *([] if report["gate_passed"] else ["--allow-gate-failure"])],
                              capture_output=True, text=True, timeout=HANG, env=env, cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    # verify reads the demo's tokens from the cache the run left: one damaged (a test token changed) with its
    # recorded sha256 rewritten to match is not trusted, but rebuilt from its source; the recount then agrees.
    cache = tmp_path / "xdg" / "micronet-kit"
    cache.mkdir(parents=True)
    for path in user_cache_dir().glob("wikitext_demo-*"):
        shutil.copy(path, cache)
    edit_token_cache(next(cache.glob("wikitext_demo-*.npy")),
                     lambda vocab, ids: ids.__setitem__(-10, (ids[-10] + 1) % len(vocab)))
    verified = subprocess.run([sys.executable, "-P", "-m", "scoring", "verify", str(bundle), "--device", "cpu"],
                              capture_output=True, text=True, timeout=HANG, cwd=tmp_path,
                              env={**env, "XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "nll_sum" in verified.stdout and "verified: all" in verified.stdout.splitlines()[-1]
    assert "is damaged" in verified.stderr and "rebuilding it" in verified.stderr


def test_wikitext103_on_a_fixture_in_the_real_format_runs_end_to_end(tmp_path: Path):
    """A smoke run (the fixture's train text holds each of its 267,734 words once, nearly all in the adaptive
    softmax's widest cluster: a full epoch would take many minutes); the whole streams' sizes are data tests'."""
    root = tmp_path / "data"
    make_wikitext103(root)
    args = ("task=wikitext103", f"data.root={root}", "smoke=true", "train.batch_size=4",
            "model.kwargs.cutoffs=[2000,20000]", *SMALL)
    result = run_train(*args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 3, result.stderr[-3000:]  # finished; random words fail the gate
    report = _report(tmp_path / "run")
    # Smoke: the first 8 evaluation windows of 512 tokens (conf/task/wikitext103.yaml) of each stream.
    assert report["total"] == 8 * 512 and report["validation"]["total"] == 8 * 512 and report["examples"] == 8
    assert report["gate_passed"] is False and "gate FAILED: perplexity" in result.stdout
    assert report["baseline"]["params"] == 159_000_000 and report["example"] == "token"
    assert "tokenizing" in result.stdout + result.stderr
    # The token ids were cached: another run reads them, not the text files.
    cache = root / "wikitext-103" / "micronet-cache"
    assert any(cache.glob("*.npy"))
    again = run_train(*args, "seed=1", f"hydra.run.dir={tmp_path / 'again'}", cwd=tmp_path)
    assert again.returncode == 3 and "tokenizing" not in again.stdout + again.stderr, again.stderr[-3000:]
