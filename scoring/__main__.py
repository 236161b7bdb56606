"""``python -m scoring`` (the console script ``micronet-score``): the scorer's command line, four modes.

Only the dispatch and the overview (:data:`USAGE`, ``--help``) live here; each mode is imported when chosen.
"""
from __future__ import annotations

import sys
from pathlib import Path

USAGE = """\
usage: micronet-score PATH [--data-root PATH] [--examples N] [--device D]
       micronet-score verify BUNDLE [--allow-no-manifest] [--allow-score-settings] [--data-root PATH]
                      [--examples N] [--device D]
       micronet-score measure DIR [DIR ...] [--json PATH] [--onnx-dir PATH] [...]
       micronet-score --model NAME --task TASK [--input-size N] [--num-classes N] [--json PATH]

The MicroNet scorer (also `python -m scoring`), in four modes:

  PATH                       score an entry: evaluate and count a finished run dir, bundle or entry folder with
                             its own recorded config, and print the gate verdict, totals and score
  verify BUNDLE              verify an exported bundle (organizers): check its files, rebuild the model,
                             re-evaluate and recount it under the kit's task and rules, and compare every field of
                             its report; exit 0 when all agree, 1 when something differs, 2 when refused
  measure DIR [DIR ...]      measure entries (run dirs or bundles) and their task's dense model on ONNX Runtime:
                             latency and throughput beside the counted ops
  --model NAME --task TASK   count a registered architecture, untrained, on inputs of the task's shape: its
                             per-layer table, totals and score

Each mode lists its options with --help (e.g. `micronet-score verify --help`). Run verify as
`micronet-score verify BUNDLE` or `python -P -m scoring verify BUNDLE` (Python 3.11+), never as plain
`python -m scoring` inside the bundle: that puts the bundle's folder first on the import path, so a planted
module would run before the scorer.
"""


def main(argv: list[str] | None = None) -> int:
    """Dispatch: ``verify`` → the verifier; ``measure`` → ONNX Runtime; ``--model`` (an option first) → count an
    architecture; a path → score that entry (a path that does not exist is one line, exit 2); nothing or ``--help``
    → the overview."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="", file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "measure":
        return _measure(argv[1:])
    if argv[0] == "verify":
        from scoring.entry.verify import main as verify_main
        return verify_main(argv[1:])
    if argv[0].startswith("-"):
        from scoring.entry.architecture import main as architecture_main
        return architecture_main(argv)
    if not Path(argv[0]).exists():
        from scoring.errors import UserError, fail
        fail(str(UserError(f"{argv[0]} does not exist", "pass a run dir, bundle or entry folder, `verify BUNDLE`, "
                                                        "`measure DIR`, or --model NAME --task TASK "
                                                        "(micronet-score --help)")))
    from scoring.entry.verify import score_main
    return score_main(argv)


def _measure(argv: list[str]) -> int:
    """``measure DIR [DIR ...] [--json PATH]``: entries and their task's dense model on ONNX Runtime."""
    from scoring.entry.deploy.measure import main as measure_main
    return measure_main(argv)


if __name__ == "__main__":
    sys.exit(main())
