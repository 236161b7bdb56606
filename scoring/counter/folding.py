"""Batch norm folding: a batch norm whose input a conv/linear produced folds into it (a bias for its unbiased
channels), decided once the trace is complete: a fold stands only if nothing else needs that output or that stored
weight unscaled (another op reading the output raw, another use of the weight); otherwise the batch norm counts as a
per-channel affine. A fold into a weight quantized per tensor stores one scale per channel, and a fold into a layer
with a quantized bias stores the merged bias at the batch norm's width.

Imports torch, :mod:`scoring.rules` and the counter's facts, layers, producers and storage."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from scoring.counter.facts import NO_INPUT, UNTAGGED, FactMap, Facts, Width
from scoring.counter.layers import Layer, Stored
from scoring.counter.producers import Producer
from scoring.counter.storage import Storage
from scoring.rules import UnsupportedOpError


@dataclass
class NormCall:
    """One batch norm call, counted folded or unfolded once the trace is complete (see :meth:`Folding.resolve`).

    ``producer`` is the output it tentatively folds into (None: counted unfolded); ``unbiased`` the channels a
    fold gives a bias, ``empty`` those of them with empty dot products; ``width`` and ``scale_bits`` what it
    costs unfolded; ``other_ops`` the width declared for it (``micronet_other_ops_bits``; None: none), at which
    its additions count and its parameters are stored.
    """

    layer: Layer
    params: Facts
    elements: int
    channels: int
    width: Width
    scale_bits: int | None
    other_ops: Width | None = None
    producer: Producer | None = None
    unbiased: int = 0
    empty: int = 0


class Folding:
    """The conv/linear outputs of a trace and the batch norm calls that may fold into them."""

    def __init__(self, facts: FactMap, conventions: set[str]):
        self.facts, self.conventions = facts, conventions
        #: Stored weights (by their parameters) -> the batch norm (by its parameters) folded into them.
        self.folds: dict[frozenset[int], frozenset[int]] = {}
        #: Stored weights (by their parameters) -> every conv/linear output computed with them.
        self.uses: dict[frozenset[int], list[Producer]] = {}
        #: Every batch norm call in trace order, counted by resolve.
        self.norm_calls: list[NormCall] = []

    def use(self, producer: Producer) -> Producer:
        """Record a conv/linear output as a use of its stored weight (a batch norm folds only if all uses agree)."""
        if producer.weight:
            self.uses.setdefault(producer.weight, []).append(producer)
        return producer

    def _foldable(self, producer: Producer | None, channels: int, batch_norm: frozenset[int]) -> bool:
        """Whether the batch norm ``batch_norm`` (its parameters) can fold into the layer that produced its input.

        It folds into an unfolded conv/linear with as many channels whose weights are stored (static) and have
        absorbed no other batch norm's scale: a weight shared by two layers holds one scale only. The fold is
        tentative: resolve undoes it if a weight is also used by an output the scale does not suit.
        """
        return (producer is not None and not producer.folded and producer.channels == channels
                and all(weight and self.folds.get(weight, batch_norm) == batch_norm for weight in producer.weights()))

    def batch_norm(self, layer: Layer, key: str, args: tuple, batch_statistics: bool,
                   other_ops: Width | None = None) -> None:
        """Fold a batch norm into the layer that produced its input, or count it as a per-channel affine; it runs at
        ``other_ops`` when a module declared that width.

        Both need fixed statistics: a batch norm that normalises with the statistics of the batch at inference
        (``track_running_stats=False``, instance norm) is refused rather than counted as an affine.
        """
        if batch_statistics:
            raise UnsupportedOpError(
                f"aten.{key} (in layer '{layer.name}', {layer.type}) normalises with batch statistics at inference "
                "(track_running_stats=False, or an instance norm): neither folding nor a fixed affine counts that; "
                "keep running statistics, or use GroupNorm (an instance norm is GroupNorm(C, C)), which has a rule")
        x = args[0]
        stored = [t for t in args[1:5] if isinstance(t, torch.Tensor)]
        params = Facts(static=True, roots=frozenset().union(*(self.facts.get(t).roots for t in stored)))
        channels = x.shape[1]
        producer = self.facts.get(x).producer
        operands = [t for t in args[:2] if isinstance(t, torch.Tensor)]  # input and scale, if unfolded
        scale_bits = self.facts.get(args[1]).bits if isinstance(args[1], torch.Tensor) else None
        if scale_bits is None and other_ops is not None:
            scale_bits = other_ops.tagged
        call = NormCall(layer, params, x.numel(), channels,
                        self.facts.operand_width(operands, unquantized=other_ops or UNTAGGED), scale_bits, other_ops)
        if self._foldable(producer, channels, params.roots):
            producer.fold(params.roots)
            self.folds.update(dict.fromkeys(producer.weights(), params.roots))
            call.producer = producer
            call.unbiased, call.empty = producer.unbiased_channels()
        else:  # its affine can absorb the inverse of a fold into any output it reads unchanged
            for read in self.facts.get(x).raw:
                read.absorbed = True
        self.norm_calls.append(call)

    @staticmethod
    def read_raw(known: Iterable[Facts]) -> None:
        """An op other than a counted batch norm reads tensors with the facts ``known``: the conv/linear outputs
        they hold unchanged are read raw, so no batch norm folds into them."""
        for facts in known:
            for read in facts.raw:
                read.read_raw = True

    def _keeps_fold(self, call: NormCall, verdicts: dict[tuple[frozenset[int], frozenset[int]], bool]) -> bool:
        """Whether a tentative fold stands: every use of its weights was folded with the same batch norm, or is
        read by an unfolded batch norm (which absorbs the inverse affine), and no use's output is read raw by any
        other op. A weight whose output some op needs raw must be stored unscaled, so the batch norm is counted
        unfolded. ``verdicts`` caches (weight, batch norm)."""
        for weight in call.producer.weights():
            key = (weight, call.params.roots)
            if key not in verdicts:
                verdicts[key] = all(use.holds(call.params.roots) for use in self.uses.get(weight, ()))
            if not verdicts[key]:
                return False
        return True

    def resolve(self, storage: Storage) -> None:
        """Count every batch norm call, in trace order, folded (a bias for its unbiased channels, added where a dot
        product is computed) or as a per-channel affine (2 params per channel, 1 multiply and 1 add per element)."""
        verdicts: dict[tuple[frozenset[int], frozenset[int]], bool] = {}
        for call in self.norm_calls:
            if call.producer is not None and self._keeps_fold(call, verdicts):
                self._count_folded(call, storage)
                continue
            layer, params = call.layer, call.params
            layer.add_ops(call.width, call.elements, call.elements, call.width if call.other_ops else None)
            if storage.wants(params.roots, 2 * call.channels):
                storage.keep(layer, params.roots, Stored(2 * call.channels, call.scale_bits))
            layer.note("not folded")
        self.norm_calls.clear()

    def _count_folded(self, call: NormCall, storage: Storage) -> None:
        """A batch norm folded into ``call.producer``: a bias add per unbiased channel, in the accumulator (with an
        adder tree at the wider of the layer's final sums and the shift), that shift stored at the batch norm's width;
        the scales and biases of the layers it folds into adjusted."""
        layer, params, producer = call.layer, call.params, call.producer
        layer.note(f"folded into {producer.layer}")
        adds = call.elements // call.channels * (call.unbiased - call.empty)
        final = producer.final_bits()
        if final is None:
            layer.add_ops(NO_INPUT, 0, adds)
        else:
            layer.add_adds(Width(final) | (call.other_ops or UNTAGGED), adds)
        shift_bits = call.other_ops.tagged if call.other_ops else None
        if call.unbiased and storage.wants(params.roots, call.unbiased):
            storage.keep(layer, params.roots, Stored(call.unbiased, shift_bits))  # the folded shift: their bias
        for leaf in producer.leaves():
            scales = storage.tensor_scales.get(leaf.weight)
            if scales is not None and storage.kept[scales][1].numel != leaf.channels:
                storage.restore(scales, leaf.channels, storage.kept[scales][1].bits)
                self.conventions.add("per-tensor scales and folding")
            bias = storage.kept.get(leaf.bias) if leaf.bias else None
            if bias is not None and bias[1].bits is not None and bias[1].bits != shift_bits:
                storage.restore(leaf.bias, bias[1].numel, shift_bits)
                self.conventions.add("folded bias width")
