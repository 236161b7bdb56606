"""The MicroNet counting rules, as data.

Everything the scorer knows about the cost of an operation is in :data:`RULES`: a table from an aten
operator (its overload-packet name, in-place ops folded onto their out-of-place twin: ``relu_`` ->
``relu``) to a :class:`Rule`. Each rule says how to count (its ``kind``), how many multiplies and
additions per output element, per merged input element and per reduced row, whether it is an *official*
rule (the challenge's page or its reference calculator) or a *project* rule (ours, stated in every report),
and why. Composite ops are counted through the rules of their parts (:func:`norm_counts`,
:func:`attention_counts`, :func:`recurrent_counts` with the recurrent cells of :data:`CELLS`), so every number
traces back to a line of the table. A few rows are keyed by a class of ops rather than an aten name
(:data:`INDEX_ARITHMETIC`, :data:`REORDERING_VIEW`).

Both the traced counter (:mod:`scoring.counter`) and the hand-written op list (:mod:`scoring.oplist`)
count through this table, so a traced count can be checked by hand.

How additions are counted: flat, in an accumulator of a fixed width, or in an adder tree
(:func:`adder_tree_levels`, :func:`accumulator_setting`); which kinds of op lie outside the dot products
(:data:`OUTSIDE_DOT_PRODUCTS`, the ops a model may declare it runs narrower).

Also here: :func:`score` (against the baselines of :mod:`scoring.challenge`) and how the freebie is set.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from types import MappingProxyType
from typing import Any, Iterable, Mapping

from scoring.challenge import baseline
from scoring.errors import UserError


class UnsupportedOpError(UserError, NotImplementedError):
    """An executed op has no counting rule; the scorer refuses to count it as zero."""


# --- rule kinds: how the counter measures "elements" and "merges" for an op -----------------------
#: Data movement or format conversion: no ops; a bit tag passes through.
FREE = "free"
#: FREE, and the result still counts as its input for batch-norm folding (reshapes, copies).
VIEW = "view"
#: Per output element (unary and broadcasting binary ops).
ELEMENTWISE = "elementwise"
#: Reduction: per output element, plus per input element merged into an output (in - out of them).
REDUCE = "reduce"
#: Fixed-window pooling: per output element, plus (window - 1) merges per output.
POOL = "pool"
#: Adaptive pooling: as POOL with the exact window of every output.
ADAPTIVE_POOL = "adaptive_pool"
#: Softmax along one dim: per element, per merged input ((n - 1) per row of n) and per row.
SOFTMAX = "softmax"
#: Normalisation over groups of values (layer norm, group norm): as SOFTMAX, a group being a row, plus
#: the affine scale and shift (see :func:`norm_counts`).
NORM = "norm"
#: Scaled dot-product attention (see :func:`attention_counts`).
ATTENTION = "attention"
#: Convolution: dot products over the nonzero weights (see :func:`dot_counts`).
CONV = "conv"
#: Matrix products (linear layers, attention): dot products over the nonzero weights.
MATMUL = "matmul"
#: Batch norm: folded into the conv/linear that produced its input, or counted explicitly.
BATCH_NORM = "batch_norm"
#: Table lookup (embedding): free; the table is a stored weight (nonzeros × bits + mask).
LOOKUP = "lookup"
#: A reordering of the elements along some dims: the product with a sparse permutation matrix per dim.
PERMUTATION = "permutation"
#: A recurrent layer or cell (LSTM, GRU, RNN): gate dot products and the cell's pointwise ops per step
#: (see :class:`Cell`); ``layout`` says how the op's arguments hold input, weights and state.
RECURRENT = "recurrent"

KINDS = (FREE, VIEW, ELEMENTWISE, REDUCE, POOL, ADAPTIVE_POOL, SOFTMAX, NORM, CONV, MATMUL, BATCH_NORM, ATTENTION,
         LOOKUP, PERMUTATION, RECURRENT)
#: The kinds of op that cost something outside the dot products (activations, element-wise arithmetic, pooling,
#: softmax, normalisation, an unfolded batch norm): a module declaring ``micronet_other_ops_bits``
#: (:mod:`scoring.protocol`) runs these at that width, and compress/ rounds exactly these when it simulates it.
OUTSIDE_DOT_PRODUCTS = (ELEMENTWISE, REDUCE, POOL, ADAPTIVE_POOL, SOFTMAX, NORM, BATCH_NORM)

#: Argument layouts of the recurrent ops. ``sequence`` and ``cell`` are torch's composite functions
#: (``torch.lstm``, ``torch.lstm_cell``, ...), counted where they are called, before a backend kernel is chosen;
#: the others are the kernels themselves, counted when one runs outside such a call (a direct call).
#:
#: * ``sequence``: ``(input | data, batch_sizes, hx, params, has_biases, num_layers, dropout, train, bidirectional,
#:   batch_first)``, the params ``w_ih, w_hh[, b_ih, b_hh][, w_hr]`` per layer and direction;
#: * ``cell``: ``(input, hx, w_ih, w_hh, b_ih, b_hh)``, one step;
#: * ``kernel``: cuDNN / MIOpen, ``(input, weight, weight_stride0, ..., mode, hidden_size, ...)``: the weights as in
#:   ``sequence``, ``weight_stride0`` of them per layer and direction;
#: * ``layer``: oneDNN's ``mkldnn_rnn_layer``, one layer and direction, ``(input, w_ih, w_hh, b_ih, b_hh, ...,
#:   mode, hidden_size, num_layers, has_biases, ...)`` (the bias slots hold other tensors without biases);
#: * ``fused_cell``: ``_thnn_fused_*_cell(input_gates, hidden_gates, state, input_bias, hidden_bias)``: the gate
#:   dot products arrive as separate matmuls; this op merges them, adds the bias and runs the cell.
RECURRENT_LAYOUTS = ("sequence", "cell", "kernel", "layer", "fused_cell")
#: The layouts counted at the level of torch's composite function.
COMPOSITE_LAYOUTS = ("sequence", "cell")


@dataclass(frozen=True)
class Cell:
    """A recurrent cell: its gate dot products and its pointwise ops per hidden unit and step.

    Each of the ``gates`` gate rows per hidden unit has an input dot product (over W_ih) and a recurrent one
    (over W_hh). For the first ``merged`` gates the two are one dot product over both weight rows (their
    products summed: L = L_ih + L_hh, L·N mults, (L-1)·N adds) plus one bias add: the framework's two biases
    b_ih + b_hh are summed at export and stored once (project rule). The other gates (GRU's candidate, whose
    recurrent part is multiplied by the reset gate first) keep two dot products with a bias each.
    ``pointwise`` lists ``(rule key, count per hidden unit and step)``: the nonlinearities and the state update,
    each counted by that rule of the table.
    """

    gates: int
    merged: int
    pointwise: tuple[tuple[str, int], ...]


#: The cells by the names torch uses (``torch.lstm``, ``torch.gru``, ``torch.rnn_tanh``, ``torch.rnn_relu``).
CELLS: Mapping[str, Cell] = MappingProxyType({
    # i, f, o = σ(·), g = tanh(·); c' = f·c + i·g; h' = o·tanh(c'): 3 σ, 2 tanh, 3 mults, 1 add (rules doc table)
    "lstm": Cell(4, 4, (("sigmoid", 3), ("tanh", 2), ("mul", 3), ("add", 1))),
    # r, z = σ(·); n = tanh(W_in x + b_in + r·(W_hn h + b_hn)); h' = n + z·(h - n): 2 σ, 1 tanh, 2 mults, 2 adds, 1 sub
    "gru": Cell(3, 2, (("sigmoid", 2), ("tanh", 1), ("mul", 2), ("add", 2), ("sub", 1))),
    "rnn_tanh": Cell(1, 1, (("tanh", 1),)),
    "rnn_relu": Cell(1, 1, (("relu", 1),)),
})

#: The ``mode`` argument of the cuDNN, MIOpen and oneDNN kernels (their shared numbering) -> cell name.
KERNEL_MODES: Mapping[int, str] = MappingProxyType({0: "rnn_relu", 1: "rnn_tanh", 2: "lstm", 3: "gru"})


@dataclass(frozen=True)
class Rule:
    """How one operator is counted.

    For the element-based kinds the counts are
    ``mults = mults * elements + merge_mults * merges + row_mults * rows`` and likewise for additions,
    where ``elements`` is the number of output elements, ``merges`` the number of input elements
    combined into an output beyond the first (a window of w inputs has w - 1 merges) and ``rows`` the
    number of reduced rows (softmax rows, normalised groups).
    """

    kind: str
    official: bool
    note: str
    mults: int = 0
    adds: int = 0
    merge_mults: int = 0
    merge_adds: int = 0
    row_mults: int = 0
    row_adds: int = 0
    #: The argument that ``alpha`` multiplies (``x + alpha·y``: ``"other"``), for the ops that take one.
    alpha_scales: str | None = None
    #: The output stays on the input's value grid (max, ReLU), so a bit tag of the input passes on.
    keeps_bits: bool = False
    #: A product: with a 1-bit (±1) operand its multiplies are sign flips, 1/32 op each (rules page).
    product: bool = False
    #: RECURRENT only: the cell (a key of :data:`CELLS`, or ``"mode"``: read from the kernel's ``mode`` argument).
    cell: str | None = None
    #: RECURRENT only: the argument layout (one of :data:`RECURRENT_LAYOUTS`).
    layout: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"rule kind {self.kind!r} is not one of {KINDS}")
        if self.kind == RECURRENT and (self.layout not in RECURRENT_LAYOUTS
                                       or (self.cell != "mode" and self.cell not in CELLS)):
            raise ValueError(f"a recurrent rule needs a layout in {RECURRENT_LAYOUTS} and a cell in "
                             f"{(*CELLS, 'mode')}; got {self.layout!r}, {self.cell!r}")

    def counts(self, elements: int | Fraction, merges: int | Fraction = 0,
               rows: int | Fraction = 0) -> tuple[int | Fraction, int | Fraction]:
        """(multiplies, additions) of this op for ``elements`` outputs, ``merges`` merged inputs, ``rows`` rows."""
        return (self.mults * elements + self.merge_mults * merges + self.row_mults * rows,
                self.adds * elements + self.merge_adds * merges + self.row_adds * rows)


def dot_counts(weights_per_output: int | Fraction, outputs: int | Fraction,
               bias: bool = False) -> tuple[int | Fraction, int | Fraction]:
    """(multiplies, additions) of ``outputs`` dot products over ``weights_per_output`` nonzero weights, each
    plus a bias when ``bias``.

    Official: L·N multiplies and (L-1)·N additions, + N for a bias. An output with no nonzero weight and a bias
    is the constant bias: (0-1)·N + N = 0 additions, as the official formula gives. Project rule: without a
    bias such an output costs no additions either (the official formula would go negative). So the additions
    are max(L - 1 + bias, 0)·N: the official count whenever it is not negative.
    """
    return weights_per_output * outputs, max(weights_per_output - 1 + int(bias), 0) * outputs


def adder_tree_levels(terms: int, product_bits: int) -> tuple[tuple[tuple[int, int], ...], int]:
    """(the levels as ``(bits, additions)``, the final width) of summing ``terms`` products of ``product_bits`` bits
    pairwise in an adder tree (project rule, the 2019 CIFAR-100 and ImageNet winners' counting).

    Each level adds its values in pairs, an odd one passing to the next level unchanged: n values take n // 2
    additions and leave ceil(n / 2). An addition counts at its widest input (rules page): level 1 adds products of
    ``product_bits`` bits, and every level's sums are one bit wider, so level l counts at ``product_bits + l - 1``
    bits; the final sum has ``product_bits`` + (number of levels) = ``product_bits + ceil(log2 terms)`` bits. The
    additions of all levels total ``terms - 1``, the official (L-1) of a dot product. 0 or 1 term: no level.
    """
    levels, bits, values = [], product_bits, terms
    while values > 1:
        levels.append((bits, values // 2))
        values, bits = values - values // 2, bits + 1
    return tuple(levels), bits


def weight_storage_bits(numel: int | Fraction, nonzeros: int | Fraction, bits: int,
                        mask_bits: int | Fraction | None = None,
                        kept: int | Fraction | None = None) -> int | Fraction:
    """Bits to store a weight tensor: nonzeros × bits plus a mask when it has zeros.

    The mask costs 1 bit per element (``mask_bits`` None or ``numel``), or the ``mask_bits`` a mask
    declares (block sparsity: 1 bit per block); such a mask stores the ``kept`` values it keeps (default
    ``nonzeros``; zeros inside kept blocks are stored as values). A 1-bit-per-element mask is always
    possible, so the declared one counts only when it is cheaper.

    Project rule: when the mask would cost more than it saves (a few zeros, e.g. from rounding), the tensor
    is stored dense instead, zeros as values: the cheaper of the two. Its multiplies by the fixed zeros
    are still skipped, as for any fixed, input-independent sparsity.
    """
    dense = numel * bits
    if nonzeros == numel:
        return dense
    sparse = nonzeros * bits + numel
    if mask_bits is not None:
        sparse = min(sparse, (nonzeros if kept is None else kept) * bits + mask_bits)
    return min(dense, sparse)


def _sum_counts(parts: list[tuple[int | Fraction, int | Fraction]]) -> tuple[int | Fraction, int | Fraction]:
    return sum(m for m, _ in parts), sum(a for _, a in parts)


def norm_counts(rules: Mapping[str, Rule], key: str, elements: int, rows: int, *, scale: bool,
                shift: bool) -> tuple[int | Fraction, int | Fraction]:
    """(multiplies, additions) of normalising ``elements`` values in ``rows`` groups under rule ``key``.

    Each group of n values costs what the rule says per element, per merge (n - 1 per group) and per group;
    the affine scale γ (``scale``) adds 1 multiply per element (the official channel scale, rule ``mul``),
    the shift β (``shift``) 1 addition per element (the official bias add, rule ``add``).
    """
    parts = [rules[key].counts(elements, elements - rows, rows)]
    if scale:
        parts.append(rules["mul"].counts(elements))
    if shift:
        parts.append(rules["add"].counts(elements))
    return _sum_counts(parts)


def attention_counts(rules: Mapping[str, Rule], heads: int, queries: int, keys: int, head_dim: int, value_dim: int,
                     *, causal: bool = False, masked: bool = False) -> tuple[int | Fraction, int | Fraction]:
    """(multiplies, additions) of ``heads`` scaled dot-product attentions softmax(scale·QKᵀ + mask)·V.

    A query row that sees n keys (all ``keys``; with ``causal`` the top-left-aligned keys j <= i, as
    PyTorch's ``is_causal``: n = min(i + 1, keys)) costs n dot products over ``head_dim`` (official, L = head
    dim) for its scores, the scale (rule ``mul``, 1 per score), the mask or bias when ``masked`` (rule
    ``add``, 1 per score), the softmax over n (rule ``_softmax``) and ``value_dim`` dot products over its n
    weights (official, L = n).
    """
    lengths = Counter(min(i + 1, keys) for i in range(queries)) if causal else Counter({keys: queries})
    parts = []
    for n, rows in lengths.items():
        if not n:
            continue  # no keys: nothing to attend to
        scores = n * rows
        parts += [dot_counts(head_dim, scores), rules["mul"].counts(scores),
                  rules["_softmax"].counts(scores, scores - rows, rows), dot_counts(n, value_dim * rows)]
        if masked:
            parts.append(rules["add"].counts(scores))
    mults, adds = _sum_counts(parts)
    return heads * mults, heads * adds


def cell_counts(rules: Mapping[str, Rule], cell: Cell, units: int | Fraction) -> tuple[int | Fraction, int | Fraction]:
    """(multiplies, additions) of the pointwise ops of ``units`` hidden-unit steps of ``cell``, each by its rule."""
    return _sum_counts([rules[key].counts(per * units) for key, per in cell.pointwise])


Lengths = Iterable[tuple[int | Fraction, int]]


def recurrent_counts(rules: Mapping[str, Rule], cell: Cell, hidden: int, steps: int | Fraction, *, merged: Lengths,
                     inputs: Lengths = (), recurrent: Lengths = (), biases: tuple[bool, bool] = (True, True)
                     ) -> tuple[tuple[int | Fraction, int | Fraction], tuple[int | Fraction, int | Fraction]]:
    """((dot mults, dot adds), (pointwise mults, pointwise adds)) of ``steps`` steps of ``cell`` with ``hidden`` units.

    The gate dot products are given as ``(nonzero weights L, rows)`` pairs: ``merged`` for the rows whose input and
    recurrent products form one dot product (L = L_ih + L_hh), ``inputs`` and ``recurrent`` for the other rows'
    two dot products (:class:`Cell`). ``biases`` says which of b_ih, b_hh exist: a merged row takes one bias add
    if either does (the two summed), the other rows' input and recurrent dot products one each for their own;
    the official (L-1)·N + N is followed (:func:`dot_counts`).
    """
    parts = [dot_counts(length, rows * steps, any(biases)) for length, rows in merged]
    parts += [dot_counts(length, rows * steps, biases[0]) for length, rows in inputs]
    parts += [dot_counts(length, rows * steps, biases[1]) for length, rows in recurrent]
    return _sum_counts(parts), cell_counts(rules, cell, hidden * steps)


#: Project rules that apply to every model (listed in every report beside the project op rules used).
PROJECT_CONVENTIONS: Mapping[str, str] = MappingProxyType({
    "bias width": "biases (incl. folded batch-norm shifts) are stored at 32 bits (16 under the freebie) "
                  "unless a quantizer declares them narrower",
    "quantizer parameters": "scales/zero-points at 32 bits unless the quantizer declares micronet_scale_bits",
    "weight storage": "the cheaper of dense (zeros as values) and sparse: nonzeros × bits + a 1-bit mask per "
                      "element, or, if cheaper, for a mask declaring micronet_mask_bits (block sparsity: 1 bit per "
                      "block), the values it keeps × bits + those mask bits",
    "batch norm folding": "a batch norm folds into the conv/linear that produced its input (directly, through "
                          "reshapes, or through a channel concatenation of such outputs) when that layer's weight is "
                          "stored (not computed at run time) and nothing else needs its output or its weight "
                          "unscaled. Its output: every other reader of it unchanged (through reshapes that keep each "
                          "element in its channel and channel concatenations; the model's outputs are read too) must "
                          "be a batch norm counted unfolded, whose affine absorbs the fold's inverse affine at no "
                          "cost (DenseNet's stem, concatenated and read by the dense layers' batch norms); any other "
                          "reader (an add, a conv, a slice, another view) keeps the batch norm unfolded. Its weight: "
                          "a weight shared by several conv/linear calls holds one scale, so the same batch norm after "
                          "every use folds (its bias stored once); a second, different batch norm after it is counted "
                          "unfolded (its affine absorbs the first one's scale); and if any use's output is not read "
                          "by a batch norm (used raw), the batch norm is counted unfolded, whatever the order of the "
                          "uses",
    "empty dot product": "an output with no nonzero weight costs no additions: with a bias (its own or a folded batch "
                         "norm's) it is that constant, as the official (L-1)·N + N = 0 gives; without one the official "
                         "(L-1)·N would go negative",
    "stored values": "a value derived from parameters is stored once, measured on the whole tensor it is a view of (a "
                     "slice of a table stores the table) and at its largest read (a position table looked up for a "
                     "growing context); a table read by a lookup and by a conv/linear (tied embedding and softmax) is "
                     "one weight, shown in the conv/linear's row",
    "binary products": "a multiply with a 1-bit operand (micronet_bits=1: ±1 values, times the quantizer's scales like "
                       "any quantized tensor) is a sign flip of a value with a standalone sign bit (floats, and integers "
                       "on the symmetric grids of scoring/protocol.py): 1/32 op, whatever the other operand's width "
                       "(rules page); its additions stay at the accumulator width",
    "recurrent state": "a recurrent op's state is an activation: every step costs its full cell, a zero initial state "
                       "included, and its recurrent weights are stored; inside a recurrent kernel the state is "
                       "unquantized",
    "alpha scaling": "add/sub/rsub with alpha != 1 (x + alpha·y), and addmm/baddbmm's beta·bias and alpha·(a@b), "
                     "cost 1 multiply per element of the scaled tensor, none when it is a constant or derives only "
                     "from parameters (precomputed at export; alpha folds into a static weight)",
    "comparisons": "comparisons (ReLU, max, min) count as multiplies, like the official ReLU; a clip to a range "
                   "(clamp, ReLU6) is one op, as in a 2019 entry's published count (see hardswish)",
    "bit tags": "a quantizer's bit width passes through data movement, ReLU and max; any other op's output is "
                "unquantized until the next quantizer",
})


#: Project rules that apply only to the counts that use them (listed in the report of such a count).
CONDITIONAL_CONVENTIONS: Mapping[str, str] = MappingProxyType({
    "adder tree": "score.accumulator_bits=adder_tree: every dot product of integer-quantized operands (both carry a "
                  "quantizer's bit width) sums its nonzero products pairwise in an adder tree: a product of a-bit and "
                  "b-bit integers is counted w = a + b bits wide, the n // 2 additions of level l (n values left) at "
                  "their widest input, w + l - 1 bits, the final sum w + ceil(log2 L) bits for L terms; the bias add "
                  "at the wider of the final sum and the bias (a folded batch norm's shift: the widest final sum of "
                  "the layer it folds into); a dot product with a float operand (an unquantized input or weight, a "
                  "recurrent state, a fused attention's softmax) sums in a 32-bit accumulator, as the 2019 winners "
                  "counted their float-input first and last layers, and is listed (float_dot_products): the score is "
                  "official only where none is; additions outside dot products stay at 32 bits unless a module "
                  "declares its other ops narrower",
    "other ops precision": "a module declaring micronet_other_ops_bits runs the ops outside dot products (activations, "
                           "element-wise arithmetic, pooling, softmax, normalisation, an unfolded batch norm) at that "
                           "width: they count at the wider of it and their quantized inputs, their additions too (the "
                           "value really is added at that width), and the stored values they read (a batch norm's "
                           "affine, a norm's scale and shift, a folded batch norm's shift) are stored at it; their "
                           "outputs carry no bit width (a float format, not an integer grid)",
    "per-tensor scales and folding": "a batch norm folded into a weight quantized with one scale per tensor scales "
                                     "each output channel differently: the folded weight keeps its integers and "
                                     "stores one scale per output channel",
    "folded bias width": "a batch norm folded into a layer whose bias is quantized moves that bias off its grid: "
                         "the merged bias is stored at the batch norm's width (unquantized, or its declared "
                         "micronet_other_ops_bits); the bias quantizer's step size is still counted",
})


def _free(note: str) -> Rule:
    return Rule(FREE, True, note)


def _view(note: str) -> Rule:
    return Rule(VIEW, True, note)


def _project(kind: str, note: str, **fields: Any) -> Rule:
    return Rule(kind, False, note, **fields)


_TRANSCENDENTAL = "transcendental function: 1 op per element, counted as a multiply"
_BITWISE = "bitwise / logical op on computed values: 1 op per element (rules page), counted as a multiply"
_CLIP = ("precedent: the 2019 ImageNet entry of CanyonWind/Single-Path-One-Shot-NAS-MXNet counts hard-swish "
         "x·clip(x + 3, 0, 6)/6 as +3 (1 add), the clip (1 op), /6 (1 mult), ×x (1 mult) = 3 mults + 1 add "
         "(utils/micronet_counting.py, get_flops_per_activation; its MicroNetChallenge/README.md table: HSwish on "
         "112×112×16 = 0.603M mults, 0.201M adds)")
_SELECT = ("a select by a mask (masked_fill, where): 1 op per output element, counted as an addition, like the additive "
           "attention mask it stands for")
_PERMUTE = ("a reordering of the elements along a dim of size n (ShuffleNet's channel shuffle, roll, flip) is the "
            "product with a sparse n×n permutation matrix (rules FAQ): 1 multiply per output element and per permuted "
            "dim (one nonzero per row: (L-1)·N = 0 adds); the matrix is stored once per distinct permutation, as any "
            "sparse tensor (n nonzeros at the unquantized width + an n² mask). Reshapes, views, transposes and permutes "
            "of whole dims (a head split, a flatten, pixel shuffle, a window partition) keep every dim's order: free; a "
            "view that merges back the parts of a dim an earlier view split, in another order (the view-transpose-view "
            "channel shuffle), reorders that dim: a permutation")
_LOOKUP = ("embedding lookup: free (precedent of the verified 2019 WikiText-103 entries); the table is a stored weight, "
           "nonzeros × bits + mask like any weight, stored once with a conv/linear that reads it too (a tied softmax)")
_INDEX = ("address computation on integer or boolean index tensors (token ids and the comparisons, masks, offsets, "
          "counts and nonzero positions derived only from them, e.g. an adaptive input's cluster masks): free, as the "
          "address arithmetic of a lookup; an op on a value computed from floats is counted by its own rule")
_RECURRENT = ("per step, for a hidden size H with input E and recurrent input R (= H, or the projection size): each "
              "gate row's input and recurrent products form one dot product over its nonzero weights (L = L_ih + L_hh: "
              "L mults, L-1 adds) plus 1 bias add (b_ih + b_hh summed at export: one stored bias per gate row); "
              "an LSTM with proj_size adds the projection's dot products; a zero initial state costs the same as any "
              "(its W_hh is stored); dropout between layers in training is refused")
_LSTM = (f"LSTM (rules doc table): 4 gate rows per unit, 4H(E+R) mults and 4H(E+R-1) + 4H adds dense, then 3 sigmoids, "
         f"2 tanh, c' = f·c + i·g and h' = o·tanh(c'): 3 mults + 1 add per unit; {_RECURRENT}")
_GRU = (f"GRU (project table, derived as the LSTM's): r and z rows merge their dot products and biases (2H(E+H) mults, "
        f"2H(E+H-1) + 2H adds dense); the candidate n = tanh(W_in x + b_in + r·(W_hn h + b_hn)) keeps two dot products "
        f"with a bias each (H·E + H·H mults, H(E-1) + H(H-1) + 2H adds); then 2 sigmoids, 1 tanh, the reset product, "
        f"+ in n, and h' = n + z·(h - n): 2 mults + 2 adds + 1 sub per unit (each by its rule); stored biases 4H "
        f"(torch's 6H minus the 2H summed); {_RECURRENT}")
_RNN = f"Elman RNN h' = act(W_ih x + W_hh h + b): 1 gate row per unit, then tanh or ReLU per unit; {_RECURRENT}"
_FUSED = ("a fused cell kernel on gates computed by separate matmuls: per merged gate row 1 add joining the input and "
          "recurrent dot products and 1 bias add; GRU's candidate row 1 bias add on each of its two parts; then the "
          "cell's pointwise ops as in its full rule")
_COMPARISON = "a comparison counts as a multiply, like the official ReLU"
_MOVE = "data movement: free"
_RESHAPE = "reshape/copy: free; batch norm still folds through it"
_CONSTANT = "constant creation: free (no input)"
_NORM = ("over each group of n values: mean (n-1 adds + 1 mult), variance (n subtractions + n squares + n-1 adds "
         "+ 1 mult), + eps and rsqrt (1 add + 1 transcendental), normalise (n mults) = 2n+3 mults + 3n-1 adds; the "
         "affine γ and β when present: 1 mult + 1 add per element, stored 1 + 1 per channel at their width")
_ATTENTION = ("scaled dot-product attention softmax(scale·QKᵀ + mask)·V, per head and query row over n keys: n dot "
              "products over the head dim, n scale mults, n mask adds (only with attn_mask/attn_bias), softmax over n "
              "(3n-1 ops), value-dim dot products over n; n = all keys, or with is_causal the top-left-aligned keys "
              "j <= i (an explicit mask counts all keys); dropout_p > 0 is refused (training only); the math fallback "
              "(some dtypes and shapes) is counted op by op")


def _norm(name: str, group: str) -> Rule:
    # per element: 1 subtraction, 1 square, 1 normalising mult; per merge: the 2 sums (mean, variance);
    # per group: 2 divisions by n, rsqrt (mults) and + eps (add)
    return _project(NORM, f"{name} {_NORM}; a group is {group}", mults=2, adds=1, merge_adds=2, row_mults=3, row_adds=1)


#: The rule of ops on index tensors only (see ``_INDEX``); not an aten name.
INDEX_ARITHMETIC = "(index arithmetic)"
#: The rule of a view that reorders a dim split by an earlier view (see ``_PERMUTE``); not an aten name.
REORDERING_VIEW = "(reordering view)"

_POOL_VALID = "valid = the window's in-bounds elements (padding and ceil_mode overhang excluded)"
_NEAREST = ("nearest upsampling (F.interpolate / nn.Upsample mode 'nearest' or 'nearest-exact'): every output element "
            "is a copy of one input element, data movement like repeat: free; a bit tag passes through")


def _interpolation(name: str, taps: int) -> Rule:
    return _project(ELEMENTWISE, f"{name} interpolation (F.interpolate / nn.Upsample, any scale, align_corners or "
                                 f"not): each output element is a weighted sum of its {taps} neighbouring inputs, "
                                 f"the weights constants of the sizes (not stored), a dot product over L = {taps}: "
                                 f"{taps} mults + {taps - 1} adds by the official L·N and (L-1)·N, every tap "
                                 f"counted (a weight of 0 or 1 too)", mults=taps, adds=taps - 1)


#: The table. Keys are aten overload-packet names without the in-place underscore.
RULES: Mapping[str, Rule] = MappingProxyType({
    # dot products
    "convolution": Rule(CONV, True, "conv (dense, grouped, depthwise): L·N mults, (L-1)·N adds, N adds for a bias",
                        product=True),
    "mm": Rule(MATMUL, True, "linear / matmul: L·N mults, (L-1)·N adds", product=True),
    "addmm": Rule(MATMUL, True, "linear with bias: L·N mults, (L-1)·N adds + N adds for the bias", product=True),
    "bmm": Rule(MATMUL, True, "batched matmul: L·N mults, (L-1)·N adds", product=True),
    "baddbmm": Rule(MATMUL, True, "batched matmul with bias: L·N mults, (L-1)·N + N adds", product=True),
    # recurrent layers and cells: torch's composite functions, and every backend kernel they dispatch to
    **{name: _project(RECURRENT, {"lstm": _LSTM, "gru": _GRU}.get(cell, _RNN), cell=cell, layout="sequence")
       for name, cell in (("lstm", "lstm"), ("gru", "gru"), ("rnn_tanh", "rnn_tanh"), ("rnn_relu", "rnn_relu"))},
    **{f"{cell}_cell": _project(RECURRENT, {"lstm": _LSTM, "gru": _GRU}.get(cell, _RNN), cell=cell, layout="cell")
       for cell in CELLS},
    **{name: _project(RECURRENT, f"{name}: the cell its mode argument names (0 ReLU RNN, 1 tanh RNN, 2 LSTM, 3 GRU), "
                                 f"counted as the lstm / gru / rnn_* rules", cell="mode", layout=layout)
       for name, layout in (("_cudnn_rnn", "kernel"), ("miopen_rnn", "kernel"), ("mkldnn_rnn_layer", "layer"))},
    "_thnn_fused_lstm_cell": _project(RECURRENT, f"{_FUSED}; LSTM", cell="lstm", layout="fused_cell"),
    "_thnn_fused_gru_cell": _project(RECURRENT, f"{_FUSED}; GRU", cell="gru", layout="fused_cell"),
    # batch norm (every backend's variant)
    **{name: Rule(BATCH_NORM, True, "batch norm: folded into the conv/linear that produced its input (N bias adds, "
                                    "C bias params); else 1 mult + 1 add per element and 2 params per channel; "
                                    "batch statistics at inference (track_running_stats=False, instance norm) "
                                    "are refused")
       for name in ("native_batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit",
                    "cudnn_batch_norm", "miopen_batch_norm")},
    # official element-wise ops
    "relu": Rule(ELEMENTWISE, True, "ReLU: 1 per element, counted as a multiply", mults=1, keeps_bits=True),
    "silu": Rule(ELEMENTWISE, True, "swish / SiLU: 3 mults + 1 add per element", mults=3, adds=1),
    "sigmoid": Rule(ELEMENTWISE, True, "sigmoid: 2 mults + 1 add per element", mults=2, adds=1),
    "add": Rule(ELEMENTWISE, True, "residual / bias add: 1 add per output element", adds=1, alpha_scales="other"),
    "mul": Rule(ELEMENTWISE, True, "channel scale / product: 1 mult per output element", mults=1, product=True),
    "mean": Rule(REDUCE, True, "average (global pool): 1 mult per output, 1 add per merged input", mults=1, merge_adds=1),
    # project element-wise ops
    "sub": _project(ELEMENTWISE, "subtraction counts as an addition", adds=1, alpha_scales="other"),
    "rsub": _project(ELEMENTWISE, "reversed subtraction (1 - x) counts as an addition", adds=1, alpha_scales="self"),
    "div": _project(ELEMENTWISE, "division counts as a multiply", mults=1),
    "hardtanh": _project(ELEMENTWISE, f"ReLU6 / hardtanh: a clip, 1 op per element counted as a multiply; {_CLIP}",
                         mults=1),
    "clamp": _project(ELEMENTWISE, f"clamp with both bounds: a clip, 1 op per element counted as a multiply; {_CLIP}",
                      mults=1),
    "clamp_min": _project(ELEMENTWISE, "clamp with one bound: 1 comparison per element", mults=1),
    "clamp_max": _project(ELEMENTWISE, "clamp with one bound: 1 comparison per element", mults=1),
    **{name: _project(ELEMENTWISE, _COMPARISON, mults=1)
       for name in ("maximum", "minimum", "gt", "ge", "lt", "le", "eq", "ne")},
    **{name: _project(ELEMENTWISE, _TRANSCENDENTAL, mults=1)
       for name in ("tanh", "exp", "log", "sqrt", "rsqrt", "erf", "pow", "reciprocal")},
    **{name: _project(ELEMENTWISE, _BITWISE, mults=1)
       for name in ("bitwise_and", "bitwise_or", "bitwise_xor", "bitwise_not", "logical_and", "logical_or",
                    "logical_xor", "logical_not")},
    **{name: _project(ELEMENTWISE, _SELECT, adds=1) for name in ("masked_fill", "where")},
    "hardsigmoid": _project(ELEMENTWISE, f"hard-sigmoid relu6(x + 3)/6: 1 add, the clip and the divide: 2 mults + 1 add "
                                         f"per element, as hard-swish without its product; {_CLIP}", mults=2, adds=1),
    "hardswish": _project(ELEMENTWISE, f"hard-swish x·relu6(x + 3)/6: 1 add (+3), the clip, the divide and the product: "
                                       f"3 mults + 1 add per element; {_CLIP}", mults=3, adds=1),
    "gelu": _project(ELEMENTWISE, "GELU (erf): 4 mults (erf counted as one) + 1 add per element", mults=4, adds=1),
    "gelu_tanh": _project(ELEMENTWISE, "GELU (tanh approximation): 7 mults (tanh counted as one) + 2 adds per element", mults=7, adds=2),
    "leaky_relu": _project(ELEMENTWISE, "leaky ReLU: 1 comparison + 1 mult per element, counted as 2 multiplies", mults=2),
    "elu": _project(ELEMENTWISE, "ELU: 1 comparison + exp + 1 mult per element, counted as 3 mults, + 1 add", mults=3, adds=1),
    "softplus": _project(ELEMENTWISE, "softplus log(1 + exp x): 2 mults (exp, log counted as one each) + 1 add per element", mults=2, adds=1),
    "mish": _project(ELEMENTWISE, "mish x·tanh(softplus x): 4 mults (exp, log, tanh, product) + 1 add per element", mults=4, adds=1),
    "sum": _project(REDUCE, "sum: 1 add per merged input", merge_adds=1),
    "amax": _project(REDUCE, "max over a dim: 1 comparison (multiply) per merged input", merge_mults=1, keeps_bits=True),
    "_softmax": _project(SOFTMAX, "softmax over n: 2n mults (exp, divide) + (n-1) adds = 3n-1 ops (precedent)", mults=2, merge_adds=1),
    "_safe_softmax": _project(SOFTMAX, "softmax of math attention (a fully masked row gives 0): as softmax, 3n-1 ops per row of n",
                              mults=2, merge_adds=1),
    "_log_softmax": _project(SOFTMAX, "log-softmax over n, x - log Σ exp x: n exps + 1 log (mults), (n-1) adds + n subtractions "
                                      "= 3n ops per row", mults=1, adds=1, merge_adds=1, row_mults=1),
    # normalisation and attention
    "native_layer_norm": _norm("layer norm", "the normalized_shape values of one position"),
    "native_group_norm": _norm("group norm", "C/G channels × all positions of one example"),
    # every backend's fused kernel; the math fallback arrives as mul (q and k by √scale), bmm, _safe_softmax
    **{name: _project(ATTENTION, _ATTENTION) for name in (
        "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_fused_attention_overrideable", "_scaled_dot_product_attention_math_for_mps")},
    # pooling
    **{name: _project(POOL, f"average pool: (valid-1) adds + 1 mult per output; {_POOL_VALID}", mults=1, merge_adds=1)
       for name in ("avg_pool2d", "avg_pool3d")},
    "_adaptive_avg_pool2d": _project(ADAPTIVE_POOL, "adaptive average pool: (window-1) adds + 1 mult per output", mults=1, merge_adds=1),
    "_adaptive_avg_pool3d": _project(ADAPTIVE_POOL, "adaptive average pool: (window-1) adds + 1 mult per output", mults=1, merge_adds=1),
    **{name: _project(POOL, f"max pool: (valid-1) comparisons (multiplies) per output; {_POOL_VALID}, dilation "
                            "followed", merge_mults=1, keeps_bits=True)
       for name in ("max_pool2d_with_indices", "max_pool3d_with_indices")},
    "adaptive_max_pool2d": _project(ADAPTIVE_POOL, "adaptive max pool: (window-1) comparisons (multiplies) per output", merge_mults=1, keeps_bits=True),
    # resampling; antialiased downsampling (_upsample_*_aa), whose taps grow with the scale, has no rule
    **{name: _project(FREE, _NEAREST) for name in (
        "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d",
        "_upsample_nearest_exact1d", "_upsample_nearest_exact2d", "_upsample_nearest_exact3d")},
    "upsample_linear1d": _interpolation("linear", 2),
    "upsample_bilinear2d": _interpolation("bilinear", 4),
    "upsample_trilinear3d": _interpolation("trilinear", 8),
    "upsample_bicubic2d": _interpolation("bicubic", 16),
    # Composite ops (reshape, flatten, contiguous, linear, matmul, chunk, narrow) arrive decomposed into
    # the ops below; dropout in eval mode executes no op at all.
    # free: reshapes and copies (batch norm folds through them)
    **{name: _view(_RESHAPE) for name in (
        "view", "_unsafe_view", "alias", "detach", "clone", "_to_copy", "unsqueeze", "squeeze", "lift_fresh")},
    # free: other data movement, reading a scalar
    **{name: _free(_MOVE) for name in (
        "t", "transpose", "permute", "expand", "cat", "stack", "split", "split_with_sizes", "unbind",
        "unsafe_split", "unsafe_split_with_sizes", "unsafe_chunk", "slice", "select", "as_strided", "index",
        "index_select", "gather", "index_put", "index_copy", "scatter", "masked_select", "masked_scatter", "repeat", "constant_pad_nd", "pixel_shuffle", "pixel_unshuffle",
        "copy", "_local_scalar_dense", "_pack_padded_sequence", "_pad_packed_sequence")},
    # lookups, permutations, index arithmetic
    "embedding": _project(LOOKUP, _LOOKUP),
    **{name: Rule(PERMUTATION, True, _PERMUTE) for name in ("channel_shuffle", "native_channel_shuffle", "roll", "flip",
                                                             REORDERING_VIEW)},
    INDEX_ARITHMETIC: _project(FREE, _INDEX),
    **{name: _free(_CONSTANT) for name in (
        "empty", "empty_like", "empty_strided", "zeros", "zeros_like", "ones", "ones_like", "full", "full_like",
        "new_zeros", "new_ones", "new_empty", "new_full", "scalar_tensor", "arange", "fill",
        "zero")},
})


def rule_key(name: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
    """The :data:`RULES` key of an executed aten op (overload-packet ``name``, its arguments).

    In-place ops map onto their out-of-place twin; ops whose cost depends on an argument map onto the
    variant that says so (``gelu`` with ``approximate='tanh'``, ``clamp`` with one bound).
    """
    if name.endswith("_") and not name.endswith("__"):
        name = name[:-1]
    if name == "gelu" and kwargs.get("approximate", "none") == "tanh":
        return "gelu_tanh"
    if name == "clamp":
        low = args[1] if len(args) > 1 else kwargs.get("min")
        high = args[2] if len(args) > 2 else kwargs.get("max")
        if low is None:
            return "clamp_max"
        if high is None:
            return "clamp_min"
    return name


#: The convention of a per-token count (:func:`scoring.counter.count_stream`), listed in its reports.
STREAM_CONVENTION = ("per token", "a language model is counted per token fed on-line (batch of one stream, one token "
                                  "per call, state carried): ops are the mean over the tokens counted, after the "
                                  "uncounted warm-up tokens that fill the state; the state entering the count is an "
                                  "activation; parameters are counted once")


def project_rules_note(rules: Mapping[str, Rule], keys: set[str] | list[str],
                       conventions: set[str] | list[str] = ()) -> dict[str, str]:
    """``{name: note}``: the project conventions, then the project (non-official) op rules among ``keys``, then the
    :data:`CONDITIONAL_CONVENTIONS` named in ``conventions``."""
    return {**PROJECT_CONVENTIONS, **{key: rules[key].note for key in sorted(keys) if not rules[key].official},
            **{key: CONDITIONAL_CONVENTIONS[key] for key in sorted(conventions)}}


# --- the score ------------------------------------------------------------------------------------
#: What a declared accumulator does with a sum past its width (``score.accumulator_overflow``): keep it modulo
#: 2^bits (two's complement), or clamp every partial sum. The count does not depend on it; verify's integer
#: execution applies it (scoring/entry/integer.py).
ACCUMULATOR_OVERFLOWS = ("wrap", "saturate")


#: The ``score.accumulator_bits`` setting that counts the additions of dot products in adder trees.
ADDER_TREE = "adder_tree"


def accumulator_setting(setting: Any) -> int | str:
    """The counter's accumulator for a ``score.accumulator_bits`` setting: a width of 1..32 bits at which every
    addition counts, or :data:`ADDER_TREE`; ValueError (one line) for anything else."""
    if setting == ADDER_TREE or (isinstance(setting, int) and not isinstance(setting, bool) and 1 <= setting <= 32):
        return setting
    raise ValueError(f"score.accumulator_bits={setting!r} must be an integer in 1..32 or {ADDER_TREE}")


def accumulator_name(setting: int | str) -> str:
    """How a report names an accumulator setting: ``"adder tree"`` or ``"N-bit"``."""
    return "adder tree" if setting == ADDER_TREE else f"{setting}-bit"


def freebie_setting(setting: Any) -> bool | None:
    """The counter's ``freebie`` argument for a ``score.freebie`` setting: None for ``auto`` (on unless a tensor is
    quantized below 16 bits), else the bool; ValueError for anything but auto, true or false."""
    if setting == "auto":
        return None
    if isinstance(setting, bool):
        return setting
    raise ValueError(f"score.freebie={setting!r} must be auto, true or false")


def score_terms(task: str, params: int | float | Fraction, ops: int | float | Fraction) -> tuple[Fraction, Fraction]:
    """(params / baseline_params, ops / baseline_ops), exact; params and ops in 32-bit equivalents."""
    base = baseline(task)
    return Fraction(params) / base.params, Fraction(ops) / base.ops


def score(task: str, params: int | float | Fraction, ops: int | float | Fraction) -> float:
    """The MicroNet score: params / baseline_params + ops / baseline_ops (lower is better)."""
    params_term, ops_term = score_terms(task, params, ops)
    return float(params_term + ops_term)
