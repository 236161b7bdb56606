"""The module stack: module hooks keep the modules running, so that each op is attributed to the innermost one
(a quantizer's ops to the layer around it); quantizer modules tag their outputs with their bits and store their
scales, a module declaring ``micronet_mask_bits`` puts its mask on the weight it outputs, and one declaring
``micronet_other_ops_bits`` sets the width of the ops outside dot products run inside it (:mod:`scoring.protocol`).

Imports torch, :mod:`scoring.protocol` and the counter's facts, layers and storage."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn as nn
from torch.nn.utils.parametrize import ParametrizationList, type_before_parametrizations
from torch.utils._python_dispatch import _disable_current_modes

from scoring.counter.facts import FactMap, Mask, Width, tensors
from scoring.counter.layers import MODEL_LAYER, Layer, Stored
from scoring.counter.storage import Storage
from scoring.protocol import (declared_mask_bits, is_quantizer, other_ops_bits, quantizer_bits, quantizer_scales,
                              scale_granularity)


def kept_by(module: nn.Module, args: Any, output: Any) -> torch.Tensor | None:
    """Where a module declaring ``micronet_mask_bits`` keeps values: the nonzeros of its forward on ones.

    Not the nonzeros of its output: a zero of the input inside a kept block is still a stored value, else
    a mask declaring one block over a weight with unstructured zeros would store them without mask bits.
    None (the declaration is not used) unless the module maps one tensor to a tensor of the same shape.
    """
    if not (len(args) == 1 and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor)
            and args[0].shape == output.shape):
        return None
    pattern = module.forward(torch.ones_like(args[0]))  # forward, not __call__: no hooks, no recursion
    return pattern.ne(0) if isinstance(pattern, torch.Tensor) and pattern.shape == output.shape else None


class ModuleStack:
    """The modules of one model running now, and the layer (per-layer counts) of each module."""

    def __init__(self, model: nn.Module, facts: FactMap, storage: Storage, conventions: set[str]):
        self.facts, self.storage, self.conventions = facts, storage, conventions
        self.layers: dict[str, Layer] = {}
        #: Per module running, outermost first: the innermost of them that is not a quantizer (None: none is).
        self.stack: list[nn.Module | None] = []
        self.names = {module: name or MODEL_LAYER for name, module in model.named_modules()}
        self.modules = {name: module for module, name in self.names.items()}
        self.quantizer_depth = 0
        #: The narrowest quantized tensor (bits, where): it decides the freebie.
        self.narrowest_tag: tuple[int, str] | None = None
        #: The modules running now that declare the width of their other ops, outermost first, with that width.
        self.other_ops: list[tuple[nn.Module, int]] = []

    @property
    def other_ops_width(self) -> Width | None:
        """The width declared for the ops outside dot products running now (the innermost declaration; None: none)."""
        return Width(self.other_ops[-1][1]) if self.other_ops else None

    def attach(self, model: nn.Module) -> list[Any]:
        """Hook every module of ``model``; the handles, to remove the hooks."""
        handles = []
        for module in model.modules():
            if isinstance(module, ParametrizationList):
                continue  # a container of parametrizations, not a layer
            handles.append(module.register_forward_pre_hook(self._enter, prepend=True))  # before quantizer hooks
            handles.append(module.register_forward_hook(self._leave, always_call=True))
        return handles

    def _enter(self, module: nn.Module, args: Any) -> None:
        # The module that ops run now count in: a quantizer's belong to the layer around it. Pushed first: _leave
        # pops it even when the quantizer's declaration is refused.
        quantizer = is_quantizer(module)
        self.stack.append((self.stack[-1] if self.stack else None) if quantizer else module)
        if quantizer:
            self._enter_quantizer(module)
        bits = other_ops_bits(module)
        if bits is not None:
            self.other_ops.append((module, bits))
            self.conventions.add("other ops precision")
            self._narrow(bits, f"'{self.names.get(module, type(module).__name__)}' runs its other ops at {bits} bits")

    def _leave(self, module: nn.Module, args: Any, output: Any) -> None:
        self.stack.pop()
        if self.other_ops and self.other_ops[-1][0] is module:
            self.other_ops.pop()
        mask_bits = declared_mask_bits(module)
        if mask_bits is not None:
            with _disable_current_modes():  # the scorer's own ops, not the model's
                kept = kept_by(module, args, output)
            if kept is not None and self.facts.get(output).static:
                # a stored weight's mask: carried to the conv/linear that consumes it
                self.facts[output] = replace(self.facts.get(output), mask=Mask(mask_bits, kept))
        if is_quantizer(module):
            self.quantizer_depth -= 1
            bits = quantizer_bits(module)
            per_tensor = ("quantizer", id(module)) in self.storage.kept and scale_granularity(module) == "tensor"
            for tensor in tensors([output]):
                facts = self.facts[tensor] = replace(self.facts.get(tensor), bits=bits, producer=None)
                if per_tensor and facts.static and facts.roots:  # a stored weight with one scale
                    self.storage.tensor_scales[facts.roots] = ("quantizer", id(module))

    def _enter_quantizer(self, module: nn.Module) -> None:
        self.quantizer_depth += 1
        name = self.names.get(module, type(module).__name__)
        bits = quantizer_bits(module)
        self._narrow(bits, f"'{name}' quantizes to {bits} bits")
        key = ("quantizer", id(module))
        if key not in self.storage.kept:
            count, scale_bits = quantizer_scales(module)
            if count:
                self._narrow(scale_bits, f"'{name}' stores its scales in {scale_bits} bits")
                # a weight quantizer's scales belong to the layer owning the parametrization, wherever it is read
                owner = self.modules.get(name.split(".parametrizations.")[0]) if ".parametrizations." in name else None
                self.storage.keep(self.layer(owner), key, Stored(count, scale_bits))

    def _narrow(self, bits: int, where: str) -> None:
        """Keep the narrowest quantized tensor (weights, activations or stored scales): it decides the freebie."""
        if self.narrowest_tag is None or bits < self.narrowest_tag[0]:
            self.narrowest_tag = (bits, where)

    def layer(self, module: nn.Module | None = None) -> Layer:
        """The layer of ``module``, by default of the innermost module running (quantizers aside)."""
        if module is None:
            module = self.stack[-1] if self.stack else None
        name = self.names.get(module, MODEL_LAYER) if module is not None else MODEL_LAYER
        layer = self.layers.get(name)
        if layer is None:
            # The class the user wrote, not the ParametrizedConv2d that masks and quantizers create.
            layer_type = type_before_parametrizations(module).__name__ if module is not None else ""
            layer = self.layers[name] = Layer(name, layer_type)
        return layer
