"""The training loop, in the style of torchvision's classification reference.

A :class:`Trainer` runs the epochs of one stage: optimizer (SGD with Nesterov momentum, or AdamW), a
per-step schedule (linear warmup, then cosine or step decay), the task's objective (:mod:`train.objectives`:
label smoothing and mixup/CutMix for classification), optional weight EMA and gradient clipping, and the
compression :class:`~compress.base.Technique` hooks in the order ``compress/base.py`` documents. Evaluation
belongs to the task (:meth:`data.tasks.Task.evaluate`). Every ``log_every`` steps the objective's metrics (of the
task's loss: a technique's term, such as distillation's, is in its own scalars), the learning rate and the
throughput go to the progress bar when the run is watched on a terminal, else to the log as one plain line of
``key=value`` pairs (also when ``TQDM_DISABLE=1``), and to TensorBoard. A stop request (:mod:`train.signals`) is
read after every step, all processes agreeing on it. On CUDA it takes the fast path: bf16 autocast,
channels_last, fused optimizers, optional ``torch.compile``, non-blocking copies, and metrics accumulated
on the device so that the host synchronises only every ``log_every`` steps. On CPU it is seeded and
deterministic: given the same checkpoint, the same steps produce bit-identical weights.
"""
from __future__ import annotations

import logging
import os
import random
import sys
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
from omegaconf import DictConfig
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, MultiStepLR, SequentialLR
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from compress.base import Technique
from scoring.errors import UserError
from train import distributed
from train.checkpoint import rng_state, set_rng_state
from train.config import Amp, Optimizer, Schedule, auto_switch
from train.objectives import Forward, Objective

log = logging.getLogger(__name__)


class NonFiniteLossError(UserError, FloatingPointError):
    """The training loss became NaN or infinite; the message says where and what to try."""


def make_deterministic(seed: int, device: torch.device) -> None:
    """Seed python, numpy and torch; deterministic kernels on CPU, fast (TF32, cuDNN autotune) on CUDA."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def build_optimizer(model: nn.Module, train: DictConfig, device: torch.device) -> torch.optim.Optimizer:
    """SGD or AdamW; no weight decay on biases, norm and quantizer scales (tensors of rank <= 1)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": train.weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    fused = True if device.type == "cuda" else None  # fused kernels exist for CUDA tensors only
    if train.optimizer == Optimizer.sgd:
        return torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum,
                               nesterov=train.nesterov and train.momentum > 0, fused=fused)
    return torch.optim.AdamW(groups, lr=train.lr, betas=(train.momentum, 0.999), fused=fused)


def build_scheduler(optimizer: torch.optim.Optimizer, train: DictConfig, steps_per_epoch: int) -> LRScheduler:
    """Per-step schedule: linear warmup over ``warmup_epochs``, then cosine to 0 or step decay."""
    total = max(1, train.epochs * steps_per_epoch)
    warmup = min(round(train.warmup_epochs * steps_per_epoch), total - 1)
    if train.schedule == Schedule.cosine:
        main = CosineAnnealingLR(optimizer, T_max=total - warmup)
    else:  # milestones count from the start of the stage; SequentialLR restarts `main` after warmup
        late = [m for m in train.milestones if m >= train.epochs]
        if late:
            log.warning("train.milestones %s reach past this stage's %d epochs: the learning rate never decays "
                        "there; pass milestones within the stage or train.schedule=cosine", late, train.epochs)
        main = MultiStepLR(optimizer, [m * steps_per_epoch - warmup for m in train.milestones], train.gamma)
    if warmup == 0:
        return main
    ramp = LinearLR(optimizer, start_factor=1.0 / warmup, total_iters=warmup)
    return SequentialLR(optimizer, [ramp, main], milestones=[warmup])


