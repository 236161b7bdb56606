"""An entry's model as an ONNX file with QuantizeLinear / DequantizeLinear (QDQ) nodes, as runtimes deploy it.

Every weight quantizer of :mod:`compress.quantization` becomes its integers, stored as an int8 initializer, and a
per-output-channel ``DequantizeLinear``; every input quantizer a per-tensor ``QuantizeLinear`` →
``DequantizeLinear`` pair (uint8 when calibrated unsigned, else int8; zero-point 0 either way, as in training).
ONNX's integer containers are 8 bits wide: a declared width of 2..7 bits (and the symmetric signed grid, which
never uses −128) keeps its exact range with a ``Clip`` in front of the ``QuantizeLinear``, so the file computes
what the fake-quantized model computes, but it stores and runs those values as int8 — :class:`Stored` records
each declared width beside its container. A 16-bit width has no integer kernel here and stays float32.

A batch norm that follows a conv with dequantized weights is folded into it in the file
(:func:`fold_batch_norms`): the integers keep their grid, each channel's scale absorbs γ/σ (the project rule
of :mod:`compress.quantization`), and the runtime then sees the QDQ pattern it fuses into integer kernels.
Float weights are folded by the exporter itself.

The TorchScript-based exporter (``torch.onnx.export(dynamo=False)``) is used: it needs no onnxscript and takes
each quantizer's ONNX nodes from a ``symbolic`` method. onnx and torch are imported by the functions that use them
(onnx is the ``deploy`` extra). May import compress/ and scoring core.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from compress.base import find_parametrization, weight_layers
from compress.quantization import ActivationQuantizer, WeightQuantizer, round_to_grid
from scoring.entry.deploy.graph import fold_batch_norms
from scoring.errors import UserError

#: ONNX opset of the exported files (per-axis DequantizeLinear needs 13 or later).
OPSET = 17
#: Widest declared width that fits an 8-bit integer container.
CONTAINER_BITS = 8
INPUT_NAME, OUTPUT_NAME = "input", "output"


@dataclass
class Stored:
    """How the file stores what the scorer counts: per weight tensor and per quantized input."""

    #: One per conv/linear/embedding weight: layer, declared bits (32 = float), container, elements, zeros.
    weights: list[dict[str, Any]] = field(default_factory=list)
    #: One per input quantizer: layer, declared bits, container.
    inputs: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """As recorded in the measurement JSON."""
        return {"weights": self.weights, "inputs": self.inputs}


class _QuantizeDequantize(torch.autograd.Function):
    """Per-tensor fake quantization; exported as [Clip →] QuantizeLinear → DequantizeLinear."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float, qmin: int, qmax: int) -> torch.Tensor:
        return round_to_grid(x, torch.tensor(scale, dtype=torch.float32), qmin, qmax).to(x.dtype)

    @staticmethod
    def symbolic(g: Any, x: Any, scale: float, qmin: int, qmax: int) -> Any:
        container = torch.uint8 if qmin >= 0 else torch.int8
        info = torch.iinfo(container)
        if (qmin, qmax) != (info.min, info.max):  # the declared grid is narrower than the container's
            low, high = (np.float32(bound) * np.float32(scale) for bound in (qmin, qmax))
            x = g.op("Clip", x, _constant(g, low), _constant(g, high))
        step, zero = _constant(g, np.float32(scale)), g.op("Constant", value_t=torch.tensor(0, dtype=container))
        return g.op("DequantizeLinear", g.op("QuantizeLinear", x, step, zero), step, zero)


def _constant(g: Any, value: np.float32) -> Any:
    return g.op("Constant", value_t=torch.tensor(float(value), dtype=torch.float32))


