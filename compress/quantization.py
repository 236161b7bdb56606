"""Quantization-aware training: fake quantization of weights and activations, declared to the scorer.

Weights (of conv, linear and embedding layers): symmetric, one step size per output channel (an embedding:
per row), integers in [−(2^(b−1)−1), 2^(b−1)−1] (so at most 2^b − 1 values per channel, and 0 ↦ 0: pruned
weights stay exactly zero). The quantizer is a
:mod:`torch.nn.utils.parametrize` parametrization registered after the pruning mask, so the executed
``module.weight`` is ``quantize(original * mask)``. It carries ``micronet_bits`` and
``micronet_scale_count = out_channels`` (scoring/protocol.py).

Activations: one quantizer per conv/linear input (``module.input_quantizer``; not for an embedding, whose
input is token ids and whose output is rows of the quantized table), run from a forward pre-hook through
``__call__`` so the scorer's module hooks see it; per-tensor, unsigned in [0, 2^b − 1] when the first training batch it sees is non-negative (e.g. after ReLU), otherwise
symmetric signed; zero-point 0 in both cases, hence ``micronet_scale_count = 1``. An input that
turns negative after an unsigned calibration is clipped at 0.

Step sizes: ``lsq`` learns them (Esser et al. 2020, "Learned Step Size Quantization", ICLR), with
the paper's gradient scale 1/sqrt(N·Q_P) (N = weights per output channel, or input elements per
example), initialised to the step with least squared quantization error on the initial weights / the
first batch; ``minmax`` and ``moving_average`` are observers: weight step sizes follow the current
per-channel max |w| (both methods), activation step sizes the running min/max (``minmax``) or its
exponential moving average (``moving_average``, ``averaging_constant`` as in torch.ao's
MovingAverageMinMaxObserver). Observers update only in training mode. All share one
fake-quantization function (:class:`_FakeQuantize`, which says why it is not torch's fused kernels).
``freeze_observers`` fixes every step size from an epoch on; ``freeze_bn`` makes every BatchNorm
normalise with (and stop updating) its running statistics from an epoch on, as torchvision's
``references/classification/train_quantization.py`` does.

**Project rule — batch norm folding keeps quantized weights on their grid.** The scorer folds a
BatchNorm that follows a conv/linear into it: ``W'[c] = W[c] · γ[c] / σ[c]`` and a bias per channel.
With per-channel symmetric quantization ``W[c] = s[c] · q[c]`` with integers q[c] in
[−(2^(b−1)−1), 2^(b−1)−1], so ``W'[c] = (s[c] · γ[c] / σ[c]) · q[c]``: the same b-bit integers with a
new per-channel scale (the grid is symmetric, so a negative γ only flips the sign of the scale). The
folded layer therefore stores b-bit weights and the same number of scales, and is counted as such;
the folded bias is a dense 32-bit parameter. Per-tensor weight scales would not have this property,
which is why weights are always quantized per output channel here.

**Scales per tensor** (``scale: per_tensor``): one step size for the whole weight. The scorer then counts one
stored scale, or one per output channel where a batch norm folds into the layer (the fold rescales each channel,
see above): per-tensor weight scales pay off where no batch norm folds (pre-activation blocks, DenseNet).

**Stored scale width** (``scale_bits``): every step size of the stage's quantizers is rounded, in training and
evaluation, to the format it is stored in, and declared at that width (``micronet_scale_bits``): 32 = fp32 as
learned; 16 = IEEE half; 8 = a power of two, its exponent stored as an 8-bit integer in [−128, 127] (fp32 holds
both exactly). LSQ learns through the rounding with the straight-through gradient. ``finalize_for_export`` writes
the rounded value into each step size (each quantizer's ``finalize``), so an entry stores exactly the step it
computes with, and the packed format stores it at its declared width (scoring/entry/packed.py).

**Biases** (``bias_bits`` 8 or 16): each conv/linear bias gets a symmetric per-tensor quantizer (a
parametrization, one step size, like a per-tensor weight quantizer, set from the bias's range whatever the stage's
``method``) and is counted at that width; its add counts
at its widest input. A batch norm that the scorer folds into such a layer moves the bias off its grid: the merged
bias is then counted at the batch norm's width (scoring/rules.py, "folded bias width").

**Attention operands** (``attention_bits``): every *operand point* of the model — an ``nn.Identity`` a model
registers under a name ending in ``_operand`` (models/transformer_xl.py marks the query, keys, positions,
attention weights and values of its score and value matmuls) — is replaced by an activation quantizer of that
width, so those matmuls run on, and are counted at, quantized operands.

**Other ops** (``other_ops``): see :mod:`compress.precision`.

Config keys of a stage's ``quantize:`` mapping (checked by :class:`QuantizeTechnique`):

    weight_bits         2..8 or 16; default 8
    activation_bits     2..8 or 16, or null (inputs stay float); default 8
    method              lsq | minmax | moving_average; default lsq
    averaging_constant  moving_average only, in (0, 1]; default 0.01
    first_last_bits     weight and input bits of the first and last conv/linear/embedding layers; default 8;
                        null = like the others
    layer_bits          {pattern: bits, or {weight: bits, activation: bits}}; first match wins
    layers, exclude     fnmatch patterns of conv/linear/embedding layer names; default ["*"] and []
    scale               per_channel | per_tensor: step sizes of weights (inputs: always per tensor); default per_channel
    scale_bits          32 | 16 | 8: stored width of every step size (see above); default 32
    bias_bits           8 | 16 | 32: conv/linear biases quantized to that width; 32 (default) = left in float
    attention_bits      2..8 or 16: quantize every attention operand point; null (default) = none
    other_ops           fp32 | fp16 | bf16: the ops outside dot products run in that format; default fp32
    unit                fraction | epoch: unit of freeze_observers and freeze_bn; default fraction
    freeze_observers    stage position from which step sizes are fixed; null = never (default)
    freeze_bn           stage position from which BatchNorm statistics are frozen; null = never (default)
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from torch.nn.utils import parametrize

from .base import Settings, Technique, check_bits, find_parametrization, first_and_last, first_match, \
    put_parametrization, register_technique, select_layers, stage_epochs_at
from .precision import FORMATS, set_other_ops

METHODS = ("lsq", "minmax", "moving_average")
#: Granularities of weight step sizes (``scale``).
SCALES = ("per_channel", "per_tensor")
#: Widths a step size may be stored in (``scale_bits``): fp32, IEEE half, a power of two (8-bit exponent).
SCALE_BITS = (32, 16, 8)
#: How a bias's step size is set, whatever the stage's ``method``: from its range (max |b| / Q_P) at every training
#: forward. A learned (LSQ) step on a few values starting near 1e-5 grew to zero most of a classifier's 10 biases.
BIAS_METHOD = "minmax"
#: Widths of a quantized bias (``bias_bits``); 32 leaves it in float.
BIAS_BITS = (8, 16, 32)
#: Suffix of the name under which a model registers an attention operand point (an ``nn.Identity``).
OPERAND_SUFFIX = "_operand"
#: Exponent range of a power-of-two step size stored in 8 bits.
_EXPONENTS = (-128, 127)

#: Smallest step size: keeps all-zero channels (fully pruned) and constant inputs well defined.
_MIN_SCALE = torch.finfo(torch.float32).eps

#: Clipping ratios of max|x| tried when initialising a step size by least squared error.
_INIT_RATIOS = torch.linspace(0.3, 1.0, 15).tolist()


def signed_range(bits: int) -> tuple[int, int]:
    """Integer range of symmetric signed quantization: 0 is exact and the grid is closed under negation."""
    top = 2 ** (bits - 1) - 1
    return -top, top


def unsigned_range(bits: int) -> tuple[int, int]:
    """Integer range of unsigned quantization with zero-point 0."""
    return 0, 2 ** bits - 1


def round_to_grid(x: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """``step · clamp(round(x / step), qmin, qmax)`` (``step`` broadcasts against ``x``)."""
    return torch.round(x / step).clamp_(qmin, qmax) * step


def least_error_scale(x: torch.Tensor, qmin: int, qmax: int, *, per_channel: bool) -> torch.Tensor:
    """The step size (per output channel, or one) among clipped max-scalings with least squared error."""
    x = x.detach().float()
    rows = x.flatten(1) if per_channel else x.reshape(1, -1)
    peak = rows.abs().amax(1).clamp_min(_MIN_SCALE)
    best, best_err = None, None
    for ratio in _INIT_RATIOS:
        scale = (peak * ratio / qmax).clamp_min(_MIN_SCALE)
        step = scale[:, None]
        # round_to_grid(rows, step) - rows, in place in one temporary: the search of a WRN-28-10 took seconds
        err = torch.div(rows, step).round_().clamp_(qmin, qmax).mul_(step).sub_(rows).square_().sum(1)
        if best is None:
            best, best_err = scale, err
        else:
            better = err < best_err
            best, best_err = torch.where(better, scale, best), torch.where(better, err, best_err)
    return best


def stored_scale(scale: torch.Tensor, bits: int) -> torch.Tensor:
    """``scale`` as stored in ``bits`` bits (:data:`SCALE_BITS`), with the straight-through gradient: 32 as it is,
    16 rounded to IEEE half, 8 to the nearest power of two with an exponent in [−128, 127]."""
    if bits == 32:
        return scale
    with torch.no_grad():
        if bits == 16:
            stored = scale.clamp(2.0 ** -24, torch.finfo(torch.float16).max).half().to(scale.dtype)
        else:
            stored = torch.exp2(torch.log2(scale).round().clamp(*_EXPONENTS))
    return stored + (scale - scale.detach())  # the stored value, exactly; the gradient of the scale


def _step_view(scale: torch.Tensor, x: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """``scale`` shaped to broadcast against ``x`` (one step per output channel, or one)."""
    return scale.view(-1, *[1] * (x.dim() - 1)) if per_channel else scale


class _FakeQuantize(torch.autograd.Function):
    """``scale · clamp(round(x / scale), qmin, qmax)`` with the straight-through and LSQ gradients.

    The input gets the straight-through gradient where ``round(x / scale)`` is inside the range; a
    scale that requires grad gets LSQ's (Esser et al. 2020, eq. 3: ``round(x/s) − x/s`` inside the
    range, the clamped integer outside) times ``grad_factor``. These are exactly the gradients of
    torch's fused ``_fake_quantize_learnable_per_{channel,tensor}_affine`` (a test checks it), but
    torch's fused CPU fake-quantization kernels are about 15x slower than these few vectorised ops
    (11 ms vs 0.8 ms forward on a 512x512x3x3 weight, one thread) and the learnable ones also
    differentiate the zero-point, which is always 0 here.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor, per_channel: bool, qmin: int, qmax: int,
                grad_factor: float) -> torch.Tensor:
        # The step size itself is saved, not a view of it: a view made here (in no_grad mode) breaks
        # autograd once the next call of the same quantizer (a layer used twice in one forward) updates it.
        ctx.save_for_backward(x, scale)
        ctx.per_channel, ctx.qmin, ctx.qmax, ctx.grad_factor = per_channel, qmin, qmax, grad_factor
        return round_to_grid(x, _step_view(scale, x, per_channel), qmin, qmax).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, scale = ctx.saved_tensors
        step = _step_view(scale, x, ctx.per_channel)
        scaled = x / step
        grad = grad.to(scaled.dtype)  # under autocast x may be bf16 while the step size is fp32
        grad_x = torch.ops.aten.hardtanh_backward(grad, scaled, ctx.qmin - 0.5, ctx.qmax + 0.5)
        grad_scale = None
        if ctx.needs_input_grad[1]:
            dims = tuple(range(1, x.dim())) if ctx.per_channel else tuple(range(x.dim()))
            integers = torch.round(scaled).clamp_(ctx.qmin, ctx.qmax)
            # sum over the elements of grad · (q − x/s · inside) = Σ grad·q − Σ grad_x·x/s
            grad_scale = ((grad * integers).sum(dims, dtype=torch.float32)
                          - (grad_x * scaled).sum(dims, dtype=torch.float32)) * ctx.grad_factor
        return grad_x.to(x.dtype), None if grad_scale is None else grad_scale.view(-1), None, None, None, None


