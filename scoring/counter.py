"""The traced MicroNet counter: runs a model on real inputs and counts what executes.

Every aten op is seen through a :class:`~torch.utils._python_dispatch.TorchDispatchMode`; module hooks
keep a stack of module names, so each op is attributed to the innermost module that ran it. Per tensor
the counter tracks:

* whether it is *static* (derived only from parameters, buffers and constants): ops on static tensors are
  free (they would be precomputed at export: masks times weights, weight fake-quantization, batch-norm
  folding arithmetic), and a static tensor consumed by a real op is a stored value (a parameter);
* its bit tag, set by quantizer modules (:mod:`scoring.protocol`) and kept through data movement;
* the mask a module declared on it (``micronet_mask_bits``), kept through static ops of the same size
  (a weight quantizer, views) up to the conv/linear that stores it;
* the op that produced it, so that a batch norm whose input comes from a conv/linear folds into it (decided
  after tracing: a fold stands only if no other use of that stored weight needs it unscaled);
* the parameters it derives from, so each stored value is counted once over all batches.

Costs come from the rules table (:mod:`scoring.rules`); an op with no rule raises
:class:`~scoring.rules.UnsupportedOpError`. Widths are resolved after tracing, once the freebie is known.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn
from torch.nn.utils.parametrize import ParametrizationList, type_before_parametrizations
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils.weak import WeakIdKeyDictionary

from scoring.protocol import declared_mask_bits, is_quantizer, quantizer_bits, quantizer_scales
from scoring.rules import (ADAPTIVE_POOL, ATTENTION, BATCH_NORM, CONV, ELEMENTWISE, FREE, MATMUL, NORM, POOL, REDUCE,
                           RULES, SOFTMAX, VIEW, Rule, UnsupportedOpError, attention_counts, dot_counts, norm_counts,
                           project_rules_note, rule_key, score, score_terms, weight_storage_bits)

#: Width of an unquantized tensor with and without the freebie.
FULL_BITS = 32
FREEBIE_BITS = 16
#: Name of the model's own module in the per-layer table.
MODEL_LAYER = "(model)"


@dataclass(frozen=True)
class _Width:
    """Width of an op's inputs before the freebie is known: the widest tag and whether any is untagged."""

    tagged: int = 0
    untagged: bool = False

    def __or__(self, other: _Width) -> _Width:
        return _Width(max(self.tagged, other.tagged), self.untagged or other.untagged)

    def bits(self, default: int) -> int:
        return max(self.tagged, default if self.untagged else 0)


_NO_INPUT = _Width()


@dataclass
class _Producer:
    """A conv/linear output (or a channel concatenation of them), for folding a batch norm into it once."""

    layer: str
    channels: int
    has_bias: bool
    #: The parameters its weight derives from (empty: a weight computed at run time, which absorbs no scale).
    weight: frozenset[int] = frozenset()
    parts: tuple[_Producer, ...] = ()
    #: The batch norm (by its parameters) tentatively folded into this output, None if none.
    batch_norm: frozenset[int] | None = None
    #: Read by a batch norm counted unfolded over the same channels: its affine can absorb a scale.
    absorbed: bool = False

    @property
    def folded(self) -> bool:
        """Whether a batch norm has (tentatively) folded into this output."""
        return self.batch_norm is not None

    def weights(self) -> list[frozenset[int]]:
        """The stored weights (by the parameters they derive from) whose scale a folded batch norm changes."""
        if self.parts:
            return [weight for part in self.parts for weight in part.weights()]
        return [self.weight]

    def unbiased_channels(self) -> int:
        """Channels without a bias of their own: folding a batch norm gives them one."""
        if self.parts:
            return sum(part.unbiased_channels() for part in self.parts)
        return 0 if self.has_bias else self.channels

    def fold(self, batch_norm: frozenset[int]) -> None:
        self.batch_norm = batch_norm
        for part in self.parts:
            part.fold(batch_norm)

    def absorb(self) -> None:
        self.absorbed = True
        for part in self.parts:
            part.absorb()

    def holds(self, batch_norm: frozenset[int]) -> bool:
        """Whether this output can use a weight that absorbed ``batch_norm``'s scale: it was folded with that
        batch norm, or an unfolded batch norm after it absorbs the inverse scale in its own affine."""
        return self.batch_norm == batch_norm or self.absorbed


@dataclass
class _NormCall:
    """One batch norm call, counted folded or unfolded once the trace is complete (see ``_Tracer.resolve_folds``).

    ``producer`` is the output it tentatively folds into (None: counted unfolded); ``unbiased`` the channels a
    fold gives a bias; ``width`` and ``scale_bits`` what it costs unfolded.
    """

    layer: _Layer
    params: _Info
    elements: int
    channels: int
    width: _Width
    scale_bits: int | None
    producer: _Producer | None = None
    unbiased: int = 0


