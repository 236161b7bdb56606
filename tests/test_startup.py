"""Start-up: the digits path imports no torchvision, timm or torch._dynamo (together about 1.5 s of every command,
benchmarks/README.md) and no scikit-learn until digits data is read. A fresh interpreter imports what
``train/run.py``, ``python -m scoring verify`` and ``python -m scoring.export`` import, builds the digits task's
transforms and model and runs it, and reports which of those libraries it holds."""
import json
import subprocess
import sys

from tests.conftest import HANG, REPO

#: Libraries a command needs only for the models, datasets or augmentations that use them.
ON_DEMAND = ("torchvision", "timm", "torch._dynamo", "sklearn")

DIGITS_PATH = f"""
import json, sys
import torch
import models, scoring.__main__, scoring.entry.export, scoring.entry.verify, train.pipeline
from data.augment import AugmentOptions
from data.transforms import eval_transform, train_transform
from PIL import Image

options = AugmentOptions.from_mapping({{"crop_padding": 1}})
image = Image.new("L", (8, 8))
inputs = torch.stack([train_transform(options, 8, (0.5,), (0.25,), resize_crop=False)(image),
                      eval_transform(options, 8, (0.5,), (0.25,), resize_crop=False)(image)])
models.create_model("digits_cnn", num_classes=10).eval()(inputs)
print(json.dumps(sorted(name for name in {ON_DEMAND!r} if name in sys.modules)))
"""


def test_the_digits_path_imports_no_library_it_does_not_use():
    result = subprocess.run([sys.executable, "-c", DIGITS_PATH], cwd=REPO, capture_output=True, text=True,
                            timeout=HANG)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []
