"""``train.search.allocate``: the exact multiple-choice knapsack, the freebie, the compress config it writes."""
from __future__ import annotations

import itertools
import json
import random
import shlex
from pathlib import Path

import pytest

from compress import build_stages, mask_sparsity
from compress.base import find_parametrization
from compress.quantization import WeightQuantizer
from models import create_model
from tests.conftest import compose_config
from train.search.allocate import build_parser, main, suggested_command
from train.search.configs import compress_config, load_template
from train.search.grid import FREEBIE_OFF, FREEBIE_ON, Setting
from train.search.solve import allocate, solve


def _cost(score: float) -> dict:
    return {"score": score, "params": 1000 * score, "ops": 2000 * score}


def _sensitivity(layers: dict[str, list[tuple]], rest_off: float = 0.2, rest_on: float = 0.1) -> dict:
    """A sensitivity.json: per layer, settings (bits, sparsity, loss increase, metric change, cost off[, cost on])."""
    return {
        "format": 1, "task": "digits", "model": "digits_cnn", "metric": "top1", "higher_is_better": True,
        "validation": {"split": "val", "val_split": 0.2, "examples": 287, "trained_on": False},
        "calibration_batches": 4, "calibration_examples": 256, "score_examples": 256, "run": "some/run",
        "reference": {"loss": 0.2, "metric": 0.99, "rest": {FREEBIE_OFF: _cost(rest_off), FREEBIE_ON: _cost(rest_on)}},
        "layers": [{"name": name, "settings": [
            {"bits": bits, "sparsity": sparsity, "loss_increase": loss, "metric_change": change,
             "cost": {FREEBIE_OFF: _cost(off), **({FREEBIE_ON: _cost(rest[0])} if rest else {})}}
            for bits, sparsity, loss, change, off, *rest in settings]} for name, settings in layers.items()]}


def test_the_solver_finds_the_brute_force_optimum():
    rng = random.Random(0)
    for trial in range(30):
        groups = rng.randint(1, 4)
        costs = [[rng.random() for _ in range(rng.randint(1, 4))] for _ in range(groups)]
        penalties = [[rng.random() for _ in group] for group in costs]
        budget = rng.uniform(0, groups * 0.7)
        feasible = [choice for choice in itertools.product(*[range(len(g)) for g in costs])
                    if sum(p[k] for p, k in zip(penalties, choice)) <= budget]
        choice = solve(costs, penalties, budget)
        if not feasible:
            assert choice is None
            continue
        best = min(sum(c[k] for c, k in zip(costs, option)) for option in feasible)
        assert sum(p[k] for p, k in zip(penalties, choice)) <= budget + 1e-9
        assert sum(c[k] for c, k in zip(costs, choice)) == pytest.approx(best, abs=1e-9), trial


# Two layers; float dense costs 0.5 (0.25 with the freebie), 4-bit costs 0.1 and raises the loss by 0.3.
TWO = {name: [(None, 0.0, 0.0, 0.0, 0.5, 0.25), (4, 0.0, 0.3, -0.01, 0.1)] for name in ("a", "b")}


@pytest.mark.parametrize("budget, freebie, score, bits", [
    (0.1, True, 0.1 + 0.25 + 0.25, (None, None)),   # nothing may be quantized: the freebie counts everything at 16
    (0.3, True, 0.1 + 0.25 + 0.25, (None, None)),   # one 4-bit layer loses the freebie: 0.2 + 0.1 + 0.5 = 0.8 > 0.6
    (0.6, False, 0.2 + 0.1 + 0.1, (4, 4)),          # both quantized: 0.4 beats the freebie's 0.6
])
def test_the_freebie_is_counted_only_for_allocations_that_quantize_nothing(budget, freebie, score, bits):
    allocation = allocate(_sensitivity(TWO), loss_budget=budget)
    assert allocation.freebie is freebie and allocation.score == pytest.approx(score)
    assert tuple(s.bits for s in allocation.settings.values()) == bits
    assert allocation.params == pytest.approx(1000 * score) and allocation.ops == pytest.approx(2000 * score)


