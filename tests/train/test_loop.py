"""The train loop on real digits data: schedules, exact evaluation, bit-exact resume, NaN stop, EMA."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from compress.base import Technique
from train import distributed
from train.build import build_model, data_options, task_of
from train.checkpoint import load_latest, save_checkpoint
from train.config import to_container
from train.loop import NonFiniteLossError, Trainer, build_optimizer, build_scheduler, make_deterministic
from train.objectives import build_objective
from train.rundir import run_tag

CPU = distributed.Context(torch.device("cpu"))


def _loaders(cfg, ctx: distributed.Context = CPU):
    return task_of(cfg).loaders(data_options(cfg, ctx), batch_size=cfg.train.batch_size,
                                eval_batch_size=cfg.train.eval_batch_size, seed=cfg.seed,
                                distributed=ctx.distributed, device=ctx.device)


def _setup(cfg):
    make_deterministic(cfg.seed, CPU.device)
    loaders = _loaders(cfg)
    return build_model(cfg), loaders.train, loaders.test


def _trainer(cfg, model, loader, ctx: distributed.Context = CPU, **kwargs) -> Trainer:
    return Trainer(model, cfg.train, techniques=kwargs.pop("techniques", []), loader=loader, ctx=ctx,
                   objective=build_objective(cfg.train, to_container(cfg)["task"]), **kwargs)


def _evaluate(cfg, model, loader):
    return task_of(cfg).evaluate(model, loader, CPU.device, "test")


def _learning_rates(train, steps_per_epoch: int = 10) -> list[float]:
    """The learning rate of every step of ``train.epochs`` epochs."""
    optimizer = build_optimizer(nn.Linear(2, 2), train, CPU.device)
    scheduler = build_scheduler(optimizer, train, steps_per_epoch)
    lrs = []
    for _ in range(train.epochs * steps_per_epoch):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step(), scheduler.step()
    return lrs


def test_linear_warmup_then_cosine_to_zero(tiny_config):
    lrs = _learning_rates(tiny_config("train.epochs=4", "train.warmup_epochs=1", "train.lr=0.2").train)
    assert lrs[0] == pytest.approx(0.2 / 10) and lrs[10] == pytest.approx(0.2)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11])) and all(a > b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] < 0.002


def test_step_schedule_decays_at_each_milestone_epoch(tiny_config):
    lrs = _learning_rates(tiny_config("train.epochs=4", "train.warmup_epochs=0", "train.lr=0.2",
                                      "train.schedule=step", "train.milestones=[2,3]", "train.gamma=0.5").train)
    assert lrs[19] == pytest.approx(0.2) and lrs[20] == pytest.approx(0.1) and lrs[30] == pytest.approx(0.05)


def test_milestones_past_the_stage_are_reported(tiny_config, caplog):
    train = tiny_config("train.epochs=3", "train.schedule=step", "train.milestones=[2,3,5]", "train.warmup_epochs=0",
                        "train.lr=0.2", "train.gamma=0.5").train
    lrs = _learning_rates(train)
    assert "train.milestones [3, 5] reach past this stage's 3 epochs" in caplog.text
    assert lrs == pytest.approx([0.2] * 20 + [0.1] * 10)  # only the milestone at epoch 2 acts


def test_no_weight_decay_on_biases_and_norm_parameters(tiny_config):
    cfg = tiny_config()
    model = build_model(cfg)
    decayed, plain = build_optimizer(model, cfg.train, CPU.device).param_groups
    assert decayed["weight_decay"] == cfg.train.weight_decay and plain["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decayed["params"]) and all(p.ndim == 1 for p in plain["params"])


class _Constant(nn.Module):
    def __init__(self, label: int) -> None:
        super().__init__()
        self.label = label

    def forward(self, x):
        return nn.functional.one_hot(torch.full((len(x),), self.label), 10).float()


def test_evaluate_counts_exactly(tiny_config):
    cfg = tiny_config()
    _, _, test_loader = _setup(cfg)
    labels = torch.cat([targets for _, targets in test_loader])
    result = _evaluate(cfg, _Constant(3), test_loader)
    assert result.split == "test" and result.total == test_loader.dataset_size == len(labels)
    assert result.correct == int((labels == 3).sum())
    # every example's loss: the cross-entropy of a one-hot logit vector, log(e + 9) - 1 or log(e + 9)
    right = 1 - (labels == 3).double()
    assert result.loss_sum == pytest.approx(float((torch.log(torch.tensor(torch.e + 9.0)) - 1 + right).sum()))


def _train(cfg, epochs_then_stop: list, tmp_path: Path) -> dict:
    """Train cfg.train.epochs epochs, restarting from a checkpoint on disk after each interruption point.

    ``epochs_then_stop`` lists, per process "life", the epochs to run and whether it stops mid-epoch.
    """
    model, train_loader, _ = _setup(cfg)
    trainer = _trainer(cfg, model, train_loader)
    for epochs, stop_mid_epoch in epochs_then_stop:
        for _ in range(epochs):
            trainer.train_epoch()
        if stop_mid_epoch:
            assert trainer.train_epoch(should_stop=lambda: True) is False
            assert 0 < trainer.batches_done < len(train_loader)
        save_checkpoint(tmp_path, trainer.global_step, trainer.state_dict())
        torch.manual_seed(12345)  # a new process would start from other RNG states
        model, train_loader, _ = _setup(cfg)
        trainer = _trainer(cfg, model, train_loader)
        trainer.load_state_dict(load_latest(tmp_path))
    while trainer.epoch < cfg.train.epochs:
        trainer.train_epoch()
    return trainer.model.state_dict()


@pytest.mark.slow
def test_resume_at_epoch_boundary_and_mid_epoch_gives_identical_weights(tiny_config, tmp_path: Path):
    cfg = tiny_config("train.epochs=3")
    uninterrupted = _train(cfg, [], tmp_path / "a")
    resumed = _train(cfg, [(1, False), (0, True), (0, True)], tmp_path / "b")
    assert uninterrupted.keys() == resumed.keys()
    for key in uninterrupted:
        assert torch.equal(uninterrupted[key], resumed[key]), key
    untrained = build_model(cfg).state_dict()
    assert not any(torch.equal(uninterrupted[k], untrained[k]) for k in untrained if untrained[k].ndim == 4)


class _PoisonAt(Technique):
    name = "poison"

    def __init__(self, step: int) -> None:
        self.step, self.seen = step, 0

    def loss(self, loss, outputs, inputs, targets):
        self.seen += 1
        return loss * float("nan") if self.seen > self.step else loss


def test_nan_loss_stops_with_a_message(tiny_config):
    cfg = tiny_config("train.log_every=4")
    model, train_loader, _ = _setup(cfg)
    trainer = _trainer(cfg, model, train_loader, techniques=[_PoisonAt(6)])
    with pytest.raises(NonFiniteLossError, match=r"NaN/inf in stage 'train' \(epoch 1, before step 8\).*fix:") as info:
        trainer.train_epoch()
    # The advised fix must be one the resume check accepts: changed settings run in a new folder of their own.
    assert "runs in a new folder" in str(info.value) and "re-run the same command" not in str(info.value)
    assert run_tag(["train.lr=0.05"]) != run_tag([]) and run_tag(["train.grad_clip=5.0"]) != run_tag([])


def test_ema_weights_become_the_stage_output(tiny_config):
    cfg = tiny_config("train.ema_decay=0.9", "train.epochs=1")
    model, train_loader, _ = _setup(cfg)
    trainer = _trainer(cfg, model, train_loader)
    trainer.train_epoch()
    ema_weight = next(trainer.eval_model.parameters()).detach().clone()
    assert trainer.eval_model is not model and not torch.equal(ema_weight, next(model.parameters()))
    trainer.finish()
    assert torch.equal(next(model.parameters()), ema_weight)


def test_ema_is_not_applied_under_compression_and_says_so(tiny_config, caplog):
    cfg = tiny_config("train.ema_decay=0.9", "train.epochs=1")
    model, train_loader, _ = _setup(cfg)
    trainer = _trainer(cfg, model, train_loader, techniques=[Technique()], tag="q8")
    assert trainer.ema is None and trainer.eval_model is model
    assert "stage 'q8': train.ema_decay=0.9 is not applied while technique is active" in caplog.text


class _FailingBackward(torch.autograd.Function):
    """Identity whose backward raises, like a compiler that fails only when building the backward graph."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("backend exploded\nsecond line")


