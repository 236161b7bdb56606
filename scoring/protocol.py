"""The one protocol through which a model tells the scorer its bit widths.

The scorer never guesses precision. A module that converts a tensor to a narrower format (a fake
quantizer, for weights or activations) declares it by carrying the attribute ``micronet_bits``. While
the scorer traces a model:

* every op executed inside such a module's ``forward`` is a format conversion: it is free;
* the module's output tensor is tagged with ``micronet_bits``; ops consuming it (directly or through
  views) see that width as the width of that input;
* the stored quantization parameters it declares (``micronet_scale_count`` values of
  ``micronet_scale_bits`` bits each; per-tensor or per-channel scales and zero-points) count as
  parameters, once per quantizer module.

Weight quantizers are typically registered with ``torch.nn.utils.parametrize`` so that ``conv.weight``
is ``quantizer(mask * original)``: the conv then consumes a tensor tagged with the weight width, and the
scorer measures sparsity by counting zeros of that very tensor. Tensors never tagged are unquantized
(32-bit, or 16-bit under the freebie).

Sparsity needs no declaration: it is measured from the weights that actually execute.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch.nn as nn

#: Width of stored scales / zero-points unless a quantizer declares ``micronet_scale_bits`` (project rule).
DEFAULT_SCALE_BITS = 32


@runtime_checkable
class Quantizer(Protocol):
    """What a fake-quantizer module exposes to the scorer."""

    #: Bit width of the tensor this module outputs (2..16).
    micronet_bits: int
    #: Number of stored quantization parameters (scales and zero-points) this quantizer needs at inference.
    micronet_scale_count: int


def is_quantizer(module: nn.Module) -> bool:
    """True when ``module`` declares a bit width through the protocol."""
    return getattr(module, "micronet_bits", None) is not None


def quantizer_bits(module: nn.Module) -> int:
    """The declared output width of a quantizer module, validated."""
    bits = int(module.micronet_bits)
    if not 1 <= bits <= 32:
        raise ValueError(f"{type(module).__name__} declares micronet_bits={bits}; expected 1..32")
    return bits


def quantizer_param_bits(module: nn.Module) -> int:
    """Bits of stored quantization parameters (scales, zero-points) a quantizer declares."""
    count = int(getattr(module, "micronet_scale_count", 0))
    bits = int(getattr(module, "micronet_scale_bits", DEFAULT_SCALE_BITS))
    return count * bits