def test_loss_budget_target_metric_and_infeasible_budgets():
    layers = {"a": [(None, 0.0, 0.0, 0.0, 0.5), (4, 0.5, 0.2, -0.02, 0.1), (2, 0.9, 0.9, -0.2, 0.01)],
              "b": [(None, 0.0, 0.0, 0.0, 0.5), (4, 0.0, -0.05, 0.01, 0.2)]}
    sensitivity = _sensitivity(layers)
    # b's measured improvement counts as no change (penalty 0), so it cannot buy a's 2-bit setting a budget of 0.9
    allocation = allocate(sensitivity, loss_budget=0.85)
    assert allocation.settings == {"a": Setting(4, 0.5), "b": Setting(4, 0.0)}
    assert allocation.loss_increase == pytest.approx(0.2) and allocation.score == pytest.approx(0.2 + 0.1 + 0.2)
    assert allocation.metric == pytest.approx(0.99 - 0.02)  # improvements are not added either
    # top-1 >= 0.97: drops may add up to 0.02
    assert allocate(sensitivity, target_metric=0.97).settings == {"a": Setting(4, 0.5), "b": Setting(4, 0.0)}
    assert allocate(sensitivity, target_metric=0.975).settings["a"] == Setting(None, 0.0)
    assert allocate(sensitivity, target_metric=0.995) is None  # better than the trained model: nothing meets it
    with pytest.raises(ValueError, match="exactly one"):
        allocate(sensitivity)


# a: float 0.5 (0.25 with the freebie), 8-bit 0.2 at +0.05 nats, 4-bit 50% 0.05 at +0.3; b: float 0.4 (0.2),
# 8-bit 0.15 at +0.1, 4-bit 50% 0.05 at +0.2; rest 0.2 (0.1 with the freebie).
CAPPED = {"a": [(None, 0.0, 0.0, 0.0, 0.5, 0.25), (8, 0.0, 0.05, -0.01, 0.2), (4, 0.5, 0.3, -0.05, 0.05)],
          "b": [(None, 0.0, 0.0, 0.0, 0.4, 0.2), (8, 0.0, 0.1, -0.02, 0.15), (4, 0.5, 0.2, -0.04, 0.05)]}


@pytest.mark.parametrize("cap, score, loss, bits", [
    (0.6, 0.1 + 0.25 + 0.2, 0.0, (None, None)),   # the freebie's 0.55 fits: no loss at all
    # 0.55 > 0.5: freebie off, 0.3 left for a + b: 8 + 8 costs 0.35; 8 + 4 (0.25) loses 0.25 nats, 4 + 8 (0.2) 0.4
    (0.5, 0.2 + 0.2 + 0.05, 0.05 + 0.2, (8, 4)),
    (0.31, 0.2 + 0.05 + 0.05, 0.3 + 0.2, (4, 4)),  # only 4 + 4 (0.1) fits in 0.11
])
def test_a_score_cap_buys_the_least_loss_increase_that_fits(cap, score, loss, bits):
    allocation = allocate(_sensitivity(CAPPED), max_score=cap)
    assert tuple(s.bits for s in allocation.settings.values()) == bits
    assert allocation.score == pytest.approx(score) and allocation.loss_increase == pytest.approx(loss)
    assert allocation.constraint == f"predicted score <= {cap:.6f}"


def test_a_capped_allocation_takes_the_cheapest_of_equal_losses_and_none_fits_below_the_cheapest():
    # c: float 0.3 and 8-bit 0.1 both lose nothing (a measured improvement counts as none); no freebie-on cost
    equal = _sensitivity({"c": [(None, 0.0, 0.0, 0.0, 0.3), (8, 0.0, -0.01, 0.0, 0.1)]})
    assert allocate(equal, max_score=10).settings == {"c": Setting(8, 0.0)}  # 0.2 + 0.1, not 0.2 + 0.3
    assert allocate(_sensitivity(CAPPED), max_score=0.29) is None  # the cheapest: 0.2 + 0.05 + 0.05 = 0.3
    with pytest.raises(ValueError, match="exactly one of a loss budget, a target metric and a score cap"):
        allocate(equal, loss_budget=1, max_score=1)