def _concat_producer(tensors: list, dim: int, infos: list[_Info]) -> _Producer | None:
    """The producer of a channel concatenation of unfolded conv/linear outputs (mixed convs), if it is one."""
    producers = [info.producer for info in infos]
    if not tensors or dim % tensors[0].dim() != 1 or any(p is None or p.folded for p in producers):
        return None
    return _Producer("+".join(p.layer for p in producers), sum(p.channels for p in producers),
                     all(p.has_bias for p in producers), parts=tuple(producers))


@dataclass(frozen=True, eq=False)
class _Mask:
    """A declared mask (``micronet_mask_bits``) of ``bits`` bits over a tensor of which it keeps ``kept``."""

    bits: int
    kept: torch.Tensor  # bool, where the mask module lets a value through (see _kept_by)

    def covers(self, weight: torch.Tensor, nonzeros: int) -> bool:
        """True when every nonzero of ``weight`` lies where the mask keeps a value.

        ``weight`` is compared in the mask's layout, or transposed (a linear layer consumes ``weight.t()``):
        either is a fixed layout the weight can be stored in.
        """
        if weight.numel() != self.kept.numel() or nonzeros > int(self.kept.count_nonzero()):
            return False
        layouts = [weight, weight.t()] if weight.dim() == 2 else [weight]
        return any(not bool((w.reshape(self.kept.shape).ne(0) & ~self.kept).any()) for w in layouts)


def _kept_by(module: nn.Module, args: Any, output: Any) -> torch.Tensor | None:
    """Where a module declaring ``micronet_mask_bits`` keeps values: the nonzeros of its forward on ones.

    Not the nonzeros of its output: a zero of the input inside a kept block is still a stored value, else
    a mask declaring one block over a weight with unstructured zeros would store them without mask bits.
    None (the declaration is not used) unless the module maps one tensor to a tensor of the same shape.
    """
    if not (len(args) == 1 and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor)
            and args[0].shape == output.shape):
        return None
    pattern = module.forward(torch.ones_like(args[0]))  # forward, not __call__: no hooks, no recursion
    return pattern.ne(0) if isinstance(pattern, torch.Tensor) and pattern.shape == output.shape else None


@dataclass(frozen=True)
class _Info:
    """What the counter knows about one tensor (see the module docstring)."""

    static: bool
    bits: int | None = None
    producer: _Producer | None = None
    roots: frozenset[int] = frozenset()
    mask: _Mask | None = None

    @property
    def constant(self) -> bool:
        """Static and derived from no parameter or buffer: a literal, not a stored value or an operand width."""
        return self.static and not self.roots

    def width(self) -> _Width:
        """This tensor's width as an operand: its tag, or untagged."""
        return _Width(self.bits) if self.bits is not None else _Width(0, True)


_CONSTANT = _Info(static=True)


@dataclass(frozen=True)
class _Stored:
    """``numel`` values stored for inference at ``bits`` (None: unquantized); a weight also has ``nonzeros``."""

    numel: int
    bits: int | None
    nonzeros: int | None = None  # None: stored dense (biases, scales)
    mask_bits: int | None = None  # a declared mask (None: 1 bit per element) keeping ``kept`` values
    kept: int | None = None

    def total_bits(self, default: int) -> int:
        bits = self.bits if self.bits is not None else default
        if self.nonzeros is None:
            return self.numel * bits
        return weight_storage_bits(self.numel, self.nonzeros, bits, self.mask_bits, self.kept)


@dataclass
class _Layer:
    """Counts attributed to one module, widths unresolved."""

    name: str
    type: str
    mults: Counter = field(default_factory=Counter)  # _Width -> multiplies over all batches
    adds: int = 0
    stored: list[_Stored] = field(default_factory=list)
    nonzero_weights: int = 0
    weights: int = 0
    weight_width: _Width | None = None
    input_width: _Width | None = None
    notes: list[str] = field(default_factory=list)


def _tensors(values: Iterable[Any]) -> Iterator[torch.Tensor]:
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from _tensors(value)


def _stored_view(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor without broadcast (stride-0) dimensions: what is actually stored."""
    if 0 not in tensor.stride():
        return tensor
    return tensor[tuple(slice(0, 1) if s == 0 else slice(None) for s in tensor.stride())]


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


def _pool_windows(key: str, arguments: Mapping[str, Any], out: torch.Tensor) -> tuple[int, int]:
    """(spatial dims, sum of the in-bounds window sizes over the outputs of one plane) of a fixed-window pool."""
    dims = 3 if "3d" in key else 2
    kernel = _per_dim(arguments["kernel_size"], dims)
    stride = _per_dim(arguments["stride"], dims) if arguments["stride"] else kernel  # [] means the kernel size
    padding = _per_dim(arguments["padding"], dims)
    dilation = _per_dim(arguments.get("dilation", 1), dims)  # average pools have none
    sizes = zip(arguments["self"].shape[-dims:], out.shape[-dims:], kernel, stride, padding, dilation)
    return dims, math.prod(_pool_window_total(*size) for size in sizes)


#: Argument names and defaults of each op's schema, filled on first use.
_SCHEMAS: dict[Any, list[tuple[str, Any]]] = {}


def _arguments(func: Any, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments of an executed op by their schema names, defaults filled in."""
    schema = _SCHEMAS.get(func)
    if schema is None:
        schema = _SCHEMAS[func] = [(a.name, a.default_value if a.has_default_value() else None)
                                   for a in func._schema.arguments]
    return {**dict(schema), **dict(zip((name for name, _ in schema), args)), **kwargs}


def _elements(key: str, rule: Rule, func: Any, args: tuple, kwargs: dict, out: torch.Tensor) -> tuple[int, int, int]:
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
        spatial, windows = _pool_windows(key, _arguments(func, args, kwargs), out)
    elif rule.kind == ADAPTIVE_POOL:
        spatial = len(args[1])  # the output size, one entry per spatial dim
        windows = math.prod(_window_total(i, o) for i, o in zip(x.shape[-spatial:], out.shape[-spatial:]))
    else:
        raise AssertionError(f"not an element-based rule kind: {rule.kind}")
    planes = n // math.prod(out.shape[-spatial:])
    return n, planes * windows - n, 0


def _dot_totals(nonzeros_per_output: torch.Tensor, reuse: int) -> tuple[int, int]:
    """(mults, adds) of dot products whose outputs have these nonzero counts, each used ``reuse`` times."""
    values, repeats = torch.unique(nonzeros_per_output, return_counts=True)
    mults = adds = 0
    for weights, times in zip(values.tolist(), repeats.tolist()):
        m, a = dot_counts(weights, reuse * times)
        mults += m
        adds += a
    return mults, adds


class _Tracer(TorchDispatchMode):
    """Records every op of one model over any number of batches."""

    def __init__(self, model: nn.Module, rules: Mapping[str, Rule]):
        super().__init__()
        self.rules = rules
        self.infos: WeakIdKeyDictionary = WeakIdKeyDictionary()
        for tensor in [*model.parameters(), *model.buffers()]:
            self.infos[tensor] = _Info(static=True, roots=frozenset((id(tensor),)))
        self.layers: dict[str, _Layer] = {}
        self.stack: list[nn.Module] = []
        self.names = {module: name or MODEL_LAYER for name, module in model.named_modules()}
        self.quantizer_depth = 0
        self.counted: set[frozenset[int]] = set()
        self.counted_quantizers: set[int] = set()
        #: Stored weights (by their parameters) -> the batch norm (by its parameters) folded into them.
        self.folds: dict[frozenset[int], frozenset[int]] = {}
        #: Stored weights (by their parameters) -> every conv/linear output computed with them.
        self.uses: dict[frozenset[int], list[_Producer]] = {}
        #: Every batch norm call in trace order, counted by resolve_folds.
        self.norm_calls: list[_NormCall] = []
        self.narrowest_tag: tuple[int, str] | None = None
        self.rules_used: set[str] = set()
        self.keys: dict[Any, str] = {}

    # --- module hooks -----------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> list[Any]:
        handles = []
        for module in model.modules():
            if isinstance(module, ParametrizationList):
                continue  # a container of parametrizations, not a layer
            handles.append(module.register_forward_pre_hook(self._enter, prepend=True))  # before quantizer hooks
            handles.append(module.register_forward_hook(self._leave, always_call=True))
        return handles

    def _enter(self, module: nn.Module, args: Any) -> None:
        self.stack.append(module)  # first: _leave pops it even when the quantizer's declaration is refused
        if is_quantizer(module):
            self._enter_quantizer(module)

    def _leave(self, module: nn.Module, args: Any, output: Any) -> None:
        self.stack.pop()
        with _disable_current_modes():  # the scorer's own ops, not the model's
            mask_bits = declared_mask_bits(module)
            kept = _kept_by(module, args, output) if mask_bits is not None else None
            if kept is not None and self._info(output).static:
                # a stored weight's mask: carried to the conv/linear that consumes it
                self.infos[output] = replace(self._info(output), mask=_Mask(mask_bits, kept))
        if is_quantizer(module):
            self.quantizer_depth -= 1
            bits = quantizer_bits(module)
            for tensor in _tensors([output]):
                self.infos[tensor] = replace(self._info(tensor), bits=bits, producer=None)

    def _enter_quantizer(self, module: nn.Module) -> None:
        self.quantizer_depth += 1
        name = self.names.get(module, type(module).__name__)
        bits = quantizer_bits(module)
        self._narrow(bits, f"'{name}' quantizes to {bits} bits")
        if id(module) not in self.counted_quantizers:
            self.counted_quantizers.add(id(module))
            count, scale_bits = quantizer_scales(module)
            if count:
                self._narrow(scale_bits, f"'{name}' stores its scales in {scale_bits} bits")
                self._layer().stored.append(_Stored(count, scale_bits))

    def _narrow(self, bits: int, where: str) -> None:
        """Keep the narrowest quantized tensor (weights, activations or stored scales): it decides the freebie."""
        if self.narrowest_tag is None or bits < self.narrowest_tag[0]:
            self.narrowest_tag = (bits, where)

    def _layer(self) -> _Layer:
        module = next((m for m in reversed(self.stack) if not is_quantizer(m)), None)
        name = self.names.get(module, MODEL_LAYER) if module is not None else MODEL_LAYER
        layer = self.layers.get(name)
        if layer is None:
            # The class the user wrote, not the ParametrizedConv2d that masks and quantizers create.
            layer_type = type_before_parametrizations(module).__name__ if module is not None else ""
            layer = self.layers[name] = _Layer(name, layer_type)
        return layer

    # --- ops --------------------------------------------------------------------------------------
    def _info(self, tensor: torch.Tensor) -> _Info:
        return self.infos.get(tensor, _CONSTANT)

    def mark_input(self, tensor: torch.Tensor) -> None:
        self.infos[tensor] = _Info(static=False)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self._record(func, args, kwargs, out)
        return out

    def _key(self, func: Any, args: tuple, kwargs: dict) -> str:
        name = self.keys.get(func)
        if name is None:
            name = self.keys[func] = func.overloadpacket.__name__
        return rule_key(name, args, kwargs)

    def _record(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        inputs = list(_tensors(args)) + list(_tensors(kwargs.values()))
        infos = [self._info(t) for t in inputs]
        dynamic = not all(info.static for info in infos)
        key = self._key(func, args, kwargs)
        rule = self.rules.get(key)
        if not dynamic or self.quantizer_depth:
            # Precomputed at export (static), or a format conversion inside a quantizer: free.
            self._propagate(out, infos, rule, static=not dynamic)
            return
        layer = self._layer()
        if rule is None:
            raise UnsupportedOpError(
                f"aten.{key} (in layer '{layer.name}', {layer.type}) has no counting rule; "
                f"add a Rule for '{key}' to RULES in scoring/rules.py (or pass rules= to count_model)")
        if rule.kind in (FREE, VIEW):
            self._store_dense(layer, inputs, infos)
            # A batch norm after a channel concatenation of conv outputs folds into each conv.
            producer = _concat_producer(args[0], args[1] if len(args) > 1 else 0, infos) if key == "cat" else None
            self._propagate(out, infos, rule, static=False, producer=producer)
            return
        self.rules_used.add(key)
        producer = None
        if rule.kind == CONV:
            producer = self._conv(layer, args, out)
        elif rule.kind == MATMUL:
            producer = self._matmul(layer, args, kwargs, out)
        elif rule.kind == BATCH_NORM:
            self._batch_norm(layer, key, args, bool(_arguments(func, args, kwargs).get("training")))
        elif rule.kind in (NORM, ATTENTION):
            count = self._norm if rule.kind == NORM else self._attention
            operands, mults, adds = count(layer, key, _arguments(func, args, kwargs))
            self._add_ops(layer, self._operand_width(operands), mults, adds)
            self._store_dense(layer, inputs, infos)
        else:
            result = out[0] if isinstance(out, tuple) else out
            mults, adds = rule.counts(*_elements(key, rule, func, args, kwargs, result))
            self._add_ops(layer, self._operand_width(inputs), mults, adds)
            if rule.alpha_scales is not None:
                self._alpha(layer, rule, _arguments(func, args, kwargs))
            self._store_dense(layer, inputs, infos)
        self._propagate(out, infos, rule, static=False, producer=producer)

    def _propagate(self, out: Any, infos: list[_Info], rule: Rule | None, *, static: bool,
                   producer: _Producer | None = None) -> None:
        bits = None
        if rule is not None and (rule.kind in (FREE, VIEW) or rule.keeps_bits):
            tags = [i.bits for i in infos if not i.constant]
            if tags and None not in tags:
                bits = max(tags)
            if rule.kind == VIEW and producer is None and len(infos) == 1:
                producer = infos[0].producer
        roots = frozenset().union(*(i.roots for i in infos)) if static else frozenset()
        info = _Info(static=static, bits=bits, producer=producer, roots=roots)
        # A declared mask passes through static ops that keep its tensor's size (quantizer, views).
        masks = {i.mask for i in infos if i.mask is not None} if static else set()
        mask = masks.pop() if len(masks) == 1 else None
        for tensor in _tensors([out]):
            keeps = mask is not None and tensor.numel() == mask.kept.numel()
            self.infos[tensor] = replace(info, mask=mask) if keeps else info

    def _operand_width(self, tensors: Iterable[torch.Tensor]) -> _Width:
        """Width of an op: the widest of its operands, constants left out."""
        width = _NO_INPUT
        for info in map(self._info, tensors):
            if not info.constant:
                width |= info.width()
        return width

    def _add_ops(self, layer: _Layer, width: _Width, mults: int, adds: int) -> None:
        if mults:
            layer.mults[width] += mults
        layer.adds += adds
        layer.input_width = width if layer.input_width is None else layer.input_width | width

    def _first_use(self, info: _Info) -> bool:
        """True the first time a stored value (keyed by the parameters it derives from) is counted."""
        if not info.roots or info.roots in self.counted:
            return False
        self.counted.add(info.roots)
        return True

    def _store_dense(self, layer: _Layer, tensors: list[torch.Tensor], infos: list[_Info]) -> None:
        """Count static inputs (biases, scales, embeddings) as dense stored values."""
        for tensor, info in zip(tensors, infos):
            if info.static and self._first_use(info):
                layer.stored.append(_Stored(_stored_view(tensor).numel(), info.bits))

    def _dot(self, layer: _Layer, operands: tuple[torch.Tensor, torch.Tensor], weight: torch.Tensor,
             lines: torch.Tensor, reuse: int) -> None:
        """Count dot products over ``weight`` (its per-output nonzero counts ``lines``)."""
        winfo = self._info(weight)
        mults, adds = _dot_totals(lines, reuse)
        self._add_ops(layer, self._operand_width(operands), mults, adds)
        if winfo.static:
            layer.weight_width = winfo.width() if layer.weight_width is None else layer.weight_width | winfo.width()
            if self._first_use(winfo):
                nonzeros, numel = int(lines.sum()), weight.numel()
                mask = winfo.mask
                if mask is not None and mask.covers(weight, nonzeros):
                    stored = _Stored(numel, winfo.bits, nonzeros, mask.bits, int(mask.kept.count_nonzero()))
                else:
                    stored = _Stored(numel, winfo.bits, nonzeros)
                layer.stored.append(stored)
                layer.nonzero_weights += nonzeros
                layer.weights += numel

    def _nonzeros(self, weight: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        """Nonzero weights per output, summed over ``dims``; run-time zeros (dynamic weights) do not count."""
        # A total count first: per-dim counting is several times slower, and most weights are dense.
        if self._info(weight).static and int(weight.count_nonzero()) < weight.numel():
            return weight.count_nonzero(dims)
        dims = tuple(d % weight.dim() for d in dims)
        shape = [size for d, size in enumerate(weight.shape) if d not in dims]
        return torch.full(shape, math.prod(weight.shape[d] for d in dims), dtype=torch.long)

    def _conv(self, layer: _Layer, args: tuple, out: torch.Tensor) -> _Producer:
        x, weight, bias = args[0], args[1], args[2]
        if len(args) > 6 and args[6]:
            raise UnsupportedOpError(
                f"transposed convolution (in layer '{layer.name}', {layer.type}) is not counted by the scorer; "
                "use upsampling + a conv, or extend _conv in scoring/counter.py")
        lines = self._nonzeros(weight, tuple(range(1, weight.dim())))  # the weight itself: its info says if static
        self._dot(layer, (x, weight), weight, lines, out.numel() // out.shape[1])
        if bias is not None:
            self._bias(layer, bias, out)
        return self._use(_Producer(layer.name, weight.shape[0], bias is not None, self._info(weight).roots))

    def _matmul(self, layer: _Layer, args: tuple, kwargs: dict, out: torch.Tensor) -> _Producer:
        bias, (a, b) = (args[0], args[1:3]) if len(args) >= 3 else (None, args[:2])
        weight = a if self._info(a).static and not self._info(b).static else b
        if weight is a:
            self._dot(layer, (a, b), a, self._nonzeros(a, (-1,)), b.shape[-1])  # weight on the left
        else:
            self._dot(layer, (a, b), b, self._nonzeros(b, (-2,)), a.shape[-2])
        # out = beta·bias + alpha·(a @ b): a scaling is precomputed at export when what it scales is static
        # (the bias; alpha folds into a static weight), else 1 multiply per scaled element.
        if kwargs.get("beta", 1) != 1 and bias is not None and not self._info(bias).static:
            self._add_ops(layer, self._operand_width([bias]), _stored_view(bias).numel(), 0)
        if kwargs.get("alpha", 1) != 1 and not (self._info(a).static or self._info(b).static):
            self._add_ops(layer, self._operand_width((a, b)), out.numel(), 0)
        if bias is not None:
            self._bias(layer, bias, out)
        return self._use(_Producer(layer.name, out.shape[-1], bias is not None, self._info(weight).roots))

    def _use(self, producer: _Producer) -> _Producer:
        """Record a conv/linear output as a use of its stored weight (a batch norm folds only if all uses agree)."""
        if producer.weight:
            self.uses.setdefault(producer.weight, []).append(producer)
        return producer

    def _alpha(self, layer: _Layer, rule: Rule, arguments: Mapping[str, Any]) -> None:
        """``x + alpha·y`` with alpha != 1: 1 multiply per element of y, none for a constant or static y."""
        scaled = arguments[rule.alpha_scales]
        if arguments.get("alpha", 1) == 1 or not isinstance(scaled, torch.Tensor) or self._info(scaled).static:
            return
        self._add_ops(layer, self._operand_width([scaled]), _stored_view(scaled).numel(), 0)

    def _norm(self, layer: _Layer, key: str, arguments: Mapping[str, Any]) -> tuple[list[torch.Tensor], int, int]:
        """(operands, mults, adds) of a layer norm or group norm, its affine included."""
        x, weight, bias = arguments["input"], arguments["weight"], arguments["bias"]
        if "group" in arguments:  # group norm: each example's channels in G groups
            groups = arguments["N"] * arguments["group"]
        else:  # layer norm over the trailing normalized_shape
            groups = x.numel() // max(math.prod(arguments["normalized_shape"]), 1)
        mults, adds = norm_counts(self.rules, key, x.numel(), groups, scale=weight is not None, shift=bias is not None)
        return [t for t in (x, weight) if t is not None], mults, adds  # β only enters additions

    def _attention(self, layer: _Layer, key: str, arguments: Mapping[str, Any]) -> tuple[list[torch.Tensor], int, int]:
        """(operands, mults, adds) of a fused scaled dot-product attention (any backend's kernel)."""
        q, k, v = arguments["query"], arguments["key"], arguments["value"]
        if arguments.get("dropout_p"):
            raise UnsupportedOpError(
                f"aten.{key} (in layer '{layer.name}', {layer.type}) runs with dropout_p={arguments['dropout_p']}: "
                "dropout is training only; pass dropout_p=0 when the module is not training")
        mask = arguments.get("attn_mask", arguments.get("attn_bias"))
        queries, head_dim = q.shape[-2:]
        mults, adds = attention_counts(self.rules, math.prod(q.shape[:-2]), queries, k.shape[-2], head_dim, v.shape[-1],
                                       causal=bool(arguments.get("is_causal")), masked=mask is not None)
        self.rules_used.add("_softmax")  # its softmax is counted by that rule
        return [q, k, v], mults, adds  # the mask only enters additions

    def _bias(self, layer: _Layer, bias: torch.Tensor, out: torch.Tensor) -> None:
        self._add_ops(layer, _NO_INPUT, 0, out.numel())
        self._store_dense(layer, [bias], [self._info(bias)])

    def _foldable(self, producer: _Producer | None, channels: int, batch_norm: frozenset[int]) -> bool:
        """Whether the batch norm ``batch_norm`` (its parameters) can fold into the layer that produced its input.

        It folds into an unfolded conv/linear with as many channels whose weights are stored (static) and have
        absorbed no other batch norm's scale: a weight shared by two layers holds one scale only. The fold is
        tentative: resolve_folds undoes it if a weight is also used by an output the scale does not suit.
        """
        return (producer is not None and not producer.folded and producer.channels == channels
                and all(weight and self.folds.get(weight, batch_norm) == batch_norm for weight in producer.weights()))

    def _batch_norm(self, layer: _Layer, key: str, args: tuple, batch_statistics: bool) -> None:
        """Fold a batch norm into the layer that produced its input, or count it as a per-channel affine.

        Both need fixed statistics: a batch norm that normalises with the statistics of the batch at inference
        (``track_running_stats=False``, instance norm) is refused rather than counted as an affine.
        """
        if batch_statistics:
            raise UnsupportedOpError(
                f"aten.{key} (in layer '{layer.name}', {layer.type}) normalises with batch statistics at inference "
                "(track_running_stats=False, or an instance norm): neither folding nor a fixed affine counts that; "
                "keep running statistics, or use GroupNorm (an instance norm is GroupNorm(C, C)), which has a rule")
        x = args[0]
        stored = [t for t in args[1:5] if isinstance(t, torch.Tensor)]
        params = _Info(static=True, roots=frozenset().union(*(self._info(t).roots for t in stored)))
        channels = x.shape[1]
        producer = self._info(x).producer
        operands = [t for t in args[:2] if isinstance(t, torch.Tensor)]  # input and scale, if unfolded
        scale_bits = self._info(args[1]).bits if isinstance(args[1], torch.Tensor) else None
        call = _NormCall(layer, params, x.numel(), channels, self._operand_width(operands), scale_bits)
        if self._foldable(producer, channels, params.roots):
            producer.fold(params.roots)
            self.folds.update(dict.fromkeys(producer.weights(), params.roots))
            call.producer, call.unbiased = producer, producer.unbiased_channels()
        elif producer is not None and producer.channels == channels:
            producer.absorb()
        self.norm_calls.append(call)

    def _keeps_fold(self, call: _NormCall, verdicts: dict[tuple[frozenset[int], frozenset[int]], bool]) -> bool:
        """Whether a tentative fold stands: every use of its weights was folded with the same batch norm, or is
        read by an unfolded batch norm (which absorbs the inverse scale). A weight also used raw must be stored
        unscaled for that use, so the batch norm is counted unfolded. ``verdicts`` caches (weight, batch norm)."""
        for weight in call.producer.weights():
            key = (weight, call.params.roots)
            if key not in verdicts:
                verdicts[key] = all(use.holds(call.params.roots) for use in self.uses.get(weight, ()))
            if not verdicts[key]:
                return False
        return True

    def resolve_folds(self) -> None:
        """Count every batch norm call, in trace order, folded (a bias for its unbiased channels) or as a
        per-channel affine (2 params per channel, 1 multiply and 1 add per element)."""
        verdicts: dict[tuple[frozenset[int], frozenset[int]], bool] = {}
        for call in self.norm_calls:
            layer, params = call.layer, call.params
            if call.producer is not None and self._keeps_fold(call, verdicts):
                if f"folded into {call.producer.layer}" not in layer.notes:
                    layer.notes.append(f"folded into {call.producer.layer}")
                self._add_ops(layer, _NO_INPUT, 0, call.elements // call.channels * call.unbiased)
                if call.unbiased and self._first_use(params):
                    layer.stored.append(_Stored(call.unbiased, None))  # the folded shift becomes their bias
                continue
            self._add_ops(layer, call.width, call.elements, call.elements)
            if self._first_use(params):
                layer.stored.append(_Stored(2 * call.channels, call.scale_bits))
            if "not folded" not in layer.notes:
                layer.notes.append("not folded")
        self.norm_calls.clear()


# --- the result -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Count:
    """Per-example counts of one model under the MicroNet rules.

    ``mults``/``adds`` are raw counts, ``param_bits`` the stored bits; ``params`` and ``ops`` are in
    32-bit equivalents (what the score divides by the baselines).
    """

    mults: float
    adds: float
    param_bits: int
    params: float
    ops: float
    freebie: bool
    accumulator_bits: int
    examples: int
    layers: list[dict[str, Any]]
    project_rules: dict[str, str]
    ops_exact: Fraction = field(repr=False, compare=False, default=Fraction(0))

    def score_terms(self, task: str) -> tuple[float, float]:
        """(params term, ops term) of the score on ``task``."""
        params_term, ops_term = score_terms(task, Fraction(self.param_bits, 32), self.ops_exact)
        return float(params_term), float(ops_term)

    def score(self, task: str) -> float:
        """params / baseline_params + ops / baseline_ops for ``task``."""
        return score(task, Fraction(self.param_bits, 32), self.ops_exact)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict of every field."""
        return {"mults": self.mults, "adds": self.adds, "param_bits": self.param_bits, "params": self.params,
                "ops": self.ops, "freebie": self.freebie, "accumulator_bits": self.accumulator_bits,
                "examples": self.examples, "project_rules": dict(self.project_rules),
                "layers": [dict(layer) for layer in self.layers]}


def _number(value: Fraction) -> int | float:
    return int(value) if value.denominator == 1 else float(value)


def _resolve(tracer: _Tracer, examples: int, accumulator_bits: int, freebie: bool | None) -> Count:
    narrow = tracer.narrowest_tag is not None and tracer.narrowest_tag[0] < FREEBIE_BITS
    if freebie and narrow:
        raise ValueError(f"freebie=True, but {tracer.narrowest_tag[1]}: the freebie applies only when "
                         f"no tensor is below {FREEBIE_BITS} bits; use freebie=None (auto) or False")
    freebie = (not narrow) if freebie is None else bool(freebie)
    default = FREEBIE_BITS if freebie else FULL_BITS
    rows, total_mults, total_adds, total_mult_bits, total_param_bits = [], 0, 0, 0, 0
    for layer in tracer.layers.values():
        mults = sum(layer.mults.values())
        mult_bits = sum(count * width.bits(default) for width, count in layer.mults.items())
        param_bits = sum(s.total_bits(default) for s in layer.stored)
        if not (mults or layer.adds or param_bits or layer.notes):
            continue  # a container or data movement only
        total_mults, total_adds = total_mults + mults, total_adds + layer.adds
        total_mult_bits, total_param_bits = total_mult_bits + mult_bits, total_param_bits + param_bits
        ops = Fraction(mult_bits + layer.adds * accumulator_bits, 32 * examples)
        rows.append({
            "name": layer.name, "type": layer.type,
            "params": param_bits / 32, "param_bits": param_bits,
            "mults": _number(Fraction(mults, examples)), "adds": _number(Fraction(layer.adds, examples)),
            "ops": float(ops),
            "sparsity": 1 - layer.nonzero_weights / layer.weights if layer.weights else None,
            "weight_bits": layer.weight_width.bits(default) if layer.weight_width else None,
            "input_bits": layer.input_width.bits(default) if layer.input_width and layer.input_width != _NO_INPUT else None,
            "note": "; ".join(layer.notes),
        })
    ops = Fraction(total_mult_bits + total_adds * accumulator_bits, 32 * examples)
    return Count(mults=_number(Fraction(total_mults, examples)), adds=_number(Fraction(total_adds, examples)),
                 param_bits=total_param_bits, params=total_param_bits / 32, ops=float(ops), freebie=freebie,
                 accumulator_bits=accumulator_bits, examples=examples, layers=rows,
                 project_rules=project_rules_note(tracer.rules, tracer.rules_used), ops_exact=ops)


def _batches(inputs: torch.Tensor | Iterable[Any]) -> Iterator[torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        yield inputs
        return
    for batch in inputs:
        if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
            batch = batch[0]  # (inputs, targets)
        if not isinstance(batch, torch.Tensor):
            raise TypeError(f"count_model expects tensors or (inputs, targets) batches, got {type(batch).__name__}")
        yield batch


def count_model(model: nn.Module, inputs: torch.Tensor | Iterable[Any], *, accumulator_bits: int = 32,
                freebie: bool | None = None, rules: Mapping[str, Rule] = RULES) -> Count:
    """Count ``model`` under the MicroNet rules by running it (in eval mode, without grad) on ``inputs``.

    ``inputs`` is one batch, or an iterable of batches or ``(inputs, targets)`` pairs; ops are averaged
    per example over all of them, and each stored value is counted once. ``freebie`` None decides it
    automatically (on only when no tensor is quantized below 16 bits); ``accumulator_bits`` is the width
    at which additions count. Raises :class:`UnsupportedOpError` for an op without a rule.
    """
    if not 1 <= accumulator_bits <= 32:
        raise ValueError(f"accumulator_bits={accumulator_bits}; expected 1..32")
    tracer = _Tracer(model, rules)
    device = next((p.device for p in model.parameters()), None)
    modes = {module: module.training for module in model.modules()}
    handles = tracer.attach(model)
    examples = 0
    try:
        model.eval()
        with torch.no_grad():
            for batch in _batches(inputs):
                batch = batch.to(device) if device is not None else batch
                tracer.mark_input(batch)
                examples += batch.shape[0] if batch.dim() else 1
                tracer.stack.clear()
                with tracer:
                    model(batch)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    if not examples:
        raise ValueError("count_model got no input batches; pass a tensor batch or a non-empty iterable of batches")
    tracer.resolve_folds()
    return _resolve(tracer, examples, accumulator_bits, freebie)