class _FakeQuantizer(nn.Module):
    """Shared state: bit width (declared to the scorer), method, step size and the frozen flag.

    The step size is a Parameter for LSQ and a buffer for observers; ``frozen`` is a buffer (so a
    checkpoint remembers it) mirrored in a Python bool so the forward pass never synchronises on it.
    """

    kind = "quantizer"

    def __init__(self, bits: int, method: str, scale: torch.Tensor, scale_bits: int = 32):
        super().__init__()
        self.micronet_bits = bits
        self.micronet_scale_bits = scale_bits
        self.method = method
        if method == "lsq":
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        self.register_buffer("frozen", torch.tensor(False))
        self._frozen = False

    def freeze(self, frozen: bool = True) -> None:
        """Fix the step size (observers stop updating, LSQ stops learning it) or release it."""
        self.frozen.fill_(frozen)
        self._frozen = frozen

    @property
    def is_frozen(self) -> bool:
        """True when the step size is fixed."""
        return self._frozen

    def _learned_scale(self) -> torch.Tensor:
        # As torch.ao's _LearnableFakeQuantize: keep the step positive, through .data so that the clamp does
        # not invalidate a backward still pending from an earlier call in the same forward (shared layers).
        self.scale.data.clamp_(min=_MIN_SCALE)
        return self.scale.detach() if self._frozen else self.scale

    def _stored(self, scale: torch.Tensor) -> torch.Tensor:
        """The step size as stored (``micronet_scale_bits``)."""
        return stored_scale(scale, self.micronet_scale_bits)

    def stored_step(self) -> torch.Tensor:
        """The step size the last forward computed with (a frozen quantizer's always): ``scale`` kept positive and
        rounded to its stored width, detached."""
        return self._stored(self.scale.detach().clamp_min(_MIN_SCALE))

    def finalize(self) -> None:
        """Freeze the step size and write it back rounded to its stored width, so that the saved ``scale`` is
        exactly the step the forward uses (the rounding is idempotent: the forward's result does not change)."""
        self.freeze()
        with torch.no_grad():
            self.scale.copy_(self.stored_step())

    def _sync_from_buffers(self) -> None:
        self._frozen = bool(self.frozen)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._sync_from_buffers()

    def describe(self) -> dict[str, Any]:
        """The settings that rebuild this quantizer (see ``compress.compression_state``); ``scale_bits`` only where
        it is not the default, so that descriptions written before it existed still match."""
        return _description(self.kind, self.micronet_bits, self.method, scale_bits=self.micronet_scale_bits)

    def extra_repr(self) -> str:
        return f"bits={self.micronet_bits}, method={self.method}, scale_bits={self.micronet_scale_bits}"