class _Dequantize(torch.autograd.Function):
    """int8 integers times one scale per output channel; exported as a per-axis DequantizeLinear."""

    @staticmethod
    def forward(ctx: Any, integers: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return integers.float() * scale.view(-1, *[1] * (integers.dim() - 1))

    @staticmethod
    def symbolic(g: Any, integers: Any, scale: Any) -> Any:
        return g.op("DequantizeLinear", integers, scale, axis_i=0)


class _InputQDQ(nn.Module):
    """Replaces an :class:`ActivationQuantizer` (called from the layer's pre-hook as before); wider than a
    container, it exports as the float operations of its rounding."""

    def __init__(self, quantizer: ActivationQuantizer) -> None:
        super().__init__()
        self.scale, self.qmin, self.qmax = float(quantizer.scale.item()), quantizer.qmin, quantizer.qmax
        self.integer = quantizer.micronet_bits <= CONTAINER_BITS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.integer:
            return _QuantizeDequantize.apply(x, self.scale, self.qmin, self.qmax)
        return round_to_grid(x, torch.tensor(self.scale, dtype=torch.float32), self.qmin, self.qmax).to(x.dtype)


class _DequantizedWeight(nn.Module):
    """A parametrization that ignores the float weight and returns its stored integers dequantized."""

    def __init__(self, integers: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("integers", integers)
        self.register_buffer("scale", scale)

    def forward(self, _weight: torch.Tensor) -> torch.Tensor:
        return _Dequantize.apply(self.integers, self.scale)


def deployable(model: nn.Module) -> tuple[nn.Module, Stored]:
    """A copy of ``model`` (an entry's, rebuilt by :func:`scoring.entry.build_model_from_entry`) whose quantizers
    export as QDQ nodes and compute exactly what they computed; and how it stores each weight and input."""
    model = copy.deepcopy(model).cpu().eval()
    stored = Stored([_store_weight(name, module) for name, module in weight_layers(model).items()])
    for name, module in model.named_modules():
        quantizer = module._modules.get("input_quantizer")
        if isinstance(quantizer, ActivationQuantizer):
            container = "float32" if quantizer.micronet_bits > CONTAINER_BITS else \
                "uint8" if quantizer.qmin >= 0 else "int8"
            stored.inputs.append({"layer": name, "bits": quantizer.micronet_bits, "container": container})
            module.input_quantizer = _InputQDQ(quantizer)
    return model, stored


def _store_weight(name: str, module: nn.Module) -> dict[str, Any]:
    """Replace a weight quantizer's chain (with the block mask before it, if any) by its stored integers."""
    quantizer = find_parametrization(module, WeightQuantizer)
    with torch.no_grad():
        weight = module.weight.detach()
    bits = 32 if quantizer is None else quantizer.micronet_bits
    record = {"layer": name, "bits": bits, "container": "float32", "elements": weight.numel(),
              "zeros": int((weight == 0).sum())}
    if quantizer is None or bits > CONTAINER_BITS:
        return record
    scale = quantizer.scale.detach().float().clone()
    integers = torch.round(weight / scale.view(-1, *[1] * (weight.dim() - 1))).to(torch.int8)
    # The chain is emptied rather than removed: removing parametrizations edits the parametrized class, which a
    # deep copy shares with the model it was copied from.
    chain = module.parametrizations["weight"]
    del chain[:]
    chain.append(_DequantizedWeight(integers, scale))
    return {**record, "container": "int8"}


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> Stored:
    """Write ``model`` (quantizers and all) as an ONNX file at ``path`` with a dynamic batch dimension; return how
    it stores weights and inputs. ``example`` is one input of the task's shape."""
    import onnx

    exported, stored = deployable(model)
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice; the file is checked below
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(exported, (example,), str(path), dynamo=False, opset_version=OPSET,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
        except torch.onnx.errors.OnnxExporterError as err:
            raise UserError(f"{type(model).__name__} cannot be exported to ONNX opset {OPSET} "
                            f"({str(err).splitlines()[0][:200]})", "measure a model of standard conv / linear / "
                            "pooling layers") from None
    graph = onnx.load(str(path))
    fold_batch_norms(graph)
    onnx.checker.check_model(graph)
    onnx.save(graph, str(path))
    return stored
