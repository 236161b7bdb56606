"""A report compared with its recount, field by field: the table ``verify`` prints and decides on.

Every field of report.json is compared, nested ones (the gate, the validation metrics, the baseline, the project
rules, each layer's row) leaf by leaf: a field the recount does not have, or lacks, differs. Values are compared
exactly, as JSON values of the same type (``1`` is not ``1.0``, ``true`` is not ``1``), but those that go through
floating point, which are compared to a relative tolerance (:data:`REL_TOL`; the sums of a float32 evaluation to
:data:`NLL_REL_TOL`, see :func:`tolerance`). The layers must be the recount's, by name and in order. A text that
quotes such a sum (a perplexity gate's summary) is compared with the recount's words for the reported sum, when
that sum agrees.

report.md and WRITEUP.md are documents built from the report: :func:`document_row` compares one with its rebuild.
This module imports scoring core only.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from scoring.challenge import PERPLEXITY, challenge_task
from scoring.gate import check_gate

#: Relative tolerance for counts that go through floating point (params, ops, score, ...).
REL_TOL = 1e-9
#: A language model's NLL sum is float32 arithmetic over ~10⁵ tokens, summed in float64: another processor's
#: kernels change it in the 7th digit, never the verdict's margin that matters (the gate is compared exactly).
#: A mean loss is such a sum divided by an exact count.
NLL_REL_TOL = 1e-6
#: Fields compared to a relative tolerance, wherever they are nested; every other field is compared exactly.
_TOLERANCES = {**dict.fromkeys(("params", "ops", "mults", "adds", "score", "score_params_term", "score_ops_term",
                                "top1", "sparsity"), REL_TOL),
               **dict.fromkeys(("nll_sum", "loss_sum", "loss"), NLL_REL_TOL)}


class _Absent:
    """A field one side does not have."""

    def __repr__(self) -> str:
        return "absent"


ABSENT = _Absent()


def tolerance(field: str, recounted: Any) -> float | None:
    """The relative tolerance of ``field`` (its last name), None for an exact comparison. A perplexity is
    exp(NLL / count): it moves by the NLL's relative change times ln(perplexity)."""
    if field == "perplexity" and isinstance(recounted, float) and recounted > 0:
        return NLL_REL_TOL * max(1.0, math.log(recounted))
    return _TOLERANCES.get(field)


@dataclass
class Row:
    """One line of the comparison table."""

    field: str
    reported: Any
    recounted: Any
    #: Relative tolerance for numbers; None: the two must be the same JSON value.
    rel_tol: float | None = None

    @property
    def close(self) -> bool:
        """Whether the two values agree (exactly, or to ``rel_tol`` for numbers)."""
        a, b = self.reported, self.recounted
        if self.rel_tol is not None and all(_is_number(v) for v in (a, b)):
            try:
                return math.isclose(a, b, rel_tol=self.rel_tol, abs_tol=0.0)
            except OverflowError:  # a reported integer beyond any float differs from every recount
                return False
        return identical(a, b)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def identical(a: Any, b: Any) -> bool:
    """The same JSON value: same types (a bool is no number, an int no float), containers item by item."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(identical(a[key], b[key]) for key in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b))
    return a == b


def compare(reported: Mapping[str, Any], recounted: Mapping[str, Any]) -> list[Row]:
    """Rows for every field of ``reported`` and of ``recounted`` (but ``format_version``, which the reader checks):
    the top-level fields in the recount's order, then those only the report has."""
    expected = {**recounted, "gate": _gate_words(reported, recounted)}
    rows: list[Row] = []
    for key, value in expected.items():
        mine = reported.get(key, ABSENT)
        rows += _layer_rows(mine, value) if key == "layers" else _rows(key, key, mine, value)
    rows += [Row(key, reported[key], ABSENT) for key in reported if key not in expected and key != "format_version"]
    return rows


