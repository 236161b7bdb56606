"""The reference integer executor: an entry run with integer arithmetic wherever it declares integers.

Fake quantization evaluates a quantized entry in float32: ``conv(s_x·q_x, s_w·q_w)`` with float32 rounding in every
sum. Hardware that the count describes multiplies the integer codes and accumulates them in an integer register of
the declared width. This module runs that arithmetic, on a copy of the model:

* **Integer layers.** A ``Conv2d`` or ``Linear`` whose weight has a weight quantizer *and* whose input has an input
  quantizer (``compress.quantization``) gets an integer forward: the input's codes ``q_x`` (the quantizer's output
  divided by its step, checked to be exact integers in range), the weight's codes ``q_w`` (likewise, once), the
  accumulator ``Σ q_x·q_w`` computed exactly, then the declared accumulator applied to it (below), then
  requantized in **floating point**, not by a fixed-point multiplier and shift: ``acc · (s_w[c] · s_x)`` (``s_w``
  per output channel or one per tensor), the two steps the quantizers compute with (rounded to their stored width:
  float32, IEEE half or a power of two, all exact in float32) multiplied exactly in float64 (24 + 24 significant
  bits), times the accumulator in float64 (one rounding, relative error at most 2^-53), then rounded to float32,
  the precision of what follows; the bias as the layer uses it (float32, or the fake-quantized value of a
  ``bias_bits`` quantizer) is added after, in float32. A model whose ``other_ops`` run in fp16 / bf16 does not
  round this arithmetic (it stands in for a conv / linear, which it never rounds): the ops that read the output
  round it, as they round a float layer's.
* **Exactness.** The integer products and sums are computed in float64, which is exact while every partial sum is
  below 2^53: each layer checks ``K · max|q_x| · max|q_w| < 2^53`` (K = products per output) once when it is
  set up and refuses to run otherwise; the convolutions run with cuDNN off (im2col + matrix product, or the direct
  depthwise kernel: sums of integer products, no transforms), and every accumulator is checked to be an integer.
* **The accumulator.** ``score.accumulator_bits`` (32 by default, what the count charges additions at; an
  ``adder_tree`` sums exactly, every level at the width it needs, so it never overflows) and
  ``score.accumulator_overflow`` (``wrap``, the default, or ``saturate``): an accumulator value outside
  ``[-2^(A-1), 2^(A-1)-1]`` is an overflow, counted per layer. ``wrap`` keeps the result modulo 2^A (two's
  complement: the order of the sum does not matter, a result is wrong exactly when the true sum is out of range);
  ``saturate`` clamps every partial sum, in the order of the weight's flattened input dimensions (input channel,
  kernel row, kernel column; a linear layer's inputs in order): the outputs whose bound ``Σ|q_x|·|q_w|`` fits the
  range cannot saturate, the others are summed term by term.
* **Float where the entry declares float.** Everything else runs as the entry declares it, in float32: batch norm
  (stored unfolded), activations, pooling, residual additions, a layer whose input or weight is not quantized,
  LSTM nonlinearities and state updates, attention's products of two activations, the softmax, and table lookups
  (they read the stored values, exactly). Functional uses of a weight outside its layer's ``forward`` (the tied
  adaptive input multiplies a table row by a projection's transposed weight, whose per-channel scales lie along the
  sum) stay float too: they are listed as such in each layer's ``mode``.

What that covers, by model: the image models entirely (conv, grouped and depthwise conv and linear layers run in
integers; pooling, residual additions, batch norm, activations in float32, as declared); the LSTM language model's
gate matrices, projections and adaptive-softmax clusters in integers, its cell nonlinearities, state and softmax in
float32; Transformer-XL's quantized linears (attention projections, feed-forward, softmax clusters) in integers, its
attention products of two activations (QKᵀ, attention·V, the relative-position terms), layer norms and softmax in
float32, since the entry declares no quantizer on those operands.

:func:`integer_check` is verify's call: the integer run of an entry on its test split, or None for an entry
without integer layers. :func:`run_integer` evaluates the integer copy on the task's test split (exact
correct/total, or the exact NLL sum) next to the fake-quantized float model, and reports how many predictions
differ (each one with the float model's top-2 margin: the float rounding that decided it), the NLL difference, and
per layer its outputs, overflows and largest accumulator. This module may import data/, compress/, scoring core and the entry format.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from compress.precision import exact_ops
from data.tasks import Evaluation, Task
from scoring.entry.bundle import Entry
from scoring.entry.files import EntryError
from scoring.entry.model_report import load_test_split
from scoring.gate import GateResult, check_gate
from scoring.rules import ACCUMULATOR_OVERFLOWS, ADDER_TREE, accumulator_name, accumulator_setting

#: float64 holds every integer below this exactly.
EXACT_LIMIT = 2 ** 53
#: Outputs summed term by term at once under ``saturate`` (bounds the memory of the products).
_CHUNK = 1 << 14


@dataclass(frozen=True)
class Accumulator:
    """The declared accumulator: its width in bits, or an adder tree (every level at the width it needs: the exact
    sum, never an overflow), and what an overflow does."""

    bits: int | str = 32
    overflow: str = "wrap"

    def __post_init__(self) -> None:
        width_ok = self.bits == ADDER_TREE or isinstance(self.bits, int) and 1 <= self.bits <= 52
        if not width_ok or self.overflow not in ACCUMULATOR_OVERFLOWS:
            raise ValueError(f"accumulator of {self.bits!r} bits, overflow {self.overflow!r}: expected 1..52 bits or "
                             f"{ADDER_TREE}, and one of {', '.join(ACCUMULATOR_OVERFLOWS)}")

    @classmethod
    def from_score(cls, score: Mapping[str, Any]) -> Accumulator:
        """The accumulator that score settings declare (``accumulator_bits``, ``accumulator_overflow``)."""
        return cls(accumulator_setting(score.get("accumulator_bits", 32)), score.get("accumulator_overflow", "wrap"))

    @property
    def low(self) -> int:
        return -2 ** (self.bits - 1)

    @property
    def high(self) -> int:
        return 2 ** (self.bits - 1) - 1


@dataclass
class LayerRun:
    """What one conv / linear / embedding layer did in the integer run."""

    name: str
    type: str
    #: "integer", or why it runs in float.
    mode: str
    weight_bits: int | None = None
    input_bits: int | None = None
    #: Accumulator values computed, values outside the declared accumulator, largest |exact accumulator|.
    outputs: int = 0
    overflows: int = 0
    max_abs: int = 0

    def to_dict(self) -> dict[str, Any]:
        """As verify's JSON writes it, with the accumulator bits the largest value needs (sign included)."""
        return {"name": self.name, "type": self.type, "mode": self.mode, "weight_bits": self.weight_bits,
                "input_bits": self.input_bits, "outputs": self.outputs, "overflows": self.overflows,
                "max_abs_accumulator": self.max_abs, "bits_needed": self.max_abs.bit_length() + 1}


