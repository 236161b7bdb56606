"""Compression structure on a model: describe it (JSON), rebuild it on a fresh model, finalize it for export.

A checkpoint's ``state_dict`` holds the values of masks and quantizers, but loading it strictly needs
the same modules on the model first. :func:`compression_state` describes them (which layer's weight
carries which parametrizations in which order, which layers quantize their input with which settings;
and only where a model has them: quantized biases, quantized attention operands, the format of the ops
outside dot products) as plain JSON data, and :func:`apply_compression_state` re-creates them on a fresh
registry model, so that ``load_state_dict(saved, strict=True)`` restores the model exactly. Training-only
modes (frozen BatchNorm statistics) are not structure: the techniques re-apply them on resume.
"""
from __future__ import annotations

import reprlib
from collections.abc import Mapping
from typing import Any

import torch.nn as nn
from torch.nn.utils import parametrize

from .base import find_parametrization, original_weight, weight_layers, weight_parametrizations
from .precision import FORMATS, other_ops, set_other_ops
from .pruning import WeightMask, zero_pruned
from .quantization import ActivationQuantizer, BiasQuantizer, WeightQuantizer, bias_quantizer, operand_points, \
    put_bias_quantizer, put_input_quantizer, put_operand_quantizer

#: Version of the description written by :func:`compression_state`.
FORMAT_VERSION = 1

_WEIGHT_PARAMETRIZATIONS = {cls.kind: cls for cls in (WeightMask, WeightQuantizer)}


#: The optional sections of a compression state, written only where the model has what they describe.
_OPTIONAL = ("biases", "operands", "other_ops")


def compression_state(model: nn.Module) -> dict[str, Any]:
    """JSON-able description of the masks and quantizers on ``model``."""
    weights: dict[str, list[dict[str, Any]]] = {}
    inputs: dict[str, dict[str, Any]] = {}
    biases = {name: quantizer.describe() for name, module in model.named_modules()
              if (quantizer := bias_quantizer(module)) is not None}
    operands = {name: module.describe() for name, module in operand_points(model).items()
                if isinstance(module, ActivationQuantizer)}
    for name, module in model.named_modules():
        chain = weight_parametrizations(module)
        if chain:
            unknown = [type(p).__name__ for p in chain if type(p) not in _WEIGHT_PARAMETRIZATIONS.values()]
            if unknown:
                raise ValueError(f"layer {name!r}: weight parametrization {unknown[0]} is not one of compress's "
                                 f"({', '.join(_WEIGHT_PARAMETRIZATIONS)}), so it cannot be saved and rebuilt")
            weights[name] = [p.describe() for p in chain]
        quantizer = module._modules.get("input_quantizer")
        if isinstance(quantizer, ActivationQuantizer):
            inputs[name] = quantizer.describe()
    optional = {"biases": biases, "operands": operands, "other_ops": other_ops(model)}
    return {"format": FORMAT_VERSION, "weights": weights, "inputs": inputs,
            **{key: value for key, value in optional.items() if value and value != "fp32"}}


#: The weight chains :func:`compression_state` can describe: at most one mask, innermost, then at most one quantizer.
_CHAINS = ([WeightMask.kind], [WeightQuantizer.kind], [WeightMask.kind, WeightQuantizer.kind])


