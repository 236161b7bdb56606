"""Reports of a scored model, built as data: the report dict, its markdown, a printed summary and TensorBoard logs.

The report (what ``report.json`` holds; :mod:`scoring.entry.runfiles` writes and reads the file) carries the
schema of docs/design.md (task, correct, total, top1 or perplexity, gate_passed, params, ops, mults, adds,
param_bits, freebie, score, baseline, layers) plus the split the metric comes from, the exact sums behind it (a
language model's nll_sum over ``total`` predicted tokens), the validation metrics, the score split into its two
terms, the project rules used, the accumulation (``accumulator_bits``: the setting, a width or ``adder_tree``;
``accumulator``: its name, "32-bit" or "adder tree"; with an adder tree ``float_dot_products``, the layers whose dot
products have a float operand, which make it unofficial) and the number of examples counted. Which metric a task is
judged on comes from :mod:`scoring.challenge`. report.md may end with the "Counted vs measured" section of a
measurement on ONNX Runtime (:func:`counted_vs_measured`; ``python -m scoring measure`` makes it). Pure builders of
the judge: this module imports nothing of ours
outside scoring/ core.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from scoring.challenge import PERPLEXITY, TOP1, challenge_task
from scoring.counter import Count
from scoring.gate import check_gate
from scoring.rules import ADDER_TREE, accumulator_name


def build_report(*, task: str, count: Count, evaluation: Mapping[str, Any] | None = None,
                 validation: Mapping[str, Any] | None = None, example: str = "example",
                 extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The report dict of ``count`` on ``task``; the gate is decided when an ``evaluation`` is given.

    ``example`` names what the scorer counted ops per ("image", "token": ``data.tasks.Task.example``).
    ``evaluation`` holds the exact sums of the final evaluation (``data.tasks.Evaluation.to_dict()``: split, total,
    loss_sum, and correct for top-1 tasks); ``validation`` the same for the validation split, if any. The report
    says which split each number comes from: ``split`` for the top-level metric, ``validation.split`` for those.
    """
    judged = challenge_task(task)
    base = judged.baseline
    params_term, ops_term = count.score_terms(task)
    evaluation = dict(evaluation or {})
    correct, total, nll_sum = evaluation.get("correct"), evaluation.get("total"), None
    if evaluation and judged.metric == PERPLEXITY:  # total counts the predicted tokens
        nll_sum = evaluation["loss_sum"]
    report: dict[str, Any] = {
        "task": task, "split": evaluation.get("split"), "correct": correct, "total": total,
        "top1": correct / total if correct is not None and total else None,
        "nll_sum": nll_sum, "perplexity": math.exp(nll_sum / total) if nll_sum is not None else None,
        "loss": evaluation.get("loss"), "validation": dict(validation) if validation else None,
        "gate_passed": None, "gate": None,
        "params": count.params, "ops": count.ops, "mults": count.mults, "adds": count.adds,
        "param_bits": count.param_bits, "freebie": count.freebie, "accumulator_bits": count.accumulator_bits,
        "accumulator": accumulator_name(count.accumulator_bits), **_float_dot_products(count),
        "examples": count.examples, "example": example,
        "score": count.score(task), "score_params_term": params_term, "score_ops_term": ops_term,
        "baseline": {"model": base.model, "params": base.params, "ops": base.ops},
        "project_rules": dict(count.project_rules),
        "layers": [dict(layer) for layer in count.layers],
    }
    if evaluation:
        gate = check_gate(task, correct=correct, total=total, nll_sum=nll_sum)
        report["gate_passed"] = gate.passed
        report["gate"] = {"metric": gate.metric, "threshold": float(gate.threshold), "summary": gate.describe()}
    for key, value in (extra or {}).items():
        if key in report:
            raise ValueError(f"extra report field {key!r} would overwrite a computed field; rename it")
        report[key] = value
    return report


def _num(value: float | int | None, digits: int = 0) -> str:
    if value is None:
        return "–"
    if float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.{max(digits, 2)}f}"


def layer_table(layers: list[Mapping[str, Any]]) -> str:
    """The per-layer markdown table (params and ops in 32-bit equivalents)."""
    lines = ["| layer | type | params | mults | adds | ops | sparsity | weight bits | input bits | note |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for layer in layers:
        sparsity = "–" if layer["sparsity"] is None else f"{layer['sparsity']:.1%}"
        lines.append(
            f"| {layer['name']} | {layer['type']} | {_num(layer['params'])} | {_num(layer['mults'])} | "
            f"{_num(layer['adds'])} | {_num(layer['ops'])} | {sparsity} | {_num(layer['weight_bits'])} | "
            f"{_num(layer['input_bits'])} | {layer['note']} |")
    return "\n".join(lines)


def totals_text(report: Mapping[str, Any]) -> str:
    """Totals and the score split into its two terms (a few plain lines)."""
    example = report.get("example", "example")  # reports written before it was recorded (a finished run reprints)
    base = report["baseline"]
    return "\n".join([
        f"params {_num(report['params'])} (32-bit equivalents; {report['param_bits']:,} bits)",
        f"ops    {_num(report['ops'])} (32-bit equivalents; {_num(report['mults'])} mults + {_num(report['adds'])} adds "
        f"per {example}, {_additions(report)}, freebie "
        f"{'on' if report['freebie'] else 'off'}, {report['examples']} {example}s)",
        f"score  {report['score']:.6f} = params {report['score_params_term']:.6f} ({_num(report['params'])} / "
        f"{base['params']:,}) + ops {report['score_ops_term']:.6f} ({_num(report['ops'])} / {base['ops']:,})",
    ])


def _float_dot_products(count: Count) -> dict[str, Any]:
    """With an adder tree, the layers whose dot products have a float operand (the adder tree is official only
    where there are none)."""
    return {"float_dot_products": dict(count.float_dot_products)} if count.accumulator_bits == ADDER_TREE else {}


def _additions(report: Mapping[str, Any]) -> str:
    if report["accumulator_bits"] != ADDER_TREE:
        return f"additions at {report['accumulator_bits']} bits"
    floats = len(report.get("float_dot_products") or {})
    if floats:
        return (f"dot products of integers summed in adder trees, those of {floats} layer(s) with a float operand "
                "at 32 bits: NOT an official score")
    return "dot products summed in adder trees"


def rules_text(report: Mapping[str, Any]) -> str:
    """The project rules the count used, one per line."""
    rules = report["project_rules"]
    if not rules:
        return "Only official rules were used."
    return "\n".join(f"- `{key}`: {note}" for key, note in rules.items())


def _gate_summary(report: Mapping[str, Any]) -> str:
    return report["gate"]["summary"] if report["gate"] else "gate not evaluated"


def markdown(report: Mapping[str, Any], measurement: Mapping[str, Any] | None = None) -> str:
    """The content of report.md; with a ``measurement`` (``measured.json``), its counted-vs-measured table too."""
    gate = _gate_summary(report)
    return "\n\n".join([
        f"# MicroNet report: {report['task']}",
        f"Baseline: {report['baseline']['model']}. {gate}.",
        "## Totals\n\n" + "\n".join(f"    {line}" for line in totals_text(report).splitlines()),
        "## Layers\n\n" + layer_table(report["layers"]),
        "## Project rules used\n\n" + rules_text(report),
        *([counted_vs_measured(measurement)] if measurement else []),
    ]) + "\n"


def counted_vs_measured(measurement: Mapping[str, Any]) -> str:
    """The "Counted vs measured" section: each model of a measurement (``python -m scoring measure``) with its
    counted figures beside its file size, latency, throughput and memory on ONNX Runtime, then what the runtime
    makes of the entries' sparsity and bit widths, with the numbers."""
    settings, versions = measurement["settings"], measurement["versions"]
    models = measurement["models"]
    dense = {row["name"]: row for row in models if row["role"] == "dense"}
    lines = [
        "## Counted vs measured", "",
        f"ONNX Runtime {versions['onnxruntime']} on {versions['cpu']}, {settings['threads']} thread(s); "
        f"latency: median of {settings['runs']} batch-1 runs after {settings['warmup']}; throughput: batch "
        f"{settings['batch']}, median of {settings['batch_runs']} runs; peak memory: of a process that only loads "
        "and runs the model (+ what the session added). Ratios are to the task's dense float32 model.", "",
        "| model | score | params (counted) | ops (counted) | weights stored | file | batch-1 latency | "
        "throughput (/s) | peak memory | layers on integer kernels |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    lines += [_measured_row(row, dense.get(row.get("dense"), row)) for row in models]
    notes = [note for row in models if row["role"] == "entry" for note in _measured_notes(row, dense[row["dense"]])]
    return "\n".join(lines + ([""] + notes if notes else []))


def _mebibytes(value: int | None) -> str:
    return "–" if value is None else f"{value / 2**20:.1f} MiB"


def _ratio(value: float, reference: float) -> str:
    return f"{value / reference:.2f}×" if reference else "–"


def _versus(measured: Mapping[str, Any], reference: Mapping[str, Any]) -> str:
    """File size and batch-1 latency as multiples of the dense model's."""
    return (f"file {_ratio(measured['file_bytes'], reference['file_bytes'])}, batch-1 latency "
            f"{_ratio(measured['latency_ms'], reference['latency_ms'])} the dense model's")


def _stored_text(stored: Mapping[str, Any]) -> str:
    """The containers of the weights, each with the declared widths it holds and the share of zeros."""
    parts = []
    for container in sorted({w["container"] for w in stored["weights"]}):
        held = [w for w in stored["weights"] if w["container"] == container]
        bits = "/".join(str(b) for b in sorted({w["bits"] for w in held}))
        zeros = sum(w["zeros"] for w in held) / max(1, sum(w["elements"] for w in held))
        declared = "not quantized" if bits == "32" else f"{bits}-bit declared"
        parts.append(f"{container} ({declared}; {zeros:.0%} zeros)")
    return ", ".join(parts)


def _measured_row(row: Mapping[str, Any], dense: Mapping[str, Any]) -> str:
    counted, measured, kernels = row["counted"], row["measured"], row["kernels"]
    reference = dense["measured"]
    return (f"| {row['name']} | {counted['score']:.4f} | {_num(counted['params'])} | {_num(counted['ops'])} | "
            f"{_stored_text(row['stored'])} | {measured['file_bytes'] / 1e3:,.1f} kB "
            f"({_ratio(measured['file_bytes'], reference['file_bytes'])}) | {measured['latency_ms']:.3f} ms "
            f"({_ratio(measured['latency_ms'], reference['latency_ms'])}) | {measured['throughput']:,.0f} "
            f"({_ratio(measured['throughput'], reference['throughput'])}) | "
            f"{_mebibytes(measured['peak_memory_bytes'])} (+{_mebibytes(measured['runtime_memory_bytes'])}) | "
            f"{kernels['integer']} of {kernels['integer'] + kernels['float']} |")


def _measured_notes(row: Mapping[str, Any], dense: Mapping[str, Any]) -> list[str]:
    """What the runtime gains from the entry's compression, and what it does not, with the numbers."""
    name, measured, reference = row["name"], row["measured"], dense["measured"]
    weights = row["stored"]["weights"]
    elements, zeros = sum(w["elements"] for w in weights), sum(w["zeros"] for w in weights)
    notes = []
    if row["counted"]["freebie"]:
        notes.append(
            f"- {name}: counted with the freebie (every parameter and multiplication at 16 bits): params "
            f"{_ratio(row['counted']['params'], dense['counted']['params'])} the dense model's. The file stores "
            f"float32 and ONNX Runtime multiplies in float32: {_versus(measured, reference)}.")
    if zeros >= 0.01 * elements:
        notes.append(
            f"- {name}: {zeros / elements:.1%} of its {elements:,} weights are zeros (unstructured sparsity). The count "
            f"charges nonzeros only: params {_ratio(row['counted']['params'], dense['counted']['params'])} the dense "
            f"model's, ops {_ratio(row['counted']['ops'], dense['counted']['ops'])}. ONNX Runtime stores and multiplies "
            f"the zeros with dense kernels: {_versus(measured, reference)}.")
    narrow = {kind: [t for t in row["stored"][kind] if t["bits"] < 8] for kind in ("weights", "inputs")}
    if narrow["weights"] or narrow["inputs"]:
        held = ", ".join(f"{t['bits']}-bit {kind} of {t['layer']}" for kind, tensors in narrow.items() for t in tensors)
        counted_bits = sum(w["elements"] * w["bits"] for w in narrow["weights"])
        stored_bits = 8 * sum(w["elements"] for w in narrow["weights"])
        notes.append(
            f"- {name}: {held} are stored and run as 8-bit integers (ONNX Runtime has no narrower kernels): those "
            f"weights take {counted_bits:,} bits at their declared widths and {stored_bits:,} in the file; a Clip in "
            "front of each such input keeps its declared range.")
    kernels, check = row["kernels"], row["check"]
    if any(w["container"] == "int8" for w in weights):
        notes.append(
            f"- {name}: {kernels['float']} of {kernels['integer'] + kernels['float']} conv/linear layers run on float "
            "kernels: ONNX Runtime fuses a layer into an integer kernel only where its output is quantized next, "
            "with no Clip in between; the others dequantize their int8 weights at every run.")
    notes.append(
        f"- {name}: on {check['examples']} random inputs ONNX Runtime gives the torch model's prediction for "
        f"{check['runtime_same_predictions']} (max |Δ output| {check['runtime_max_abs_diff']:.3g}; the file on "
        f"the runtime's reference kernels: {check['file_max_abs_diff']:.2g}).")
    return notes


def format_summary(report: Mapping[str, Any]) -> str:
    """A few lines for the console: task, gate verdict with exact counts, totals and score."""
    return "\n".join([f"[{report['task']}] {_gate_summary(report)}", totals_text(report)])


def log_report(writer: Any, report: Mapping[str, Any], step: int) -> None:
    """Log the score, its terms, the totals and the gate metric as scalars, and report.md as text."""
    scalars = {"score/total": report["score"], "score/params_term": report["score_params_term"],
               "score/ops_term": report["score_ops_term"], "count/params": report["params"],
               "count/ops": report["ops"], "count/mults": report["mults"], "count/adds": report["adds"]}
    if report["gate"]:
        metric = report["gate"]["metric"]
        scalars[f"gate/{metric}"] = report["top1"] if metric == TOP1 else report["perplexity"]
    for tag, value in scalars.items():
        writer.add_scalar(tag, value, step)
    writer.add_text("report", markdown(report), step)