def exact_codes(values: torch.Tensor, step: torch.Tensor, low: int, high: int, what: str) -> torch.Tensor:
    """The integer codes (float64) of fake-quantized ``values`` on the grid ``step · [low, high]``; ValueError
    unless ``codes · step`` gives ``values`` back exactly, with every code in range."""
    codes = torch.round(values / step)
    if not torch.equal(codes * step, values) or (codes.numel() and (codes.min() < low or codes.max() > high)):
        raise ValueError(f"{what} is not on its quantization grid [{low}, {high}] × step")
    return codes.double()


def saturating_sum(terms: torch.Tensor, low: int, high: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of ``terms`` summed left to right in an accumulator that clamps to ``[low, high]`` after every
    addition; returns the sums and whether each row saturated."""
    total = torch.zeros(terms.shape[0], dtype=terms.dtype, device=terms.device)
    saturated = torch.zeros(terms.shape[0], dtype=torch.bool, device=terms.device)
    for column in terms.unbind(1):
        total += column
        saturated |= (total < low) | (total > high)
        total.clamp_(low, high)
    return total, saturated


class IntegerForward:
    """The forward of one integer conv / linear layer, in place of ``module.forward`` on the executor's copy.

    It receives the input quantizer's output (the pre-hook still runs) and the layer's parameters as they are."""

    def __init__(self, module: nn.Module, run: LayerRun, accumulator: Accumulator):
        from compress import WeightQuantizer
        from compress.base import find_parametrization

        self.module, self.run, self.accumulator = module, run, accumulator
        self.conv = isinstance(module, nn.Conv2d)
        quantizer, inputs = find_parametrization(module, WeightQuantizer), module.input_quantizer
        with torch.no_grad():  # the steps the quantizers compute with: rounded to their stored width
            weight, weight_step = module.weight.detach(), quantizer.stored_step()
            step = weight_step.view(-1, *[1] * (weight.dim() - 1))  # per channel, or one (per tensor)
            self.weight = exact_codes(weight, step, quantizer.qmin, quantizer.qmax, f"layer {run.name}'s weight")
            self.input_step = inputs.stored_step()
            rescale = weight_step.double() * self.input_step.double()  # exact: 24 + 24 bits
        self.rescale = rescale.view(-1, 1, 1) if self.conv else rescale
        self.input_range = (inputs.qmin, inputs.qmax)
        self.products = weight[0].numel()
        bound = self.products * max(-inputs.qmin, inputs.qmax) * int(self.weight.abs().max())
        if bound >= EXACT_LIMIT:
            raise ValueError(f"layer {run.name}: its sums reach {bound:,}, beyond what float64 holds exactly (2^53)")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # In place of a conv / linear, which other_ops never rounds: what follows rounds its output as it reads it.
        with exact_ops():
            return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        codes = exact_codes(x, self.input_step, *self.input_range, f"layer {self.run.name}'s input")
        accumulator = self._sum(codes, self.weight)
        if not torch.equal(accumulator, accumulator.round()):
            raise ValueError(f"layer {self.run.name}: a sum of integer products came out fractional")
        accumulator = self._declared(accumulator, codes)
        out = (accumulator * self.rescale).to(x.dtype)
        return out if self.module.bias is None else out + self.module.bias

    def _sum(self, codes: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Σ codes · weight per output, in float64 (exact below 2^53), cuDNN off (no transform-based algorithm)."""
        if not self.conv:
            return F.linear(codes, weight)
        m = self.module
        with torch.backends.cudnn.flags(enabled=False):
            return F.conv2d(codes, weight, None, m.stride, m.padding, m.dilation, m.groups)

    def _declared(self, accumulator: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """The exact sums as the declared accumulator leaves them; overflows counted."""
        run, acc = self.run, self.accumulator
        run.outputs += accumulator.numel()
        if accumulator.numel():
            run.max_abs = max(run.max_abs, int(accumulator.abs().max()))
        if acc.bits == ADDER_TREE:
            return accumulator
        if acc.overflow == "wrap":
            outside = (accumulator < acc.low) | (accumulator > acc.high)
            run.overflows += int(outside.sum())
            # Exact: |values| < 2^53 and the modulus is a power of two.
            wrapped = torch.remainder(accumulator - acc.low, 2.0 ** acc.bits) + acc.low
            return torch.where(outside, wrapped, accumulator)
        risky = self._sum(codes.abs(), self.weight.abs()) > acc.high  # only these can saturate on the way
        if bool(risky.any()):
            accumulator = self._saturated(accumulator, codes, risky)
        return accumulator

    def _saturated(self, accumulator: torch.Tensor, codes: torch.Tensor, risky: torch.Tensor) -> torch.Tensor:
        """``accumulator`` with its ``risky`` outputs summed term by term in a saturating accumulator."""
        channels = self.weight.shape[0]
        weight = self.weight.reshape(channels, -1)
        if self.conv:
            m = self.module
            columns = F.unfold(codes, m.kernel_size, m.dilation, m.padding, m.stride).transpose(1, 2)
            flat, where = accumulator.flatten(2), risky.flatten(2).nonzero()
            group = where[:, 1] // (channels // m.groups)
        else:
            columns = codes.reshape(-1, 1, self.products)
            flat, where = accumulator.reshape(-1, channels, 1), risky.reshape(-1, channels, 1).nonzero()
            group = torch.zeros(len(where), dtype=torch.long, device=where.device)
        for part, groups in zip(where.split(_CHUNK), group.split(_CHUNK)):
            example, channel, position = part.unbind(1)
            rows = columns[example, position].view(len(part), -1, self.products)[torch.arange(len(part)), groups]
            sums, saturated = saturating_sum(rows * weight[channel], self.accumulator.low, self.accumulator.high)
            flat[example, channel, position] = sums
            self.run.overflows += int(saturated.sum())
        return flat.view_as(accumulator)


def _mode(module: nn.Module) -> tuple[str, int | None, int | None]:
    """(how a weight layer runs, its weight bits, its input bits)."""
    from compress import WeightQuantizer
    from compress.base import find_parametrization

    weight, inputs = find_parametrization(module, WeightQuantizer), module._modules.get("input_quantizer")
    bits = (None if weight is None else weight.micronet_bits, None if inputs is None else inputs.micronet_bits)
    if isinstance(module, nn.Embedding):
        return "table lookup: reads the stored values, no arithmetic", *bits
    missing = [what for what, found in (("weight", weight), ("input", inputs)) if found is None]
    if missing:
        return f"float: {' and '.join(missing)} not quantized", *bits
    if not isinstance(module, (nn.Conv2d, nn.Linear)):
        return f"float: no integer kernel here for {type(module).__name__}", *bits
    if isinstance(module, nn.Conv2d) and (module.padding_mode != "zeros" or isinstance(module.padding, str)):
        return f"float: padding {module.padding!r} mode {module.padding_mode} has no integer kernel here", *bits
    return "integer", *bits


def integer_copy(model: nn.Module, accumulator: Accumulator) -> tuple[nn.Module, list[LayerRun]]:
    """A copy of ``model`` whose integer layers (see the module docstring) run :class:`IntegerForward`, and the
    record of every conv / linear / embedding layer (filled as the copy runs)."""
    from compress.base import weight_layers

    executor = copy.deepcopy(model).eval()
    runs = []
    for name, module in weight_layers(executor).items():
        mode, weight_bits, input_bits = _mode(module)
        run = LayerRun(name, type(module).__name__.removeprefix("Parametrized"), mode, weight_bits, input_bits)
        if mode == "integer":
            module.forward = IntegerForward(module, run, accumulator)
        runs.append(run)
    return executor, runs


class _PairedClassifier(nn.Module):
    """Runs the integer copy and the float model on each batch; returns the integer logits and records every
    example whose top-1 prediction differs, with the float model's top-2 margin."""

    def __init__(self, integer: nn.Module, reference: nn.Module, layers: list[LayerRun]):
        super().__init__()
        self.integer, self.reference, self.layers = integer, reference, layers
        self.seen, self.differing = 0, []

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        before = sum(layer.overflows for layer in self.layers)
        out, ref = self.integer(inputs), self.reference(inputs)
        overflows = sum(layer.overflows for layer in self.layers) - before
        mine, theirs = out.float(), ref.float()
        for i in (mine.argmax(1) != theirs.argmax(1)).nonzero().flatten().tolist():
            top = theirs[i].topk(2).values
            self.differing.append(_difference(self.seen + i, int(theirs[i].argmax()), int(mine[i].argmax()),
                                              float(top[0] - top[1]), float((mine[i] - theirs[i]).abs().max()),
                                              overflows))
        self.seen += len(out)
        return out


def _difference(example: int, reference: int, integer: int, margin: float, difference: float,
                overflows: int) -> dict[str, Any]:
    """One differing prediction and its cause: the accumulator's overflows in its batch, or else the float model's
    rounding on a near tie."""
    if overflows:
        cause = f"accumulator overflows: {overflows:,} in this example's batch"
    else:
        cause = (f"rounding on a near tie: the float top-2 margin is {margin:.3g}, the logits of exact integer sums "
                 f"differ from the float32 ones by up to {difference:.3g}")
    return {"example": example, "float_prediction": reference, "integer_prediction": integer,
            "float_margin": margin, "max_logit_difference": difference, "cause": cause}


class _PairedLanguageModel(nn.Module):
    """Runs the integer copy and the float model on each window, each with its own state; returns the integer NLL
    and sums the float one."""

    def __init__(self, integer: nn.Module, reference: nn.Module):
        super().__init__()
        self.integer, self.reference = integer, reference
        self.reference_sum: torch.Tensor | None = None
        self.max_difference = 0.0

    def forward(self, tokens: torch.Tensor, state: Any = None, targets: torch.Tensor | None = None) -> tuple:
        mine, theirs = (None, None) if state is None else state
        out, mine = self.integer(tokens, mine, targets)
        ref, theirs = self.reference(tokens, theirs, targets)
        total = ref.double().sum()
        self.reference_sum = total if self.reference_sum is None else self.reference_sum + total
        self.max_difference = max(self.max_difference, float((out - ref).abs().max()))
        return out, (mine, theirs)


@dataclass
class IntegerRun:
    """The integer execution of an entry on its test split, beside its fake-quantized float evaluation."""

    task: str
    accumulator: Accumulator
    evaluation: Evaluation
    reference: Evaluation
    layers: list[LayerRun] = field(default_factory=list)
    #: Classification: every example whose prediction differs (see :func:`_difference`); None for a language model.
    differing: list[dict[str, Any]] | None = None
    #: Language model: the largest difference of one token's NLL.
    max_token_nll_difference: float | None = None

    @property
    def gate(self) -> GateResult:
        """The task's gate, decided on the integer evaluation."""
        if self.evaluation.correct is not None:
            return check_gate(self.task, correct=self.evaluation.correct, total=self.evaluation.total)
        return check_gate(self.task, nll_sum=self.evaluation.loss_sum, total=self.evaluation.total)

    @property
    def overflows(self) -> dict[str, int]:
        """Overflows of the declared accumulator, by integer layer."""
        return {layer.name: layer.overflows for layer in self.layers if layer.mode == "integer"}

    def to_dict(self) -> dict[str, Any]:
        """As verify's JSON writes it (``integer``)."""
        out: dict[str, Any] = {"accumulator_bits": self.accumulator.bits,
                               "accumulator_overflow": self.accumulator.overflow}
        if self.evaluation.correct is not None:
            out.update(correct=self.evaluation.correct, total=self.evaluation.total,
                       float_correct=self.reference.correct, differs=len(self.differing or []),
                       differing=self.differing)
        else:
            difference = self.evaluation.loss_sum - self.reference.loss_sum
            out.update(nll_sum=self.evaluation.loss_sum, tokens=self.evaluation.total,
                       float_nll_sum=self.reference.loss_sum, differs=None, nll_difference=difference,
                       nll_relative_difference=difference / self.reference.loss_sum if self.reference.loss_sum else 0.0,
                       max_token_nll_difference=self.max_token_nll_difference)
        gate = self.gate
        return {**out, "overflows": self.overflows, "gate_passed": gate.passed, "gate": gate.describe(),
                "layers": [layer.to_dict() for layer in self.layers]}

    def describe(self) -> str:
        """Two lines: the integer result beside the float one, overflows, and the gate on the integer result."""
        integer = sum(layer.mode == "integer" for layer in self.layers)
        if self.evaluation.correct is not None:
            result = (f"top-1 {self.evaluation.correct}/{self.evaluation.total} (float {self.reference.correct}/"
                      f"{self.reference.total}; {len(self.differing or [])} predictions differ)")
        else:
            result = (f"NLL {self.evaluation.loss_sum:.6f} over {self.evaluation.total:,} tokens (float "
                      f"{self.reference.loss_sum:.6f}, difference "
                      f"{self.evaluation.loss_sum - self.reference.loss_sum:+.3g})")
        overflows = {name: n for name, n in self.overflows.items() if n}
        shown = ", ".join(f"{name} {n:,}" for name, n in overflows.items()) if overflows else "none"
        return (f"integer execution ({integer} of {len(self.layers)} layers integer, accumulator "
                f"{accumulator_name(self.accumulator.bits)}, {self.accumulator.overflow}): {result}; "
                f"overflows: {shown}\n"
                f"integer {self.gate.describe()}")


def run_integer(model: nn.Module, task: Task, loader: Iterable, device: torch.device,
                accumulator: Accumulator) -> IntegerRun | None:
    """Evaluate ``model``'s integer copy on ``loader`` (the test split) beside ``model`` itself; None when no layer of
    ``model`` is integer (nothing to compare)."""
    executor, layers = integer_copy(model, accumulator)
    if not any(layer.mode == "integer" for layer in layers):
        return None
    model = model.eval()
    if task.example == "token":
        paired = _PairedLanguageModel(executor, model)
        evaluation = task.evaluate(paired, loader, device, "test")
        reference_sum = 0.0 if paired.reference_sum is None else paired.reference_sum.item()
        return IntegerRun(task.name, accumulator, evaluation, Evaluation("test", evaluation.total, reference_sum),
                          layers, max_token_nll_difference=paired.max_difference)
    paired = _PairedClassifier(executor, model, layers)
    evaluation = task.evaluate(paired, loader, device, "test")
    return IntegerRun(task.name, accumulator, evaluation, task.evaluate(model, loader, device, "test"), layers,
                      differing=paired.differing)


def integer_check(entry: Entry, model: nn.Module, *, data_root: str | None = None,
                  device: str = "auto") -> IntegerRun | None:
    """Verify's integer execution of ``entry`` (``model``, as rebuilt from it) on the test split of its task, under
    the accumulator its score settings declare; None when no layer of it is integer. The data are read as verify's
    recount reads them (:func:`~scoring.entry.model_report.load_test_split`). A failure to run is one
    :class:`~scoring.entry.files.EntryError` line."""
    task, test, resolved = load_test_split(entry.config, data_root=data_root, device=device)
    try:
        return run_integer(model.to(resolved), task, test, resolved, Accumulator.from_score(entry.config["score"]))
    except (ValueError, RuntimeError) as err:
        reason = (str(err).strip().splitlines() or [""])[0][:300]
        raise EntryError(f"the integer execution of the entry failed ({type(err).__name__}: {reason}); re-export the "
                         "entry of a finished run of this kit") from None