def check_compression_state(model: nn.Module, state: Any) -> None:
    """Range-check ``state`` against ``model`` before anything is built; ``ValueError`` names the first problem.

    ``state`` may come from a file someone else wrote (an entry), so every value is checked here, in plain
    Python, before any tensor is made from it: the format, the keys, the layers (conv/linear layers of
    ``model``), the chain of parametrizations per weight (:data:`_CHAINS`) and each parametrization's
    settings (its class's ``check_description``: bit widths, methods, block shapes within the weight).
    """
    if not isinstance(state, Mapping) or state.get("format") != FORMAT_VERSION:
        found = state.get("format") if isinstance(state, Mapping) else type(state).__name__
        raise ValueError(f"compression state format {found!r} is not supported; expected {FORMAT_VERSION} "
                         "(written by compress.compression_state)")
    unknown = sorted(map(str, set(state) - {"format", "weights", "inputs", *_OPTIONAL}))
    if unknown:
        raise ValueError(f"compression state has unknown key(s) {', '.join(unknown)}; expected format, weights, inputs "
                         f"(and optionally {', '.join(_OPTIONAL)})")
    weights, inputs = state.get("weights", {}), state.get("inputs", {})
    if not isinstance(weights, Mapping) or not isinstance(inputs, Mapping):
        raise ValueError("compression state weights and inputs must map layer names to descriptions")
    layers = weight_layers(model)
    for name, chain in weights.items():
        module = _layer(layers, name)
        kinds = [d.get("kind") if isinstance(d, Mapping) else None for d in chain] if isinstance(chain, list) else None
        if kinds not in _CHAINS:
            raise ValueError(f"layer {name!r}: weight parametrizations {reprlib.repr(kinds or chain)} are not a mask, "
                             "a weight quantizer, or a mask then a weight quantizer")
        for description in chain:
            try:
                _WEIGHT_PARAMETRIZATIONS[description["kind"]].check_description(description, module.weight)
            except ValueError as err:
                raise ValueError(f"layer {name!r}: {err}") from None
    for name, description in inputs.items():
        _layer(layers, name)
        _check_activation(f"layer {name!r}", description)
    _check_optional(model, state, layers)


def _check_activation(where: str, description: Any) -> None:
    """``description`` is an activation quantizer's."""
    if not isinstance(description, Mapping) or description.get("kind") != ActivationQuantizer.kind:
        raise ValueError(f"{where}: input description {reprlib.repr(description)} is not an "
                         f"{ActivationQuantizer.kind}")
    try:
        ActivationQuantizer.check_description(description)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def _check_optional(model: nn.Module, state: Mapping[str, Any], layers: Mapping[str, nn.Module]) -> None:
    """The optional sections: bias quantizers of layers with a bias, activation quantizers of operand points of
    ``model``, a known format of the other ops."""
    if not isinstance(state.get("biases", {}), Mapping) or not isinstance(state.get("operands", {}), Mapping):
        raise ValueError("compression state biases and operands must map names to descriptions")
    for name, description in state.get("biases", {}).items():
        module = _layer(layers, name)
        if getattr(module, "bias", None) is None:
            raise ValueError(f"layer {name!r} has no bias, but the compression state quantizes one")
        if not isinstance(description, Mapping) or description.get("kind") != BiasQuantizer.kind:
            raise ValueError(f"layer {name!r}: bias description {reprlib.repr(description)} is not a "
                             f"{BiasQuantizer.kind}")
        try:
            BiasQuantizer.check_description(description, module.bias)
        except ValueError as err:
            raise ValueError(f"layer {name!r}: {err}") from None
    points = operand_points(model)
    for name, description in state.get("operands", {}).items():
        if name not in points:
            raise ValueError(f"the compression state quantizes operand {reprlib.repr(name)}, which this model does "
                             "not have (an nn.Identity named *_operand): was it saved from a different architecture?")
        _check_activation(f"operand {name!r}", description)
    if state.get("other_ops", "fp32") not in FORMATS:
        raise ValueError(f"compression state other_ops={reprlib.repr(state['other_ops'])}: expected one of "
                         f"{', '.join(FORMATS)}")


