"""The MicroNet scorer, the judge: a rule-exact counter of parameters and operations, the challenge's per-task
constants (:mod:`scoring.challenge`), the gate and the pure report builders. Its modules import nothing of ours
outside scoring/ core; the organizers' tools and on-disk formats are in :mod:`scoring.entry`.

    from scoring import count_model, check_gate, BASELINES
    count = count_model(model, test_batches)          # traced, per example, rules in scoring/rules.py
    count.score("cifar100"); check_gate("cifar100", correct=8012, total=10000).passed
    count_stream(language_model, test_tokens[:1000], warmup_tokens=100).score("wikitext103")   # per token, on-line

Bit widths reach the scorer only through :mod:`scoring.protocol`.
"""
from __future__ import annotations

import importlib
from typing import Any

#: The public API and the module that defines each name. Loaded on first use, so that the commands' cheap
#: paths (a refused command line is one line within a second) can import :mod:`scoring.errors` without torch.
_API = {"Count": "counter", "count_inputs": "counter", "count_model": "counter", "count_stream": "counter",
        "BASELINES": "challenge", "GATES": "challenge", "TASKS": "challenge", "UnknownTaskError": "challenge",
        "GateResult": "gate", "check_gate": "gate",
        "RULES": "rules", "Rule": "rules", "UnsupportedOpError": "rules", "score": "rules"}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'scoring' has no attribute {name!r}")
    return getattr(importlib.import_module(f"scoring.{_API[name]}"), name)