def _rows(path: str, key: str, mine: Any, theirs: Any) -> list[Row]:
    """Rows for the field at ``path`` (last name ``key``): one per leaf of the recount's value, and one per key
    only the report has."""
    if not isinstance(theirs, dict) or (mine is not ABSENT and not isinstance(mine, dict)):
        return [Row(path, mine, theirs, tolerance(key, theirs))]
    mine = mine if isinstance(mine, dict) else {}
    rows = [row for name, value in theirs.items() for row in _rows(f"{path}.{name}", name, mine.get(name, ABSENT),
                                                                  value)]
    return rows + [Row(f"{path}.{name}", value, ABSENT) for name, value in mine.items() if name not in theirs]


def _layer_rows(mine: Any, theirs: list[dict[str, Any]]) -> list[Row]:
    """The layers' names in order, then each layer's fields (those of a layer the report lacks: absent)."""
    if not isinstance(mine, list):
        return [Row("layers", mine, [layer["name"] for layer in theirs])]
    names = [layer.get("name", ABSENT) if isinstance(layer, dict) else layer for layer in mine]
    rows = [Row("layers", names, [layer["name"] for layer in theirs])]
    # When the names agree they are unique, so a layer is matched by name; else the rows show which differ.
    by_name = {layer["name"]: layer for layer in mine if isinstance(layer, dict) and isinstance(layer.get("name"), str)}
    for layer in theirs:
        rows += _rows(f"layers[{layer['name']}]", "", by_name.get(layer["name"], ABSENT), layer)
    return rows


def _gate_words(reported: Mapping[str, Any], recounted: Mapping[str, Any]) -> Any:
    """The recount's gate, its summary worded for the reported NLL sum when that agrees with the recount's (the
    summary quotes the sum to 3 decimals, which another processor's float32 kernels may move)."""
    gate, nll_sum = recounted["gate"], reported.get("nll_sum")
    if gate is None or challenge_task(recounted["task"]).metric != PERPLEXITY or not _is_number(nll_sum) or \
            not Row("nll_sum", nll_sum, recounted["nll_sum"], NLL_REL_TOL).close:
        return gate
    worded = check_gate(recounted["task"], total=recounted["total"], nll_sum=nll_sum).describe()
    return {**gate, "summary": worded}


def document_row(name: str, text: str | None, rebuilt: str) -> Row:
    """The row of a document (report.md, WRITEUP.md; None: absent) compared with its rebuild: their sha256 when
    they agree, else the first line where they differ."""
    if text is None:
        return Row(name, ABSENT, f"sha256 {hashlib.sha256(rebuilt.encode()).hexdigest()[:16]}")
    if text == rebuilt:
        digest = f"sha256 {hashlib.sha256(text.encode()).hexdigest()[:16]}"
        return Row(name, digest, digest)
    mine, theirs = text.splitlines(), rebuilt.splitlines()
    at = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
    return Row(name, _line(mine, at), _line(theirs, at))


def _line(lines: list[str], at: int) -> str:
    """Line ``at`` (0-based) of a document, numbered from 1, for the table."""
    return f"line {at + 1}: {lines[at] if at < len(lines) else '(end of file)'}"


def format_table(rows: Sequence[Row]) -> str:
    """The comparison as an aligned text table: every field, but the layer fields that agree."""
    shown = [row for row in rows if not (row.field.startswith("layers[") and row.close)]
    return aligned([("field", "reported", "recounted", "status")] + [
        (_clip(row.field), _clip(repr(row.reported)), _clip(repr(row.recounted)), "ok" if row.close else "DIFFERS")
        for row in shown])


def _clip(text: str, limit: int = 80) -> str:
    """A table cell of at most ``limit`` characters: a report can hold anything, the table stays readable."""
    return text if len(text) <= limit else text[:limit - 1] + "…"


def aligned(cells: Sequence[tuple[str, ...]]) -> str:
    """Rows of cells as left-aligned columns two spaces apart."""
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in cells)
