"""The tracer: runs a model with every aten op seen through a :class:`~torch.utils._python_dispatch.TorchDispatchMode`
and counts each op by the handler of its rule's kind, in the layer of the innermost module running it.

An op is free when it is precomputed at export (every input static: derived only from parameters, buffers and
constants) or a format conversion inside a quantizer; address arithmetic on index tensors (token ids) is free.
Recurrent composites (``torch.lstm``, ...) are counted where they are called, seen through a
:class:`~torch.overrides.TorchFunctionMode` (:class:`Composites`). An op with no rule raises
:class:`~scoring.rules.UnsupportedOpError`.

Imports torch, :mod:`scoring.rules` and the counter's own modules."""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves
from torch.utils._python_dispatch import TorchDispatchMode

from scoring.counter.arguments import bind
from scoring.counter.facts import DYNAMIC, FactMap, Facts, integral, tensors
from scoring.counter.folding import Folding
from scoring.counter.kinds import Handler, Op, OpCosts
from scoring.counter.modules import ModuleStack
from scoring.counter.permutations import Permutations
from scoring.counter.producers import Lineage, concat_lineage, concat_producer, view_lineage
from scoring.counter.storage import Storage
from scoring.rules import ADDER_TREE, BATCH_NORM, FREE, INDEX_ARITHMETIC, VIEW, Rule, UnsupportedOpError, rule_key


