"""``python train/run.py [overrides]`` (or ``micronet-train``): train, compress, evaluate and score one MicroNet
entry.

The command line is checked first, with cheap imports only (train/cli.py: compose, validate, then create and lock
the run folder): a refused command prints one line within about a second and writes nothing. Hydra then runs
the pipeline (train/pipeline.py) once, or once per job of a ``--multirun``; ``--help`` and ``--cfg`` are Hydra's.
The flow of a run is docs/design.md's: the task, its data and the model → stage "train" (the baseline; skipped
when finished, or when ``init=PATH`` is given) → the compress stages in order (each epoch evaluated on the
validation split, when there is one; an ``allocate:`` stage measures the model on it and sets the later stages'
per-layer sparsity and bits: train/search/stage.py) → evaluate on the test split, once (exact sums) → gate → score →
report.json / report.md / TensorBoard → the entry in ``<run dir>/entry``.

Every stage checkpoints each epoch under ``<run dir>/checkpoints/<index>_<stage>/``; re-running the same
command resumes from the newest good checkpoint, mid-stage included, and re-running a finished run only reprints
its summary. Under ``torchrun`` only rank 0 writes. Problems a user can fix print one line,
``error: … ; fix: …``, and no traceback: bad config values, a busy, read-only or full run folder, damaged
checkpoints, missing data.

Exit status: 0 finished, the entry passes its gate · 2 error (one line) · 3 finished, but the entry fails its
gate (report and entry written; it does not qualify) · 130 a second Ctrl-C stopped it at once (the last
checkpoint is intact) · 143 stopped by SIGTERM or Ctrl-C (SIGINT) after saving a checkpoint (re-run to resume).

Nothing imports this script; it imports our packages inside :func:`main`, after the ``__main__`` block below
has put the repository on ``sys.path``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig


def main() -> None:
    """Check the command line once, then hand it over to Hydra, which runs :func:`job` for each job."""
    from conf import CONF_DIR
    from train.cli import accept_command_line

    accept_command_line(sys.argv[1:])
    hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")(job)()


def job(cfg: DictConfig) -> None:
    """One Hydra job: the pipeline on the composed ``cfg``; exits with the run's status."""
    from train.pipeline import run_job  # seconds of imports (torch, models, ...), only for a job that runs

    run_job(cfg)


if __name__ == "__main__":
    if not __package__:  # run as a file: sys.path[0] is train/, not the repository whose packages it imports
        sys.path[0] = str(Path(__file__).resolve().parents[1])
    main()