def _description(kind: str, bits: int, method: str, *, scale_bits: int = 32, per_tensor: bool = False,
                 **settings: Any) -> dict[str, Any]:
    """A quantizer's description: kind, bits, method, the given ``settings``, and the optional keys where they are
    not the default (``scale_bits`` 32, ``scale`` per_channel)."""
    description = {"kind": kind, "bits": bits, "method": method, **settings}
    if scale_bits != 32:
        description["scale_bits"] = scale_bits
    if per_tensor:
        description["scale"] = "per_tensor"
    return description


class WeightQuantizer(_FakeQuantizer):
    """Parametrization: symmetric fake quantization of a weight, one step size per output channel (or per tensor)."""

    kind = "weight_quantizer"

    def __init__(self, weight: torch.Tensor, bits: int, method: str, *, per_channel: bool = True,
                 scale_bits: int = 32, initialise: bool = True):
        qmin, qmax = signed_range(bits)
        if method == "lsq" and initialise and not weight.is_meta:
            scale = least_error_scale(weight, qmin, qmax, per_channel=per_channel)
        else:  # observers set it from the weights on every training forward (a meta weight has no values)
            scale = torch.ones(weight.shape[0] if per_channel else 1, device=weight.device)
        super().__init__(bits, method, scale, scale_bits)
        self.qmin, self.qmax, self.per_channel = qmin, qmax, per_channel
        self.micronet_scale_count = weight.shape[0] if per_channel else 1
        self.micronet_scale_granularity = "channel" if per_channel else "tensor"
        self.grad_factor = 1.0 / math.sqrt((weight[0].numel() if per_channel else weight.numel()) * self.qmax)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.method == "lsq":
            scale = self._learned_scale()
        elif self._frozen:
            scale = self.scale
        else:  # the observer is the current weights' range
            scale = self.observe(weight)
        return _FakeQuantize.apply(weight, self._stored(scale), self.per_channel, self.qmin, self.qmax,
                                   self.grad_factor)

    def observe(self, weight: torch.Tensor) -> torch.Tensor:
        """Set the step sizes from ``weight``'s max |w| per channel (or over the tensor) (observer methods); return a
        copy of them.

        The forward pass quantizes with the copy: the buffer may change again before its backward runs.
        """
        with torch.no_grad():
            weight = weight.detach()
            peak = weight.flatten(1).abs().amax(1) if self.per_channel else weight.abs().amax().view(1)
            scale = peak.div_(self.qmax).clamp_(min=_MIN_SCALE)
            self.scale.copy_(scale)
        return scale

    def describe(self) -> dict[str, Any]:
        return _description(self.kind, self.micronet_bits, self.method, scale_bits=self.micronet_scale_bits,
                            per_tensor=not self.per_channel)

    @classmethod
    def check_description(cls, description: Mapping[str, Any], weight: torch.Tensor) -> None:
        """Refuse (``ValueError``) a description :meth:`rebuild` must not build: other keys than
        :meth:`describe`'s, a bit width outside :data:`~compress.base.ALLOWED_BITS`, an unknown method or scale."""
        _check_settings(description, ("kind", "bits", "method"), "weight quantizer", optional=("scale_bits", "scale"))

    @classmethod
    def rebuild(cls, description: Mapping[str, Any], weight: torch.Tensor) -> WeightQuantizer:
        """A quantizer shaped for ``weight``; its step sizes come from ``load_state_dict``."""
        cls.check_description(description, weight)
        return cls(weight, description["bits"], description["method"],
                   per_channel=description.get("scale", "per_channel") == "per_channel",
                   scale_bits=description.get("scale_bits", 32), initialise=False)


