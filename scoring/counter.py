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
* the parameters it derives from, so each stored value is counted once over all batches;
* whether it is an *index* tensor (integer token ids and what is computed from them alone): address
  arithmetic on index tensors is free.

Recurrent layers are counted where torch's composite functions (``torch.lstm``, ``torch.gru_cell``, ...) are
called, seen through a :class:`~torch.overrides.TorchFunctionMode`, before a backend kernel is chosen: every
kernel path then counts alike, and the state is an activation even when it starts at zero. Their kernels
(``mkldnn_rnn_layer``, ``_cudnn_rnn``, the fused cells) have rules of their own for direct calls.

Costs come from the rules table (:mod:`scoring.rules`); an op with no rule raises
:class:`~scoring.rules.UnsupportedOpError`. Widths are resolved after tracing, once the freebie is known.
:func:`count_model` counts per example (an image); :func:`count_stream` per token of a stream fed on-line.
"""
from __future__ import annotations

import functools
import math
import weakref
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any, Hashable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn
from torch.nn.utils.parametrize import ParametrizationList, type_before_parametrizations
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves

from scoring.protocol import declared_mask_bits, is_quantizer, quantizer_bits, quantizer_scales
from scoring.rules import (ADAPTIVE_POOL, ATTENTION, BATCH_NORM, CELLS, COMPOSITE_LAYOUTS, CONV, ELEMENTWISE, FREE,
                           INDEX_ARITHMETIC, KERNEL_MODES, LOOKUP, MATMUL, NORM, PERMUTATION, POOL, RECURRENT, REDUCE,
                           REORDERING_VIEW, RULES, SOFTMAX, STREAM_CONVENTION, VIEW, Cell, Rule, UnsupportedOpError,
                           attention_counts, cell_counts, dot_counts, norm_counts, project_rules_note, recurrent_counts,
                           rule_key, score, score_terms, weight_storage_bits)

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
#: An unquantized operand (32 bits, or 16 under the freebie).
_UNTAGGED = _Width(0, True)
#: A product with a ±1 operand: a sign flip, 1/32 op.
_SIGN_FLIP = _Width(1)


@dataclass
class _Producer:
    """A conv/linear output (or a channel concatenation of them), for folding a batch norm into it once."""

    layer: str
    channels: int
    has_bias: bool
    #: The parameters its weight derives from (empty: a weight computed at run time, which absorbs no scale).
    weight: frozenset[int] = frozenset()
    parts: tuple[_Producer, ...] = ()
    #: Channels whose dot products are empty (no nonzero weight): a folded bias makes them constants.
    empty: int = 0
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

    def unbiased_channels(self) -> tuple[int, int]:
        """(channels without a bias of their own, those of them with empty dot products): a fold gives them a
        bias, which costs an addition only where a dot product is computed."""
        if self.parts:
            counts = [part.unbiased_channels() for part in self.parts]
            return sum(c for c, _ in counts), sum(e for _, e in counts)
        return (0, 0) if self.has_bias else (self.channels, self.empty)

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
    fold gives a bias, ``empty`` those of them with empty dot products; ``width`` and ``scale_bits`` what it
    costs unfolded.
    """

    layer: _Layer
    params: _Info
    elements: int
    channels: int
    width: _Width
    scale_bits: int | None
    producer: _Producer | None = None
    unbiased: int = 0
    empty: int = 0


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
    #: An index tensor: integer input (token ids), or computed from index tensors alone.
    index: bool = False
    #: Per dim, (split, part) when an earlier view split one dim into parts (None: not split), for telling a
    #: view that reorders a dim (channel shuffle) from one that does not.
    parts: tuple[tuple[int, int] | None, ...] | None = None

    @property
    def constant(self) -> bool:
        """Static and derived from no parameter or buffer: a literal, not a stored value or an operand width."""
        return self.static and not self.roots

    def width(self) -> _Width:
        """This tensor's width as an operand: its tag, or untagged."""
        return _Width(self.bits) if self.bits is not None else _UNTAGGED


_CONSTANT = _Info(static=True)
_DYNAMIC = _Info(static=False)


class _Ref(weakref.ref):
    """A weak reference to a tensor that knows its key in :class:`_Infos` (the tensor's ``id``)."""

    __slots__ = ("key",)


class _Infos:
    """Tensor -> :class:`_Info` by identity, keeping no tensor alive (``WeakIdKeyDictionary``'s semantics at a
    fraction of its cost: it is read for every input of every op). An entry is dropped when its tensor dies, before
    the ``id`` can be reused; a lookup still checks that the entry refers to the tensor asked about."""

    def __init__(self) -> None:
        self.entries: dict[int, tuple[_Ref, _Info]] = {}
        entries = self.entries

        def drop(ref: _Ref) -> None:  # the tensor died: forget it, unless its id already holds a newer entry
            entry = entries.get(ref.key)
            if entry is not None and entry[0] is ref:
                del entries[ref.key]

        self.drop = drop

    def get(self, tensor: torch.Tensor, default: _Info = _CONSTANT) -> _Info:
        entry = self.entries.get(id(tensor))
        return entry[1] if entry is not None and entry[0]() is tensor else default

    def __setitem__(self, tensor: torch.Tensor, info: _Info) -> None:
        key = id(tensor)
        entry = self.entries.get(key)
        if entry is not None and entry[0]() is tensor:
            ref = entry[0]
        else:
            ref = _Ref(tensor, self.drop)
            ref.key = key
        self.entries[key] = (ref, info)


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
    stored: list[_Stored] = field(default_factory=list)  # filled from the tracer's storage when tracing ends
    weight_width: _Width | None = None
    input_width: _Width | None = None
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Rows:
    """The nonzero weights of each output of one weight: ``lines`` (None when every output has ``full``), their
    ``histogram`` of ``(nonzeros, outputs)`` pairs and the total ``nonzeros``."""

    shape: tuple[int, ...]
    full: int
    lines: torch.Tensor | None
    histogram: tuple[tuple[int, int], ...]
    nonzeros: int

    @property
    def empty(self) -> int:
        """Outputs without a nonzero weight."""
        return sum(outputs for length, outputs in self.histogram if length == 0)

    def vector(self) -> torch.Tensor:
        """The per-output counts as a tensor."""
        return self.lines if self.lines is not None else torch.full(self.shape, self.full, dtype=torch.long)


def _histogram(lines: torch.Tensor) -> tuple[tuple[int, int], ...]:
    values, counts = torch.unique(lines, return_counts=True)
    return tuple(zip(values.tolist(), counts.tolist()))


