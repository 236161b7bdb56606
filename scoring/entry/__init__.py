"""The organizers' tools and the on-disk formats, by job:

* :mod:`~scoring.entry.files` — durable writes, and bounded reads of files that may come from anyone;
* :mod:`~scoring.entry.manifest` — the ``SHA256SUMS`` manifest that seals a bundle;
* :mod:`~scoring.entry.bundle` — the entry format (``entry.json`` + ``model.safetensors``) and the model rebuild;
* :mod:`~scoring.entry.runfiles` — ``report.json`` / ``report.md`` of a run or bundle, and ``measured.json``;
* :mod:`~scoring.entry.model_report` — evaluate → count → report, shared by the run, verify and the scoring CLI;
* :mod:`~scoring.entry.kit` — what the kit defines (tasks, official score settings) and the check of an entry
  against it;
* :mod:`~scoring.entry.deploy` — an entry as an ONNX file with QDQ nodes, measured on ONNX Runtime;
* the commands: :mod:`~scoring.entry.export`, :mod:`~scoring.entry.verify`, :mod:`~scoring.entry.architecture`
  (``python -m scoring`` dispatches to them), and :mod:`~scoring.entry.boundary`, every command's error boundary.

These modules may import data/, models/, compress/, conf and scoring core, never train/. The names below are
loaded on first use, so that importing :mod:`scoring.entry.boundary` does not load the entry format.
"""
from __future__ import annotations

import importlib
from typing import Any

#: The public API and the module that defines each name.
_API = {
    "EntryError": "files", "atomic_write": "files", "open_regular": "files", "read_regular": "files",
    "sha256_file": "files", "MAX_BUNDLE_BYTES": "files", "MAX_JSON_BYTES": "files", "MAX_MODULES": "files",
    "MANIFEST_FILE": "manifest", "FileCheck": "manifest", "check_manifest": "manifest", "write_manifest": "manifest",
    "ENTRY_JSON": "bundle", "WEIGHTS_FILE": "bundle", "Entry": "bundle", "build_model_from_entry": "bundle",
    "find_entry_dir": "bundle", "load_entry": "bundle", "model_spec": "bundle", "save_entry": "bundle",
    "REPORT_JSON": "runfiles", "REPORT_MD": "runfiles", "read_report": "runfiles", "write_report": "runfiles",
    "MEASURED_JSON": "runfiles", "read_measurement": "runfiles", "write_measurement": "runfiles",
    "count_report": "model_report", "recount": "model_report",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'scoring.entry' has no attribute {name!r}")
    return getattr(importlib.import_module(f"scoring.entry.{_API[name]}"), name)