@pytest.mark.parametrize("failing_pass", ["forward", "backward", None])
def test_fast_path_options_train_on_cpu_and_compile_failure_falls_back(tiny_config, monkeypatch, caplog,
                                                                      failing_pass):
    cfg = tiny_config("train.epochs=1", "train.amp=bf16", "train.channels_last=true", "train.compile=true")
    compiled_calls = []

    def broken_compile(module):
        def compiled(inputs):
            compiled_calls.append(failing_pass)
            if failing_pass == "forward":
                raise RuntimeError("backend exploded\nsecond line")
            return _FailingBackward.apply(module(inputs)) if failing_pass == "backward" else module(inputs)
        return compiled
    monkeypatch.setattr(torch, "compile", broken_compile)
    model, train_loader, test_loader = _setup(cfg)
    trainer = _trainer(cfg, model, train_loader)
    assert trainer.bf16 and trainer.channels_last
    assert model.state_dict()["conv1.0.weight"].is_contiguous(memory_format=torch.channels_last)
    assert trainer.train_epoch()
    assert trainer.global_step == len(train_loader)
    if failing_pass is None:  # a compilation that works is used for every step after the eager first one
        assert trainer.compiled is not None and compiled_calls == [None] * (len(train_loader) - 1)
        assert "torch.compile failed" not in caplog.text
    else:  # tried once (on the second step), then every step eager
        assert trainer.compiled is None and compiled_calls == [failing_pass]
        assert "torch.compile failed (backend exploded); continuing without compilation" in caplog.text
    assert _evaluate(cfg, model, test_loader).accuracy > 0.3  # it learned, in bf16


