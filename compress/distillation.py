"""Knowledge distillation (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network").

The stage's loss becomes ``(1 − alpha) · task_loss + alpha · T² · KL(softmax(teacher / T) ‖ softmax(student / T))``
(the T² keeps the soft-target gradients on the scale of the task loss). The teacher is obtained from the
``load_teacher`` callable that ``train/run.py`` supplies: ``"baseline"`` (the default) is the trained
baseline of this run, a stage name is that stage's final model, a path is a run dir or entry bundle.
It is loaded when the stage attaches, kept in eval mode, run without autograd, and moved to the device
of the inputs. It is never a submodule of the student, so it is not saved with it.

Config keys of a stage's ``distill:`` mapping (checked by :class:`DistillTechnique`):

    teacher       "baseline" | a stage name | a path; default "baseline"
    alpha         weight of the distillation term, in [0, 1]; default 0.9
    temperature   T > 0; default 4
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Settings, Technique


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T² · KL(softmax(teacher / T) ‖ softmax(student / T))``, averaged over the batch."""
    return F.kl_div(F.log_softmax(student.float() / temperature, dim=-1),
                    F.log_softmax(teacher.float() / temperature, dim=-1),
                    reduction="batchmean", log_target=True) * temperature ** 2


class DistillTechnique(Technique):
    """Adds a distillation term to the loss of a stage; see the module docstring for its config keys."""

    name = "distill"

    def __init__(self, cfg: Mapping[str, Any] | None, *, load_teacher: Callable[[str], nn.Module], where: str):
        s = Settings(cfg, where)
        self.where = where
        self.teacher_spec = s.get("teacher", "baseline")
        if not isinstance(self.teacher_spec, str) or not self.teacher_spec:
            raise s.error("teacher", self.teacher_spec, '"baseline", a stage name or a path to a run dir / entry')
        self.alpha = s.number("alpha", 0.9, low=0.0, high=1.0)
        self.temperature = s.number("temperature", 4.0, low=0.0, high=100.0, low_open=True)
        s.finish()
        self._load_teacher = load_teacher
        self.teacher: nn.Module | None = None
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

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
            teacher_outputs = self.teacher.to(inputs.device)(inputs)  # a no-op once it is there
        soft = distillation_loss(outputs, teacher_outputs, self.temperature)
        self._last = (loss.detach(), soft.detach())
        return (1.0 - self.alpha) * loss + self.alpha * soft

    def scalars(self, model: nn.Module) -> dict[str, float]:
        if self._last is None:
            return {}
        task, soft = self._last
        return {"task_loss": task.item(), "kd_loss": soft.item()}