CHOICE = {"conv1.0": Setting(8, 0.0), "conv2.0": Setting(4, 0.9), "conv3.0": Setting(3, 0.95), "fc": Setting(None, 0.5)}


def _allocation(settings: dict[str, Setting]):
    layers = {name: [(s.bits, s.sparsity, 0.0, 0.0, 0.1)] for name, s in settings.items()}
    return allocate(_sensitivity(layers), loss_budget=1.0)


def test_the_config_trains_every_chosen_setting_with_the_templates_stages():
    config = compress_config(_allocation(CHOICE), load_template("prune_q4"), "auto_test")
    prune, quantize = config["stages"][0]["prune"], config["stages"][1]["quantize"]
    assert config["name"] == "auto_test" and [s["name"] for s in config["stages"]] == ["prune", "qat"]
    assert config["stages"][0]["epochs"] == "${train.epochs}"  # the template's interpolation, kept
    assert prune["layer_sparsity"] == {"conv2.0": 0.9, "conv3.0": 0.95, "fc": 0.5} and prune["end"] == 0.6
    assert quantize["layer_bits"] == {"conv1.0": 8, "conv2.0": 4, "conv3.0": 3} and quantize["freeze_bn"] == 0.7
    stages = build_stages(json.loads(json.dumps(config).replace('"${train.epochs}"', "2")),
                          load_teacher=lambda spec: None)
    model = create_model("digits_cnn", num_classes=10)
    for stage in stages:
        for technique in stage.techniques:
            technique.configure(steps_per_epoch=5)
            technique.attach(model)
            for step in range(10):  # the stage's 2 epochs x 5 steps: pruning reaches its final targets
                technique.on_step_end(model, step)
    assert {name: round(value, 4) for name, value in mask_sparsity(model).items()} == \
        {"conv2.0": 0.9, "conv3.0": 0.95, "fc": 0.5}
    bits = {name: getattr(find_parametrization(model.get_submodule(name), WeightQuantizer), "micronet_bits", None)
            for name in CHOICE}
    assert bits == {"conv1.0": 8, "conv2.0": 4, "conv3.0": 3, "fc": None}
    assert model.conv3[0].input_quantizer.micronet_bits == 3 and "input_quantizer" not in model.fc._modules


def test_stages_left_without_a_technique_are_dropped():
    quantized_only = compress_config(_allocation({"fc": Setting(4, 0.0)}), load_template("prune_q4"), "q")
    assert [s["name"] for s in quantized_only["stages"]] == ["qat"]  # the template's q4 holds mixed widths now
    distilled = compress_config(_allocation({"fc": Setting(None, 0.5)}), load_template("distill_prune_q8"), "d")
    assert [sorted(s) for s in distilled["stages"]] == [["distill", "epochs", "name", "prune"],
                                                       ["distill", "epochs", "lr_scale", "name"]]  # still distilled


def test_templates_must_have_prune_and_quantize_stages():
    with pytest.raises(ValueError, match="needs a stage with prune: and a stage with quantize:"):
        load_template("q8")
    with pytest.raises(ValueError, match="no file"):
        load_template("no_such_recipe")


def test_the_command_writes_a_config_hydra_composes(tmp_path: Path, capsys):
    sensitivity = _sensitivity({"conv2.0": [(None, 0.0, 0.0, 0.0, 0.5), (4, 0.9, 0.1, -0.01, 0.05)],
                                "fc": [(None, 0.0, 0.0, 0.0, 0.5), (8, 0.0, 0.01, 0.0, 0.1)]})
    path = tmp_path / "sensitivity.json"
    path.write_text(json.dumps(sensitivity))
    assert main([str(path), "--budget", "0.2", "0.05", "--name", "auto_t", "--no-check"]) == 0
    out = capsys.readouterr().out
    conf_dir = tmp_path / "conf"
    assert sorted(p.name for p in (conf_dir / "compress").iterdir()) == ["auto_t_0p05.yaml", "auto_t_0p2.yaml"]
    assert (f"python train/run.py -m init=some/run data.val_split=0.2 hydra.searchpath=[file://{conf_dir}] "
            "compress=auto_t_0p2,auto_t_0p05") in out
    text = (conf_dir / "compress" / "auto_t_0p2.yaml").read_text()
    assert text.startswith(f"# Written by `python -m train.search.allocate {path} --budget 0.2 0.05 --name auto_t "
                           "--no-check`")
    assert "conv2.0 4-bit 90%, fc 8-bit dense" in text
    cfg = compose_config(f"hydra.searchpath=[file://{conf_dir}]", "compress=auto_t_0p2", "train.epochs=3")
    assert cfg.compress.name == "auto_t_0p2" and cfg.compress.stages[0].epochs == 3
    assert cfg.compress.stages[0].prune.layer_sparsity == {"conv2.0": 0.9}
    assert cfg.compress.stages[1].quantize.layer_bits == {"conv2.0": 4, "fc": 8}
    assert main([str(path), "--budget", "-1", "--no-check"]) == 1
    assert "no setting of the grid meets budget -1" in capsys.readouterr().out


