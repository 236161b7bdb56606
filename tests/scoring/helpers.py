"""Test helpers: a tiny quantizer implementing scoring.protocol, exact weight pruning, batch norms with non-trivial
statistics, and a count's layers as rows."""
from __future__ import annotations

from fractions import Fraction
from typing import Any

import torch
import torch.nn as nn
from torch.nn.utils import parametrize


class FakeQuant(nn.Module):
    """Symmetric per-tensor fake quantizer that declares its width through the scoring protocol."""

    def __init__(self, bits: int, scale_count: int = 1):
        super().__init__()
        self.micronet_bits = bits
        self.micronet_scale_count = scale_count

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levels = 2 ** (self.micronet_bits - 1) - 1
        scale = x.detach().abs().amax().clamp(min=1e-12) / levels
        return torch.round(x / scale).clamp(-levels, levels) * scale


def quantize_weight(module: nn.Module, bits: int, name: str = "weight", scale_count: int = 1) -> None:
    """Quantize ``module.<name>`` through a parametrization, as compress/ does."""
    parametrize.register_parametrization(module, name, FakeQuant(bits, scale_count))


def set_grid_weights(weight: torch.Tensor, bits: int, sparsity: Fraction, seed: int = 0) -> int:
    """Fill ``weight`` with values exactly on a ``bits``-bit grid (so fake quantization keeps every nonzero),
    zero ``round(numel·sparsity)`` of them while every output row keeps a nonzero; return the nonzeros."""
    gen = torch.Generator().manual_seed(seed)
    levels = 2 ** (bits - 1) - 1
    rows = weight.shape[0]
    flat = weight.detach().reshape(rows, -1)
    values = torch.randint(1, levels + 1, flat.shape, generator=gen).float()
    values *= torch.where(torch.rand(flat.shape, generator=gen) < 0.5, -1.0, 1.0)
    values[0, 0] = levels  # the largest magnitude sets the quantizer's scale to exactly the step
    zeros = round(flat.numel() * sparsity)
    candidates = torch.arange(flat.numel()).reshape(rows, -1)[:, 1:].flatten()  # column 0 stays nonzero
    chosen = candidates[torch.randperm(candidates.numel(), generator=gen)[:zeros]]
    values.view(-1)[chosen] = 0
    with torch.no_grad():
        flat.copy_(values * 0.01)
    return flat.numel() - zeros


def trained_bn(bn: nn.modules.batchnorm._BatchNorm) -> nn.modules.batchnorm._BatchNorm:
    """A batch norm with non-trivial statistics and affine parameters (nothing folds by accident)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for tensor, low, high in ((bn.running_mean, -1, 1), (bn.running_var, 0.5, 2),
                                  (bn.weight, 0.5, 2), (bn.bias, -1, 1)):
            tensor.copy_(torch.rand(tensor.shape, generator=gen) * (high - low) + low)
    return bn


def layer_rows(count: Any) -> dict[str, tuple]:
    """{layer: (param_bits, mults, adds, note)} of a count."""
    return {row["name"]: (row["param_bits"], row["mults"], row["adds"], row["note"]) for row in count.layers}
