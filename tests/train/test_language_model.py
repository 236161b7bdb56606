"""The language-modelling task through the pipeline: stream batching into the trainer, state carried and detached,
on-line evaluation equal for every evaluation window, the refused settings, scorer inputs, exact resume."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._pytree import tree_leaves

from data import DatasetError
from data.tasks import DataOptions, LanguageModelTask
from data.wikitext import corpus_from_ids
from models import create_model
from train import distributed
from train.checkpoint import load_latest, save_checkpoint
from train.config import to_container
from train.loop import Trainer, make_deterministic
from train.objectives import LanguageModelObjective, build_objective

CPU = distributed.Context(torch.device("cpu"))
VOCAB = 40


@pytest.fixture
def tiny_corpus(monkeypatch):
    """A 40-word corpus (a noisy cycle, so a model can learn it) registered as the corpus of wikitext_demo."""
    rng = np.random.default_rng(0)

    def stream(n: int) -> np.ndarray:
        tokens = np.arange(n) % VOCAB
        noise = rng.random(n) < 0.1
        tokens[noise] = rng.integers(0, VOCAB, int(noise.sum()))
        return tokens.astype(np.int32)

    corpus = corpus_from_ids([f"w{i}" for i in range(VOCAB)], stream(6000), stream(600), stream(700))
    monkeypatch.setitem(__import__("data.tasks").tasks.CORPORA, "wikitext_demo", lambda root: corpus)
    return corpus


def _lm_config(tiny_config, *overrides: str):
    return tiny_config("task=wikitext_demo", "model=lstm_lm", f"task.num_classes={VOCAB}", "model.kwargs.embed_dim=16",
                       "model.kwargs.hidden_size=16", "model.kwargs.cutoffs=[8,20]", "task.stream.bptt=10",
                       "train.batch_size=4", *overrides)


def _task(cfg) -> LanguageModelTask:
    return LanguageModelTask(to_container(cfg)["task"])


def _loaders(cfg):
    return _task(cfg).loaders(DataOptions(), batch_size=cfg.train.batch_size, eval_batch_size=1, seed=cfg.seed)


def test_the_train_stream_feeds_b_streams_in_bptt_windows(tiny_config, tiny_corpus):
    loaders = _loaders(_lm_config(tiny_config))
    # 6000 tokens in 4 streams of 1500; (1500 - 1) // 10 = 149 windows of 10 tokens per epoch.
    assert len(loaders.train) == 149 and loaders.val.predictions == 599 and loaders.test.predictions == 699
    inputs, targets = next(iter(loaders.train))
    assert inputs.shape == targets.shape == (4, 10) and torch.equal(inputs[:, 1:], targets[:, :-1])
    assert torch.equal(inputs[1, 0], torch.tensor(int(tiny_corpus.train[1500])))


@pytest.mark.parametrize("model_name, kwargs", [
    ("lstm_lm", {"embed_dim": 16, "hidden_size": 16, "cutoffs": [8, 20]}),
    ("txl_micronet", {"d_model": 16, "n_layer": 2, "n_head": 2, "d_head": 8, "d_inner": 32, "mem_len": 12,
                      "cutoffs": [8, 20], "widths": [16, 8, 4], "dropout": 0.0}),
])
def test_on_line_evaluation_gives_the_same_nll_for_every_evaluation_window(tiny_config, tiny_corpus, model_name,
                                                                            kwargs):
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=VOCAB, **kwargs)
    task = _task(_lm_config(tiny_config))
    results = []
    for window in (1, 7, 64, 700):
        task.eval_window = window
        loaders = task.loaders(DataOptions(), batch_size=4, eval_batch_size=1, seed=0)
        results.append(task.evaluate(model, loaders.test, CPU.device, "test"))
    assert {r.total for r in results} == {699}  # every token but the first is predicted, once
    sums = [r.loss_sum for r in results]
    # float32 arithmetic in different window shapes: equal to rounding (the sums are ~2,600 nats).
    assert max(sums) - min(sums) < 1e-3 and 699 * np.log(VOCAB) * 0.5 < sums[0] < 699 * np.log(VOCAB) * 1.5


@pytest.mark.parametrize("override, message", [
    ("train.eval_batch_size=4", r"train.eval_batch_size=4: task wikitext_demo evaluates each split as one stream"),
    ("data.val_split=0.1", r"data.val_split=0.1: task wikitext_demo validates on its corpus's valid file"),
])
def test_settings_that_would_change_the_nll_or_the_splits_are_refused_in_one_line(tiny_config, tiny_corpus, override,
                                                                                  message):
    cfg = _lm_config(tiny_config, override)
    with pytest.raises(ValueError, match=message) as info:
        _task(cfg).loaders(DataOptions(val_split=cfg.data.val_split), batch_size=4,
                           eval_batch_size=cfg.train.eval_batch_size, seed=0)
    assert "\n" not in str(info.value)


def test_a_vocabulary_that_does_not_match_the_task_is_refused(tiny_config, tiny_corpus):
    cfg = _lm_config(tiny_config, "task.num_classes=41")
    with pytest.raises(DatasetError, match="declares num_classes=41 but its corpus has 40 types ; fix: set "
                                           "task.num_classes=40"):
        _loaders(cfg)


def test_a_window_longer_than_the_streams_is_refused_with_the_numbers(tiny_config, tiny_corpus):
    with pytest.raises(ValueError, match=r"too short for 4 streams .* window \+ 1 = 2001 tokens: each gets 1,500 ; "
                                         r"fix: batch_size <= 2 at window 2000 or window <= 1499"):
        _loaders(_lm_config(tiny_config, "task.stream.bptt=2000"))


def test_scorer_inputs_are_the_test_stream_after_the_models_memory(tiny_config, tiny_corpus):
    loaders = _loaders(_lm_config(tiny_config))
    txl = create_model("txl_micronet", num_classes=VOCAB, d_model=16, n_layer=1, n_head=2, d_head=8, d_inner=16,
                       mem_len=12, cutoffs=[8, 20], widths=[16, 8, 4])
    inputs = _task(_lm_config(tiny_config)).score_inputs(loaders.test, 5, CPU.device, txl)
    assert inputs.stream and inputs.warmup == 12 and torch.equal(inputs.inputs[0], torch.from_numpy(
        tiny_corpus.test[:17].astype(np.int64)))
    lstm = create_model("lstm_lm", num_classes=VOCAB, embed_dim=16, hidden_size=16, cutoffs=[8, 20])
    assert _task(_lm_config(tiny_config)).score_inputs(loaders.test, 5, CPU.device, lstm).warmup == 0


def test_the_objective_carries_the_state_detached_and_restarts_it_each_epoch(tiny_config, tiny_corpus):
    cfg = _lm_config(tiny_config)
    objective = build_objective(cfg.train, to_container(cfg)["task"])
    assert isinstance(objective, LanguageModelObjective)
    model = create_model("lstm_lm", num_classes=VOCAB, embed_dim=16, hidden_size=16, cutoffs=[8, 20])
    batches = iter(_loaders(cfg).train)
    first = objective.forward(model, *next(batches), need_outputs=False)
    objective.commit(first.carry)
    leaves = tree_leaves(objective.state)
    assert leaves and all(not t.requires_grad for t in leaves) and {t.shape for t in leaves} == {(4, 16)}
    carried = objective.forward(model, *next(batches), need_outputs=True)
    assert carried.outputs.shape == (4, 10, VOCAB)  # full log-probabilities when a technique reads them
    fresh = LanguageModelObjective(cfg.train, {}).forward(model, *list(_loaders(cfg).train)[1], need_outputs=False)
    assert carried.loss.item() != pytest.approx(fresh.loss.item())  # the carried state changes the prediction
    objective.reset()
    assert objective.state is None


@pytest.mark.slow
def test_resume_mid_epoch_gives_identical_weights(tiny_config, tiny_corpus, tmp_path: Path):
    cfg = _lm_config(tiny_config, "train.epochs=2", "train.log_every=7")

    def trainer():
        make_deterministic(cfg.seed, CPU.device)
        model = create_model("lstm_lm", num_classes=VOCAB, embed_dim=16, hidden_size=16, cutoffs=[8, 20])
        return Trainer(model, cfg.train, techniques=[], loader=_loaders(cfg).train, ctx=CPU,
                       objective=build_objective(cfg.train, to_container(cfg)["task"]))

    straight = trainer()
    while straight.epoch < 2:
        straight.train_epoch()
    interrupted = trainer()
    asked = []  # a stop is read after every step: asked at the 7th
    assert interrupted.train_epoch(should_stop=lambda: asked.append(1) or len(asked) >= 7) is False
    assert interrupted.batches_done == 7
    save_checkpoint(tmp_path, interrupted.global_step, interrupted.state_dict())
    torch.manual_seed(12345)
    resumed = trainer()
    resumed.load_state_dict(load_latest(tmp_path))
    assert resumed.objective.state is not None  # the streams' state at the interruption came back
    while resumed.epoch < 2:
        resumed.train_epoch()
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
