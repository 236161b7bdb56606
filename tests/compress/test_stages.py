"""Stage lists from conf/compress and conf/experiment, their validation, and distillation."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

from compress import TECHNIQUES, DistillTechnique, PruneTechnique, QuantizeTechnique, Technique, build_stages, \
    register_technique
from compress.distillation import distillation_loss
from compress.stages import rescale_stages

CONF = Path(__file__).resolve().parents[2] / "conf"


def compose_compress(name: str, train_epochs: int) -> dict:
    """conf/compress/<name>.yaml resolved against a train config with ``train_epochs`` epochs."""
    cfg = OmegaConf.create({"train": {"epochs": train_epochs}, "compress": OmegaConf.load(CONF / "compress" / f"{name}.yaml")})
    return OmegaConf.to_container(cfg.compress, resolve=True)


def no_teacher(spec: str) -> nn.Module:
    raise AssertionError("teachers load when a stage attaches, not when stages are built")


EXPECTED = {
    "none": [],
    "prune": [("prune", [PruneTechnique])],
    "q8": [("q8", [QuantizeTechnique])],
    "q4": [("q4", [QuantizeTechnique])],
    "prune_q8": [("prune", [PruneTechnique]), ("q8", [QuantizeTechnique])],
    "prune_q4": [("prune", [PruneTechnique]), ("q4", [QuantizeTechnique])],
    "distill_prune_q8": [("prune", [PruneTechnique, DistillTechnique]), ("q8", [QuantizeTechnique, DistillTechnique])],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_conf_compress_files_build_with_epochs_from_the_train_config(name: str):
    cfg = compose_compress(name, train_epochs=15)
    assert cfg["name"] == name
    stages = build_stages(cfg, load_teacher=no_teacher)
    assert [(s.name, [type(t) for t in s.techniques]) for s in stages] == EXPECTED[name]
    assert all(s.epochs == 15 for s in stages)
    assert [s.epochs for s in build_stages(compose_compress(name, 200), load_teacher=no_teacher)] == [200] * len(stages)
    bits = [t.weight_bits for s in stages for t in s.techniques if isinstance(t, QuantizeTechnique)]
    expected_bits = [int(name[-1])] if name.endswith(("q8", "q4")) else []
    assert bits == expected_bits


@pytest.mark.parametrize("path", sorted((CONF / "experiment").glob("*.yaml")), ids=lambda p: p.stem)
def test_experiment_recipes_build_and_are_marked_unreproduced(path: Path):
    text = path.read_text()
    assert text.startswith("# @package _global_") and "NOT YET REPRODUCED HERE" in text
    recipe = OmegaConf.load(path)
    for stage in recipe.compress.stages:  # a teacher the user must name (a path) is given here
        if "distill" in stage and OmegaConf.is_missing(stage.distill, "teacher"):
            stage.distill.teacher = "/runs/teacher"
    stages = build_stages(recipe.compress, load_teacher=no_teacher)
    kinds = [[type(t) for t in stage.techniques] for stage in stages]
    assert [PruneTechnique, DistillTechnique] in kinds  # every recipe prunes while it distils
    assert stages[-1].techniques[0].method == "lsq" and "lr" in stages[-1].overrides


@pytest.mark.parametrize("stages, message", [
    ([{"name": "train", "epochs": 3}], "compress.stages[0].name='train': expected letters, digits"),
    ([{"name": "a b", "epochs": 3}], "compress.stages[0].name='a b'"),
    ([{"name": "p", "epochs": 0}], "compress.stages[0].epochs=0: expected an integer >= 1"),
    ([{"name": "p", "epochs": 2}, {"name": "p", "epochs": 2}], "compress.stages[1].name='p': expected a name not used"),
    ([{"name": "p", "epochs": 2, "prune": {"final_sparsity": 2}}],
     "compress.stages[0].prune.final_sparsity=2: expected a number in [0.0, 1.0)"),
    ([{"name": "p", "epochs": 2, "distill": {"alpha": 1.5}}], "compress.stages[0].distill.alpha=1.5"),
    ("prune", "compress.stages='prune': expected a list of stage mappings"),
])
def test_bad_stage_lists_fail_with_one_line(stages, message: str):
    with pytest.raises(ValueError) as err:
        build_stages({"name": "x", "stages": stages}, load_teacher=no_teacher)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_overrides_are_the_other_stage_keys():
    stage, = build_stages({"name": "x", "stages": [{"name": "ft", "epochs": 4, "lr": 0.01, "warmup_epochs": 0}]},
                          load_teacher=no_teacher)
    assert (stage.name, stage.epochs, stage.overrides, stage.techniques) == ("ft", 4, {"lr": 0.01, "warmup_epochs": 0}, [])


def test_distillation_loss_mixes_task_and_soft_targets():
    torch.manual_seed(0)
    teacher = nn.Linear(6, 5).train()
    student = nn.Linear(6, 5)
    requested = []
    technique = DistillTechnique({"alpha": 0.7, "temperature": 3.0},
                                 load_teacher=lambda spec: requested.append(spec) or teacher, where="distill")
    technique.attach(student)
    technique.attach(student)
    assert requested == ["baseline"] and not teacher.training
    x, y = torch.randn(8, 6), torch.randint(0, 5, (8,))
    outputs = student(x)
    task = F.cross_entropy(outputs, y)
    loss = technique.loss(task, outputs, x, y)
    p_teacher = F.softmax(teacher(x) / 3.0, dim=1)
    kl = (p_teacher * (p_teacher.log() - F.log_softmax(outputs / 3.0, dim=1))).sum(1).mean()
    assert loss.item() == pytest.approx(0.3 * task.item() + 0.7 * 9.0 * kl.item(), rel=1e-5)
    loss.backward()
    assert student.weight.grad is not None and teacher.weight.grad is None
    assert technique.scalars(student) == {"task_loss": pytest.approx(task.item()), "kd_loss": pytest.approx(9 * kl.item(), rel=1e-5)}


def test_distillation_over_a_window_averages_every_position_and_top_k_renormalises_the_teacher():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 5), torch.randn(2, 3, 5)  # (batch, window, vocabulary)
    flat = distillation_loss(student.reshape(6, 5), teacher.reshape(6, 5), 2.0)
    assert distillation_loss(student, teacher, 2.0).item() == pytest.approx(flat.item())  # mean over 6 positions
    # top-2 by hand at position (0, 0): keep the teacher's two largest log-probabilities at T = 2, renormalise
    # (softmax of the two), cross-entropy with the student's log-softmax at T, times T² = 4.
    q = F.log_softmax(teacher / 2.0, dim=-1)
    p = F.log_softmax(student / 2.0, dim=-1)
    kept, classes = q.topk(2, dim=-1)
    by_hand = -(kept.softmax(-1) * p.gather(-1, classes)).sum(-1).mean() * 4
    assert distillation_loss(student, teacher, 2.0, top_k=2).item() == pytest.approx(by_hand.item())
    assert distillation_loss(student, teacher, 2.0, top_k=5).item() == pytest.approx(  # all 5: cross-entropy
        (flat + 4 * -(q.exp() * q).sum(-1).mean()).item(), rel=1e-5)  # = KL + the teacher's entropy


class _Counter(nn.Module):
    """A 'language model' whose output is the number of windows it has seen in this stream (its state)."""

    def forward(self, tokens, state=None):
        seen = (state if state is not None else torch.zeros(())) + 1
        return seen.expand(*tokens.shape, 3).clone(), seen


def _stream(model, inputs, carry):
    return model(inputs, carry)


def test_a_language_model_teacher_carries_its_state_committed_per_step_restarted_per_epoch_and_saved():
    teacher = _Counter()
    technique = DistillTechnique({"alpha": 1.0}, load_teacher=lambda spec: teacher, where="distill")
    technique.configure(steps_per_epoch=4, predict=_stream)
    technique.attach(nn.Linear(1, 1))
    x = torch.zeros(1, 2, dtype=torch.long)
    seen = []
    original = technique._predict
    technique._predict = lambda model, inputs, carry: seen.append(None if carry is None else int(carry)) or \
        original(model, inputs, carry)
    technique.on_epoch_start(None, 0)
    for _ in range(2):
        technique.loss(torch.zeros(()), torch.zeros(1, 2, 3), x, x)
        technique.on_step_end(None, 0)
    technique.loss(torch.zeros(()), torch.zeros(1, 2, 3), x, x)  # a step that is redone: not committed
    technique.loss(torch.zeros(()), torch.zeros(1, 2, 3), x, x)
    technique.on_step_end(None, 0)
    saved = technique.state_dict()
    technique.on_epoch_start(None, 0)  # a resume within epoch 0: the state stands
    technique.loss(torch.zeros(()), torch.zeros(1, 2, 3), x, x)
    technique.on_epoch_start(None, 1)  # a new epoch: its streams start afresh
    technique.loss(torch.zeros(()), torch.zeros(1, 2, 3), x, x)
    assert seen == [None, 1, 2, 2, 3, None] and int(saved["carry"]) == 3 and saved["epoch"] == 0


def test_teacher_must_not_be_the_student():
    model = nn.Linear(2, 2)
    technique = DistillTechnique({}, load_teacher=lambda spec: model, where="compress.stages[0].distill")
    with pytest.raises(ValueError, match="the teacher 'baseline' is the student model itself"):
        technique.attach(model)


class _Freeze(Technique):
    """A technique defined outside compress/: registered, it is a stage key like the built-in ones."""

    name, order = "freeze_test", 5  # before prune (10)

    def __init__(self, cfg, *, stage_epochs: int, where: str) -> None:
        self.cfg, self.stage_epochs, self.where = cfg, stage_epochs, where


def test_a_registered_technique_is_a_stage_key_built_in_its_order(monkeypatch):
    monkeypatch.setitem(TECHNIQUES, _Freeze.name, _Freeze)
    stage, = build_stages({"name": "x", "stages": [{"name": "s", "epochs": 3, "prune": {"final_sparsity": 0.5},
                                                    "freeze_test": {"layers": ["conv1"]}, "lr": 0.01}]},
                          load_teacher=no_teacher)
    assert [type(t) for t in stage.techniques] == [_Freeze, PruneTechnique] and stage.overrides == {"lr": 0.01}
    assert stage.techniques[0].cfg == {"layers": ["conv1"]} and stage.techniques[0].where == "compress.stages[0].freeze_test"
    with pytest.raises(ValueError, match="technique name 'prune' is taken"):
        register_technique(type("Again", (Technique,), {"name": "prune"}))
    assert sorted(TECHNIQUES) == ["distill", "freeze_test", "prune", "quantize"]


def test_shortened_stages_keep_the_shape_of_their_schedules():
    """The CIFAR-100 recipe's positions are epochs of two 300-epoch stages; shortened to 1 epoch they become the
    same fractions: pruning ends at 150/300, every 1/300; BN statistics freeze at 250/300."""
    recipe = OmegaConf.to_container(OmegaConf.load(CONF / "experiment" / "cifar100_densenet_micronet.yaml").compress)
    short = rescale_stages(recipe, 1)
    prune, q4 = short["stages"]
    assert (prune["epochs"], q4["epochs"]) == (1, 1)
    assert {k: prune["prune"][k] for k in ("unit", "start", "end", "frequency")} == \
        {"unit": "fraction", "start": 0.0, "end": 150 / 300, "frequency": 1 / 300}
    assert {k: q4["quantize"][k] for k in ("unit", "freeze_bn", "freeze_observers")} == \
        {"unit": "fraction", "freeze_bn": 250 / 300, "freeze_observers": 270 / 300}
    assert prune["distill"] == recipe["stages"][0]["distill"] and prune["lr"] == 0.01  # the rest as written
    assert recipe["stages"][0]["prune"]["unit"] == "epoch"  # the original is not modified
    assert [s.epochs for s in build_stages(short, load_teacher=no_teacher)] == [1, 1]
    unchanged = compose_compress("prune_q8", train_epochs=15)  # fractions already: only the epochs change
    assert rescale_stages(unchanged, 1)["stages"][0]["prune"] == unchanged["stages"][0]["prune"]


def test_positions_in_steps_cannot_be_rescaled():
    steps = {"name": "x", "stages": [{"name": "p", "epochs": 4, "prune": {"final_sparsity": 0.5, "unit": "step",
                                                                           "start": 0, "end": 100, "frequency": 10}}]}
    with pytest.raises(ValueError, match=r"compress.stages\[0\].prune.unit='step': a shortened stage cannot rescale"):
        rescale_stages(steps, 1)
