"""The one protocol through which a model tells the scorer its bit widths.

The scorer never guesses precision. A module that converts a tensor to a narrower format (a fake
quantizer, for weights or activations) declares it by carrying the attribute ``micronet_bits``. While
the scorer traces a model:

* every op executed inside such a module's ``forward`` is a format conversion: it is free;
* the module's output tensor is tagged with ``micronet_bits``; ops consuming it (directly or through
  views) see that width as the width of that input;
* the stored quantization parameters it declares (``micronet_scale_count`` values of
  ``micronet_scale_bits`` bits each; per-tensor or per-channel scales and zero-points) count as
  parameters, once per quantizer module. Stored scales narrower than 16 bits are quantization too:
  like a narrow ``micronet_bits``, they cancel the freebie for the whole model;
* ``micronet_scale_granularity`` says whether those scales are one per ``"tensor"`` or one per output
  ``"channel"`` (default ``"channel"``: the declared scales are what the weight stores, however a batch norm
  folds into it). A batch norm folded into a weight quantized per tensor scales its channels differently:
  the folded weight stores one scale per output channel (project rule).

The tensor a quantizer outputs holds integers on its grid (times its scales): an operand that carries a bit
width is integer-quantized, which is what counting a dot product's additions in an adder tree requires.

A module may declare ``micronet_other_ops_bits``: every op outside the dot products
(:data:`scoring.rules.OUTSIDE_DOT_PRODUCTS`: activations, element-wise arithmetic, pooling, softmax, norms, an
unfolded batch norm) that runs inside it, its submodules included, runs at that width (e.g. 16: in fp16), and
counts at the wider of it and its quantized inputs, additions included; what those ops alone read from storage
(a batch norm's affine, a norm's scale and shift) is stored at that width. The module must really run them so
(compress/ rounds their inputs and outputs to the format in training and evaluation). Their outputs carry no bit
width: a float value is no integer grid.

Weight quantizers are typically registered with ``torch.nn.utils.parametrize`` so that ``conv.weight``
is ``quantizer(mask * original)``: the conv then consumes a tensor tagged with the weight width, and the
scorer measures sparsity by counting zeros of that very tensor. Tensors never tagged are unquantized
(32-bit, or 16-bit under the freebie).

A width of 1 bit declares a binary tensor: its values are ±1 (times the quantizer's scales, like any quantized
tensor; zeros, if any, are coded by the sparsity mask). A multiply with a binary operand is a sign flip of a value
that has a standalone sign bit (floats, and integers on the symmetric grids below) and counts 1/32 of an op,
whatever the other operand's width (rules page); its additions stay at the accumulator width.

Sparsity needs no declaration: it is measured from the weights that actually execute. Its mask costs
1 bit per element of the full tensor, unless the module that applies it (e.g. a pruning parametrization,
``conv.weight = quantizer(mask(original))``) declares ``micronet_mask_bits``: the bits its stored mask
needs (block sparsity: 1 bit per block, partial edge blocks included). Then:

* the values that mask keeps are the nonzeros of the module's ``forward`` applied to a tensor of ones (the
  mask's pattern; a zero of the input inside a kept block is a stored value), and the declaration travels with
  that output through the static ops that follow it and keep its size (a weight quantizer, views) to the
  conv/linear that consumes it;
* it applies only when every nonzero of the executed weight lies where the mask keeps a value (checked);
  zeros inside kept blocks (e.g. weights quantized to 0) are then stored as values;
* the weight is stored as the cheapest of dense, nonzeros plus a 1-bit-per-element mask, and the kept
  values plus the declared mask (:func:`scoring.rules.weight_storage_bits`).
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch.nn as nn

#: Width of stored scales / zero-points unless a quantizer declares ``micronet_scale_bits`` (project rule).
DEFAULT_SCALE_BITS = 32
#: The values of ``micronet_scale_granularity``.
SCALE_GRANULARITIES = ("tensor", "channel")


@runtime_checkable
class Quantizer(Protocol):
    """What a fake-quantizer module exposes to the scorer."""

    #: Bit width of the tensor this module outputs (1..32; 1 = binary, ±1 values; compress/ uses 2..8 and 16).
    micronet_bits: int
    #: Number of stored quantization parameters (scales and zero-points) this quantizer needs at inference.
    micronet_scale_count: int
    # Optional: micronet_scale_bits (default DEFAULT_SCALE_BITS), micronet_scale_granularity ("tensor" | "channel").


@runtime_checkable
class MaskHolder(Protocol):
    """What a module applying a sparsity mask may expose to the scorer (optional)."""

    #: Bits of the stored mask of this module's output (default: 1 per element; block sparsity: 1 per block).
    micronet_mask_bits: int


def is_quantizer(module: nn.Module) -> bool:
    """True when ``module`` declares a bit width through the protocol."""
    return getattr(module, "micronet_bits", None) is not None


def quantizer_bits(module: nn.Module) -> int:
    """The declared output width of a quantizer module, validated."""
    bits = int(module.micronet_bits)
    if not 1 <= bits <= 32:
        raise ValueError(f"{type(module).__name__} declares micronet_bits={bits}; expected 1..32")
    return bits


def quantizer_scales(module: nn.Module) -> tuple[int, int]:
    """(count, bits each) of the stored quantization parameters (scales, zero-points) a quantizer declares."""
    count = int(getattr(module, "micronet_scale_count", 0))
    bits = int(getattr(module, "micronet_scale_bits", DEFAULT_SCALE_BITS))
    if count < 0 or not 1 <= bits <= 32:
        raise ValueError(f"{type(module).__name__} declares micronet_scale_count={count}, micronet_scale_bits={bits}; "
                         "expected a count >= 0 and bits in 1..32")
    return count, bits


def scale_granularity(module: nn.Module) -> str:
    """Whether a quantizer's scales are one per ``"tensor"`` or per output ``"channel"`` (the default), validated."""
    count, _ = quantizer_scales(module)
    granularity = getattr(module, "micronet_scale_granularity", "channel")
    if granularity not in SCALE_GRANULARITIES or (granularity == "tensor" and count > 1):
        raise ValueError(f"{type(module).__name__} declares micronet_scale_granularity={granularity!r} with "
                         f"{count} scales; expected one of {SCALE_GRANULARITIES} (\"tensor\": at most one scale)")
    return granularity


def other_ops_bits(module: nn.Module) -> int | None:
    """The width a module declares for the ops outside dot products run inside it (None: not declared), validated."""
    bits = getattr(module, "micronet_other_ops_bits", None)
    if bits is None:
        return None
    bits = int(bits)
    if not 1 <= bits <= 32:
        raise ValueError(f"{type(module).__name__} declares micronet_other_ops_bits={bits}; expected 1..32")
    return bits


def declared_mask_bits(module: nn.Module) -> int | None:
    """The mask size a module declares through ``micronet_mask_bits`` (None: not declared), validated."""
    bits = getattr(module, "micronet_mask_bits", None)
    if bits is None:
        return None
    bits = int(bits)
    if bits < 0:
        raise ValueError(f"{type(module).__name__} declares micronet_mask_bits={bits}; expected >= 0")
    return bits
