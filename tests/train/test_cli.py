"""``train/run.py``'s command line before Hydra: a config error is one line, cheap, and writes nothing."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import HANG, RUN_PY

#: What the error path must not import: the training pipeline's libraries take seconds (benchmarks/config_error.py).
HEAVY = ("torch", "torchvision", "timm", "sklearn", "scipy", "tensorboard", "models", "compress", "data", "scoring")
#: What a refused command line may import of the heavy packages: the judge's pure-Python tables and its error type
#: (the config schema reads the freebie setting and the tasks' gates there; none of them imports torch).
CHEAP = {"scoring", "scoring.errors", "scoring.rules", "scoring.challenge"}


@pytest.mark.parametrize("override, message", [
    ("train.epochs=abc", "error: Error merging override train.epochs=abc: Value 'abc' of type 'str' could not be "
                         "converted to Integer (key train.epochs) ; fix: correct the override"),
    ("train.batch_size=0", "error: train.batch_size=0 must be > 0 ; fix: use a positive batch size"),
])
def test_a_config_error_imports_no_heavy_module_and_writes_nothing(tmp_path: Path, override, message):
    result = subprocess.run([sys.executable, "-X", "importtime", RUN_PY, override], cwd=tmp_path,
                            capture_output=True, text=True, timeout=HANG)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
    assert len(errors) == 1 and errors[0].startswith(message)
    imported = {line.split("|")[2].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:") and line.count("|") == 2}
    assert "hydra" in imported and not {name for name in imported - CHEAP if name.split(".")[0] in HEAVY}
    assert list(tmp_path.iterdir()) == []  # no outputs/ folder for a refused command
