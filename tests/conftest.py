"""Shared fixtures: compose the real Hydra configs (shrunk for speed) and run ``train/run.py`` as a user would."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

import conf
import train.config  # noqa: F401  (registers the config schema with Hydra)

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = str(conf.CONF_DIR)
RUN_PY = str(REPO / "train" / "run.py")

#: Timeout of every subprocess a test runs: it only catches a hang, so it is minutes, whatever the machine's
#: load (a CI machine running other jobs may be several times slower); speed is measured in benchmarks/.
HANG = 900

#: Overrides that keep a run to seconds on a 2-core CPU without changing what it exercises.
TINY = ("train.epochs=2", "train.warmup_epochs=0.5", "train.log_every=5", "data.num_workers=0",
        "score.examples=16")


def compose_config(*overrides: str) -> DictConfig:
    """The config ``python train/run.py <overrides>`` would compose (without Hydra's own node)."""
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides))


def run_dir_for(*overrides: str) -> Path:
    """The folder ``python train/run.py <overrides>`` runs in (relative to where it is started)."""
    from train.cli import run_dir_of

    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return run_dir_of(compose("config", overrides=list(overrides), return_hydra_config=True))


@pytest.fixture
def tiny_config() -> Callable[..., DictConfig]:
    """Compose a config and shrink it (few epochs, in-process data loading), like lightning-hydra-template."""
    def make(*overrides: str) -> DictConfig:
        cfg = compose_config(*TINY, *overrides)
        with open_dict(cfg):
            cfg.train.batch_size = min(cfg.train.batch_size, 64)
        return cfg
    return make


def run_train(*args: str, cwd: Path, timeout: float = HANG, env: dict | None = None,
              launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run ``python train/run.py ARGS`` (or under ``launcher``, e.g. torchrun) and capture its output."""
    command = [*launcher, RUN_PY, *args] if launcher else [sys.executable, RUN_PY, *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
