"""Training objectives: how one batch of a task becomes the loss the loop optimises, and what it logs.

The loop (:mod:`train.loop`) is the same for every task; it asks the objective of the task's kind
(:data:`OBJECTIVES`, keyed like ``data.tasks.TASK_KINDS``) to

1. ``prepare`` a batch (mixup / CutMix soft targets),
2. ``forward`` it through the model, giving the loss and the outputs the compression techniques see,
3. ``commit`` what the batch carries to the next one once its step succeeded (a language model's state),
4. turn the running sums into the numbers the progress bar and TensorBoard show (``metrics``).

An objective may carry state between batches; ``reset`` starts each epoch afresh and ``state_dict`` /
``load_state_dict`` let a checkpoint resume mid-epoch exactly.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn
from omegaconf import DictConfig

from compress.base import map_carry, predict_outputs
from data import build_mixup


@dataclass
class Forward:
    """One batch through the model: the loss to optimise, and what the techniques and the logs read."""

    #: The model's outputs (logits), or None when the objective did not need them.
    outputs: torch.Tensor | None
    #: Mean loss over the batch (a scalar tensor).
    loss: torch.Tensor
    #: What the next batch continues from (a language model's state); None for independent batches.
    carry: Any = None


class Objective(ABC):
    """How a task's batches train a model (see the module docstring)."""

    #: What one example of a batch is, for throughput: ``"images"`` or ``"tokens"``.
    unit: ClassVar[str]

    def prepare(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch the model trains on: ``(inputs, targets)``; by default the batch itself."""
        return inputs, labels

    @staticmethod
    def predict(model: nn.Module, inputs: torch.Tensor, carry: Any) -> tuple[torch.Tensor, Any]:
        """How a model of this task runs on a batch (:data:`compress.base.Predict`); techniques run teachers so."""
        return predict_outputs(model, inputs, carry)

    @abstractmethod
    def forward(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *,
                need_outputs: bool) -> Forward:
        """Run ``model`` on the prepared batch; ``need_outputs``: a technique reads the outputs (distillation)."""

    @abstractmethod
    def sums(self, result: Forward, labels: torch.Tensor) -> torch.Tensor:
        """``[loss × n, correct, n]`` of the batch (float64, on the device; correct is 0 where not measured)."""

    @abstractmethod
    def metrics(self, loss: float, correct: float, seen: float) -> dict[str, float]:
        """What to log from the running sums of an epoch (mean loss, correct, examples seen)."""

    def commit(self, carry: Any) -> None:
        """Keep what the batch just trained carries over to the next one (called after its optimizer step)."""

    def reset(self) -> None:
        """Start an epoch afresh (called before its first batch)."""

    def state_dict(self) -> dict[str, Any]:
        """What a mid-epoch checkpoint must hold to continue exactly."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


class ClassificationObjective(Objective):
    """Cross-entropy with label smoothing, on batches optionally mixed by mixup / CutMix (timm's soft targets)."""

    unit = "images"

    def __init__(self, train: DictConfig, task: Mapping[str, Any]) -> None:
        self.criterion = nn.CrossEntropyLoss(label_smoothing=train.label_smoothing)  # hard or soft targets
        self.mixup = build_mixup(task.get("augment"), int(task["num_classes"]))

    def prepare(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mixup(inputs, labels) if self.mixup is not None else (inputs, labels)

    def forward(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *,
                need_outputs: bool) -> Forward:
        outputs = model(inputs)
        return Forward(outputs, self.criterion(outputs, targets))

    def sums(self, result: Forward, labels: torch.Tensor) -> torch.Tensor:
        loss = result.loss.detach().double()
        n = labels.numel()
        # new_full, not new_tensor: a tensor made from host data is a copy that synchronises on CUDA.
        return torch.stack([loss * n, (result.outputs.argmax(dim=1) == labels).sum().double(), loss.new_full((), n)])

    def metrics(self, loss: float, correct: float, seen: float) -> dict[str, float]:
        return {"loss": loss, "acc": correct / seen}


class LanguageModelObjective(Objective):
    """Next-token negative log-likelihood over BPTT windows, each stream's state carried from window to window.

    The state a window leaves is kept (detached, so backpropagation stops at the window) once its step
    succeeded, and feeds the next window of the same streams; each epoch starts from the zero state, and a
    mid-epoch checkpoint holds the state of this rank's streams. Without a technique that reads the outputs
    the model computes the NLL the cheap way (an adaptive softmax only evaluates the target's cluster).
    """

    unit = "tokens"

    def __init__(self, train: DictConfig, task: Mapping[str, Any]) -> None:
        self.state: Any = None

    @staticmethod
    def predict(model: nn.Module, inputs: torch.Tensor, carry: Any) -> tuple[torch.Tensor, Any]:
        return model(inputs, carry)  # log-probabilities of the full distribution, and the next state

    def forward(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *,
                need_outputs: bool) -> Forward:
        state = map_carry(lambda value: value.to(inputs.device), self.state)  # a checkpoint's is on the CPU
        if need_outputs:
            log_probs, carry = model(inputs, state)
            nll = -log_probs.float().gather(-1, targets.unsqueeze(-1))
            return Forward(log_probs, nll.mean(), carry)
        nll, carry = model(inputs, state, targets)
        return Forward(None, nll.float().mean(), carry)

    def commit(self, carry: Any) -> None:
        self.state = map_carry(torch.Tensor.detach, carry)

    def sums(self, result: Forward, labels: torch.Tensor) -> torch.Tensor:
        loss = result.loss.detach().double()
        return torch.stack([loss * labels.numel(), loss.new_zeros(()), loss.new_full((), labels.numel())])

    def metrics(self, loss: float, correct: float, seen: float) -> dict[str, float]:
        return {"loss": loss, "ppl": math.exp(min(loss, 700.0))}  # exp overflows a float past ~709

    def reset(self) -> None:
        self.state = None

    def state_dict(self) -> dict[str, Any]:
        return {"state": self.state}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.state = state.get("state")


#: The objective of each task kind (``data.tasks.TASK_KINDS``).
OBJECTIVES: Mapping[str, type[Objective]] = {"classification": ClassificationObjective,
                                             "language_model": LanguageModelObjective}


def build_objective(train: DictConfig, task: Mapping[str, Any]) -> Objective:
    """The objective of the task config ``task`` for the training recipe ``train``."""
    return OBJECTIVES[task["kind"]](train, task)
