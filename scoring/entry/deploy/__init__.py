"""An entry as deployed today: exported to ONNX with QuantizeLinear / DequantizeLinear nodes and measured on ONNX
Runtime beside its task's dense float32 model (``python -m scoring measure``).

* :mod:`~scoring.entry.deploy.qdq` — the export: quantizers as QDQ nodes, int8 containers;
* :mod:`~scoring.entry.deploy.graph` — batch norm folding into convs with dequantized weights, in the ONNX graph;
* :mod:`~scoring.entry.deploy.runtime` — ONNX Runtime: timing in a fresh process, kernels, output agreement;
* :mod:`~scoring.entry.deploy.measure` — the command: entries and dense models measured in one run.

onnx and onnxruntime are the ``deploy`` extra (``pip install -e ".[deploy]"``); only the functions that need them
import them. This package may import data/, models/, compress/ and scoring core, never train/.
"""
