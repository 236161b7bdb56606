"""ONNX Runtime on this CPU: the timing of one ONNX file in a fresh process, the kernels it runs, and how its
outputs compare with the model it was exported from.

Each file is timed in a process of its own (``spawn``), so the peak memory of one model is not the other's: the
process imports numpy and onnxruntime only, records its resident memory, creates the session, runs it and records
its peak (Linux's ``VmRSS`` and ``VmHWM``, which start afresh in a new program, unlike ``ru_maxrss``, which keeps
the forking parent's; elsewhere the memory figures are None). Timings are medians after a warm-up; nothing else is controlled (other load on the machine
shows in them, and the settings are recorded with them). onnxruntime and onnx are the ``deploy`` extra; without
them :func:`require_runtime` refuses in one line. Imports nothing of ours but scoring core (the error type), and
neither torch nor the entry format, so that the timing processes stay small.
"""
from __future__ import annotations

import multiprocessing
import statistics
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scoring.errors import UserError

#: What installs the runtime.
INSTALL = 'pip install -e ".[deploy]"'
#: Node types of an optimized graph that compute a conv / linear layer, with integer and with float arithmetic.
INTEGER_KERNELS = frozenset({"QLinearConv", "QLinearMatMul", "QGemm", "ConvInteger", "MatMulInteger",
                             "MatMulIntegerToFloat", "DynamicQuantizeMatMul"})
FLOAT_KERNELS = frozenset({"Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul"})


def require_runtime() -> None:
    """:class:`UserError` (one line naming the extra) unless onnx and onnxruntime can be imported."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as err:
        raise UserError(f"measuring needs onnx and onnxruntime, and {err.name or 'one of them'} is not installed",
                        f"install the deploy extra: {INSTALL}") from None


@dataclass(frozen=True)
class Settings:
    """How a file is timed (recorded with the figures)."""

    #: Untimed batch-1 runs first, then timed ones (the median is reported).
    warmup: int = 20
    runs: int = 200
    #: Batch of the throughput figure, and its timed runs (after ``warmup // 10 + 1`` untimed ones).
    batch: int = 64
    batch_runs: int = 20
    #: ONNX Runtime's intra-op threads (1: a figure that other load on a shared machine disturbs least).
    threads: int = 1

    def to_dict(self) -> dict[str, int]:
        """As recorded in the measurement JSON."""
        return asdict(self)


def _session(path: str, threads: int, *, optimized: bool = True, save: str | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3  # the warning that a saved optimized graph is for this machine only
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if save:
        options.optimized_model_filepath = save
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _median_seconds(run: Any, untimed: int, timed: int) -> float:
    for _ in range(untimed):
        run()
    times = []
    for _ in range(timed):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _time_in_this_process(path: str, shape: tuple[int, ...], settings: Settings) -> dict[str, float]:
    """The timing process: peak memory before and after, batch-1 latency and batch throughput."""
    rng = np.random.default_rng(0)
    single = rng.standard_normal((1, *shape), dtype=np.float32)
    batch = rng.standard_normal((settings.batch, *shape), dtype=np.float32)
    before = _memory("VmRSS")
    session = _session(path, settings.threads)
    name = session.get_inputs()[0].name
    latency = _median_seconds(lambda: session.run(None, {name: single}), settings.warmup, settings.runs)
    batch_time = _median_seconds(lambda: session.run(None, {name: batch}), settings.warmup // 10 + 1,
                                 settings.batch_runs)
    peak = _memory("VmHWM")
    return {"latency_ms": latency * 1e3, "throughput": settings.batch / batch_time, "peak_memory_bytes": peak,
            "runtime_memory_bytes": None if peak is None or before is None else peak - before}


def _memory(field: str) -> int | None:
    """A memory figure of this process from ``/proc/self/status`` in bytes; None where there is no such file."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return None
    return next((int(line.split()[1]) * 1024 for line in lines if line.startswith(field + ":")), None)


def time_file(path: Path, shape: tuple[int, ...], settings: Settings) -> dict[str, float]:
    """Time ONNX file ``path`` (inputs of ``shape`` less the batch) in a fresh process: ``latency_ms`` (median,
    batch 1), ``throughput`` (examples/s at ``settings.batch``), ``peak_memory_bytes`` (the process's peak resident
    memory) and ``runtime_memory_bytes`` (how much the session added to that peak), and ``file_bytes``."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        timing = pool.submit(_time_in_this_process, str(path), tuple(shape), settings).result()
    return {"file_bytes": path.stat().st_size, **timing}


def kernels(path: Path, threads: int) -> dict[str, Any]:
    """The node types ONNX Runtime runs ``path`` with after its optimizations, and how many conv / linear layers
    run on integer and on float kernels."""
    import onnx

    optimized = path.with_name(path.stem + ".optimized.onnx")
    _session(str(path), threads, save=str(optimized))
    ops = Counter(node.op_type for node in onnx.load(str(optimized)).graph.node)
    optimized.unlink()
    return {"integer": sum(ops[op] for op in INTEGER_KERNELS), "float": sum(ops[op] for op in FLOAT_KERNELS),
            "ops": dict(sorted(ops.items()))}


def agreement(path: Path, inputs: np.ndarray, expected: np.ndarray, threads: int) -> dict[str, Any]:
    """How the file's outputs on ``inputs`` compare with ``expected`` (the torch model's): run with ONNX Runtime's
    reference kernels (``file_max_abs_diff``: what the file computes) and as deployed, optimized
    (``runtime_max_abs_diff``, ``runtime_same_predictions``: integer kernels round differently, e.g. a bias
    quantized to int32)."""
    result: dict[str, Any] = {"examples": len(inputs)}
    for key, optimized in (("file", False), ("runtime", True)):
        session = _session(str(path), threads, optimized=optimized)
        outputs = session.run(None, {session.get_inputs()[0].name: inputs})[0]
        result[f"{key}_max_abs_diff"] = float(np.abs(outputs - expected).max())
        result[f"{key}_same_predictions"] = int((outputs.argmax(1) == expected.argmax(1)).sum())
    return result


def versions() -> dict[str, str]:
    """onnx and onnxruntime versions, and the processor the figures belong to."""
    import onnx
    import onnxruntime

    return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "python": sys.version.split()[0],
            "cpu": _cpu_name()}


def _cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        import platform
        return platform.processor() or "unknown"
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")
