"""Knowledge distillation (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network").

The stage's loss becomes ``(1 − alpha) · task_loss + alpha · T² · KL(softmax(teacher / T) ‖ softmax(student / T))``
(the T² keeps the soft-target gradients on the scale of the task loss), over the classes of each image or the
vocabulary at each position of a language model's window. With ``top_k`` only the teacher's k most likely
classes are kept, renormalised (the soft labels a language model's teacher can afford to store), and the term is
their cross-entropy with the student's distribution at T. The teacher is obtained from the ``load_teacher``
callable that ``train/run.py`` supplies: ``"baseline"`` (the default) is the trained baseline of this run, a
stage name is that stage's final model, a path is a run dir or entry bundle. It is loaded when the stage
attaches, kept in eval mode, run without autograd through the task's :data:`~compress.base.Predict`, and moved
to the device of the inputs. It is never a submodule of the student, so it is not saved with it. A language
model's teacher carries its own state from window to window (saved in checkpoints, restarted each epoch like
the student's streams).

Config keys of a stage's ``distill:`` mapping (checked by :class:`DistillTechnique`):

    teacher       "baseline" | a stage name | a path; default "baseline"
    alpha         weight of the distillation term, in [0, 1]; default 0.9
    temperature   T > 0; default 4
    top_k         null (the whole distribution) or k >= 1: the teacher's k most likely classes; default null
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Predict, Settings, Technique, map_carry, predict_outputs, register_technique


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                      top_k: int | None = None) -> torch.Tensor:
    """``T² · KL(softmax(teacher / T) ‖ softmax(student / T))`` averaged over the predictions (every leading
    dimension: the images of a batch, or each position of a language model's window). Logits and log-probabilities
    are both accepted (log-softmax makes them the same). With ``top_k``: ``T² ·`` the cross-entropy of the
    teacher's k most likely classes, renormalised, with the student's distribution at T."""
    student = F.log_softmax(student.float().flatten(0, -2) / temperature, dim=-1)
    teacher = F.log_softmax(teacher.float().flatten(0, -2) / temperature, dim=-1)
    if top_k is None:
        return F.kl_div(student, teacher, reduction="batchmean", log_target=True) * temperature ** 2
    kept, classes = teacher.topk(min(top_k, teacher.shape[-1]), dim=-1)
    return -(kept.softmax(dim=-1) * student.gather(-1, classes)).sum(-1).mean() * temperature ** 2



@register_technique
class DistillTechnique(Technique):
    """Adds a distillation term to the loss of a stage; see the module docstring for its config keys."""

    name = "distill"
    order = 30
    needs_outputs = True

    @classmethod
    def from_stage(cls, cfg: Mapping[str, Any] | None, *, stage_epochs: int, where: str,
                   load_teacher: Callable[[str], nn.Module]) -> DistillTechnique:
        return cls(cfg, load_teacher=load_teacher, where=where)

    def __init__(self, cfg: Mapping[str, Any] | None, *, load_teacher: Callable[[str], nn.Module], where: str):
        s = Settings(cfg, where)
        self.where = where
        self.teacher_spec = s.get("teacher", "baseline")
        if not isinstance(self.teacher_spec, str) or not self.teacher_spec:
            raise s.error("teacher", self.teacher_spec, '"baseline", a stage name or a path to a run dir / entry')
        self.alpha = s.number("alpha", 0.9, low=0.0, high=1.0)
        self.temperature = s.number("temperature", 4.0, low=0.0, high=100.0, low_open=True)
        self.top_k = s.number("top_k", None, low=1, high=10**7, integer=True, optional=True)
        s.finish()
        self._load_teacher = load_teacher
        self.teacher: nn.Module | None = None
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None
        self._predict: Predict = predict_outputs
        # The teacher's carried state: what the last trained batch left (kept), what the current one produced
        # (pending until its optimizer step: a step redone without compilation must see the same state), and the
        # epoch it belongs to (each epoch's streams start afresh).
        self._carry: Any = None
        self._pending: Any = None
        self._carry_epoch: int | None = None

    def configure(self, *, steps_per_epoch: int, predict: Predict = predict_outputs) -> None:
        self._predict = predict

    def attach(self, model: nn.Module) -> None:
        if self.teacher is None:
            teacher = self._load_teacher(self.teacher_spec)
            if not isinstance(teacher, nn.Module):
                raise TypeError(f"{self.where}: load_teacher({self.teacher_spec!r}) returned "
                                f"{type(teacher).__name__}, not an nn.Module")
            if teacher is model:
                raise ValueError(f"{self.where}: the teacher {self.teacher_spec!r} is the student model itself; "
                                 "load_teacher must return a separate copy")
            self.teacher = teacher.eval()  # its outputs are computed under no_grad

    def loss(self, loss: torch.Tensor, outputs: torch.Tensor, inputs: torch.Tensor,
             targets: torch.Tensor) -> torch.Tensor:
        if self.teacher is None:
            raise RuntimeError(f"{self.where}: attach(model) must be called before loss()")
        with torch.no_grad():
            teacher = self.teacher.to(inputs.device)  # a no-op once it is there
            carry = map_carry(lambda value: value.to(inputs.device), self._carry)  # a checkpoint's is on the CPU
            teacher_outputs, self._pending = self._predict(teacher, inputs, carry)
        soft = distillation_loss(outputs, teacher_outputs, self.temperature, self.top_k)
        self._last = (loss.detach(), soft.detach())
        return (1.0 - self.alpha) * loss + self.alpha * soft

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        if epoch != self._carry_epoch:  # not on a resume within the epoch: the checkpoint's state stands
            self._carry, self._carry_epoch = None, epoch

    def on_step_end(self, model: nn.Module, step: int) -> None:
        self._carry, self._pending = map_carry(torch.Tensor.detach, self._pending), None

    def state_dict(self) -> dict[str, Any]:
        return {"carry": self._carry, "epoch": self._carry_epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._carry, self._carry_epoch = state.get("carry"), state.get("epoch")

    def scalars(self, model: nn.Module) -> dict[str, float]:
        if self._last is None:
            return {}
        task, soft = self._last
        return {"task_loss": task.item(), "kd_loss": soft.item()}
