"""The counter's entry points: :func:`count_model` counts per example (an image), :func:`count_stream` per token of
a stream fed on-line, :func:`count_inputs` a task's scorer inputs with the one that fits.

Imports torch, :mod:`scoring.rules` and the counter's tracer and result."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Mapping

import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves

from scoring.counter.facts import integral
from scoring.counter.result import Count, build_count
from scoring.counter.tracer import Tracer
from scoring.rules import RULES, STREAM_CONVENTION, Rule, accumulator_setting, project_rules_note


def _batches(inputs: torch.Tensor | Iterable[Any]) -> Iterator[torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        yield inputs
        return
    for batch in inputs:
        if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
            batch = batch[0]  # (inputs, targets)
        if not isinstance(batch, torch.Tensor):
            raise TypeError(f"count_model expects tensors or (inputs, targets) batches, got {type(batch).__name__}")
        yield batch


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode without grad; its training modes restored after."""
    modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            yield
    finally:
        for module, training in modes.items():
            module.training = training


@contextmanager
def _tracing(model: nn.Module, rules: Mapping[str, Rule], accumulator_bits: int | str) -> Iterator[Tracer]:
    """A tracer attached to ``model``, run in eval mode without grad; its hooks removed after."""
    tracer = Tracer(model, rules, accumulator_setting(accumulator_bits))
    with _evaluating(model):
        handles = tracer.attach(model)
        try:
            yield tracer
        finally:
            for handle in handles:
                handle.remove()


def _device(model: nn.Module) -> torch.device | None:
    return next((p.device for p in model.parameters()), None)


def _result(tracer: Tracer, examples: int, accumulator_bits: int | str, freebie: bool | None,
            conventions: Mapping[str, str] | None = None) -> Count:
    """The count of a finished trace over ``examples``; ``conventions`` are listed with the project rules used."""
    tracer.finish()
    project_rules = {**project_rules_note(tracer.rules, tracer.rules_used, tracer.conventions), **(conventions or {})}
    return build_count(tracer.modules.layers.values(), tracer.modules.narrowest_tag, examples, accumulator_bits,
                       freebie, project_rules, tracer.float_dots or {})


def count_model(model: nn.Module, inputs: torch.Tensor | Iterable[Any], *, accumulator_bits: int | str = 32,
                freebie: bool | None = None, rules: Mapping[str, Rule] = RULES) -> Count:
    """Count ``model`` under the MicroNet rules by running it (in eval mode, without grad) on ``inputs``.

    ``inputs`` is one batch, or an iterable of batches or ``(inputs, targets)`` pairs; ops are averaged
    per example over all of them, and each stored value is counted once. ``freebie`` None decides it
    automatically (on only when no tensor is quantized below 16 bits); ``accumulator_bits`` is the width
    at which additions count, or ``"adder_tree"`` (:func:`~scoring.rules.adder_tree_levels`: every dot product
    of integer-quantized operands summed pairwise; one with a float operand in a 32-bit accumulator, listed in
    the count's ``float_dot_products``). Raises :class:`~scoring.rules.UnsupportedOpError` for an op without a rule.
    """
    device = _device(model)
    examples = 0
    with _tracing(model, rules, accumulator_bits) as tracer:
        for batch in _batches(inputs):
            batch = batch.to(device) if device is not None else batch
            tracer.mark_input(batch)
            examples += batch.shape[0] if batch.dim() else 1
            tracer.run(model, batch)
    if not examples:
        raise ValueError("count_model got no input batches; pass a tensor batch or a non-empty iterable of batches")
    return _result(tracer, examples, accumulator_bits, freebie)


def _stream(tokens: Any) -> torch.Tensor:
    """``tokens`` as a ``[1, T]`` integer tensor, or a one-line error."""
    if not isinstance(tokens, torch.Tensor) or not integral(tokens) or tokens.dtype == torch.bool:
        raise TypeError(f"count_stream expects token ids as an integer tensor, got "
                        f"{tokens.dtype if isinstance(tokens, torch.Tensor) else type(tokens).__name__}; "
                        "fix: pass a LongTensor of shape [T] or [1, T]")
    if tokens.dim() == 1:
        tokens = tokens.unsqueeze(0)
    if tokens.dim() != 2 or tokens.shape[0] != 1 or not tokens.shape[1]:
        raise ValueError(f"count_stream expects one stream of tokens, got shape {tuple(tokens.shape)}; "
                         "fix: pass a LongTensor of shape [T] or [1, T] with T >= 1")
    return tokens


def _step(model: nn.Module, run: Any, token: torch.Tensor, state: Any) -> Any:
    """One on-line call ``model(token, state)`` through ``run``; the new state, or a one-line error."""
    result = run(model, token, state)
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        raise TypeError(f"count_stream expects model(tokens, state) to return (log_probs, state), got "
                        f"{type(result).__name__}; fix: follow the language-model contract (models/)")
    return result[1]


def count_stream(model: nn.Module, tokens: torch.Tensor, *, warmup_tokens: int = 0,
                 accumulator_bits: int | str = 32, freebie: bool | None = None,
                 rules: Mapping[str, Rule] = RULES) -> Count:
    """Count a language model per token, fed on-line: ``logp, state = model(tokens[:, t:t+1], state)``.

    The stream starts from ``model.initial_state(1, device)`` (None when the model has no such method). The first
    ``warmup_tokens`` calls run uncounted: they only fill the state (an LSTM's, a memory of past states); the
    state entering the counted calls is an activation (dynamic), whatever its value. ``Count.examples`` is the
    number of tokens counted and ops are their mean; each stored value is counted once. ``freebie`` and
    ``accumulator_bits`` as in :func:`count_model`.
    """
    accumulator_setting(accumulator_bits)
    stream = _stream(tokens)
    if not 0 <= warmup_tokens < stream.shape[1]:
        raise ValueError(f"warmup_tokens={warmup_tokens} with {stream.shape[1]} tokens; fix: leave at least one "
                         "token to count (0 <= warmup_tokens < number of tokens)")
    device = _device(model)
    stream = stream.to(device) if device is not None else stream
    with _evaluating(model):
        state = model.initial_state(1, device) if hasattr(model, "initial_state") else None
        for t in range(warmup_tokens):  # plain calls, before the tracer is attached: nothing of them is counted
            state = _step(model, lambda m, *args: m(*args), stream[:, t:t + 1], state)
        with _tracing(model, rules, accumulator_bits) as tracer:
            for tensor in tree_leaves(state):
                if isinstance(tensor, torch.Tensor):
                    tracer.mark_input(tensor)
            for t in range(warmup_tokens, stream.shape[1]):
                token = stream[:, t:t + 1]
                tracer.mark_input(token)
                state = _step(model, tracer.run, token, state)
    return _result(tracer, stream.shape[1] - warmup_tokens, accumulator_bits, freebie, dict([STREAM_CONVENTION]))


def count_inputs(model: nn.Module, inputs: Any, *, accumulator_bits: int | str = 32, freebie: bool | None = None,
                 rules: Mapping[str, Rule] = RULES) -> Count:
    """Count ``model`` on a task's scorer inputs (``data.tasks.ScoreInputs``: ``inputs``, ``stream``, ``warmup``):
    a token stream fed on-line with :func:`count_stream`, a batch of examples with :func:`count_model`."""
    if inputs.stream:
        return count_stream(model, inputs.inputs, warmup_tokens=inputs.warmup, accumulator_bits=accumulator_bits,
                            freebie=freebie, rules=rules)
    return count_model(model, inputs.inputs, accumulator_bits=accumulator_bits, freebie=freebie, rules=rules)