class Tracer(TorchDispatchMode):
    """Records every op of one model over any number of batches."""

    def __init__(self, model: nn.Module, rules: Mapping[str, Rule], accumulator_bits: int | str = 32):
        super().__init__()
        self.rules = rules
        self.rules_used: set[str] = set()
        #: The conditional project rules (scoring.rules.CONDITIONAL_CONVENTIONS) this trace used.
        self.conventions: set[str] = {"adder tree"} if accumulator_bits == ADDER_TREE else set()
        self.facts = FactMap()
        for tensor in [*model.parameters(), *model.buffers()]:
            self.facts[tensor] = Facts(static=True, roots=frozenset((id(tensor),)))
        self.storage = Storage(model, self.facts)
        self.modules = ModuleStack(model, self.facts, self.storage, self.conventions)
        self.folding = Folding(self.facts, self.conventions)
        self.permutations = Permutations(self.facts, self.storage)
        costs = OpCosts(rules, self.rules_used, self.facts, self.storage, self.folding, self.permutations,
                        adder_tree=accumulator_bits == ADDER_TREE, other_ops=lambda: self.modules.other_ops_width)
        self.recurrent = costs.recurrent
        #: With an adder tree, the layers whose dot products have a float operand (see OpCosts.float_dot).
        self.float_dots = costs.float_dots
        #: Depth of recurrent composites being run: their inner ops are counted by the composite's rule.
        self.opaque = 0
        self.keys: dict[Any, str] = {}
        #: Rule kind -> how an op of that kind is counted.
        self.handlers: dict[str, Callable[[Op], None]] = {
            FREE: self._move, VIEW: self._move,
            **{kind: self._costed(count) for kind, count in costs.handlers().items()}}

    def run(self, model: nn.Module, *args: Any) -> Any:
        """Run ``model(*args)`` with every op recorded."""
        self.modules.stack.clear()
        with self, Composites(self):
            out = model(*args)
        # whoever calls the model reads its outputs as they are: a conv/linear output among them is read raw
        self.folding.read_raw(self.facts.get(leaf) for leaf in tree_leaves(out) if isinstance(leaf, torch.Tensor))
        return out

    def attach(self, model: nn.Module) -> list[Any]:
        """Hook every module of ``model`` (see :class:`~scoring.counter.modules.ModuleStack`); the hooks' handles."""
        return self.modules.attach(model)

    def mark_input(self, tensor: torch.Tensor) -> None:
        """An input of the model (or a state carried into it): dynamic; an index tensor when integral."""
        self.facts.mark_input(tensor)

    def finish(self) -> None:
        """After tracing: count the batch norms and give every stored value to the layer that keeps it."""
        self.folding.resolve(self.storage)
        self.storage.assign(self.modules.layers.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self._record(func, args, kwargs, out)
        return out

    def _key(self, func: Any, args: tuple, kwargs: dict) -> str:
        name = self.keys.get(func)
        if name is None:
            name = self.keys[func] = func.overloadpacket.__name__
        return rule_key(name, args, kwargs)

    def _record(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        inputs = tensors(kwargs.values(), tensors(args)) if kwargs else tensors(args)
        known = list(map(self.facts.get, inputs))
        if self.opaque:  # inside a recurrent composite, counted by its rule: its values are activations
            self.folding.read_raw(known)
            self.facts.propagate(out, known, None, static=False)
            return
        dynamic = any(not facts.static for facts in known)
        key = self._key(func, args, kwargs)
        rule = self.rules.get(key)
        if not dynamic or self.modules.quantizer_depth:
            # Precomputed at export (static), or a format conversion inside a quantizer: free.
            self.facts.propagate(out, known, rule, static=not dynamic,
                                 raw=self._lineage(key, rule, args, inputs, known, out))
            return
        if any(facts.index for facts in known) and self._index_only(inputs, known, out):
            key, rule = INDEX_ARITHMETIC, self.rules.get(INDEX_ARITHMETIC)
        layer = self.modules.layer()
        if rule is None:
            raise UnsupportedOpError(
                f"{func.namespace}.{key} (in layer '{layer.name}', {layer.type}) has no counting rule; "
                f"add a Rule for '{key}' to RULES in scoring/rules.py (or pass rules= to count_model)")
        self.handlers[rule.kind](Op(func, key, rule, args, kwargs, out, inputs, known, layer))

    def _index_only(self, inputs: list[torch.Tensor], known: list[Facts], out: Any) -> bool:
        """Address arithmetic: every non-constant input an index tensor (or a stored integer buffer), every output
        integral (comparisons, masks and offsets of token ids; not a float value computed from them)."""
        return (all(facts.index or (facts.static and integral(t)) for t, facts in zip(inputs, known)
                    if not facts.constant)
                and all(integral(t) for t in tensors([out])))

    def _move(self, op: Op) -> None:
        """FREE and VIEW ops: data movement, free; static inputs stored dense; index arithmetic keeps the index."""
        self.rules_used.add(op.key)  # listed in the report if it is a project rule (index arithmetic, nearest)
        if op.key == INDEX_ARITHMETIC:
            self.facts.propagate(op.out, op.known, op.rule, static=False, index=True)
            return
        self.storage.store_dense(op.layer, op.inputs, op.known)
        # A batch norm after a channel concatenation of conv outputs folds into each conv.
        producer = (concat_producer(op.args[0], op.args[1] if len(op.args) > 1 else 0,
                                    [facts.producer for facts in op.known]) if op.key == "cat" else None)
        parts = (self.permutations.view_parts(op.layer, op.key, op.args, op.out)
                 if isinstance(op.out, torch.Tensor) and op.inputs else None)
        raw = self._lineage(op.key, op.rule, op.args, op.inputs, op.known, op.out)
        self.facts.propagate(op.out, op.known, op.rule, static=False, producer=producer, raw=raw, parts=parts)
        self.facts.mark_written_base(op.func, op.args)

    def _lineage(self, key: str, rule: Rule | None, args: tuple, inputs: list[torch.Tensor], known: list[Facts],
                 out: Any) -> Lineage:
        """The conv/linear outputs that ``out`` holds unchanged: its input's through a reshape or copy that keeps
        every element in its channel, its inputs' through a channel concatenation. Any other op on them reads them
        raw (:meth:`~scoring.counter.folding.Folding.read_raw`), and its output holds none."""
        if not any(facts.raw for facts in known):
            return ()
        lineage = None
        if key == "cat":
            lineage = concat_lineage(args[0], args[1] if len(args) > 1 else 0, [facts.raw for facts in known])
        elif rule is not None and rule.kind == VIEW and len(inputs) == 1 and isinstance(out, torch.Tensor):
            lineage = view_lineage(known[0].raw, inputs[0], out)
        if lineage is None:
            self.folding.read_raw(known)
            return ()
        return lineage

    def _costed(self, count: Handler) -> Callable[[Op], None]:
        """The handler of a kind that costs something: ``count`` it, its rule listed as used, its outputs dynamic.
        It reads its inputs raw (a batch norm's folding sees its own); a conv/linear output holds itself."""
        def handle(op: Op) -> None:
            self.rules_used.add(op.key)
            producer = count(op)
            if op.rule.kind != BATCH_NORM:
                self.folding.read_raw(op.known)
            self.facts.propagate(op.out, op.known, op.rule, static=False, producer=producer,
                                 raw=(producer,) if producer is not None else ())
            self.facts.mark_written_base(op.func, op.args)
        return handle


class Composites(TorchFunctionMode):
    """Counts torch's composite recurrent functions (``torch.lstm``, ``torch.gru_cell``, ...) by their rules, where
    they are called: every kernel they dispatch to then counts alike. Every other call passes through."""

    def __init__(self, tracer: Tracer):
        super().__init__()
        self.tracer = tracer
        self.composites = tracer.recurrent.composites

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tracer = self.tracer
        key = self.composites.get(func)
        if key is None or tracer.modules.quantizer_depth or tracer.opaque:  # nearly every call: kept short
            return func(*args, **kwargs)
        if all(tracer.facts.get(t).static for t in tensors([*args, *kwargs.values()])):
            return func(*args, **kwargs)  # precomputed at export: its ops are static
        tracer.rules_used.add(key)
        tracer.recurrent.count(tracer.modules.layer(), key, tracer.rules[key], bind(key, args, kwargs))
        tracer.opaque += 1
        try:
            out = func(*args, **kwargs)
        finally:
            tracer.opaque -= 1
        for tensor in tensors([out]):
            tracer.facts[tensor] = DYNAMIC
        return out
