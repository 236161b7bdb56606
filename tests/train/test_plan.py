"""``plan=true``: a recipe's final model built and counted without training it (train/plan.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from compress.base import weight_layers
from tests.conftest import REPO, compose_config, run_dir_for, run_train
from tests.fixtures import make_cifar100
from train import distributed, pipeline
from train.build import build_model
from train.cli import accept_command_line
from train.plan import PLAN_JSON, PLAN_MD, unset_teachers
from train.search.formats import ALLOCATION_FORMAT, ALLOCATION_JSON, SENSITIVITY_DIR, write_json
from train.session import Session

COMPRESS = sorted(p.stem for p in (REPO / "conf" / "compress").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))
#: In-process data loading: a plan reads two training batches and the scorer's test examples.
QUICK = ("data.num_workers=0",)


def _plan(run_dir: Path, *overrides: str) -> dict:
    """What ``python train/run.py plan=true <overrides>`` does in ``run_dir``, in this process; plan.json."""
    cfg, unset = unset_teachers(compose_config("plan=true", *QUICK, *overrides))
    run_dir.mkdir(parents=True, exist_ok=True)  # the run's prepare step makes it
    assert pipeline.plan(cfg, distributed.Context(torch.device("cpu")), run_dir, unset) == 0
    return json.loads((run_dir / PLAN_JSON).read_text())


def _layers(plan: dict) -> dict[str, tuple]:
    """{conv/linear layer: (sparsity to 0.1, weight bits, input bits)} of a plan's per-layer table (a quantizer
    rounds a few percent of the weights to zero: they count as sparsity too)."""
    return {row["name"]: (round(row["sparsity"] or 0.0, 1), row["weight_bits"], row["input_bits"])
            for row in plan["layers"] if row["type"] in ("Conv2d", "Linear")}


@pytest.mark.parametrize("compress", COMPRESS)
def test_every_compress_config_plans_on_digits_and_writes_only_the_plan(tmp_path: Path, compress):
    plan = _plan(tmp_path, f"compress={compress}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [PLAN_JSON, PLAN_MD]  # no record, log, checkpoint, entry
    assert plan["plan"] is True and plan["task"] == "digits" and plan["compress"] == compress
    assert plan["accumulator"] == "32-bit" and plan["examples"] == 256 and not plan["estimate"]
    assert plan["score"] == pytest.approx(plan["score_params_term"] + plan["score_ops_term"])
    assert plan["params"] > 0 and plan["ops"] > 0 and plan["layers"]
    assert plan["counted_on"].startswith("the first 256 images of the test split")
    assert plan["leaderboard"] is None  # digits was not a challenge task
    assert (plan["allocation"] is not None) == (compress == "auto")
    text = (tmp_path / PLAN_MD).read_text()
    assert "nothing trained" in text and "| layer | type |" in text and "No 2019 leaderboard" in text


def test_the_final_model_carries_every_stage_at_its_end_of_schedule_targets(tmp_path: Path, capsys):
    plan = _plan(tmp_path, "compress=prune_q4")
    # prune_q4: 90% of every layer but the first and last (first_last_sparsity 0), then 4 bits, first/last at 8
    assert _layers(plan) == {"conv1.0": (0.0, 8, 8), "conv2.0": (0.9, 4, 4), "conv3.0": (0.9, 4, 4),
                             "fc": (0.0, 8, 8)}
    assert plan["stages"] == [{"stage": "prune", "attached": ["prune"], "skipped": []},
                              {"stage": "q4", "attached": ["quantize"], "skipped": []}]
    assert not plan["freebie"] and plan["run_would_refuse"] == []
    printed = capsys.readouterr().out
    assert printed.startswith("PLAN, nothing trained: digits / digits_cnn / compress=prune_q4: score ")
    assert "IF the entry reaches its gate (test top-1 >= 95.00%)" in printed and "| conv2.0 | Conv2d |" in printed


def test_distillation_and_an_unset_teacher_are_no_obstacle_and_the_run_s_refusals_are_listed(tmp_path: Path):
    plan = _plan(tmp_path, "compress=distill_prune_q8", "compress.stages.0.distill.teacher=???")
    assert plan["stages"][0] == {"stage": "prune", "attached": ["prune"], "skipped": ["distill"]}
    assert plan["run_would_refuse"] == ["compress.stages[0].distill.teacher is not set ; fix: pass compress.stages.0."
                                        "distill.teacher=PATH (the trained teacher's run dir)"]
    assert plan["score"] == _plan(tmp_path / "plain", "compress=prune_q8")["score"]  # the teacher changes no count


def test_an_allocate_stage_plans_its_template_until_the_run_has_an_allocation(tmp_path: Path):
    template = _plan(tmp_path, "compress=auto")
    assert template["allocation"]["source"] == "template" and "cap" not in template["allocation"]  # a budget
    assert template["allocation"]["summary"].endswith("so this score is the template's, neither a prediction nor a "
                                                      "bound of the run's (max_score bounds it)")
    assert _layers(template) == {"conv1.0": (0.0, 8, 8), "conv2.0": (0.9, 4, 4), "conv3.0": (0.9, 4, 4),
                                 "fc": (0.0, 8, 8)}  # the stages after it as written (prune_q4's settings)
    assert any("has none ; fix: pass data.val_split=0.2" in line for line in template["run_would_refuse"])
    # an earlier start of the run chose per-layer settings: the plan trains them, as the run would
    cfg = compose_config("compress=auto", "plan=true", *QUICK)
    config = Session(cfg, distributed.Context(torch.device("cpu")), tmp_path).config
    chosen = {"conv1.0": {"bits": 6, "sparsity": 0.0}, "conv2.0": {"bits": 4, "sparsity": 0.5},
              "conv3.0": {"bits": 3, "sparsity": 0.8}, "fc": {"bits": None, "sparsity": 0.7}}
    (tmp_path / SENSITIVITY_DIR).mkdir()
    write_json(tmp_path / SENSITIVITY_DIR / ALLOCATION_JSON, {
        "format": ALLOCATION_FORMAT, "layers": chosen, "freebie": False, "constraint": "loss increase <= 1.5",
        "predicted": {"score": 0.1, "params": 1.0, "ops": 1.0, "loss_increase": 1.0, "metric": 0.9},
        "counted": {"score": 0.1}, "validation_examples": 287, "config": config})
    allocated = _plan(tmp_path, "compress=auto")
    assert allocated["allocation"]["source"] == "sensitivity/allocation.json"
    assert "287 examples" in allocated["allocation"]["summary"]
    assert _layers(allocated) == {"conv1.0": (0.0, 6, 6), "conv2.0": (0.5, 4, 4), "conv3.0": (0.8, 3, 3),
                                  "fc": (0.7, 32, 32)}


def test_a_score_cap_is_planned_beside_the_templates_count(tmp_path: Path, capsys):
    plan = _plan(tmp_path, "compress=auto", "compress.stages.0.allocate.budget=null",
                 "+compress.stages.0.allocate.max_score=0.05")
    assert plan["allocation"]["cap"] == {"max_score": 0.05, "score": 0.05, "template_score": plan["score"]}
    line = f"capped at max_score 0.05 (the stages after it as written: {plan['score']:.6f})"
    assert plan["allocation"]["summary"].endswith(line)
    assert "allocation: no allocation yet (" in capsys.readouterr().out.split(line)[0].splitlines()[-1]  # one line


def test_a_language_model_is_counted_on_its_test_stream_where_the_data_is_present(tmp_path: Path):
    plan = _plan(tmp_path, "task=wikitext_demo", "compress=lm_prune_q8")
    assert plan["example"] == "token" and not plan["estimate"]
    assert plan["counted_on"].startswith("the first 256 tokens of the test split")
    assert {bits for _, bits, _ in _layers(plan).values()} == {8}


def test_without_the_data_an_image_model_is_counted_on_a_synthetic_image(tmp_path: Path):
    plan = _plan(tmp_path / "run", "task=cifar100", "model=resnet18_cifar", "compress=prune_q4",
                 f"data.root={tmp_path / 'nothing'}")
    assert plan["counted_on"].startswith("a synthetic image of 3x32x32 (the data is not on disk: CIFAR-100 not found")
    assert plan["examples"] == 1 and not plan["estimate"] and plan["calibrated_on"] == "2 synthetic batches"
    assert plan["run_would_refuse"][-1].startswith("CIFAR-100 not found: ")
    assert plan["leaderboard"]["place"] == 4 and _layers(plan)["layer1.0.conv1"] == (0.9, 4, 4)


def test_plan_is_a_bool_that_does_not_define_the_run(tmp_path: Path, monkeypatch, capsys):
    assert run_dir_for("compress=prune_q4", "plan=true") == run_dir_for("compress=prune_q4")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_status:
        accept_command_line(["plan=maybe"])
    assert exit_status.value.code == 2
    assert capsys.readouterr().err.startswith("error: Error merging override plan=maybe: Value 'maybe' is not a valid "
                                              "bool (type str) (key plan) ; fix: ")
    assert list(tmp_path.iterdir()) == []
    # a plan needs no data.root: without the data it counts on synthetic inputs
    accept_command_line(["task=cifar100", "plan=true"])


@pytest.mark.slow
def test_a_plan_then_the_real_run_in_the_same_folder_which_scores_what_the_plan_said(tmp_path: Path):
    """A smoke run of prune_q4 on digits, planned first in its own folder. The plan masks the initial weights, the run
    the trained ones: with per-layer ranking every layer has the same sparsity, and only weights an 8-bit quantizer
    rounds to zero differ (the dense first and last layers'), a few hundredths of a percent of the score."""
    args = ("compress=prune_q4", "smoke=true", "data.num_workers=0", f"hydra.run.dir={tmp_path / 'run'}")
    planned = run_train(*args, "plan=true", cwd=tmp_path)
    assert planned.returncode == 0, planned.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock", PLAN_JSON, PLAN_MD]
    plan = json.loads((tmp_path / "run" / PLAN_JSON).read_text())
    trained = run_train(*args, cwd=tmp_path)
    assert trained.returncode == 3, trained.stderr[-3000:]  # finished; two batches cannot pass the gate
    assert "run already finished" not in trained.stdout
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["0_train", "1_prune", "2_q4"]
    assert "plan=true" not in yaml.safe_load((tmp_path / "run" / ".hydra" / "overrides.yaml").read_text())
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["params"] == plan["params"]
    assert plan["score"] == pytest.approx(report["score"], rel=0.01)
    ours, theirs = _layers(plan), _layers(report)
    assert {name: bits for name, (_, *bits) in ours.items()} == {name: bits for name, (_, *bits) in theirs.items()}
    assert ours["conv2.0"][0] == theirs["conv2.0"][0] == ours["conv3.0"][0] == theirs["conv3.0"][0] == 0.9


@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_plans_at_full_size_on_synthetic_inputs(tmp_path: Path, experiment):
    plan = _plan(tmp_path, f"+experiment={experiment}")
    assert plan["examples"] == (64 if plan["example"] == "token" else 1)
    assert "synthetic" in plan["counted_on"] and "the data is not on disk" in plan["counted_on"]
    assert plan["estimate"] == (plan["example"] == "token")
    assert f"task={plan['task']} needs data.root" in plan["run_would_refuse"][-1]
    leaderboard = plan["leaderboard"]
    assert [p["place"] for p in leaderboard["placings"]] == [1, 2, 3] and leaderboard["accumulator_bits"] == 32
    assert 1 <= leaderboard["place"] <= 4 and all(stage["skipped"] == ["distill"] for stage in plan["stages"])


@pytest.mark.slow
def test_the_cifar100_experiment_on_a_fixture_counts_its_test_images(tmp_path: Path):
    make_cifar100(tmp_path / "cifar", train_per_class=1, test_per_class=1)
    plan = _plan(tmp_path / "run", "+experiment=cifar100_densenet_micronet", f"data.root={tmp_path / 'cifar'}",
                 "score.examples=2", "train.batch_size=4")
    assert plan["counted_on"].startswith("the first 2 images of the test split") and plan["examples"] == 2
    assert plan["run_would_refuse"] == []
    layers = {row["name"]: (row["sparsity"], row["weight_bits"], row["input_bits"]) for row in plan["layers"]
              if row["type"] in ("Conv2d", "Linear")}
    # the recipe's per-layer table: the stem 8-bit, 1 - 0.9 * (1 - 0.341) = 0.4069 sparse; the classifier 6-bit
    # weights on 8-bit inputs, 0.55 sparse; every other layer 4-bit. A quantizer may round a few more kept weights
    # to zero (they count as sparsity too): each layer is at least as sparse as its mask, and at most 0.1 more.
    assert layers["conv1"][1:] == (8, 8) and layers["fc"][1:] == (6, 8)
    recipe = compose_config("+experiment=cifar100_densenet_micronet").compress.stages[0].prune.layer_sparsity
    with torch.device("meta"):
        sizes = {name: layer.weight.numel() for name, layer in weight_layers(build_model(compose_config(
            "+experiment=cifar100_densenet_micronet"))).items()}
    assert set(recipe) == set(sizes)  # one entry per conv / linear layer
    for name, sparsity in recipe.items():
        assert sparsity - 1 / sizes[name] <= layers[name][0] <= sparsity + 0.1, (name, layers[name][0], sparsity)
    assert {bits for name, (_, bits, _) in layers.items() if name not in ("conv1", "fc")} == {4}
    assert plan["accumulator"] == "32-bit" and plan["score"] < 0.0085  # below the 2019 winner's 32-bit figure