class BiasQuantizer(WeightQuantizer):
    """Parametrization: symmetric fake quantization of a conv/linear bias with one step size."""

    kind = "bias_quantizer"

    def __init__(self, bias: torch.Tensor, bits: int, method: str, *, scale_bits: int = 32,
                 initialise: bool = True):
        super().__init__(bias, bits, method, per_channel=False, scale_bits=scale_bits, initialise=initialise)

    def describe(self) -> dict[str, Any]:
        return _description(self.kind, self.micronet_bits, self.method, scale_bits=self.micronet_scale_bits)

    @classmethod
    def check_description(cls, description: Mapping[str, Any], weight: torch.Tensor) -> None:
        _check_settings(description, ("kind", "bits", "method"), "bias quantizer", optional=("scale_bits",))

    @classmethod
    def rebuild(cls, description: Mapping[str, Any], weight: torch.Tensor) -> BiasQuantizer:
        """A quantizer for the bias ``weight``; its step size comes from ``load_state_dict``."""
        cls.check_description(description, weight)
        return cls(weight, description["bits"], description["method"], scale_bits=description.get("scale_bits", 32),
                   initialise=False)


class ActivationQuantizer(_FakeQuantizer):
    """Per-tensor fake quantization of a layer's input, unsigned when calibrated on non-negative data."""

    kind = "input_quantizer"

    def __init__(self, bits: int, method: str, averaging_constant: float = 0.01, scale_bits: int = 32):
        super().__init__(bits, method, torch.ones(1), scale_bits)
        self.micronet_scale_count = 1
        self.averaging_constant = averaging_constant
        self.register_buffer("calibrated", torch.tensor(False))
        self.register_buffer("signed", torch.tensor(True))
        if method != "lsq":
            self.register_buffer("min_val", torch.zeros(1))
            self.register_buffer("max_val", torch.zeros(1))
        self._sync_from_buffers()

    def _sync_from_buffers(self) -> None:
        super()._sync_from_buffers()
        self._calibrated = bool(self.calibrated)
        self.qmin, self.qmax = signed_range(self.micronet_bits) if bool(self.signed) \
            else unsigned_range(self.micronet_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._calibrated:
            if not self.training:
                raise RuntimeError("an activation quantizer has not seen a training batch yet: train at least one "
                                   "step with it (or load a checkpoint) before evaluating")
            self._calibrate(x)
        if self.method == "lsq":
            scale = self._learned_scale()
        elif self.training and not self._frozen:
            scale = self._observe(x)
        else:
            scale = self.scale
        grad_factor = 1.0 / math.sqrt(x[0].numel() * self.qmax)
        return _FakeQuantize.apply(x, self._stored(scale), False, self.qmin, self.qmax, grad_factor)

    def _calibrate(self, x: torch.Tensor) -> None:
        """First training batch: choose signed/unsigned and initialise the step size.

        Under torch.distributed every process sees a different batch: they agree on the range (min of
        minima, max of maxima) and average the LSQ step, so all replicas start identical.
        """
        with torch.no_grad():
            low, high = torch.aminmax(x.detach().float())
            distributed = dist.is_available() and dist.is_initialized()
            if distributed:
                dist.all_reduce(low, op=dist.ReduceOp.MIN)
                dist.all_reduce(high, op=dist.ReduceOp.MAX)
            self.signed.fill_(bool(low < 0))
            self.calibrated.fill_(True)
            self._sync_from_buffers()
            if self.method == "lsq":
                self.scale.copy_(least_error_scale(x, self.qmin, self.qmax, per_channel=False))
                if distributed:
                    dist.all_reduce(self.scale.data)
                    self.scale.data /= dist.get_world_size()
            else:
                self.min_val.copy_(low)
                self.max_val.copy_(high)
                self._set_observed_scale()

    def _observe(self, x: torch.Tensor) -> torch.Tensor:
        """Update the running range with ``x``; return a copy of the new step size (see ``observe``)."""
        with torch.no_grad():
            low, high = torch.aminmax(x.detach().float())
            if self.method == "minmax":
                torch.minimum(self.min_val, low, out=self.min_val)
                torch.maximum(self.max_val, high, out=self.max_val)
            else:
                self.min_val.lerp_(low.view(1), self.averaging_constant)
                self.max_val.lerp_(high.view(1), self.averaging_constant)
            return self._set_observed_scale()

    def _set_observed_scale(self) -> torch.Tensor:
        peak = torch.maximum(-self.min_val, self.max_val) if self.qmin < 0 else self.max_val
        scale = (peak / self.qmax).clamp_(min=_MIN_SCALE)
        self.scale.copy_(scale)
        return scale

    def describe(self) -> dict[str, Any]:
        return _description(self.kind, self.micronet_bits, self.method, scale_bits=self.micronet_scale_bits,
                            averaging_constant=self.averaging_constant)

    @classmethod
    def check_description(cls, description: Mapping[str, Any]) -> None:
        """Refuse (``ValueError``) a description :meth:`rebuild` must not build: other keys than :meth:`describe`'s,
        a bit width outside :data:`~compress.base.ALLOWED_BITS`, an unknown method, an averaging constant
        outside (0, 1]."""
        _check_settings(description, ("kind", "bits", "method", "averaging_constant"), "input quantizer",
                        optional=("scale_bits",))
        constant = description["averaging_constant"]
        if isinstance(constant, bool) or not isinstance(constant, (int, float)) or not 0 < constant <= 1:
            raise ValueError(f"input quantizer averaging_constant={constant!r}: expected a number in (0, 1]")

    @classmethod
    def rebuild(cls, description: Mapping[str, Any]) -> ActivationQuantizer:
        """An uncalibrated quantizer; its state comes from ``load_state_dict``."""
        cls.check_description(description)
        return cls(description["bits"], description["method"], description["averaging_constant"],
                   description.get("scale_bits", 32))


def _check_settings(description: Mapping[str, Any], keys: tuple[str, ...], what: str,
                    optional: tuple[str, ...] = ()) -> None:
    """A quantizer description has ``keys`` and maybe some of the ``optional`` ones, an allowed bit width, a known
    method, and a known scale width and granularity."""
    if not set(keys) <= set(description) <= set(keys) | set(optional):
        extra = f" (and optionally {', '.join(optional)})" if optional else ""
        raise ValueError(f"{what} settings {sorted(description)}: expected exactly {', '.join(keys)}{extra}")
    check_bits(description["bits"], f"{what} bits")
    if description["method"] not in METHODS:
        raise ValueError(f"{what} method={description['method']!r}: expected one of {', '.join(METHODS)}")
    if description.get("scale_bits", 32) not in SCALE_BITS or isinstance(description.get("scale_bits"), bool):
        raise ValueError(f"{what} scale_bits={description['scale_bits']!r}: expected one of "
                         f"{', '.join(map(str, SCALE_BITS))}")
    if description.get("scale", "per_channel") not in SCALES:
        raise ValueError(f"{what} scale={description['scale']!r}: expected one of {', '.join(SCALES)}")


def _quantize_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Forward pre-hook: the layer consumes its quantized input (called through ``__call__``, so hooked)."""
    return (module.input_quantizer(args[0]), *args[1:])


def put_input_quantizer(module: nn.Module, quantizer: ActivationQuantizer) -> None:
    """Give ``module`` an input quantizer (replacing an existing one; the pre-hook is registered once)."""
    if "input_quantizer" not in module._modules:
        module.register_forward_pre_hook(_quantize_input)
    module.input_quantizer = quantizer


def bias_quantizer(module: nn.Module) -> BiasQuantizer | None:
    """The quantizer parametrizing ``module.bias``, or None."""
    if not parametrize.is_parametrized(module, "bias"):
        return None
    return next((p for p in module.parametrizations["bias"] if isinstance(p, BiasQuantizer)), None)


def put_bias_quantizer(module: nn.Module, quantizer: BiasQuantizer) -> None:
    """Quantize ``module.bias`` with ``quantizer`` (replacing the one there)."""
    if bias_quantizer(module) is not None:
        parametrize.remove_parametrizations(module, "bias", leave_parametrized=False)
    parametrize.register_parametrization(module, "bias", quantizer)


def operand_points(model: nn.Module) -> dict[str, nn.Module]:
    """The attention operand points of ``model`` by qualified name: the modules it registers under a name ending in
    :data:`OPERAND_SUFFIX`, an ``nn.Identity`` or the activation quantizer put in its place."""
    return {name: module for name, module in model.named_modules() if name.rpartition(".")[2].endswith(OPERAND_SUFFIX)
            and isinstance(module, (nn.Identity, ActivationQuantizer))}


def put_operand_quantizer(model: nn.Module, name: str, quantizer: ActivationQuantizer) -> None:
    """Put ``quantizer`` at the operand point ``name`` of ``model`` (in place of its ``nn.Identity``)."""
    parent, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(parent), attribute, quantizer)


#: Attribute of a BatchNorm whose statistics a QAT stage may freeze (set together with the pre-hook).
_FROZEN_STATS = "compress_frozen_stats"


def _running_stats_when_frozen(module: nn.Module, args: tuple[Any, ...]) -> None:
    """Forward pre-hook on BatchNorm: with frozen statistics, normalise as in evaluation."""
    if getattr(module, _FROZEN_STATS):
        module.training = False


def set_batch_norm_frozen(module: nn.modules.batchnorm._BatchNorm, frozen: bool) -> None:
    """Freeze (or release) a BatchNorm's running statistics; it then normalises with them in training too.

    A training-only mode: not part of the saved structure (inference always uses the running statistics).
    """
    if not hasattr(module, _FROZEN_STATS):
        module.register_forward_pre_hook(_running_stats_when_frozen)
    setattr(module, _FROZEN_STATS, frozen)


@register_technique
class QuantizeTechnique(Technique):
    """Quantization-aware training of a stage; see the module docstring for its config keys."""

    name = "quantize"
    order = 20
    positions = ("freeze_observers", "freeze_bn")

    def __init__(self, cfg: Mapping[str, Any] | None, *, stage_epochs: int, where: str):
        s = Settings(cfg, where)
        self._settings = s
        self.weight_bits = s.bits("weight_bits", 8)
        self.activation_bits = s.bits("activation_bits", 8, optional=True)
        self.method = s.choice("method", "lsq", METHODS)
        self.averaging_constant = s.number("averaging_constant", 0.01, low=0.0, high=1.0, low_open=True)
        self.first_last_bits = s.bits("first_last_bits", 8, optional=True)
        self.layer_bits = {pattern: self._read_layer_bits(s, pattern, value)
                           for pattern, value in s.mapping("layer_bits").items()}
        self.include = s.patterns("layers", ["*"])
        self.exclude = s.patterns("exclude", [])
        self.per_channel = s.choice("scale", "per_channel", SCALES) == "per_channel"
        self.scale_bits = _width(s, "scale_bits", 32, SCALE_BITS)
        self.bias_bits = _width(s, "bias_bits", 32, BIAS_BITS)
        self.attention_bits = s.bits("attention_bits", None, optional=True)
        self.other_ops = s.choice("other_ops", "fp32", tuple(FORMATS))
        unit = s.choice("unit", "fraction", ("fraction", "epoch"))
        limit = 1.0 if unit == "fraction" else float(stage_epochs)
        freeze_observers = s.number("freeze_observers", None, low=0.0, high=limit, optional=True)
        freeze_bn = s.number("freeze_bn", None, low=0.0, high=limit, optional=True)
        s.finish()
        #: Epochs (within the stage) from which step sizes / BatchNorm statistics are frozen; None = never.
        self.freeze_observers_epoch = None if freeze_observers is None \
            else stage_epochs_at(freeze_observers, unit, stage_epochs)
        self.freeze_bn_epoch = None if freeze_bn is None else stage_epochs_at(freeze_bn, unit, stage_epochs)
        self._quantizers: list[_FakeQuantizer] = []

    def _read_layer_bits(self, s: Settings, pattern: str, value: Any) -> tuple[int, int | None]:
        """(weight bits, input bits) of a ``layer_bits`` entry: one width for both, or a mapping."""
        where = f"{s.where}.layer_bits.{pattern}"
        if isinstance(value, Mapping):
            entry = Settings(value, where)
            pair = entry.bits("weight", self.weight_bits), entry.bits("activation", self.activation_bits,
                                                                      optional=True)
            entry.finish()
            return pair
        bits = check_bits(value, where)
        return bits, bits

    def final_bits(self, model: nn.Module) -> dict[str, tuple[int, int | None]]:
        """(weight bits, input bits; None: float input) of every layer of ``model`` this stage quantizes."""
        return {name: bits for name, _, bits in self._targets(model)}

    def _targets(self, model: nn.Module) -> Iterator[tuple[str, nn.Module, tuple[int, int | None]]]:
        """(name, module, (weight bits, input bits)) of every layer this stage quantizes."""
        first_last = first_and_last(model)
        for name, module in select_layers(model, self._settings, include=self.include, exclude=self.exclude,
                                          per_layer=self.layer_bits).items():
            explicit, bits = first_match(name, self.layer_bits)
            if not explicit:
                bits = (self.first_last_bits, self.first_last_bits) \
                    if name in first_last and self.first_last_bits is not None \
                    else (self.weight_bits, self.activation_bits)
            yield name, module, bits

    def attach(self, model: nn.Module) -> None:
        self._quantizers = []
        for _, module, (weight_bits, input_bits) in self._targets(model):
            self._quantizers.append(self._weight_quantizer(module, weight_bits))
            if self.bias_bits != 32 and isinstance(getattr(module, "bias", None), torch.Tensor):
                self._quantizers.append(self._bias_quantizer(module))
            if input_bits is None or isinstance(module, nn.Embedding):  # an embedding's input is token ids
                continue
            present = module._modules.get("input_quantizer")
            module_input = self._activation_quantizer(input_bits, present, module.weight.device)
            if module_input is not present:
                put_input_quantizer(module, module_input)
            self._quantizers.append(module_input)
        self._quantize_operands(model)
        set_other_ops(model, self.other_ops)

    def _weight_quantizer(self, module: nn.Module, bits: int) -> WeightQuantizer:
        """The weight quantizer of ``module`` at ``bits``: the one there if it has these settings, else a new one."""
        current = find_parametrization(module, WeightQuantizer)
        if current is None or current.describe() != _description(WeightQuantizer.kind, bits, self.method,
                                                                  scale_bits=self.scale_bits,
                                                                  per_tensor=not self.per_channel):
            current = WeightQuantizer(module.weight.detach(), bits, self.method, per_channel=self.per_channel,
                                      scale_bits=self.scale_bits)
            put_parametrization(module, current)
        return current

    def _bias_quantizer(self, module: nn.Module) -> BiasQuantizer:
        """The bias quantizer of ``module``: the one there if it has this stage's settings, else a new one."""
        current = bias_quantizer(module)
        if current is None or current.describe() != _description(BiasQuantizer.kind, self.bias_bits, BIAS_METHOD,
                                                                  scale_bits=self.scale_bits):
            current = BiasQuantizer(module.bias.detach(), self.bias_bits, BIAS_METHOD, scale_bits=self.scale_bits)
            put_bias_quantizer(module, current)
        return current

    def _activation_quantizer(self, bits: int, present: nn.Module | None, device: torch.device) -> ActivationQuantizer:
        """``present`` if it is an activation quantizer with this stage's settings at ``bits``, else a new one."""
        wanted = ActivationQuantizer(bits, self.method, self.averaging_constant, self.scale_bits)
        if isinstance(present, ActivationQuantizer) and present.describe() == wanted.describe():
            return present
        return wanted.to(device)

    def _quantize_operands(self, model: nn.Module) -> None:
        """With ``attention_bits``: an activation quantizer at every attention operand point of ``model``."""
        if self.attention_bits is None:
            return
        points = operand_points(model)
        if not points:
            raise self._settings.error("attention_bits", self.attention_bits, "null for a model without attention "
                                       f"operand points (nn.Identity modules named *{OPERAND_SUFFIX})")
        device = next(model.parameters()).device
        for name, present in points.items():
            quantizer = self._activation_quantizer(self.attention_bits, present, device)
            if quantizer is not present:
                put_operand_quantizer(model, name, quantizer)
            self._quantizers.append(quantizer)

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        # Both states are functions of the stage's epoch, so resuming mid-stage restores them, and a
        # later QAT stage learns its step sizes again unless it freezes them itself.
        freeze_observers = self.freeze_observers_epoch is not None and epoch >= self.freeze_observers_epoch
        for quantizer in self._quantizers:
            quantizer.freeze(freeze_observers)
        _freeze_batch_norms(model, self.freeze_bn_epoch is not None and epoch >= self.freeze_bn_epoch)

    def on_stage_end(self, model: nn.Module) -> None:
        _freeze_batch_norms(model, False)  # frozen statistics are a training mode of this stage only


def _width(s: Settings, key: str, default: int, widths: tuple[int, ...]) -> int:
    """A stored width among ``widths``."""
    value = s.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value not in widths:
        raise s.error(key, value, "one of " + ", ".join(map(str, widths)))
    return value


def _freeze_batch_norms(model: nn.Module, frozen: bool) -> None:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (frozen or hasattr(module, _FROZEN_STATS)):
            set_batch_norm_frozen(module, frozen)