@pytest.mark.slow
def test_sensitivity_allocation_and_training_end_to_end(tmp_path: Path, capsys):
    """The README's two steps on a short digits run with a validation split, then the printed command trains the
    allocation from it and the comparison lists both runs (the commands' main() in this process: no start-up)."""
    import shlex

    from tests.conftest import REPO, TINY, run_train
    from train.search import compare, sensitivity

    base = tmp_path / "base"
    trained = run_train("data.val_split=0.2", *TINY, f"hydra.run.dir={base}", cwd=tmp_path, timeout=600)
    assert trained.returncode in (0, 3), trained.stderr[-2000:]  # 3: finished, fails the gate (2 epochs)
    assert sensitivity.main([str(base), "--bits", "float,4", "--sparsity", "0,0.5", "--exclude", "conv1.0"]) == 0
    result = json.loads((base / "sensitivity" / "sensitivity.json").read_text())
    assert [layer["name"] for layer in result["layers"]] == ["conv2.0", "conv3.0", "fc"]
    assert result["validation"] == {"split": "val", "val_split": 0.2, "examples": 287, "trained_on": False}
    capsys.readouterr()
    assert main([str(base), "--budget", "100", "--name", "auto_e2e"]) == 0
    allocated = capsys.readouterr().out
    # an unlimited budget takes the cheapest setting of every measured layer, 4-bit 50% sparse: with conv1.0 left
    # unquantized (32-bit counting freebie off) that still beats every unquantized choice with the freebie
    assert "conv2.0 4-bit 50%, conv3.0 4-bit 50%, fc 4-bit 50%" in allocated
    command = shlex.split(allocated.strip().splitlines()[-1])
    assert command[:2] == ["python", "train/run.py"] and f"init={base}" in command
    run_dir = tmp_path / "auto"
    compressed = run_train(*command[2:], *TINY, f"hydra.run.dir={run_dir}", cwd=REPO, timeout=600)
    assert compressed.returncode in (0, 3), compressed.stderr[-2000:]
    report = json.loads((run_dir / "report.json").read_text())
    rows = {row["name"]: row for row in report["layers"]}
    assert rows["conv2.0"]["weight_bits"] == rows["conv3.0"]["weight_bits"] == rows["fc"]["weight_bits"] == 4
    assert all(rows[name]["sparsity"] >= 0.5 for name in ("conv2.0", "conv3.0", "fc"))
    assert rows["conv1.0"]["weight_bits"] == 32 and rows["conv1.0"]["sparsity"] == 0  # not measured: left alone
    assert report["validation"]["split"] == "val" and report["validation"]["total"] == 287
    assert compare.main([str(tmp_path)]) == 0
    compared = capsys.readouterr().out
    assert "| auto_e2e |" in compared and "| none |" in compared


def test_the_sensitivity_commands_next_step_is_the_readmes_and_allocate_accepts_it():
    suggested = suggested_command("outputs/digits/base_val")
    assert suggested == "python -m train.search.allocate outputs/digits/base_val --budget 1 1.5 2"
    assert build_parser().parse_args(shlex.split(suggested)[3:]).budget == [1.0, 1.5, 2.0]
    assert suggested in (Path(__file__).parents[2] / "README.md").read_text()