@pytest.mark.slow
def test_compiled_prune_and_qat_steps_trace_into_one_graph(tiny_config):
    """Graph breaks or recompilations would leave QAT's element-wise ops unfused: the GPU speed path."""
    from torch._dynamo.utils import counters

    from compress import build_stages
    cfg = tiny_config("train.epochs=1", "train.compile=true")
    model, train_loader, _ = _setup(cfg)
    stages = build_stages({"name": "pq", "stages": [{"name": "pq", "epochs": 1, "prune": {"final_sparsity": 0.5},
                                                     "quantize": {"weight_bits": 8, "activation_bits": 8}}]},
                          load_teacher=lambda spec: None)
    torch._dynamo.reset()
    counters.clear()
    trainer = _trainer(cfg, model, train_loader, techniques=stages[0].techniques)
    assert trainer.train_epoch() and trainer.compiled is not None and trainer.compile_proven
    # The first step calibrates eagerly; the others run one graph, compiled once, masks updated in between.
    assert dict(counters["frames"]) == {"total": 1, "ok": 1} and counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]


def test_auto_gpu_resident_only_where_the_device_can_apply_the_augmentation(tiny_config):
    cuda = distributed.Context(torch.device("cuda"))
    chosen = [data_options(tiny_config("task=cifar100", "data.root=/nowhere", augment), cuda).gpu_resident
              for augment in ("task.augment.auto_augment=null", "task.augment.auto_augment=rand-m9-mstd0.5")]
    chosen.append(data_options(tiny_config("task=cifar100", "data.root=/nowhere"), CPU).gpu_resident)
    # RandAugment is CPU-only: "auto" must pick the CPU path rather than fail at the loader.
    assert chosen == [True, False, False]


