"""Fixtures for entry tests: a digits run config, a pruned + quantized model, a finished run dir, its exported
bundle (also one per session, to copy), and a pickle that creates a marker file when (and only when) something
unpickles it."""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from compress import build_stages
from models import create_model
from scoring.entry import export, load_entry, save_entry, write_report
from scoring.entry.verify import recount_entry
from train.config import to_container
from tests.conftest import CONF_DIR

#: Two stages on the digits CNN: prune half of the weights over three steps, then 4-bit QAT.
PRUNE_Q4 = {"name": "prune_q4_test", "stages": [
    {"name": "prune", "epochs": 1,
     "prune": {"final_sparsity": 0.5, "unit": "step", "start": 0, "end": 2, "frequency": 1}},
    {"name": "quantize", "epochs": 1, "quantize": {"weight_bits": 4, "activation_bits": 4, "method": "lsq"}},
]}
STEPS = 3


@pytest.fixture(scope="session")
def run_config() -> dict:
    """The resolved config of a digits run compressed with :data:`PRUNE_Q4` (as train/run.py saves it)."""
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["task=digits", "device=cpu", "data.num_workers=0"])
    config = to_container(cfg)
    config["compress"] = PRUNE_Q4
    return config


def make_compressed_model(seed: int = 0) -> torch.nn.Module:
    """digits_cnn after a few SGD steps through each stage of :data:`PRUNE_Q4` (masks, LSQ quantizers)."""
    torch.manual_seed(seed)
    model = create_model("digits_cnn", num_classes=10)
    inputs, targets = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    for stage in build_stages(PRUNE_Q4, load_teacher=lambda spec: None):
        for technique in stage.techniques:
            technique.configure(steps_per_epoch=STEPS)
            technique.attach(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        model.train()
        for step in range(STEPS):
            optimizer.zero_grad()
            F.cross_entropy(model(inputs), targets).backward()
            optimizer.step()
            for technique in stage.techniques:
                technique.on_step_end(model, step)
    return model.eval()


def quantized_digits(**quantize) -> torch.nn.Module:
    """digits_cnn under one 4-bit LSQ stage with the ``quantize`` keys, calibrated on one random batch: no training."""
    torch.manual_seed(0)
    model = create_model("digits_cnn", num_classes=10)
    [stage] = build_stages({"name": "q", "stages": [{"name": "q", "epochs": 1, "quantize": {
        "weight_bits": 4, "activation_bits": 4, **quantize}}]}, load_teacher=lambda spec: None)
    for technique in stage.techniques:
        technique.configure(steps_per_epoch=1)
        technique.attach(model)
    model.train()(torch.randn(16, 1, 8, 8))
    return model.eval()


@pytest.fixture(scope="session")
def compressed_model() -> torch.nn.Module:
    """Shared by the tests, which only read it (save_entry works on a copy)."""
    return make_compressed_model()


def exit_status(command: Callable[[list[str]], int], argv: list[str]) -> int:
    """The exit status of a command's ``main(argv)``: what it returns, or what its error boundary exits with."""
    try:
        return command(argv)
    except SystemExit as stopped:
        return stopped.code


def finish_run(directory: Path, model: torch.nn.Module, config: dict) -> Path:
    """Write a finished run dir as train/run.py leaves it: entry/, report.json, report.md."""
    save_entry(directory / "entry", model, config=config)
    write_report(directory, recount_entry(load_entry(directory), device="cpu"))
    return directory


@pytest.fixture
def run_dir(tmp_path: Path, run_config: dict, compressed_model: torch.nn.Module) -> Path:
    """A finished run dir as train/run.py leaves it: entry/, report.json, report.md."""
    return finish_run(tmp_path / "run", compressed_model, run_config)


@pytest.fixture
def bundle(run_dir: Path, tmp_path: Path) -> Path:
    """The bundle ``python -m scoring.export`` makes of :func:`run_dir`."""
    out = tmp_path / "bundle"
    assert export.main([str(run_dir), "--out", str(out), "--allow-gate-failure"]) == 0  # an untrained model
    return out


@pytest.fixture(scope="session")
def exported_bundle(tmp_path_factory: pytest.TempPathFactory, run_config: dict,
                    compressed_model: torch.nn.Module) -> Path:
    """One exported bundle for the whole session, never changed: tests that alter a bundle copy it first. It is in
    the float format, whose safetensors file the hostile probes edit (the packed format's are in test_packed.py)."""
    root = tmp_path_factory.mktemp("exported")
    out = root / "bundle"
    assert export.main([str(finish_run(root / "run", compressed_model, run_config)), "--out", str(out),
                        "--allow-gate-failure", "--format", "float"]) == 0
    return out


class Planted:
    """Unpickling this calls ``open(marker, "w")``: the file appearing proves code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def plant_pickle(path: Path, marker: Path, *, torch_archive: bool) -> None:
    """Write a malicious payload to ``path``: a raw pickle, or a ``torch.save`` zip archive."""
    if torch_archive:
        torch.save({"conv1.0.weight": Planted(marker)}, path)
    else:
        path.write_bytes(pickle.dumps({"conv1.0.weight": Planted(marker)}))
