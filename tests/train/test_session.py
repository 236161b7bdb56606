"""A run's session and preflight checks that need no training: what a run refuses before its first stage starts."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import models
from compress import build_stages
from tests.conftest import REPO, compose_config
from train import distributed
from train.config import ConfigError
from train.preflight import check_score_examples, check_teachers, rehearse_attach
from train.session import Session
from train.stages import run_stage


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
            check_teachers(stages, session.stage_dirs)


@pytest.mark.parametrize("teacher", ["baseline", "train", "prune", "."])
def test_earlier_stages_and_existing_paths_are_accepted_as_teachers(tiny_config, tmp_path: Path, teacher):
    session = _session(tiny_config, tmp_path, "compress=distill_prune_q8",
                       f"compress.stages.1.distill.teacher={teacher}")
    with session:
        check_teachers(build_stages(session.config["compress"], load_teacher=session.load_teacher), session.stage_dirs)


def test_more_scored_examples_than_the_test_split_holds_are_refused_before_training(tiny_config, tmp_path: Path):
    session = _session(tiny_config, tmp_path)
    check_score_examples(session.task, session.loaders.test, 360)
    with pytest.raises(ConfigError, match=r"score.examples=361 but the digits test split has 360 examples ; fix: "
                                          r"pass score.examples=360 or fewer"):
        check_score_examples(session.task, session.loaders.test, 361)


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
        assert run_stage(session, Stage("train", 2, {}, []), cfg.train,
                         build_objective(cfg.train, session.config["task"]), model, should_stop=lambda: False)
        assert reads == []  # two epochs trained and validated: not one read of the test split
        assert "train epoch 2/2: train loss" in caplog.text and "; val " in caplog.text and "/144 = " in caplog.text
        final = session.evaluate(model, "test")
    assert reads == ["test"] and final.split == "test" and final.total == 360


_IMAGE_RECIPES = sorted(p.stem for p in (REPO / "conf" / "compress").glob("*.yaml")
                        if not p.stem.startswith("lm_"))


@pytest.mark.parametrize("recipe, model", [*((r, "digits_cnn") for r in _IMAGE_RECIPES),
                                           ("lm_prune_q8", "lstm_lm"), ("lm_distill_prune_q8", "txl_micronet")])
def test_the_rehearsal_attaches_every_shipped_recipe_and_leaves_the_model_alone(recipe, model):
    """rehearse_attach runs on a meta-device copy: every technique of every shipped recipe must attach there."""
    stages = build_stages(compose_config(f"compress={recipe}")["compress"], load_teacher=None)
    built = models.create_model(model, num_classes=10 if model == "digits_cnn" else 30000)
    before = {name: tensor.clone() for name, tensor in built.state_dict().items()}
    rehearse_attach(built, stages, steps_per_epoch=5)
    assert built.state_dict().keys() == before.keys()  # no mask or quantizer was put on the model itself
    assert all(torch.equal(built.state_dict()[name], before[name]) for name in before)
    assert {p.device.type for p in built.parameters()} == {"cpu"}


def test_the_rehearsal_stops_a_layer_that_nm_sparsity_cannot_divide():
    # digits_cnn's first convolution has 1 x 3 x 3 = 9 weights per output: not a multiple of m = 4.
    stages = build_stages({"name": "nm", "stages": [{"name": "prune", "epochs": 1, "prune": {
        "final_sparsity": 0.5, "structure": "nm", "nm": [2, 4], "first_last_sparsity": None}}]}, load_teacher=None)
    with pytest.raises(ValueError, match=r"layer 'conv1.0' has 9 weights per output, not a multiple of m=4"):
        rehearse_attach(models.create_model("digits_cnn", num_classes=10), stages, steps_per_epoch=5)
