"""The MicroNet scorer: a rule-exact counter of parameters and operations, the gate and the reports.

    from scoring import count_model, check_gate, BASELINES
    count = count_model(model, test_batches)          # traced, per example, rules in scoring/rules.py
    count.score("cifar100"); check_gate("cifar100", correct=8012, total=10000).passed
    count_stream(language_model, test_tokens[:1000], warmup_tokens=100).score("wikitext103")   # per token, on-line

Bit widths reach the scorer only through :mod:`scoring.protocol`.
"""
from scoring.counter import Count, count_inputs, count_model, count_stream
from scoring.gate import GATES, GateResult, check_gate
from scoring.rules import BASELINES, RULES, Rule, UnknownTaskError, UnsupportedOpError, score

__all__ = ["BASELINES", "GATES", "RULES", "Count", "GateResult", "Rule", "UnknownTaskError", "UnsupportedOpError",
           "check_gate", "count_inputs", "count_model", "count_stream", "score"]