def apply_compression_state(model: nn.Module, state: Mapping[str, Any]) -> None:
    """Re-create the structure described by ``state`` on ``model`` (a fresh model of the same architecture).

    The whole state is checked first (:func:`check_compression_state`), so a bad value builds nothing.
    Idempotent: a layer that already carries exactly the described structure is left alone, and one that
    carries the start of it (an earlier stage's mask, before a later stage's quantizer) gets the rest.
    """
    check_compression_state(model, state)
    layers = weight_layers(model)
    for name, chain in state.get("weights", {}).items():
        module = layers[name]
        present = [p.describe() for p in weight_parametrizations(module)]
        if present != list(chain)[:len(present)]:
            raise ValueError(f"layer {name!r} already carries {present}, not the described {list(chain)}")
        for description in list(chain)[len(present):]:
            built = _WEIGHT_PARAMETRIZATIONS[description["kind"]].rebuild(description, module.weight)
            parametrize.register_parametrization(module, "weight", built.to(module.weight.device))
    for name, description in state.get("inputs", {}).items():
        module = layers[name]
        present = module._modules.get("input_quantizer")
        if present is None or present.describe() != dict(description):
            put_input_quantizer(module, ActivationQuantizer.rebuild(description).to(module.weight.device))
    for name, description in state.get("biases", {}).items():
        module = layers[name]
        present = bias_quantizer(module)
        if present is None or present.describe() != dict(description):
            put_bias_quantizer(module, BiasQuantizer.rebuild(description, module.bias).to(module.bias.device))
    points = operand_points(model)
    for name, description in state.get("operands", {}).items():
        if not isinstance(points[name], ActivationQuantizer) or points[name].describe() != dict(description):
            device = next(model.parameters()).device
            put_operand_quantizer(model, name, ActivationQuantizer.rebuild(description).to(device))
    set_other_ops(model, state.get("other_ops", "fp32"))


def check_restored(model: nn.Module) -> None:
    """After ``load_state_dict``: ``ValueError`` when an input quantizer was never calibrated.

    Such a quantizer has no step size yet and refuses to run in evaluation; a trained model's have all seen a
    training batch, so the loaded state was not saved from one.
    """
    uncalibrated = [name.removesuffix(".input_quantizer") for name, module in model.named_modules()
                    if isinstance(module, ActivationQuantizer) and not bool(module.calibrated)]
    if uncalibrated:
        raise ValueError(f"the input quantizer of layer(s) {', '.join(uncalibrated[:5])} was never calibrated "
                         f"({len(uncalibrated)} in all): the weights were not saved from a trained model")


def _layer(layers: Mapping[str, nn.Module], name: Any) -> nn.Module:
    """The conv / linear layer ``name`` of the model (``layers`` is :func:`~compress.base.weight_layers`)."""
    if not isinstance(name, str) or name not in layers:
        raise ValueError(f"the compression state names layer {reprlib.repr(name)}, which this model does not have as a "
                         "conv/linear layer: was it saved from a different architecture?")
    return layers[name]


def finalize_for_export(model: nn.Module) -> None:
    """Prepare ``model`` for an entry: bake masks into the weights, fix every step size.

    Pruned weights become exact zeros of the stored tensor and the mask parametrizations are removed
    (the scorer measures sparsity from the executed weights, so nothing is lost) — except block masks,
    which stay because the scorer charges them 1 bit per block only while they declare it; quantizers stay, with
    weight observers set from the final weights and every quantizer frozen, its step size rounded to its stored
    width, so the saved entry holds exactly the steps the evaluated model computes with and reproduces it without
    depending on training-mode updates. Idempotent.
    """
    for module in model.modules():
        mask = find_parametrization(module, WeightMask)
        if mask is not None:
            zero_pruned(module, mask)
        # A block mask is cheaper to store than one bit per weight: it stays part of the entry.
        if mask is not None and mask.micronet_mask_bits == mask.mask.numel():
            chain = module.parametrizations["weight"]
            if len(chain) == 1:
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
            else:
                del chain[list(chain).index(mask)]
        quantizer = find_parametrization(module, WeightQuantizer)
        if quantizer is not None and quantizer.method != "lsq" and not quantizer.is_frozen:
            quantizer.observe(original_weight(module))
        quantizer = bias_quantizer(module)
        if quantizer is not None and quantizer.method != "lsq" and not quantizer.is_frozen:
            quantizer.observe(module.parametrizations["bias"].original)
        # After its layer (modules() lists a layer before its parametrizations): the observed step is in place.
        if isinstance(module, (WeightQuantizer, ActivationQuantizer)):
            module.finalize()
