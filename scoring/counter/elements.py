"""Element-based ops (elementwise, reductions, softmax, pools): how many output elements, merged inputs and rows
each computes, which their rule turns into multiplies and additions. Imports torch and :mod:`scoring.rules`."""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

from scoring.counter.arguments import arguments
from scoring.rules import ADAPTIVE_POOL, ELEMENTWISE, POOL, REDUCE, SOFTMAX, Rule


def _window_total(inputs: int, outputs: int) -> int:
    """Sum of the adaptive-pooling window sizes along one dimension (PyTorch's start/end indices)."""
    return sum(-(-(i + 1) * inputs // outputs) - (i * inputs) // outputs for i in range(outputs))


def _pool_window_total(size: int, outputs: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Sum of the in-bounds elements of the pooling windows along one dimension.

    Output o reads positions ``o·stride - padding + j·dilation`` for j < kernel; those in the padding (or,
    with ceil_mode, past it) hold no input. ``outputs`` is the size PyTorch computed, ceil_mode included.
    """
    return sum(sum(0 <= o * stride - padding + j * dilation < size for j in range(kernel)) for o in range(outputs))


def _per_dim(value: int | Sequence[int], dims: int) -> list[int]:
    """A pooling size argument, one entry per spatial dim (a single entry applies to all of them)."""
    values = [value] if isinstance(value, int) else list(value)
    return values * dims if len(values) == 1 else values


def _pool_windows(key: str, bound: Mapping[str, Any], out: torch.Tensor) -> tuple[int, int]:
    """(spatial dims, sum of the in-bounds window sizes over the outputs of one plane) of a fixed-window pool."""
    dims = 3 if "3d" in key else 2
    kernel = _per_dim(bound["kernel_size"], dims)
    stride = _per_dim(bound["stride"], dims) if bound["stride"] else kernel  # [] means the kernel size
    padding = _per_dim(bound["padding"], dims)
    dilation = _per_dim(bound.get("dilation", 1), dims)  # average pools have none
    sizes = zip(bound["self"].shape[-dims:], out.shape[-dims:], kernel, stride, padding, dilation)
    return dims, math.prod(_pool_window_total(*size) for size in sizes)


def elements(key: str, rule: Rule, func: Any, args: tuple, kwargs: dict, out: torch.Tensor) -> tuple[int, int, int]:
    """(output elements, merged inputs, rows) of the element-based op ``key``."""
    n = out.numel()
    if rule.kind == ELEMENTWISE:
        return n, 0, 0
    x = args[0]
    if rule.kind == REDUCE:
        return n, x.numel() - n, 0
    if rule.kind == SOFTMAX:
        rows = n // max(x.shape[args[1]] if x.dim() else 1, 1)
        return n, n - rows, rows
    if rule.kind == POOL:
        spatial, windows = _pool_windows(key, arguments(func, args, kwargs), out)
    elif rule.kind == ADAPTIVE_POOL:
        spatial = len(args[1])  # the output size, one entry per spatial dim
        windows = math.prod(_window_total(i, o) for i, o in zip(x.shape[-spatial:], out.shape[-spatial:]))
    else:
        raise AssertionError(f"not an element-based rule kind: {rule.kind}")
    planes = n // math.prod(out.shape[-spatial:])
    return n, planes * windows - n, 0
