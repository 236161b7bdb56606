"""The files a finished run leaves beside its entry: ``report.json``, ``report.md`` and, once the entry has been
measured on ONNX Runtime (``python -m scoring measure``), ``measured.json``.

``report.json`` is the report dict of :func:`scoring.report.build_report` with a ``format_version`` first;
a report written before that field existed reads as version 1 (the same layout), so existing runs still
reprint, export and verify. ``report.md`` is its markdown (:func:`scoring.report.markdown`). Each file is
written atomically; report.json is read within :data:`~scoring.entry.files.MAX_JSON_BYTES` as plain JSON,
since a bundle's may come from anyone. With a ``measured.json``, report.md has its counted-vs-measured table
(:func:`scoring.report.counted_vs_measured`).
"""
from __future__ import annotations

import json
import os
import reprlib
from pathlib import Path
from typing import Any, Mapping

from scoring.entry.files import MAX_JSON_BYTES, EntryError, atomic_write, plain_json, read_regular
from scoring.report import markdown

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
MEASURED_JSON = "measured.json"
#: Version of the report.json layout; bumped when a reader could misread an older report.
REPORT_FORMAT_VERSION = 1


def write_report_json(path: Path, report: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``report`` as a report.json file at ``path``, atomically; return the document written."""
    document = {"format_version": REPORT_FORMAT_VERSION, **report}
    text = json.dumps(document, indent=2) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))
    return document


def write_report(out_dir: str | os.PathLike, report: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``report.json`` and ``report.md`` into ``out_dir`` (created if needed), each atomically (a crash or a
    full disk leaves the previous file or none, never a torn one); return the document written to report.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    document = write_report_json(out / REPORT_JSON, report)
    _write_markdown(out, report)
    return document


def _write_markdown(out: Path, report: Mapping[str, Any]) -> None:
    """report.md of ``report``, with the measurement of ``out/measured.json`` when there is one."""
    text = markdown(report, read_measurement(out))
    atomic_write(out / REPORT_MD, lambda tmp: tmp.write_text(text))


def write_measurement(run_dir: str | os.PathLike, measurement: Mapping[str, Any]) -> None:
    """Write ``measurement`` as ``run_dir/measured.json`` and rewrite report.md with its table (report.json is
    left as it is)."""
    run_dir = Path(run_dir)
    report = read_report(run_dir)
    text = json.dumps(measurement, indent=1) + "\n"
    atomic_write(run_dir / MEASURED_JSON, lambda tmp: tmp.write_text(text))
    _write_markdown(run_dir, report)


def read_report(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``report.json`` of a run dir or bundle; :class:`EntryError` with what to run when absent, and for a
    format version this kit does not read."""
    directory = Path(directory)
    path = directory / REPORT_JSON
    if not os.path.lexists(path):
        raise EntryError(f"{directory} has no report.json; a run writes it when it finishes: "
                         "run `python train/run.py …` to the end first")
    report = plain_json(read_regular(path, within=directory, limit=MAX_JSON_BYTES), path)
    if not isinstance(report, dict):
        raise EntryError(f"{path} holds a JSON {type(report).__name__}, not a report (an object); "
                         "get an intact copy of the bundle or re-export it")
    version = report.get("format_version", 1)
    if version != REPORT_FORMAT_VERSION:
        raise EntryError(f"{path} has format_version {reprlib.repr(version)}; this micronet-kit reads version "
                         f"{REPORT_FORMAT_VERSION} — use the micronet-kit version that wrote it")
    return report


def read_measurement(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The ``measured.json`` of a run dir (written by ``python -m scoring measure``), or None when it has none."""
    path = Path(directory) / MEASURED_JSON
    if not os.path.lexists(path):
        return None
    measurement = plain_json(read_regular(path, within=Path(directory), limit=MAX_JSON_BYTES), path)
    if not isinstance(measurement, dict) or not isinstance(measurement.get("models"), list):
        raise EntryError(f"{path} is not a measurement (an object with models); run `python -m scoring measure "
                         f"{directory}` again")
    return measurement
