"""The files a finished run leaves beside its entry: ``report.json`` and ``report.md``.

``report.json`` is the report dict of :func:`scoring.report.build_report` with a ``format_version`` first;
a report written before that field existed reads as version 1 (the same layout), so existing runs still
reprint, export and verify. ``report.md`` is its markdown (:func:`scoring.report.markdown`). Each file is
written atomically; report.json is read within :data:`~scoring.entry.files.MAX_JSON_BYTES` as plain JSON and the
markdown files within :data:`~scoring.entry.files.MAX_MARKDOWN_BYTES` as UTF-8, since a bundle's may come from
anyone.
"""
from __future__ import annotations

import json
import os
import reprlib
from pathlib import Path
from typing import Any, Mapping

from scoring.entry.files import MAX_JSON_BYTES, MAX_MARKDOWN_BYTES, EntryError, atomic_write, plain_json, \
    read_regular
from scoring.report import markdown

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
#: Version of the report.json layout; bumped when a reader could misread an older report.
REPORT_FORMAT_VERSION = 1
#: Fields of a run's report.json that only the run can make, never a recount: the allocate stage's record (the
#: per-layer settings it chose, and what it predicted, on the validation split). A bundle's report.json leaves them
#: out, so that verify can compare every field it holds.
RUN_ONLY_FIELDS = ("allocation",)


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
    text = markdown(report)
    atomic_write(out / REPORT_MD, lambda tmp: tmp.write_text(text))
    return document


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


def read_markdown(directory: str | os.PathLike, name: str) -> str | None:
    """The text of the markdown file ``name`` of a run dir or bundle (report.md, WRITEUP.md), or None when it is
    absent; :class:`EntryError` for anything but a regular UTF-8 file within the size cap."""
    directory = Path(directory)
    path = directory / name
    if not os.path.lexists(path):
        return None
    try:
        return read_regular(path, within=directory, limit=MAX_MARKDOWN_BYTES).decode("utf-8")
    except UnicodeDecodeError as err:
        raise EntryError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); get an intact copy of the "
                         "bundle or re-export it") from None
