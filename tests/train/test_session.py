"""``train.run.Session`` checks that need no training: what a run refuses before its first stage starts."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from compress import build_stages
from train import distributed
from train.config import ConfigError
from train.run import Session


def _session(tiny_config, tmp_path: Path, *overrides: str) -> Session:
    return Session(tiny_config(*overrides), distributed.Context(torch.device("cpu")), tmp_path)


@pytest.mark.parametrize("teacher, message", [
    ("q8", "stage prune: distill.teacher='q8' is not a stage before it"),
    ("prune", "stage prune: distill.teacher='prune' is not a stage before it"),
    ("/no/such/run", "stage prune: distill.teacher='/no/such/run' is neither baseline, a stage name nor an existing"),
])
def test_a_teacher_that_cannot_exist_is_refused_before_training(tiny_config, tmp_path: Path, teacher, message):
    session = _session(tiny_config, tmp_path, "compress=distill_prune_q8",
                       f"compress.stages.0.distill.teacher={teacher}")
    with session:
        stages = build_stages(session.config["compress"], load_teacher=session.load_teacher)
        with pytest.raises(ConfigError, match=message):
            session.check_teachers(stages)


@pytest.mark.parametrize("teacher", ["baseline", "train", "prune", "."])
def test_earlier_stages_and_existing_paths_are_accepted_as_teachers(tiny_config, tmp_path: Path, teacher):
    session = _session(tiny_config, tmp_path, "compress=distill_prune_q8",
                       f"compress.stages.1.distill.teacher={teacher}")
    with session:
        session.check_teachers(build_stages(session.config["compress"], load_teacher=session.load_teacher))


class _Watched:
    """A loader that records when it is iterated."""

    def __init__(self, loader, reads: list) -> None:
        self.loader, self.reads = loader, reads

    def __iter__(self):
        self.reads.append("test")
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)


def test_with_a_validation_split_the_test_split_is_read_once_after_training(tiny_config, tmp_path: Path, caplog):
    from compress import Stage
    from data import Loaders
    from train.build import build_model
    from train.objectives import build_objective

    cfg = tiny_config("data.val_split=0.1", "train.epochs=2")
    session = _session(tiny_config, tmp_path, "data.val_split=0.1", "train.epochs=2")
    reads: list[str] = []
    loaders = session.loaders
    session.loaders = Loaders(loaders.train, loaders.val, _Watched(loaders.test, reads))  # shadows the cached one
    model = build_model(cfg)
    with session, caplog.at_level("INFO"):
        assert session.run_stage(Stage("train", 2, {}, []), cfg.train, build_objective(cfg.train, session.config["task"]),
                                 model, should_stop=lambda: False)
        assert reads == []  # two epochs trained and validated: not one read of the test split
        assert "train epoch 2/2: train loss" in caplog.text and "; val " in caplog.text and "/144 = " in caplog.text
        final = session.evaluate(model, "test")
    assert reads == ["test"] and final.split == "test" and final.total == 360
