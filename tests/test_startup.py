"""Start-up: importing the commands' modules and building a model that needs neither imports no torchvision, timm
or torch._dynamo (together about 1.5 s, benchmarks/README.md), nor scikit-learn until digits data is read. A fresh
interpreter imports what ``train/run.py``, ``python -m scoring verify`` and ``python -m scoring.export`` import,
builds the digits model and runs it, and reports which of those libraries it holds. (A pipeline of image transforms
is torchvision's, and a training run's optimizer imports torch._dynamo: those come when they are used.)"""
import json
import subprocess
import sys

from tests.conftest import HANG, REPO

#: Libraries a command needs only for the models, datasets or augmentations that use them.
ON_DEMAND = ("torchvision", "timm", "torch._dynamo", "sklearn")

COMMANDS_AND_A_MODEL = f"""
import json, sys
import torch
import models, scoring.__main__, scoring.entry.export, scoring.entry.verify, train.pipeline

models.create_model("digits_cnn", num_classes=10).eval()(torch.zeros(2, 1, 8, 8))
print(json.dumps(sorted(name for name in {ON_DEMAND!r} if name in sys.modules)))
"""


def test_the_commands_import_no_library_before_they_use_it():
    result = subprocess.run([sys.executable, "-c", COMMANDS_AND_A_MODEL], cwd=REPO, capture_output=True, text=True,
                            timeout=HANG)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []
