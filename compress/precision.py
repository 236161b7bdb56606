"""Reduced precision for the ops outside dot products: a model that runs them in fp16 (or bf16) and says so.

A quantized model loses the 16-bit freebie, and then every op it does not quantize would count at 32 bits. The
2019 CIFAR-100 winner ran batch norm, ReLU and pooling in real fp16 instead. :func:`set_other_ops` makes a model do
that, in training and evaluation alike, and declares it to the scorer (``micronet_other_ops_bits``,
:mod:`scoring.protocol`), which then counts those ops at 16 bits:

* which ops: exactly the rule kinds :data:`scoring.rules.OUTSIDE_DOT_PRODUCTS` (activations, element-wise
  arithmetic, residual adds, pooling, softmax, norms, batch norm), found by the scorer's own rules table, so what
  runs narrow and what is counted narrow cannot drift apart; convolutions, matmuls and attention kernels are dot
  products and keep their operands' widths (their inputs are the quantizers' business);
* how: a :class:`~torch.utils._python_dispatch.TorchDispatchMode`, active during the model's forward, rounds every
  floating input of such an op to the format and its output too (an IEEE op is the exact result rounded once), so
  the accuracy of the run is the accuracy of the narrow model. It works below autograd: the gradient passes the
  rounding straight through. Inputs the op writes into (a batch norm's running statistics in training) are left
  as they are, and nothing is rounded inside quantizers and weight parametrizations (masks, weight fake
  quantization: their values are exact on their grids and static at export);
* what it is not: an integer format. The outputs carry no bit width for the scorer (a float is no integer grid),
  so an adder tree still needs quantized inputs for every dot product.

:func:`exact_ops` suspends the rounding for code that stands in for a dot product (the integer executor's layers).

``fp32`` (the default) leaves the model as it is. The format is part of the compression state (``other_ops``).
Imports torch and scoring's core (rules, protocol) only.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn
from torch.nn.utils.parametrize import ParametrizationList
from torch.utils._python_dispatch import TorchDispatchMode

from scoring.protocol import is_quantizer
from scoring.rules import OUTSIDE_DOT_PRODUCTS, RULES, rule_key

#: The formats of ``other_ops`` (None: unchanged, fp32).
FORMATS: dict[str, torch.dtype | None] = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
#: Attribute of a model holding its ``other_ops`` format (absent: fp32).
OTHER_OPS = "compress_other_ops"
#: Attribute of a model whose rounding hooks are registered; of a submodule that suspends the rounding.
_HOOKED, _EXACT = "compress_other_ops_hooked", "compress_other_ops_exact"

_active = threading.local()


def other_ops(model: nn.Module) -> str:
    """The format ``model`` runs its ops outside dot products in (``fp32`` unless set)."""
    return getattr(model, OTHER_OPS, "fp32")


def set_other_ops(model: nn.Module, name: str) -> None:
    """Run ``model``'s ops outside dot products in format ``name`` (a key of :data:`FORMATS`) and declare their
    width to the scorer; ``fp32`` on a model never set leaves it untouched. Idempotent."""
    if name not in FORMATS:
        raise ValueError(f"other_ops={name!r}: expected one of {', '.join(FORMATS)}")
    if name == other_ops(model):
        return
    setattr(model, OTHER_OPS, name)
    dtype = FORMATS[name]
    model.micronet_other_ops_bits = None if dtype is None else torch.finfo(dtype).bits
    if not getattr(model, _HOOKED, False):
        model.register_forward_pre_hook(_enter)
        model.register_forward_hook(_leave, always_call=True)
        setattr(model, _HOOKED, True)


class _Rounding(TorchDispatchMode):
    """Rounds the floating inputs and outputs of the ops outside dot products to ``dtype``, unless suspended."""

    #: Per aten op: None when it is not rounded, else (its written-into arguments by position and name, whether its
    #: output is a selection of its inputs, which needs no rounding: ReLU, max).
    plans: dict[Any, tuple[frozenset, bool] | None] = {}

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model, self.dtype, self.suspended = model, dtype, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        plan = None if self.suspended else self._plan(func)
        if plan is None:
            return func(*args, **kwargs)
        written, selects = plan
        args = tuple(value if index in written else self._round(value) for index, value in enumerate(args))
        kwargs = {key: value if key in written else self._round(value) for key, value in kwargs.items()}
        out = func(*args, **kwargs)
        result = out[0] if isinstance(out, (tuple, list)) else out
        if (not selects or 0 in written) and self._narrows(result):  # an in-place op's input was not rounded
            result.copy_(_convert(result, self.dtype))  # in place: an in-place op returns its own input
        return out

    @classmethod
    def _plan(cls, func: Any) -> tuple[frozenset, bool] | None:
        if func not in cls.plans:
            rule = RULES.get(rule_key(func.overloadpacket.__name__, (), {}))
            if rule is None or rule.kind not in OUTSIDE_DOT_PRODUCTS:
                cls.plans[func] = None
            else:
                schema = func._schema.arguments
                written = {key for index, argument in enumerate(schema) for key in (index, argument.name)
                           if argument.alias_info is not None and argument.alias_info.is_write}
                cls.plans[func] = frozenset(written), rule.keeps_bits
        return cls.plans[func]

    def _narrows(self, value: Any) -> bool:
        return isinstance(value, torch.Tensor) and value.is_floating_point() and value.element_size() > 2

    def _round(self, value: Any) -> Any:
        return _convert(_convert(value, self.dtype), value.dtype) if self._narrows(value) else value


def _convert(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # The aten op itself: below autograd, Tensor.to would reach the modes outside this one undecomposed.
    return torch.ops.aten._to_copy.default(tensor, dtype=dtype)


def _modes() -> list[_Rounding | None]:
    """The rounding modes of the model calls running in this thread, innermost last (None: a call at fp32)."""
    if not hasattr(_active, "modes"):
        _active.modes = []
    return _active.modes


def _enter(model: nn.Module, args: Any) -> None:
    """Forward pre-hook of the model: start rounding (its new quantizers and parametrizations suspend it)."""
    dtype = FORMATS[other_ops(model)]
    mode = None
    if dtype is not None:
        for module in model.modules():
            if not getattr(module, _EXACT, False) and (isinstance(module, ParametrizationList) or is_quantizer(module)):
                module.register_forward_pre_hook(_suspend)
                module.register_forward_hook(_resume, always_call=True)
                setattr(module, _EXACT, True)
        mode = _Rounding(model, dtype)
        mode.__enter__()
    _modes().append(mode)


def _leave(model: nn.Module, args: Any, output: Any) -> None:
    """Forward hook of the model (always called): stop the rounding its pre-hook started."""
    modes = _modes()
    if not modes or (modes[-1] is not None and modes[-1].model is not model):
        return  # its pre-hook never ran (an earlier pre-hook raised)
    mode = modes.pop()
    if mode is not None:
        mode.__exit__(None, None, None)


@contextlib.contextmanager
def exact_ops() -> Iterator[None]:
    """Within it, the model call running in this thread does not round: for code that stands in for a dot product
    (an integer executor's layer), whose arithmetic is exact and whose output is rounded where the next op reads it,
    as a convolution's is."""
    _suspend(None, ())
    try:
        yield
    finally:
        _resume(None, (), None)


def _suspend(module: nn.Module | None, args: Any) -> None:
    """Forward pre-hook of a quantizer or parametrization: its values stay exact."""
    modes = _modes()
    if modes and modes[-1] is not None:
        modes[-1].suspended += 1


def _resume(module: nn.Module | None, args: Any, output: Any) -> None:
    modes = _modes()
    if modes and modes[-1] is not None and modes[-1].suspended:
        modes[-1].suspended -= 1