class Trainer:
    """Runs the epochs of one stage and holds everything a checkpoint must restore.

    The stage's techniques are configured and attached here, before the optimizer is built. On resume the
    model must already carry the checkpoint's compression structure (attach is then a no-op).
    """

    def __init__(self, model: nn.Module, train: DictConfig, *, techniques: list[Technique],
                 loader: Any, ctx: distributed.Context, objective: Objective,
                 writer: SummaryWriter | None = None, tag: str = "train") -> None:
        self.model, self.train_cfg, self.techniques = model, train, techniques
        self.loader, self.ctx, self.objective, self.writer, self.tag = loader, ctx, objective, writer, tag
        self.need_outputs = any(technique.needs_outputs for technique in techniques)
        device = ctx.device
        self.bf16 = train.amp == Amp.bf16 or (train.amp == Amp.auto and device.type == "cuda")
        self.channels_last = auto_switch(train.channels_last, device.type == "cuda")
        for technique in techniques:  # before the optimizer: quantizers may add parameters
            technique.configure(steps_per_epoch=len(loader), predict=objective.predict)
            technique.attach(model)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(model, train, device)
        self.scheduler = build_scheduler(self.optimizer, train, len(loader))
        # Averaging masks or quantizer state would corrupt them: EMA only where nothing is attached.
        self.ema = None
        if train.ema_decay is not None and not techniques:
            self.ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(train.ema_decay), use_buffers=True)
        elif train.ema_decay is not None:
            log.warning("stage '%s': train.ema_decay=%s is not applied while %s is active (averaging would corrupt "
                        "masks and quantizer state); set ema_decay: null in the stage to silence this", tag,
                        train.ema_decay, ", ".join(t.name for t in techniques))
        self.step_model = distributed.wrap(model, ctx)
        self.compiled = torch.compile(self.step_model) if train.compile else None
        self.eager_step_done = False  # compilation starts with the second step (see _forward_backward)
        self.compile_proven = False  # set once a compiled step (forward and backward) has run
        self.epoch = 0          # completed epochs
        self.batches_done = 0   # batches of the current epoch already trained
        self.global_step = 0    # optimizer steps in this stage
        # Device-side running sums for the current epoch: loss x n, correct, seen, non-finite losses.
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)
        #: The objective's metrics (mean loss, accuracy or perplexity) of the epoch so far, as last logged.
        self.epoch_metrics: dict[str, float] = {}
        self._rng_to_restore: dict | None = None

    @property
    def eval_model(self) -> nn.Module:
        """What this stage produces: the EMA weights when EMA is on, else the model."""
        return self.ema.module if self.ema is not None else self.model

    def finish(self) -> None:
        """End of stage: the EMA weights (if any) become the model's; techniques undo training-only state."""
        if self.ema is not None:
            self.model.load_state_dict(self.ema.module.state_dict())
        for technique in self.techniques:
            technique.on_stage_end(self.model)

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs; under torchrun a collective (every rank's RNG state is gathered)."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "global_step": self.global_step,
            "sums": self.sums.cpu(),
            # One per rank, in rank order: each rank has its own random streams (and, for a language
            # model, its own streams of text and their carried state).
            "rng": distributed.all_gather_object(rng_state()),
            "objective": distributed.all_gather_object(self.objective.state_dict()),
            "techniques": distributed.all_gather_object([technique.state_dict() for technique in self.techniques]),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a checkpoint; the model must already carry the checkpoint's compression structure."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.epoch, self.batches_done = state["epoch"], state["batches_done"]
        self.global_step = state["global_step"]
        self.sums.copy_(state["sums"])
        states, rank = state["rng"], self.ctx.rank
        # Format 1 allows one RNG state instead of a per-rank list, and no objective or technique states.
        states = [states] if isinstance(states, dict) else states
        if rank < len(states):
            self._rng_to_restore = states[rank]
            self.objective.load_state_dict(state.get("objective", [{}] * len(states))[rank])
            techniques = state.get("techniques", [[{}] * len(self.techniques)] * len(states))[rank]
            for technique, saved in zip(self.techniques, techniques):
                technique.load_state_dict(saved)
        else:  # resumed on more processes than saved: this rank keeps its fresh (seed + rank) streams
            log.warning("checkpoint holds RNG states of %d processes; rank %d keeps its own seeding", len(states), rank)

    def train_epoch(self, should_stop: Callable[[], bool] = lambda: False) -> bool:
        """Train (the rest of) epoch ``self.epoch``; False when stopped early because ``should_stop()``."""
        # RNG state is restored where the interrupted run took it: before anything of the epoch draws from
        # it (epoch boundary) or after replaying the batches already trained (mid-epoch).
        if self.batches_done == 0:
            self._restore_rng()
            self.objective.reset()
        self.loader.set_epoch(self.epoch)
        self.model.train()
        for technique in self.techniques:
            technique.on_epoch_start(self.model, self.epoch)
        batches = iter(self.loader)
        for _ in range(self.batches_done):
            next(batches)
        self._restore_rng()
        # Bars only on a terminal (redirected, they become lines of carriage returns) and unless TQDM_DISABLE is
        # set; read here, as tqdm itself reads it only when it is imported.
        bar = self.ctx.is_main and sys.stdout.isatty() and sys.stderr.isatty() \
            and os.environ.get("TQDM_DISABLE", "").lower() in ("", "0", "false")
        progress = tqdm(total=len(self.loader), initial=self.batches_done, leave=False,
                        desc=f"{self.tag} epoch {self.epoch + 1}/{self.train_cfg.epochs}", disable=not bar)
        start, start_seen = time.perf_counter(), self.sums[2].item()
        for inputs, targets in batches:
            self._step(inputs, targets)
            self.batches_done += 1
            progress.update()
            at_end = self.batches_done == len(self.loader)
            stop = distributed.any_process(should_stop())  # every step: a stop never waits for the next log line
            if stop or self.global_step % self.train_cfg.log_every == 0 or at_end:
                self._sync(progress, time.perf_counter() - start, start_seen)
                if stop and not at_end:
                    progress.close()
                    return False
        progress.close()
        self.epoch, self.batches_done = self.epoch + 1, 0
        self.sums.zero_()
        return True

    def _restore_rng(self) -> None:
        if self._rng_to_restore is not None:
            set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None

    def _forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[Forward, torch.Tensor]:
        """One batch through the objective, gradients left in ``.grad``; compiled while compilation works.
        Returns the objective's result (its ``loss``: the task's) and the loss optimised (with the techniques')."""
        if self.compiled is not None and not self.eager_step_done:
            # The first step runs eagerly: quantizers calibrate on it, and that one-off, data-dependent code
            # would split the compiled graph into pieces and use up the recompilations.
            self.eager_step_done = True
            return self._loss_and_grad(self.step_model, inputs, targets)
        if self.compiled is not None and not self.compile_proven:
            # Compilers fail in many ways, in the forward pass or only when the first backward builds the
            # backward graph; eager always works, so that first step is redone without compilation.
            try:
                result = self._loss_and_grad(self.compiled, inputs, targets)
                self.compile_proven = True
                return result
            except Exception as err:
                log.warning("torch.compile failed (%s); continuing without compilation",
                            str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
                self.compiled = None
        return self._loss_and_grad(self.step_model if self.compiled is None else self.compiled, inputs, targets)

    def _loss_and_grad(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor
                       ) -> tuple[Forward, torch.Tensor]:
        with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            result = self.objective.forward(model, inputs, targets, need_outputs=self.need_outputs)
            loss = result.loss
            for technique in self.techniques:
                loss = technique.loss(loss, result.outputs, inputs, targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return result, loss

    def _step(self, inputs: torch.Tensor, labels: torch.Tensor) -> None:
        device = self.ctx.device
        inputs = inputs.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if self.channels_last and inputs.dim() == 4:  # images (NCHW); token batches have no memory format
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        inputs, targets = self.objective.prepare(inputs, labels)
        result, loss = self._forward_backward(inputs, targets)
        if self.train_cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.train_cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        for technique in self.techniques:
            technique.on_step_end(self.model, self.global_step)
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.global_step += 1
        self.objective.commit(result.carry)
        with torch.no_grad():
            self.sums[:3] += self.objective.sums(result, labels)
            self.sums[3] += (~torch.isfinite(loss.detach())).double()

    def _sync(self, progress: tqdm, elapsed: float, start_seen: float) -> None:
        """The one host synchronisation every ``log_every`` steps (and at a stop): check, then log."""
        # Agreed over all processes first, so that a NaN on any rank stops every rank together.
        nonfinite = distributed.all_reduce_sum(self.sums[3:4].clone()).item()
        loss_sum, correct, seen, _ = self.sums.tolist()
        if nonfinite:
            raise NonFiniteLossError(
                f"training loss became NaN/inf in stage '{self.tag}' (epoch {self.epoch + 1}, before step "
                f"{self.global_step}); the last good checkpoint is kept ; fix: lower train.lr or set "
                "train.grad_clip (e.g. 5.0): a changed value runs in a new folder (a checkpoint resumes only with the "
                "settings that wrote it, and would reach the same NaN)")
        self.epoch_metrics = self.objective.metrics(loss_sum / seen, correct, seen)
        scalars = {**self.epoch_metrics, "lr": self.optimizer.param_groups[0]["lr"],
                   f"{self.objective.unit}_per_s": (seen - start_seen) * self.ctx.world_size / max(elapsed, 1e-9)}
        for technique in self.techniques:
            scalars.update({f"{technique.name}/{k}": v for k, v in technique.scalars(self.model).items()})
        progress.set_postfix({k: f"{v:.4g}" for k, v in scalars.items()}, refresh=False)
        if progress.disable and self.ctx.is_main:
            log.info("%s epoch %d/%d batch %d/%d step %d: %s", self.tag, self.epoch + 1, self.train_cfg.epochs,
                     self.batches_done, len(self.loader), self.global_step,
                     " ".join(f"{key}={value:.4g}" for key, value in scalars.items()))
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(f"{self.tag}/train/{key}", value, self.global_step)
