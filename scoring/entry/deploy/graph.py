"""Batch norm folding in an exported ONNX graph, for convs whose weights are dequantized integers.

The exporter folds a batch norm into a conv with a float weight, but not into one whose weight a
``DequantizeLinear`` computes: the runtime would then run that conv in float and the batch norm apart. Folded here
as :mod:`compress.quantization`'s project rule says (the same integers, each output channel's scale times
γ/σ, a negative factor flipping the channel's integers instead, the grid being symmetric; a float bias), it
leaves ``DequantizeLinear → Conv`` with nothing in between, the pattern ONNX Runtime fuses into integer kernels.
Imports nothing of ours; onnx is imported by the caller.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np


def _constants(graph: Any) -> dict[str, np.ndarray]:
    """Every value of ``graph`` known before it runs: initializers, Constant nodes and Identity nodes of those."""
    from onnx import numpy_helper

    values = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        elif node.op_type == "Identity" and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]
    return values


def fold_batch_norms(model: Any) -> int:
    """Fold every BatchNormalization whose input is the only output read of a Conv with a per-channel
    DequantizeLinear weight into that Conv (``model``: an ``onnx.ModelProto``, changed in place); remove what is
    left unused. Returns the number of folds."""
    graph = model.graph
    values = _constants(graph)
    producer = {output: node for node in graph.node for output in node.output}
    readers: dict[str, int] = defaultdict(int)
    for node in graph.node:
        for name in node.input:
            readers[name] += 1
    folded = []
    for norm in (node for node in graph.node if node.op_type == "BatchNormalization"):
        conv = producer.get(norm.input[0])
        dequantize = producer.get(conv.input[1]) if conv is not None and conv.op_type == "Conv" else None
        if (dequantize is None or dequantize.op_type != "DequantizeLinear"
                or readers[conv.output[0]] != 1 or readers[dequantize.output[0]] != 1
                or not all(name in values for name in [*dequantize.input, *norm.input[1:], *conv.input[2:]])):
            continue
        _fold(graph, values, conv, dequantize, norm)
        folded.append(norm)
    for norm in folded:
        graph.node.remove(norm)
    _remove_unused(graph)
    return len(folded)


def _fold(graph: Any, values: dict[str, np.ndarray], conv: Any, dequantize: Any, norm: Any) -> None:
    """Rewrite ``conv`` (and its weight's ``dequantize``) to compute ``norm`` of its output."""
    from onnx import numpy_helper

    epsilon = next((attribute.f for attribute in norm.attribute if attribute.name == "epsilon"), 1e-5)
    gamma, beta, mean, variance = (values[name].astype(np.float64) for name in norm.input[1:5])
    factor = gamma / np.sqrt(variance + epsilon)
    integers, scale = values[dequantize.input[0]], values[dequantize.input[1]].astype(np.float64)
    bias = values[conv.input[2]].astype(np.float64) if len(conv.input) > 2 else np.zeros_like(factor)
    sign = np.where(factor < 0, -1, 1).reshape(-1, *[1] * (integers.ndim - 1))
    new = {"integers": (integers * sign).astype(integers.dtype),
           "scale": np.where(factor == 0, scale, scale * np.abs(factor)).astype(np.float32),
           "bias": ((bias - mean) * factor + beta).astype(np.float32)}
    if np.any(factor == 0):  # a channel the batch norm zeroes: its integers go, its scale stays positive
        new["integers"][factor == 0] = 0
    names = {key: f"{conv.output[0]}.folded_{key}" for key in new}
    graph.initializer.extend(numpy_helper.from_array(array, names[key]) for key, array in new.items())
    dequantize.input[0], dequantize.input[1] = names["integers"], names["scale"]
    del conv.input[2:]
    conv.input.append(names["bias"])
    conv.output[0] = norm.output[0]


def _remove_unused(graph: Any) -> None:
    """Drop nodes none of whose outputs is read (or is a graph output), then initializers nothing reads."""
    outputs = {output.name for output in graph.output}
    while True:
        read = {name for node in graph.node for name in node.input} | outputs
        unused = [node for node in graph.node if not any(output in read for output in node.output)]
        if not unused:
            break
        for node in unused:
            graph.node.remove(node)
    read = {name for node in graph.node for name in node.input}
    for tensor in [tensor for tensor in graph.initializer if tensor.name not in read]:
        graph.initializer.remove(tensor)
