"""The search's files: sensitivity.json (a measurement), allocation.json (an allocate stage's record) and the run
folders the comparison reads (report.json with the run's config, and measured.json where ``python -m scoring
measure`` timed the entry).

Imports scoring (the entry's files, the report's name, the gate) and train.config; nothing of the search.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from scoring.challenge import gate_for
from scoring.entry import ENTRY_JSON, REPORT_JSON, atomic_write, read_measurement, read_report
from train.config import ConfigError, check_same_run, run_settings

#: The folder of a run dir the search writes into (the sensitivity command's default ``--out``, and an allocate
#: stage's).
SENSITIVITY_DIR = "sensitivity"
SENSITIVITY_JSON = "sensitivity.json"
#: Version of sensitivity.json.
SENSITIVITY_FORMAT = 1
#: What an allocate stage keeps of its measurement while it measures (the layers measured so far): a stage stopped
#: (SIGTERM, Ctrl-C) or killed resumes from it; removed once the stage has finished.
PARTIAL_SENSITIVITY_JSON = "sensitivity.partial.json"
#: What an allocate stage writes last into ``RUN/sensitivity/``: its presence means the stage has finished.
ALLOCATION_JSON = "allocation.json"
#: Version of allocation.json.
ALLOCATION_FORMAT = 1


def write_json(path: Path, content: Any) -> None:
    """``content`` as indented JSON, written atomically (a reader never sees half a file)."""
    text = json.dumps(content, indent=1) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))


# --- sensitivity.json --------------------------------------------------------------------------------
def read_sensitivity(path: str | Path) -> dict[str, Any]:
    """sensitivity.json from its path, or from the folder holding it (``RUN_DIR/sensitivity`` or ``RUN_DIR``), with
    the path it was read from as ``path``."""
    path = Path(path)
    candidates = [path] if path.suffix == ".json" else [path / SENSITIVITY_JSON, path / SENSITIVITY_DIR / SENSITIVITY_JSON]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise ConfigError(f"no {SENSITIVITY_JSON} at {' or '.join(map(str, candidates))}",
                          f"run `python -m train.search.sensitivity RUN_DIR` first, or pass the path of its "
                          f"{SENSITIVITY_JSON}")
    try:
        result = json.loads(found.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{found} is not valid JSON ({err})", "re-run `python -m train.search.sensitivity`") from None
    if not isinstance(result, dict) or result.get("format") != SENSITIVITY_FORMAT:
        raise ConfigError(f"{found} is not a sensitivity.json of format {SENSITIVITY_FORMAT}",
                          "re-run `python -m train.search.sensitivity` with this version")
    result["path"] = str(found)
    return result


def read_partial_sensitivity(out: Path) -> dict[str, Any] | None:
    """The partial measurement an allocate stage kept in ``out`` (``RUN/sensitivity``), or None when there is none
    or it cannot be read (the stage then measures every layer again)."""
    try:
        partial = json.loads((out / PARTIAL_SENSITIVITY_JSON).read_text())
    except (OSError, ValueError):
        return None
    return partial if isinstance(partial, dict) and partial.get("format") == SENSITIVITY_FORMAT else None


# --- allocation.json ---------------------------------------------------------------------------------
def read_allocation(out: Path, config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The record an allocate stage of this run wrote into ``out`` (``RUN/sensitivity``), or None when it has not
    finished. ConfigError when it cannot be read, or was written by a run of another configuration."""
    path = out / ALLOCATION_JSON
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if record.get("format") != ALLOCATION_FORMAT:
            raise ValueError(f"format {record.get('format')!r}, not {ALLOCATION_FORMAT}")
    except (OSError, ValueError, AttributeError) as err:
        raise ConfigError(f"{path} cannot be read ({err})", f"delete {path} and re-run the same command: the allocate "
                                                            "stage measures again") from None
    check_same_run(record["config"], dict(config), path)
    return record


# --- run folders (the comparison) --------------------------------------------------------------------
#: Run settings that vary between the runs of one configuration.
_PER_RUN = ("seed", "init")


@dataclass
class Run:
    """What the comparison reads from one run folder."""

    path: str
    task: str
    model: str
    compress: str
    seed: int | None
    metric: str
    test: float | None
    val: float | None
    correct: int | None
    total: int | None
    params: float
    ops: float
    score: float
    gate_passed: bool | None
    settings: dict[str, Any] = field(default_factory=dict)
    variant: str = ""
    #: Batch-1 latency on ONNX Runtime of the entry and of its task's dense float32 model (measured.json), in ms.
    latency_ms: float | None = None
    dense_latency_ms: float | None = None


def _config(folder: Path) -> dict[str, Any]:
    """The run's config: .hydra/config.yaml (resolved), else the entry's resolved config, else nothing."""
    hydra = folder / ".hydra" / "config.yaml"
    if hydra.is_file():
        try:
            return OmegaConf.to_container(OmegaConf.load(hydra), resolve=True)
        except OmegaConfBaseException:
            pass  # an interpolation that needs Hydra's resolvers: the entry's copy is resolved
    entry = folder / "entry" / ENTRY_JSON
    if entry.is_file():
        try:
            return json.loads(entry.read_text()).get("config") or {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}
    return {}


def read_run(folder: Path, root: Path) -> Run:
    """One run folder (holding report.json)."""
    report = read_report(folder)
    config = _config(folder)
    metric = gate_for(report["task"]).metric
    validation = report.get("validation") or {}
    seed = report.get("seed", config.get("seed"))
    latency = _latencies(read_measurement(folder))
    return Run(path=str(folder.relative_to(root)) if folder != root else ".", task=report["task"],
               model=report.get("model") or (config.get("model") or {}).get("name", "?"),
               compress=report.get("compress") or (config.get("compress") or {}).get("name", "?"),
               seed=seed, metric=metric, test=report.get(metric), val=validation.get(metric),
               correct=report.get("correct"), total=report.get("total"), params=report["params"], ops=report["ops"],
               score=report["score"], gate_passed=report.get("gate_passed"),
               settings={k: v for k, v in run_settings(config).items() if k.split(".")[0] not in _PER_RUN}
               if config else {}, latency_ms=latency["entry"], dense_latency_ms=latency["dense"])


def _latencies(measurement: Mapping[str, Any] | None) -> dict[str, float | None]:
    """The batch-1 latencies of a run's measured.json: its entry's and its dense model's (None: not measured)."""
    rows = {row.get("role"): row for row in (measurement or {}).get("models", []) if isinstance(row, dict)}
    return {role: rows[role]["measured"]["latency_ms"] if role in rows else None for role in ("entry", "dense")}


def find_runs(root: str | Path) -> list[Run]:
    """Every run below ``root`` (a folder holding report.json), in path order; unreadable reports are refused."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"{root} is not a folder", "pass the folder holding the run dirs, e.g. outputs or multirun/digits")
    runs = []
    for report in sorted(root.rglob(REPORT_JSON)):
        if "entry" in report.relative_to(root).parts[:-1]:
            continue  # a bundle's copy inside an entry folder
        runs.append(read_run(report.parent, root))
    if not runs:
        raise ConfigError(f"no {REPORT_JSON} below {root}", "point at the folder of finished runs (train/run.py writes "
                                                            "report.json at the end of a run)")
    return runs