def _tensors(values: Iterable[Any], found: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """The tensors among ``values``, in lists and tuples too, in order."""
    found = [] if found is None else found
    for value in values:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            _tensors(value, found)
    return found


def _integral(tensor: torch.Tensor) -> bool:
    return not (tensor.is_floating_point() or tensor.is_complex())


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


def _fits(schema: Any, args: tuple, kwargs: Mapping[str, Any]) -> bool:
    """Whether positional ``args`` match the tensor / tensor-list / scalar types of ``schema``'s arguments."""
    if len(args) > len(schema.arguments) or any(a.kwarg_only for a in schema.arguments[:len(args)]):
        return False
    for argument, value in zip(schema.arguments, args):
        kind = str(argument.type)
        if kind == "Tensor" and not isinstance(value, torch.Tensor):
            return False
        if kind == "Tensor[]" and not (isinstance(value, (list, tuple))
                                       and all(isinstance(v, torch.Tensor) for v in value)):
            return False
        if kind in ("bool", "int", "float") and isinstance(value, (torch.Tensor, list, tuple)):
            return False
    return set(kwargs) <= {a.name for a in schema.arguments}


def _bind(key: str, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments of a call of torch's composite function ``key`` (``torch.lstm``, ...) by their aten schema
    names, the overload chosen by the argument types (``lstm.input`` or ``lstm.data``)."""
    packet = getattr(torch.ops.aten, key)
    for name in packet.overloads():
        overload = getattr(packet, name)
        if not name.endswith("out") and _fits(overload._schema, args, kwargs):
            return _arguments(overload, args, kwargs)
    raise UnsupportedOpError(f"torch.{key} was called with arguments that fit none of its aten schemas; "
                             "call it as torch.nn's recurrent modules do")


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


# --- views that reorder a dim -----------------------------------------------------------------------
#: Ops that reshape without moving data (dims split or merged), transpose dims, or copy a tensor as it is.
_RESHAPES = frozenset({"view", "_unsafe_view", "unsqueeze", "squeeze"})
_TRANSPOSES = frozenset({"t", "transpose", "permute"})
_COPIES = frozenset({"clone", "_to_copy", "alias", "detach", "lift_fresh"})


@functools.lru_cache(maxsize=4096)  # a pure function of two shapes, asked for every reshape of every token
def _dim_groups(before: tuple[int, ...], after: tuple[int, ...]) -> tuple[tuple[list[int], list[int]], ...]:
    """The (dims before, dims after) of a reshape whose sizes multiply to the same product, size-1 dims left out."""
    dims_before = [d for d, size in enumerate(before) if size != 1]
    dims_after = [d for d, size in enumerate(after) if size != 1]
    groups, i, j = [], 0, 0
    while i < len(dims_before) and j < len(dims_after):
        ins, outs = [dims_before[i]], [dims_after[j]]
        product_in, product_out = before[dims_before[i]], after[dims_after[j]]
        i, j = i + 1, j + 1
        while product_in != product_out:
            if (i == len(dims_before)) if product_in < product_out else (j == len(dims_after)):
                return tuple(groups)  # not a reshape of equal products (an empty tensor)
            if product_in < product_out:
                ins.append(dims_before[i])
                product_in, i = product_in * before[dims_before[i]], i + 1
            else:
                outs.append(dims_after[j])
                product_out, j = product_out * after[dims_after[j]], j + 1
        groups.append((ins, outs))
    return tuple(groups)


def _transposed(key: str, args: tuple, parts: tuple) -> tuple:
    """``parts`` (per dim) in the dim order of a transpose / permute."""
    dims = len(parts)
    if key == "t":
        order = list(range(dims))[::-1]
    elif key == "transpose":
        first, second = args[1] % dims, args[2] % dims
        order = list(range(dims))
        order[first], order[second] = second, first
    else:
        order = [d % dims for d in args[1]]
    return tuple(parts[d] for d in order)


# --- recurrent ops: what their arguments hold -------------------------------------------------------
@dataclass(frozen=True)
class Recurrence:
    """One layer and direction of a recurrent op, read from its arguments (:func:`recurrences`).

    ``steps`` (time step, sequence) pairs run through ``cell`` with ``hidden`` units; ``x`` is the layer's input
    (None: computed inside the op, the previous layer's output). ``w_ih`` and ``w_hh`` are None for a fused cell
    (its gates come from separate matmuls); ``w_hr`` is an LSTM's projection.
    """

    cell: Cell
    hidden: int
    steps: int
    x: torch.Tensor | None
    w_ih: torch.Tensor | None
    w_hh: torch.Tensor | None
    b_ih: torch.Tensor | None = None
    b_hh: torch.Tensor | None = None
    w_hr: torch.Tensor | None = None


def _cell(key: str, rule: Rule, arguments: Mapping[str, Any]) -> Cell:
    name = rule.cell
    if name == "mode":
        name = KERNEL_MODES.get(arguments["mode"])
        if name is None:
            raise UnsupportedOpError(f"aten.{key} runs a recurrent cell of mode {arguments['mode']}, which the scorer "
                                     f"does not know (known: {dict(KERNEL_MODES)}); add it to KERNEL_MODES and CELLS "
                                     "in scoring/rules.py")
    return CELLS[name]


def _layers(cell: Cell, x: torch.Tensor, params: Sequence[torch.Tensor], per: int, biases: bool,
            layers: int, directions: int) -> list[Recurrence]:
    """The layers and directions of a flat weight list: ``per`` tensors each, ``w_ih, w_hh[, b_ih, b_hh][, w_hr]``."""
    if per * layers * directions != len(params) or per - 2 - 2 * biases not in (0, 1):
        raise UnsupportedOpError(f"a recurrent op with {len(params)} weights for {layers} layer(s) × {directions} "
                                 f"direction(s) ({per} each, biases={biases}): not a layout the scorer knows")
    steps = x.numel() // x.shape[-1]
    result = []
    for index in range(layers * directions):
        chunk = params[index * per:(index + 1) * per]
        b_ih, b_hh = chunk[2:4] if biases else (None, None)
        w_hr = chunk[-1] if per - 2 - 2 * biases else None
        result.append(Recurrence(cell, chunk[0].shape[0] // cell.gates, steps, x if index < directions else None,
                                 chunk[0], chunk[1], b_ih, b_hh, w_hr))
    return result


def recurrences(key: str, rule: Rule, arguments: Mapping[str, Any]) -> list[Recurrence]:
    """Every layer and direction that the recurrent op ``key`` (rule ``rule``) computes, read from its arguments
    (by schema name) according to the rule's layout (:data:`scoring.rules.RECURRENT_LAYOUTS`)."""
    cell = _cell(key, rule, arguments)
    if arguments.get("train") and arguments.get("dropout"):
        raise UnsupportedOpError(f"aten.{key} runs with dropout={arguments['dropout']} in training mode: dropout is "
                                 "training only; count the model in eval mode")
    layout = rule.layout
    if layout == "sequence":
        x = arguments["input"] if "input" in arguments else arguments["data"]
        return _layers(cell, x, arguments["params"], len(arguments["params"]) // (
            arguments["num_layers"] * (1 + arguments["bidirectional"])), arguments["has_biases"],
            arguments["num_layers"], 1 + arguments["bidirectional"])
    if layout == "kernel":  # cuDNN / MIOpen: weight_stride0 tensors per layer and direction
        per = arguments["weight_stride0"]
        return _layers(cell, arguments["input"], arguments["weight"], per, per >= 4, arguments["num_layers"],
                       1 + arguments["bidirectional"])
    if layout == "layer":  # oneDNN: one layer, one direction; without biases the bias slots hold other tensors
        x, biases = arguments["input"], arguments["has_biases"]
        w_ih = arguments["weight0"]
        return [Recurrence(cell, arguments["hidden_size"], x.numel() // x.shape[-1], x, w_ih, arguments["weight1"],
                           arguments["weight2"] if biases else None, arguments["weight3"] if biases else None)]
    if layout == "cell":
        x = arguments["input"]
        return [Recurrence(cell, arguments["w_ih"].shape[0] // cell.gates, x.numel() // x.shape[-1], x,
                           arguments["w_ih"], arguments["w_hh"], arguments["b_ih"], arguments["b_hh"])]
    gates = arguments["input_gates"]  # fused_cell
    return [Recurrence(cell, gates.shape[-1] // cell.gates, gates.numel() // gates.shape[-1], None, None, None,
                       arguments["input_bias"], arguments["hidden_bias"])]


class _Tracer(TorchDispatchMode):
    """Records every op of one model over any number of batches."""

    def __init__(self, model: nn.Module, rules: Mapping[str, Rule]):
        super().__init__()
        self.rules = rules
        self.infos = _Infos()
        for tensor in [*model.parameters(), *model.buffers()]:
            self.infos[tensor] = _Info(static=True, roots=frozenset((id(tensor),)))
        #: Storage of every parameter and buffer: a weight on it can be measured once (see _rows).
        self.param_storages = {t.untyped_storage().data_ptr(): t for t in [*model.parameters(), *model.buffers()]
                               if not t.is_meta and t.numel()}
        self.rows_cache: dict[tuple, _Rows] = {}
        self.nonzeros_cache: dict[tuple, int] = {}
        #: Stored values read through views (by their parameters): the elements read so far (None: all of them).
        self.coverage: dict[frozenset[int], torch.Tensor | None] = {}
        self.reads: set[tuple] = set()
        self.layers: dict[str, _Layer] = {}
        #: Per module running, outermost first: the innermost of them that is not a quantizer (None: none is).
        self.stack: list[nn.Module | None] = []
        self.names = {module: name or MODEL_LAYER for name, module in model.named_modules()}
        self.modules = {name: module for module, name in self.names.items()}
        #: Parameter / buffer -> the layer owning it (a parametrization's original: the parametrized module); one
        #: registered in several modules (a shared weight) has no single owner.
        owners: dict[int, set[str]] = {}
        for name, module in model.named_modules(remove_duplicate=False):
            for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
                owners.setdefault(id(tensor), set()).add(name.split(".parametrizations.")[0] or MODEL_LAYER)
        self.owners = {key: names.pop() for key, names in owners.items() if len(names) == 1}
        self.quantizer_depth = 0
        #: Depth of recurrent composites being run: their inner ops are counted by the composite's rule.
        self.opaque = 0
        #: Stored values by key (the parameters they derive from): (layer, value, priority).
        self.storage: dict[Hashable, tuple[_Layer, _Stored, int]] = {}
        #: Stored weights (by their parameters) -> the batch norm (by its parameters) folded into them.
        self.folds: dict[frozenset[int], frozenset[int]] = {}
        #: Stored weights (by their parameters) -> every conv/linear output computed with them.
        self.uses: dict[frozenset[int], list[_Producer]] = {}
        #: Every batch norm call in trace order, counted by resolve_folds.
        self.norm_calls: list[_NormCall] = []
        self.narrowest_tag: tuple[int, str] | None = None
        self.rules_used: set[str] = set()
        self.keys: dict[Any, str] = {}
        self.mutates: dict[Any, bool] = {}
        self.splits = 0  # views that split a dim into parts, numbered
        #: torch's composite recurrent functions (torch.lstm, ...) -> their rule key.
        self.composites = {getattr(torch, key): key for key, rule in rules.items()
                           if rule.kind == RECURRENT and rule.layout in COMPOSITE_LAYOUTS and hasattr(torch, key)}

    def run(self, model: nn.Module, *args: Any) -> Any:
        """Run ``model(*args)`` with every op recorded."""
        self.stack.clear()
        with self, _Composites(self):
            return model(*args)

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
        # The module that ops run now count in: a quantizer's belong to the layer around it. Pushed first: _leave
        # pops it even when the quantizer's declaration is refused.
        quantizer = is_quantizer(module)
        self.stack.append((self.stack[-1] if self.stack else None) if quantizer else module)
        if quantizer:
            self._enter_quantizer(module)

    def _leave(self, module: nn.Module, args: Any, output: Any) -> None:
        self.stack.pop()
        mask_bits = declared_mask_bits(module)
        if mask_bits is not None:
            with _disable_current_modes():  # the scorer's own ops, not the model's
                kept = _kept_by(module, args, output)
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
        key = ("quantizer", id(module))
        if key not in self.storage:
            count, scale_bits = quantizer_scales(module)
            if count:
                self._narrow(scale_bits, f"'{name}' stores its scales in {scale_bits} bits")
                # a weight quantizer's scales belong to the layer owning the parametrization, wherever it is read
                owner = self.modules.get(name.split(".parametrizations.")[0]) if ".parametrizations." in name else None
                self._keep(self._layer(owner), key, _Stored(count, scale_bits))

    def _narrow(self, bits: int, where: str) -> None:
        """Keep the narrowest quantized tensor (weights, activations or stored scales): it decides the freebie."""
        if self.narrowest_tag is None or bits < self.narrowest_tag[0]:
            self.narrowest_tag = (bits, where)

    def _layer(self, module: nn.Module | None = None) -> _Layer:
        """The layer of ``module``, by default of the innermost module running (quantizers aside)."""
        if module is None:
            module = self.stack[-1] if self.stack else None
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
        """An input of the model (or a state carried into it): dynamic; an index tensor when integral."""
        self.infos[tensor] = _Info(static=False, index=_integral(tensor))

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
        inputs = _tensors(kwargs.values(), _tensors(args)) if kwargs else _tensors(args)
        infos = list(map(self.infos.get, inputs))
        if self.opaque:  # inside a recurrent composite, counted by its rule: its values are activations
            self._propagate(out, infos, None, static=False)
            return
        dynamic = any(not info.static for info in infos)
        key = self._key(func, args, kwargs)
        rule = self.rules.get(key)
        if not dynamic or self.quantizer_depth:
            # Precomputed at export (static), or a format conversion inside a quantizer: free.
            self._propagate(out, infos, rule, static=not dynamic)
            return
        if any(info.index for info in infos) and self._index_only(inputs, infos, out):
            key, rule = INDEX_ARITHMETIC, self.rules.get(INDEX_ARITHMETIC)
        layer = self._layer()
        if rule is None:
            raise UnsupportedOpError(
                f"{func.namespace}.{key} (in layer '{layer.name}', {layer.type}) has no counting rule; "
                f"add a Rule for '{key}' to RULES in scoring/rules.py (or pass rules= to count_model)")
        if rule.kind in (FREE, VIEW):
            if key == INDEX_ARITHMETIC:
                self.rules_used.add(key)
                self._propagate(out, infos, rule, static=False, index=True)
                return
            self._store_dense(layer, inputs, infos)
            # A batch norm after a channel concatenation of conv outputs folds into each conv.
            producer = _concat_producer(args[0], args[1] if len(args) > 1 else 0, infos) if key == "cat" else None
            parts = self._view_parts(layer, key, args, out) if isinstance(out, torch.Tensor) and inputs else None
            self._propagate(out, infos, rule, static=False, producer=producer, parts=parts)
            self._mark_written_base(func, args)
            return
        self.rules_used.add(key)
        producer = None
        if rule.kind == CONV:
            producer = self._conv(layer, args, out)
        elif rule.kind == MATMUL:
            producer = self._matmul(layer, args, kwargs, out)
        elif rule.kind == BATCH_NORM:
            self._batch_norm(layer, key, args, bool(_arguments(func, args, kwargs).get("training")))
        elif rule.kind == LOOKUP:
            self._lookup(layer, args[0])
        elif rule.kind == PERMUTATION:
            self._permutation(layer, key, _arguments(func, args, kwargs), out)
        elif rule.kind == RECURRENT:
            self._recurrent(layer, key, rule, _arguments(func, args, kwargs))
        elif rule.kind in (NORM, ATTENTION):
            count = self._norm if rule.kind == NORM else self._attention
            operands, mults, adds = count(layer, key, _arguments(func, args, kwargs))
            self._add_ops(layer, self._operand_width(operands), mults, adds)
            self._store_dense(layer, inputs, infos)
        else:
            result = out[0] if isinstance(out, tuple) else out
            mults, adds = rule.counts(*_elements(key, rule, func, args, kwargs, result))
            width = self._product_width(inputs) if rule.product else self._operand_width(inputs)
            self._add_ops(layer, width, mults, adds)
            if rule.alpha_scales is not None:
                self._alpha(layer, rule, _arguments(func, args, kwargs))
            self._store_dense(layer, inputs, infos)
        self._propagate(out, infos, rule, static=False, producer=producer)
        self._mark_written_base(func, args)

    def _index_only(self, inputs: list[torch.Tensor], infos: list[_Info], out: Any) -> bool:
        """Address arithmetic: every non-constant input an index tensor (or a stored integer buffer), every output
        integral (comparisons, masks and offsets of token ids; not a float value computed from them)."""
        return (all(info.index or (info.static and _integral(t)) for t, info in zip(inputs, infos) if not info.constant)
                and all(_integral(t) for t in _tensors([out])))

    def _mark_written_base(self, func: Any, args: tuple) -> None:
        """An op writing computed values into a view (``out[:, a:b] = x``) makes the viewed tensor dynamic too."""
        mutates = self.mutates.get(func)
        if mutates is None:
            arguments = func._schema.arguments
            alias = arguments[0].alias_info if arguments else None
            mutates = self.mutates[func] = bool(alias is not None and alias.is_write)
        if mutates and isinstance(args[0], torch.Tensor) and args[0]._base is not None:
            base = args[0]._base
            if self._info(base).static:
                self.infos[base] = _DYNAMIC

    def _propagate(self, out: Any, infos: list[_Info], rule: Rule | None, *, static: bool,
                   producer: _Producer | None = None, index: bool = False, parts: tuple | None = None) -> None:
        bits = None
        if rule is not None and (rule.kind in (FREE, VIEW, LOOKUP, PERMUTATION) or rule.keeps_bits):
            # the tags of the values moved: neither constants nor indices (which move data, they are not values)
            tags = [i.bits for i in infos if not i.index and (i.roots or not i.static)]
            if tags and None not in tags:
                bits = max(tags)
            if rule.kind == VIEW and producer is None and len(infos) == 1:
                producer = infos[0].producer
        outputs = [out] if isinstance(out, torch.Tensor) else _tensors([out])
        if not static:  # an activation: no roots, no mask
            info = (_DYNAMIC if bits is None and producer is None and not index and parts is None
                    else _Info(static=False, bits=bits, producer=producer, index=index, parts=parts))
            for tensor in outputs:
                self.infos[tensor] = info
            return
        roots = frozenset().union(*(i.roots for i in infos))
        info = _Info(static=True, bits=bits, producer=producer, roots=roots, index=index, parts=parts)
        # A declared mask passes through static ops that keep its tensor's size (quantizer, views).
        masks = {i.mask for i in infos if i.mask is not None}
        mask = masks.pop() if len(masks) == 1 else None
        for tensor in outputs:
            keeps = mask is not None and tensor.numel() == mask.kept.numel()
            self.infos[tensor] = replace(info, mask=mask) if keeps else info

    def _operand_width(self, tensors: Iterable[torch.Tensor], extra: _Width = _NO_INPUT) -> _Width:
        """Width of an op: the widest of its operands (and ``extra``), constants left out."""
        width = extra
        for info in map(self._info, tensors):
            if not info.constant:
                width |= info.width()
        return width

    def _product_width(self, tensors: Iterable[torch.Tensor], extra: _Width = _NO_INPUT) -> _Width:
        """Width of a product: a sign flip (1/32 op) when an operand is 1-bit (±1), else the widest operand."""
        tensors = list(tensors)
        if any(self._info(t).bits == 1 for t in tensors):
            return _SIGN_FLIP
        return self._operand_width(tensors, extra)

    def _add_ops(self, layer: _Layer, width: _Width, mults: int, adds: int) -> None:
        if mults:
            layer.mults[width] += mults
        layer.adds += adds
        layer.input_width = width if layer.input_width is None else layer.input_width | width

    # --- stored values ------------------------------------------------------------------------------
    def _wants(self, key: Hashable, numel: int, priority: int = 1) -> bool:
        """Whether a value stored under ``key`` (the parameters it derives from), read at ``numel`` values, must be
        (re)counted: its first read, a larger read (a table looked up for a growing context), or a read of higher
        ``priority``: a conv/linear read (1) after a lookup (0), so that a tied table belongs to its output layer,
        and any read in the module owning the parameters (+2) after reads elsewhere."""
        if not key:
            return False
        kept = self.storage.get(key)
        return kept is None or (priority, numel) > (kept[2], kept[1].numel)

    def _priority(self, layer: _Layer, roots: frozenset[int], priority: int) -> int:
        """``priority``, + 2 when ``layer`` is the module owning every parameter in ``roots``."""
        return priority + 2 if roots and all(self.owners.get(root) == layer.name for root in roots) else priority

    def _keep(self, layer: _Layer, key: Hashable, stored: _Stored, priority: int = 1) -> None:
        self.storage[key] = (layer, stored, priority)

    def _extent(self, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What a static read stores: (the stored tensor, the flat mask of its elements read so far; None: all).

        A view of a larger static tensor holding the same parameters (a slice of a table, a row of it) stores the
        elements of that tensor that any read so far covered: a position table sliced for a growing context, or
        read row by row, counts the rows read; a transpose or the whole tensor counts it all.
        """
        roots = self._info(tensor).roots
        base = tensor._base
        if (base is None or not base.is_contiguous() or not self._info(base).static
                or self._info(base).roots != roots):
            return _stored_view(tensor), None
        offset = tensor.storage_offset() - base.storage_offset()
        covered = self.coverage.get(roots, False)
        if covered is None or (offset == 0 and tensor.numel() == base.numel() and 0 not in tensor.stride()):
            self.coverage[roots] = None  # the whole tensor
            return base, None
        geometry = (roots, tuple(tensor.shape), tensor.stride(), offset)
        if geometry not in self.reads:
            self.reads.add(geometry)
            read = torch.zeros(base.numel(), dtype=torch.bool, device=base.device)
            read.as_strided(tensor.shape, tensor.stride(), offset).fill_(True)
            covered = read if covered is False else covered | read
            self.coverage[roots] = None if bool(covered.all()) else covered
        return base, self.coverage[roots]

    def _store_dense(self, layer: _Layer, tensors: list[torch.Tensor], infos: list[_Info]) -> None:
        """Count static inputs (biases, scales, position tables) as dense stored values."""
        for tensor, info in zip(tensors, infos):
            if info.static and info.roots:
                base, read = self._extent(tensor)
                numel = base.numel() if read is None else int(read.sum())
                priority = self._priority(layer, info.roots, 1)
                if self._wants(info.roots, numel, priority):
                    self._keep(layer, info.roots, _Stored(numel, info.bits), priority)

    def _store_weight(self, layer: _Layer, weight: torch.Tensor, priority: int = 1) -> None:
        """Count a static weight (conv/linear, recurrent matrix, lookup table): its nonzeros × bits + a mask, or
        its declared mask, or dense, whichever is cheapest."""
        info = self._info(weight)
        layer.weight_width = info.width() if layer.weight_width is None else layer.weight_width | info.width()
        base, read = self._extent(weight)
        numel = base.numel() if read is None else int(read.sum())
        priority = self._priority(layer, info.roots, priority)
        if not self._wants(info.roots, numel, priority):
            return
        storage = None if base.is_meta else base.untyped_storage().data_ptr()
        if read is not None:  # part of a larger weight: its nonzeros among the elements read
            nonzeros = numel if self._dense(base, storage) else int(base.reshape(-1)[read].count_nonzero())
            stored = _Stored(numel, info.bits, nonzeros)
        else:
            nonzeros = self._nonzero_total(base, storage)
            mask = info.mask
            if mask is not None and mask.covers(base, nonzeros):
                stored = _Stored(numel, info.bits, nonzeros, mask.bits, int(mask.kept.count_nonzero()))
            else:
                stored = _Stored(numel, info.bits, nonzeros)
        self._keep(layer, info.roots, stored, priority)

    def _rows(self, weight: torch.Tensor, dims: tuple[int, ...]) -> _Rows:
        """Nonzero weights per output, summed over ``dims``; run-time zeros (dynamic weights) do not count.

        Measured once per weight read from a parameter's own storage (unchanged since: same version).
        """
        dims = tuple(d % weight.dim() for d in dims)
        static = self._info(weight).static
        storage = weight.untyped_storage().data_ptr() if not weight.is_meta else None
        key = None
        if storage in self.param_storages:
            key = (storage, weight.storage_offset(), tuple(weight.shape), weight.stride(), weight._version, dims,
                   static)
            cached = self.rows_cache.get(key)
            if cached is not None:
                return cached
        shape = tuple(size for d, size in enumerate(weight.shape) if d not in dims)
        full = math.prod(weight.shape[d] for d in dims)
        outputs = math.prod(shape)
        # A meta tensor holds no values: dense.
        if static and storage is not None and weight.numel() and not self._dense(weight, storage):
            lines = weight.count_nonzero(dims) if dims else weight.ne(0).long()
            rows = _Rows(shape, full, lines, _histogram(lines), int(lines.sum()))
        else:
            rows = _Rows(shape, full, None, ((full, outputs),) if outputs else (), full * outputs)
        if key is not None:
            self.rows_cache[key] = rows
        return rows

    def _dense(self, weight: torch.Tensor, storage: int) -> bool:
        """Whether ``weight`` has no zero (a total count first: per-dim counting is several times slower, and most
        weights are dense); any view of a dense parameter is dense."""
        owner = self.param_storages.get(storage)
        if owner is not None and self._nonzero_total(owner, storage) == owner.numel():
            return True
        return self._nonzero_total(weight, storage) == weight.numel()

    def _nonzero_total(self, weight: torch.Tensor, storage: int | None) -> int:
        """The nonzeros of ``weight``, counted once per parameter storage and version when it spans that storage."""
        if storage is None:
            return weight.numel()  # meta: no values
        whole = weight.numel() * weight.element_size() == weight.untyped_storage().nbytes()
        key = (storage, weight._version) if whole and storage in self.param_storages else None
        total = self.nonzeros_cache.get(key) if key is not None else None
        if total is None:
            total = int(weight.count_nonzero())
            if key is not None:
                self.nonzeros_cache[key] = total
        return total

    # --- dot products ---------------------------------------------------------------------------------
    def _dot(self, layer: _Layer, operands: Sequence[torch.Tensor], weight: torch.Tensor, rows: _Rows, reuse: int,
             bias: bool = False, extra: _Width = _NO_INPUT) -> None:
        """Count dot products over ``weight`` (nonzeros per output ``rows``), each output used ``reuse`` times and
        plus a bias when ``bias``, at the width of ``operands`` (and ``extra``); a static weight is stored."""
        mults = adds = 0
        for length, outputs in rows.histogram:
            m, a = dot_counts(length, reuse * outputs, bias)
            mults, adds = mults + m, adds + a
        self._add_ops(layer, self._product_width(operands, extra), mults, adds)
        if self._info(weight).static:
            self._store_weight(layer, weight)

    def _conv(self, layer: _Layer, args: tuple, out: torch.Tensor) -> _Producer:
        x, weight, bias = args[0], args[1], args[2]
        if len(args) > 6 and args[6]:
            raise UnsupportedOpError(
                f"transposed convolution (in layer '{layer.name}', {layer.type}) is not counted by the scorer; "
                "use upsampling + a conv, or extend _conv in scoring/counter.py")
        rows = self._rows(weight, tuple(range(1, weight.dim())))  # the weight itself: its info says if static
        self._dot(layer, (x, weight), weight, rows, out.numel() // out.shape[1], bias is not None)
        if bias is not None:
            self._store_dense(layer, [bias], [self._info(bias)])
        return self._use(_Producer(layer.name, weight.shape[0], bias is not None, self._info(weight).roots,
                                   empty=rows.empty))

    def _matmul(self, layer: _Layer, args: tuple, kwargs: dict, out: torch.Tensor) -> _Producer:
        bias, (a, b) = (args[0], args[1:3]) if len(args) >= 3 else (None, args[:2])
        weight = a if self._info(a).static and not self._info(b).static else b
        if weight is a:  # weight on the left: its rows are the outputs
            rows = self._rows(a, (-1,))
            self._dot(layer, (a, b), a, rows, b.shape[-1], bias is not None)
        else:
            rows = self._rows(b, (-2,))
            self._dot(layer, (a, b), b, rows, a.shape[-2], bias is not None)
        # out = beta·bias + alpha·(a @ b): a scaling is precomputed at export when what it scales is static
        # (the bias; alpha folds into a static weight), else 1 multiply per scaled element.
        if kwargs.get("beta", 1) != 1 and bias is not None and not self._info(bias).static:
            self._add_ops(layer, self._operand_width([bias]), _stored_view(bias).numel(), 0)
        if kwargs.get("alpha", 1) != 1 and not (self._info(a).static or self._info(b).static):
            self._add_ops(layer, self._operand_width((a, b)), out.numel(), 0)
        if bias is not None:
            self._store_dense(layer, [bias], [self._info(bias)])
        return self._use(_Producer(layer.name, out.shape[-1], bias is not None, self._info(weight).roots,
                                   empty=rows.empty if weight is b else 0))

    def _use(self, producer: _Producer) -> _Producer:
        """Record a conv/linear output as a use of its stored weight (a batch norm folds only if all uses agree)."""
        if producer.weight:
            self.uses.setdefault(producer.weight, []).append(producer)
        return producer

    def _lookup(self, layer: _Layer, table: torch.Tensor) -> None:
        """A table lookup: free; a static table is a stored weight (a conv/linear reading it too takes it over)."""
        if self._info(table).static:
            self._store_weight(layer, table, priority=0)

    def _permutation(self, layer: _Layer, key: str, arguments: Mapping[str, Any], out: torch.Tensor) -> None:
        """channel_shuffle, roll, flip: a permutation along each dim they reorder."""
        x = arguments["self"]
        if key in ("channel_shuffle", "native_channel_shuffle"):
            moves = [(1, ("groups", arguments["groups"]))]
        elif key == "flip":
            moves = [(d, ("flip",)) for d in arguments["dims"]]
        else:  # roll: no dims rolls the flattened tensor
            shifts, dims = list(arguments["shifts"]), list(arguments["dims"])
            moves = list(zip(dims, (("shift", s) for s in shifts))) if dims else [(None, ("shift", shifts[0]))]
        for dim, how in moves:
            n = x.numel() if dim is None else x.shape[dim]
            if n > 1 and not (how[0] == "shift" and how[1] % n == 0):  # else the identity
                self._permute(layer, key, n, how, x, out)

    def _permute(self, layer: _Layer, key: str, n: int, how: tuple, x: torch.Tensor, out: torch.Tensor) -> None:
        """A permutation of a dim of size ``n``: 1 multiply per output element with a stored n×n permutation matrix
        (n nonzeros + an n² mask), once per distinct permutation ``how``."""
        self._add_ops(layer, self._operand_width([x], _UNTAGGED), *dot_counts(1, out.numel()))
        matrix = ("permutation", key, n, how)
        if self._wants(matrix, n * n):
            self._keep(layer, matrix, _Stored(n * n, None, nonzeros=n))

    def _view_parts(self, layer: _Layer, key: str, args: tuple, out: torch.Tensor) -> tuple | None:
        """The parts of split dims after a layout op, and a view merging parts back in another order counted as a
        permutation of that dim (the view-transpose-view channel shuffle)."""
        if key not in _RESHAPES and key not in _TRANSPOSES and key not in _COPIES:
            return None
        x = args[0]
        parts = self._info(x).parts
        if key in _COPIES:
            return parts
        if key in _TRANSPOSES:
            return _transposed(key, args, parts) if parts is not None else None
        new: list[tuple[int, int] | None] = [None] * out.dim()
        for ins, outs in _dim_groups(x.shape, out.shape):
            merged = [parts[d] for d in ins] if parts is not None else [None]
            if len(ins) > 1 and None not in merged and len({split for split, _ in merged}) == 1:
                order = tuple(part for _, part in merged)
                if list(order) != sorted(order):  # parts of one dim back together, reordered
                    sizes = tuple(x.shape[d] for d in ins)
                    self._permute(layer, REORDERING_VIEW, math.prod(sizes), (order, sizes), x, out)
            if len(ins) == 1 and len(outs) > 1:  # a split: its parts numbered
                self.splits += 1
                for part, dim in enumerate(outs):
                    new[dim] = (self.splits, part)
            elif len(ins) == 1 and parts is not None:
                new[outs[0]] = parts[ins[0]]
        return tuple(new) if any(p is not None for p in new) else None

    def _recurrent(self, layer: _Layer, key: str, rule: Rule, arguments: Mapping[str, Any]) -> None:
        """A recurrent op: per layer and direction the gate dot products, biases, pointwise ops and projection."""
        for rec in recurrences(key, rule, arguments):
            cell, hidden = rec.cell, rec.hidden
            merged = cell.merged * hidden
            unmerged = (cell.gates - cell.merged) * hidden
            biases = (rec.b_ih is not None, rec.b_hh is not None)
            if rec.w_ih is None:  # fused cell: merge the two dot products' outputs, add the bias
                adds = self.rules["add"].counts(rec.steps * (merged * (1 + any(biases)) + unmerged * sum(biases)))[1]
                self._add_ops(layer, _NO_INPUT, 0, adds)
                pointwise = cell_counts(self.rules, cell, hidden * rec.steps)
            else:
                ih, hh = self._rows(rec.w_ih, (-1,)), self._rows(rec.w_hh, (-1,))
                if ih.lines is None and hh.lines is None:
                    merged_rows = ((ih.full + hh.full, merged),)
                    inputs, recurrent = ((ih.full, unmerged),), ((hh.full, unmerged),)
                else:
                    vih, vhh = ih.vector(), hh.vector()
                    merged_rows = _histogram(vih[:merged] + vhh[:merged])
                    inputs, recurrent = _histogram(vih[merged:]), _histogram(vhh[merged:])
                dots, pointwise = recurrent_counts(self.rules, cell, hidden, rec.steps, merged=merged_rows,
                                                   inputs=inputs if unmerged else (),
                                                   recurrent=recurrent if unmerged else (), biases=biases)
                # the input products at the input's width, the recurrent ones at the (unquantized) state's
                input_mults = ih.nonzeros * rec.steps
                x_width = (self._product_width([rec.x, rec.w_ih]) if rec.x is not None
                           else self._product_width([rec.w_ih], _UNTAGGED))
                self._add_ops(layer, x_width, input_mults, dots[1])
                self._add_ops(layer, self._product_width([rec.w_hh], _UNTAGGED), dots[0] - input_mults, 0)
                for weight in (rec.w_ih, rec.w_hh):
                    if self._info(weight).static:
                        self._store_weight(layer, weight)
            self._add_ops(layer, _UNTAGGED, *pointwise)
            self.rules_used.update(name for name, _ in cell.pointwise)
            self._store_biases(layer, [b for b in (rec.b_ih, rec.b_hh) if b is not None],
                               merged + unmerged * sum(biases))
            if rec.w_hr is not None:  # the LSTM's projection of h
                self._dot(layer, (rec.w_hr,), rec.w_hr, self._rows(rec.w_hr, (-1,)), rec.steps, extra=_UNTAGGED)

    def _store_biases(self, layer: _Layer, biases: list[torch.Tensor], numel: int) -> None:
        """A recurrent op's biases, stored as ``numel`` values (b_ih + b_hh summed where they meet)."""
        infos = [self._info(b) for b in biases]
        if not infos or not all(info.static for info in infos):
            return
        roots = frozenset().union(*(info.roots for info in infos))
        tags = [info.bits for info in infos]
        if self._wants(roots, numel):
            self._keep(layer, roots, _Stored(numel, None if None in tags else max(tags)))

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

    # --- batch norm -----------------------------------------------------------------------------------
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
            call.producer = producer
            call.unbiased, call.empty = producer.unbiased_channels()
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
        """Count every batch norm call, in trace order, folded (a bias for its unbiased channels, added where a dot
        product is computed) or as a per-channel affine (2 params per channel, 1 multiply and 1 add per element)."""
        verdicts: dict[tuple[frozenset[int], frozenset[int]], bool] = {}
        for call in self.norm_calls:
            layer, params = call.layer, call.params
            if call.producer is not None and self._keeps_fold(call, verdicts):
                if f"folded into {call.producer.layer}" not in layer.notes:
                    layer.notes.append(f"folded into {call.producer.layer}")
                self._add_ops(layer, _NO_INPUT, 0, call.elements // call.channels * (call.unbiased - call.empty))
                if call.unbiased and self._wants(params.roots, call.unbiased):
                    self._keep(layer, params.roots, _Stored(call.unbiased, None))  # the folded shift: their bias
                continue
            self._add_ops(layer, call.width, call.elements, call.elements)
            if self._wants(params.roots, 2 * call.channels):
                self._keep(layer, params.roots, _Stored(2 * call.channels, call.scale_bits))
            if "not folded" not in layer.notes:
                layer.notes.append("not folded")
        self.norm_calls.clear()

    def finish(self) -> None:
        """After tracing: count the batch norms and give every stored value to the layer that keeps it."""
        self.resolve_folds()
        for layer in self.layers.values():
            layer.stored.clear()
        for layer, stored, _ in self.storage.values():
            layer.stored.append(stored)


class _Composites(TorchFunctionMode):
    """Counts torch's composite recurrent functions (``torch.lstm``, ``torch.gru_cell``, ...) by their rules, where
    they are called: every kernel they dispatch to then counts alike. Every other call passes through."""

    def __init__(self, tracer: _Tracer):
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tracer = self.tracer
        key = tracer.composites.get(func)
        if key is None or tracer.quantizer_depth or tracer.opaque:  # nearly every call: kept short
            return func(*args, **kwargs)
        if all(tracer._info(t).static for t in _tensors([*args, *kwargs.values()])):
            return func(*args, **kwargs)  # precomputed at export: its ops are static
        tracer.rules_used.add(key)
        tracer._recurrent(tracer._layer(), key, tracer.rules[key], _bind(key, args, kwargs))
        tracer.opaque += 1
        try:
            out = func(*args, **kwargs)
        finally:
            tracer.opaque -= 1
        for tensor in _tensors([out]):
            tracer.infos[tensor] = _DYNAMIC
        return out


# --- the result -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Count:
    """Per-example counts of one model under the MicroNet rules.

    ``mults``/``adds`` are raw counts, ``param_bits`` the stored bits; ``params`` and ``ops`` are in
    32-bit equivalents (what the score divides by the baselines). An example is an input of the batch
    dimension (:func:`count_model`) or a token (:func:`count_stream`).
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


def _resolve(tracer: _Tracer, examples: int, accumulator_bits: int, freebie: bool | None,
             conventions: Mapping[str, str] | None = None) -> Count:
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
        weights = [s for s in layer.stored if s.nonzeros is not None]
        numel = sum(s.numel for s in weights)
        rows.append({
            "name": layer.name, "type": layer.type,
            "params": param_bits / 32, "param_bits": param_bits,
            "mults": _number(Fraction(mults, examples)), "adds": _number(Fraction(layer.adds, examples)),
            "ops": float(ops),
            "sparsity": 1 - sum(s.nonzeros for s in weights) / numel if numel else None,
            "weight_bits": layer.weight_width.bits(default) if layer.weight_width else None,
            "input_bits": layer.input_width.bits(default) if layer.input_width and layer.input_width != _NO_INPUT else None,
            "note": "; ".join(layer.notes),
        })
    ops = Fraction(total_mult_bits + total_adds * accumulator_bits, 32 * examples)
    project_rules = {**project_rules_note(tracer.rules, tracer.rules_used), **(conventions or {})}
    return Count(mults=_number(Fraction(total_mults, examples)), adds=_number(Fraction(total_adds, examples)),
                 param_bits=total_param_bits, params=total_param_bits / 32, ops=float(ops), freebie=freebie,
                 accumulator_bits=accumulator_bits, examples=examples, layers=rows,
                 project_rules=project_rules, ops_exact=ops)


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


def _check_accumulator(accumulator_bits: int) -> None:
    if not 1 <= accumulator_bits <= 32:
        raise ValueError(f"accumulator_bits={accumulator_bits}; expected 1..32")


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode without grad; its training modes restored after."""
    modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            yield
    finally:
        for module, training in modes.items():
            module.training = training


@contextmanager
def _tracing(model: nn.Module, rules: Mapping[str, Rule]) -> Iterator[_Tracer]:
    """A tracer attached to ``model``, run in eval mode without grad; its hooks removed after."""
    tracer = _Tracer(model, rules)
    with _evaluating(model):
        handles = tracer.attach(model)
        try:
            yield tracer
        finally:
            for handle in handles:
                handle.remove()


def _device(model: nn.Module) -> torch.device | None:
    return next((p.device for p in model.parameters()), None)


def count_model(model: nn.Module, inputs: torch.Tensor | Iterable[Any], *, accumulator_bits: int = 32,
                freebie: bool | None = None, rules: Mapping[str, Rule] = RULES) -> Count:
    """Count ``model`` under the MicroNet rules by running it (in eval mode, without grad) on ``inputs``.

    ``inputs`` is one batch, or an iterable of batches or ``(inputs, targets)`` pairs; ops are averaged
    per example over all of them, and each stored value is counted once. ``freebie`` None decides it
    automatically (on only when no tensor is quantized below 16 bits); ``accumulator_bits`` is the width
    at which additions count. Raises :class:`UnsupportedOpError` for an op without a rule.
    """
    _check_accumulator(accumulator_bits)
    device = _device(model)
    examples = 0
    with _tracing(model, rules) as tracer:
        for batch in _batches(inputs):
            batch = batch.to(device) if device is not None else batch
            tracer.mark_input(batch)
            examples += batch.shape[0] if batch.dim() else 1
            tracer.run(model, batch)
    if not examples:
        raise ValueError("count_model got no input batches; pass a tensor batch or a non-empty iterable of batches")
    tracer.finish()
    return _resolve(tracer, examples, accumulator_bits, freebie)


def _stream(tokens: Any) -> torch.Tensor:
    """``tokens`` as a ``[1, T]`` integer tensor, or a one-line error."""
    if not isinstance(tokens, torch.Tensor) or not _integral(tokens) or tokens.dtype == torch.bool:
        raise TypeError(f"count_stream expects token ids as an integer tensor, got "
                        f"{tokens.dtype if isinstance(tokens, torch.Tensor) else type(tokens).__name__}; "
                        "fix: pass a LongTensor of shape [T] or [1, T]")
    if tokens.dim() == 1:
        tokens = tokens.unsqueeze(0)
    if tokens.dim() != 2 or tokens.shape[0] != 1 or not tokens.shape[1]:
        raise ValueError(f"count_stream expects one stream of tokens, got shape {tuple(tokens.shape)}; "
                         "fix: pass a LongTensor of shape [T] or [1, T] with T >= 1")
    return tokens


def _step(model: nn.Module, run: Any, token: torch.Tensor, state: Any) -> Any:
    """One on-line call ``model(token, state)`` through ``run``; the new state, or a one-line error."""
    result = run(model, token, state)
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        raise TypeError(f"count_stream expects model(tokens, state) to return (log_probs, state), got "
                        f"{type(result).__name__}; fix: follow the language-model contract (models/)")
    return result[1]


def count_stream(model: nn.Module, tokens: torch.Tensor, *, warmup_tokens: int = 0, accumulator_bits: int = 32,
                 freebie: bool | None = None, rules: Mapping[str, Rule] = RULES) -> Count:
    """Count a language model per token, fed on-line: ``logp, state = model(tokens[:, t:t+1], state)``.

    The stream starts from ``model.initial_state(1, device)`` (None when the model has no such method). The first
    ``warmup_tokens`` calls run uncounted: they only fill the state (an LSTM's, a memory of past states); the
    state entering the counted calls is an activation (dynamic), whatever its value. ``Count.examples`` is the
    number of tokens counted and ops are their mean; each stored value is counted once. ``freebie`` and
    ``accumulator_bits`` as in :func:`count_model`.
    """
    _check_accumulator(accumulator_bits)
    stream = _stream(tokens)
    if not 0 <= warmup_tokens < stream.shape[1]:
        raise ValueError(f"warmup_tokens={warmup_tokens} with {stream.shape[1]} tokens; fix: leave at least one "
                         "token to count (0 <= warmup_tokens < number of tokens)")
    device = _device(model)
    stream = stream.to(device) if device is not None else stream
    with _evaluating(model):
        state = model.initial_state(1, device) if hasattr(model, "initial_state") else None
        for t in range(warmup_tokens):  # plain calls, before the tracer is attached: nothing of them is counted
            state = _step(model, lambda m, *args: m(*args), stream[:, t:t + 1], state)
        with _tracing(model, rules) as tracer:
            for tensor in tree_leaves(state):
                if isinstance(tensor, torch.Tensor):
                    tracer.mark_input(tensor)
            for t in range(warmup_tokens, stream.shape[1]):
                token = stream[:, t:t + 1]
                tracer.mark_input(token)
                state = _step(model, tracer.run, token, state)
    tracer.finish()
    return _resolve(tracer, stream.shape[1] - warmup_tokens, accumulator_bits, freebie, dict([STREAM_CONVENTION]))


def count_inputs(model: nn.Module, inputs: Any, *, accumulator_bits: int = 32, freebie: bool | None = None,
                 rules: Mapping[str, Rule] = RULES) -> Count:
    """Count ``model`` on a task's scorer inputs (``data.tasks.ScoreInputs``: ``inputs``, ``stream``, ``warmup``):
    a token stream fed on-line with :func:`count_stream`, a batch of examples with :func:`count_model`."""
    if inputs.stream:
        return count_stream(model, inputs.inputs, warmup_tokens=inputs.warmup, accumulator_bits=accumulator_bits,
                            freebie=freebie, rules=rules)
    return count_model(model, inputs.inputs, accumulator_bits=accumulator_bits, freebie=freebie, rules=rules)
