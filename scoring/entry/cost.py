"""What running an entry's model may cost, measured before anything real is built.

An entry's keyword arguments shape the model it rebuilds, and a small entry can ask for a large one: attention heads
or a memory (``mem_len``) whose cost no weight pays for, a table of positions that is not stored. So the
architecture, built first on the ``meta`` device (shapes, no memory), is measured there by :func:`check_cost`,
running one evaluation step of its task on meta tensors (a batch of ``train.eval_batch_size`` images; for a language
model, windows of ``task.stream.eval_window`` tokens with the state carried until it stops growing), and refused
beyond any of these limits:

* :data:`MAX_MODEL_BYTES` of parameters and buffers (the table of positions too);
* :data:`MAX_MEMORY_TOKENS` of a language model's memory (``mem_len``): the tokens the scorer feeds before it counts,
  and that every token attends to;
* activations alive at once during one evaluation step: :data:`MAX_BYTES_PER_EXAMPLE` per example (image or
  token of the step), and :data:`MAX_STEP_BYTES` in all (the recorded ``train.eval_batch_size`` images);
* floating-point operations per example (per image or token; matrix products and convolutions, as
  ``torch.utils.flop_counter`` counts them): :data:`COMPUTE_FACTOR` times the task's baseline ops, and
  :data:`MAX_FLOPS_PER_EXAMPLE` whatever the task.

The registry's models at the kit's settings are inside each: the largest, lstm_lm_baseline, has 0.64 GB of
parameters and 3.2·10⁸ operations per token (its task's baseline: 1×); txl_teacher 150 tokens of memory;
mobilenetv2_140 holds 18.7 MB of activations per ImageNet image (4.8 GB in a batch of 256); DenseNet-BC 190/40
(conf/model/densenet_bc.yaml) 13.9 GB in a CIFAR batch of 1,000; wrn28_10 needs 1.05·10¹⁰ operations per CIFAR
image. Transformer-XL's 13,329 heads of width 1 would hold 83 MB per token. An operation the meta device cannot size (``nonzero``: an adaptive softmax's clusters) is given its
largest output, so each measure is an upper bound. Each refusal is an :class:`~scoring.entry.files.EntryError`.

This module may import data/, models/ and scoring core.
"""
from __future__ import annotations

import reprlib
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from scoring.entry.files import EntryError

#: Bytes of parameters and buffers (persistent or not) of the model rebuilt from an entry.
MAX_MODEL_BYTES = 2 << 30
#: Tokens of a language model's memory (``mem_len``; Transformer-XL evaluated WikiText-103 with 1,600).
MAX_MEMORY_TOKENS = 2048
#: Bytes of activations alive at once in one evaluation step, per example of the step and in all.
MAX_BYTES_PER_EXAMPLE, MAX_STEP_BYTES = 32 << 20, 32 << 30
#: Operations per example, relative to the task's baseline ops (such an entry would score above it), and in all.
COMPUTE_FACTOR, MAX_FLOPS_PER_EXAMPLE = 100, 10**11


@dataclass(frozen=True)
class Step:
    """One evaluation step as measured on the meta device."""

    #: Floating-point operations per example (image or token).
    flops_per_example: float
    #: Largest number of activation bytes alive at once.
    peak_bytes: int
    #: Examples (images or tokens) of the step.
    examples: int


class _Activations(TorchDispatchMode):
    """Tracks the bytes of the tensors an evaluation creates while they are alive, and sizes ``nonzero`` (which
    the meta device cannot) as its largest output: every element nonzero."""

    def __init__(self) -> None:
        super().__init__()
        self.alive = self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func is torch.ops.aten.nonzero.default:
            return torch.empty((args[0].numel(), args[0].dim()), dtype=torch.long, device=args[0].device)
        out = func(*args, **(kwargs or {}))
        inputs = {id(arg) for arg in tree_leaves((args, kwargs)) if isinstance(arg, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and id(tensor) not in inputs and tensor._base is None:  # new storage
                size = tensor.numel() * tensor.element_size()
                self.alive += size
                self.peak = max(self.peak, self.alive)
                weakref.finalize(tensor, self._release, size)
        return out

    def _release(self, size: int) -> None:
        self.alive -= size


def check_cost(skeleton: nn.Module, config: Mapping[str, Any], described: str) -> None:
    """Refuse ``skeleton`` (the entry's architecture on the meta device) beyond the module's limits, measured on
    the task and evaluation batch of the resolved run ``config``; ``described`` names the model in a refusal."""
    from data.tasks import LanguageModelTask, build_task

    model_bytes = sum(t.numel() * t.element_size() for t in (*skeleton.parameters(), *skeleton.buffers()))
    _within(described, "parameters and buffers", model_bytes, MAX_MODEL_BYTES, " bytes")
    try:
        task = build_task(config["task"])
        batch = config["train"].get("eval_batch_size")
        image = () if isinstance(task, LanguageModelTask) else (
            int(task.config["in_chans"]), int(task.config["input_size"]), int(task.config["input_size"]))
    except (KeyError, TypeError, ValueError) as err:
        raise EntryError(f"entry.json's config lacks or mistypes {err} of its task; re-export the run") from None
    skeleton.eval()
    if not image:
        _within(described, "memory (mem_len)", int(getattr(skeleton, "mem_len", 0)), MAX_MEMORY_TOKENS, " tokens")
        steps = _stream_steps(skeleton, task.eval_window)
    elif isinstance(batch, int) and not isinstance(batch, bool) and batch >= 1:
        steps = iter([_measure(lambda: skeleton(torch.empty((batch, *image), device="meta")), batch)])
    else:
        raise EntryError(f"entry.json's train.eval_batch_size={reprlib.repr(batch)} must be a positive integer; "
                         "re-export the run")
    limit = _flops_limit(task.name)
    for step in steps:  # each checked as measured: a model over a limit stops at its first step over it
        _within(described, f"activations per {task.example} of an evaluation step", step.peak_bytes // step.examples,
                MAX_BYTES_PER_EXAMPLE, " bytes")
        _within(described, "activations of one evaluation step", step.peak_bytes, MAX_STEP_BYTES, " bytes")
        _within(described, f"operations per {task.example}", round(step.flops_per_example), limit, "")


def _stream_steps(skeleton: nn.Module, window: int) -> Iterator[Step]:
    """Steps of ``window`` tokens from the model's initial state, the state carried, until the state stops growing:
    one step for a recurrent state of fixed size, and a language model's memory fills in at most
    ``MAX_MEMORY_TOKENS / window + 1`` windows."""
    tokens = torch.zeros(1, window, dtype=torch.long, device="meta")
    try:
        state = skeleton.initial_state(1, device="meta")
    except Exception as err:  # the model's own code
        raise evaluation_failure(err) from None
    for _ in range(MAX_MEMORY_TOKENS // window + 2):
        carried: list[Any] = []
        yield _measure(lambda state=state: carried.append(skeleton(tokens, state, tokens)[1]), window)
        grown = _shapes(carried[0]) != _shapes(state)
        state = carried[0]
        if not grown:
            return


def _shapes(state: Any) -> list[tuple[int, ...]] | None:
    return None if state is None else [tuple(t.shape) for t in tree_leaves(state) if isinstance(t, torch.Tensor)]


def _measure(run: Callable[[], Any], examples: int) -> Step:
    """Run ``run()`` (one evaluation step of ``examples`` examples on meta tensors), counting operations and
    activations; a model that does not run on the task's inputs is refused here."""
    flops, activations = FlopCounterMode(display=False), _Activations()
    try:
        with torch.no_grad(), flops, activations:
            run()
    except EntryError:
        raise
    except Exception as err:  # the model's own code, on the task's input shapes
        raise evaluation_failure(err) from None
    return Step(flops.get_total_flops() / examples, activations.peak, examples)


def _flops_limit(task: str) -> int:
    """Operations per example an entry of ``task`` may cost: :data:`COMPUTE_FACTOR` times its baseline's, within
    :data:`MAX_FLOPS_PER_EXAMPLE` (a task the judge has no baseline for gets the latter)."""
    from scoring.challenge import TASKS

    judged = TASKS.get(task)
    return MAX_FLOPS_PER_EXAMPLE if judged is None else min(COMPUTE_FACTOR * judged.baseline.ops,
                                                            MAX_FLOPS_PER_EXAMPLE)


def _within(described: str, what: str, value: int, limit: int, unit: str) -> None:
    if value > limit:
        raise EntryError(f"{described}: {what} {value:,}{unit}, over the limit of {limit:,}{unit} for an entry "
                         "(scoring/entry/cost.py); re-export a run of a smaller model")


def evaluation_failure(err: BaseException) -> EntryError:
    """The refusal of an entry whose model fails on its task's inputs (``err``, what it raised)."""
    reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return EntryError(f"the entry cannot be evaluated on its task ({type(err).__name__}: {reason[:300]}); "
                      "re-export the entry of a finished run of this kit")
