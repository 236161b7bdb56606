"""``python -m scoring``: the scorer's command line.

    python -m scoring --model NAME --task TASK [--input-size N] [--num-classes N] [--json PATH]
        count a registered architecture (untrained) and print its per-layer table, totals and score
        (scoring/entry/architecture.py);
    python -m scoring verify BUNDLE [...]          verify an exported entry (scoring/entry/verify.py);
    python -m scoring measure DIR [...]            measure entries on ONNX Runtime (scoring/entry/deploy/measure.py);
    python -m scoring CHECKPOINT_OR_BUNDLE [...]   evaluate and score a trained entry (scoring/entry/verify.py).

Only the dispatch lives here; each command is imported when chosen.
"""
from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Dispatch: ``verify`` → the verifier; an existing path → score that entry; else count an architecture."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "measure":
        return _measure(argv[1:])
    if argv and argv[0] == "verify":
        from scoring.entry.verify import main as verify_main
        return verify_main(argv[1:])
    if argv and not argv[0].startswith("-") and Path(argv[0]).exists():
        from scoring.entry.verify import score_main
        return score_main(argv)
    from scoring.entry.architecture import main as architecture_main
    return architecture_main(argv)


def _measure(argv: list[str]) -> int:
    """``measure DIR [DIR ...] [--json PATH]``: entries and their task's dense model on ONNX Runtime."""
    from scoring.entry.deploy.measure import main as measure_main
    return measure_main(argv)


if __name__ == "__main__":
    sys.exit(main())