def test_a_train_step_makes_no_tensor_from_host_data(tiny_config):
    """On CUDA such a tensor is a synchronous host-to-device copy: one host sync per step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(str(func))
            return func(*args, **(kwargs or {}))

    cfg = tiny_config("train.epochs=1")
    model, train_loader, _ = _setup(cfg)
    trainer = _trainer(cfg, model, train_loader)
    inputs, targets = next(iter(train_loader))
    with Ops() as ops:
        trainer._step(inputs, targets)
    assert "aten.lift_fresh.default" not in ops.seen


class _DrawsAtEpochStart(Technique):
    name = "draws"

    def __init__(self) -> None:
        self.draws: list[float] = []

    def on_epoch_start(self, model, epoch):
        self.draws.append(torch.rand(()).item())


def test_epoch_boundary_resume_restores_the_rng_before_techniques_draw(tiny_config, tmp_path: Path):
    cfg = tiny_config("train.epochs=2")
    model, train_loader, _ = _setup(cfg)
    first = _DrawsAtEpochStart()
    trainer = _trainer(cfg, model, train_loader, techniques=[first])
    trainer.train_epoch()
    save_checkpoint(tmp_path, trainer.global_step, trainer.state_dict())
    trainer.train_epoch()

    model, train_loader, _ = _setup(cfg)
    torch.manual_seed(12345)  # a resumed process starts from another RNG state
    second = _DrawsAtEpochStart()
    resumed = _trainer(cfg, model, train_loader, techniques=[second])
    resumed.load_state_dict(load_latest(tmp_path))
    resumed.train_epoch()
    assert second.draws == first.draws[1:]


def _nan_on_rank1_rank_main(rank: int, init_file: str, cfg, out_dir: str) -> None:
    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool (it would hang)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        ctx = distributed.Context(torch.device("cpu"), rank=rank, world_size=2)
        make_deterministic(cfg.seed, ctx.device)
        train_loader = _loaders(cfg, ctx).train
        last = len(train_loader) - 1  # the NaN comes at the epoch's last step, on rank 1 only
        trainer = _trainer(cfg, build_model(cfg), train_loader, ctx, techniques=[_PoisonAt(last if rank == 1 else 10**9)])
        try:
            trainer.train_epoch()
            outcome = "finished"
        except NonFiniteLossError:
            outcome = "stopped"
        Path(out_dir, f"rank{rank}").write_text(outcome)
    finally:
        torch.distributed.destroy_process_group()


def test_a_nan_on_one_rank_stops_every_rank(tiny_config, tmp_path: Path):
    import torch.multiprocessing as mp

    cfg = tiny_config("train.epochs=1", "train.log_every=1000")
    mp.start_processes(_nan_on_rank1_rank_main, args=(str(tmp_path / "init"), cfg, str(tmp_path)), nprocs=2,
                       start_method="fork")
    assert [(tmp_path / f"rank{r}").read_text() for r in (0, 1)] == ["stopped", "stopped"]


class _Terminal:
    """A stream that says it is a terminal and keeps what is written to it."""

    def __init__(self) -> None:
        self.text = ""

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass


_PROGRESS_LINE = re.compile(r"train epoch 1/1 batch (\d+)/22 step (\d+): loss=(\S+) acc=(\S+) lr=(\S+) "
                            r"images_per_s=(\S+)")


def test_without_a_terminal_every_log_step_is_one_plain_line_and_no_bar(tiny_config, caplog, capsys):
    cfg = tiny_config("train.epochs=1", "train.log_every=10")
    model, train_loader, _ = _setup(cfg)
    with caplog.at_level("INFO", logger="train.loop"):
        _trainer(cfg, model, train_loader).train_epoch()
    lines = [_PROGRESS_LINE.fullmatch(record.getMessage()) for record in caplog.records]
    assert [(m.group(1), m.group(2)) for m in lines] == [("10", "10"), ("20", "20"), ("22", "22")]
    loss, acc, lr, speed = (float(v) for v in lines[-1].groups()[2:])
    assert 0 < loss < 3 and 0 <= acc <= 1 and lr == 0 and speed > 0  # cosine over one epoch ends at 0
    captured = capsys.readouterr()
    assert "\r" not in captured.err + captured.out and "it/s" not in captured.err  # no bar


@pytest.mark.parametrize("tqdm_disable, bar", [("", True), ("1", False)])
def test_on_a_terminal_a_bar_shows_unless_tqdm_disable(tiny_config, caplog, monkeypatch, tqdm_disable, bar):
    cfg = tiny_config("train.epochs=1", "train.log_every=10")
    model, train_loader, _ = _setup(cfg)
    stdout, stderr = _Terminal(), _Terminal()
    monkeypatch.setattr(sys, "stdout", stdout)
    monkeypatch.setattr(sys, "stderr", stderr)
    monkeypatch.setenv("TQDM_DISABLE", tqdm_disable)
    with caplog.at_level("INFO", logger="train.loop"):
        _trainer(cfg, model, train_loader).train_epoch()
    # The bar refreshes at most every 0.1 s: a fast machine may draw it only at "5/22", then clear it.
    assert ("train epoch 1/1:" in stderr.text and "/22 [" in stderr.text) == bar
    assert len([r for r in caplog.records if _PROGRESS_LINE.fullmatch(r.getMessage())]) == (0 if bar else 3)
