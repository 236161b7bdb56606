"""Compression structure on a model: describe it (JSON), rebuild it on a fresh model, finalize it for export.

A checkpoint's ``state_dict`` holds the values of masks and quantizers, but loading it strictly needs
the same modules on the model first. :func:`compression_state` describes them (which layer's weight
carries which parametrizations in which order, which layers quantize their input with which settings)
as plain JSON data, and :func:`apply_compression_state` re-creates them on a fresh registry model, so
that ``load_state_dict(saved, strict=True)`` restores the model exactly. Training-only modes (frozen
BatchNorm statistics) are not structure: the techniques re-apply them on resume.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.nn as nn
from torch.nn.utils import parametrize

from .base import find_parametrization, original_weight, weight_parametrizations
from .pruning import WeightMask, zero_pruned
from .quantization import ActivationQuantizer, WeightQuantizer, put_input_quantizer

#: Version of the description written by :func:`compression_state`.
FORMAT_VERSION = 1

_WEIGHT_PARAMETRIZATIONS = {cls.kind: cls for cls in (WeightMask, WeightQuantizer)}


def compression_state(model: nn.Module) -> dict[str, Any]:
    """JSON-able description of the masks and quantizers on ``model``."""
    weights: dict[str, list[dict[str, Any]]] = {}
    inputs: dict[str, dict[str, Any]] = {}
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
    return {"format": FORMAT_VERSION, "weights": weights, "inputs": inputs}


def apply_compression_state(model: nn.Module, state: Mapping[str, Any]) -> None:
    """Re-create the structure described by ``state`` on ``model`` (a fresh model of the same architecture).

    Idempotent: a layer that already carries exactly the described structure is left alone, and one that
    carries the start of it (an earlier stage's mask, before a later stage's quantizer) gets the rest.
    """
    if not isinstance(state, Mapping) or state.get("format") != FORMAT_VERSION:
        found = state.get("format") if isinstance(state, Mapping) else type(state).__name__
        raise ValueError(f"compression state format {found!r} is not supported; expected {FORMAT_VERSION} "
                         "(written by compress.compression_state)")
    for name, chain in state.get("weights", {}).items():
        module = _layer(model, name)
        present = [p.describe() for p in weight_parametrizations(module)]
        if present != list(chain)[:len(present)]:
            raise ValueError(f"layer {name!r} already carries {present}, not the described {list(chain)}")
        for description in list(chain)[len(present):]:
            kind = description.get("kind")
            if kind not in _WEIGHT_PARAMETRIZATIONS:
                raise ValueError(f"layer {name!r}: unknown weight parametrization kind {kind!r}; "
                                 f"expected one of {', '.join(_WEIGHT_PARAMETRIZATIONS)}")
            built = _WEIGHT_PARAMETRIZATIONS[kind].rebuild(description, module.weight)
            parametrize.register_parametrization(module, "weight", built.to(module.weight.device))
    for name, description in state.get("inputs", {}).items():
        module = _layer(model, name)
        present = module._modules.get("input_quantizer")
        if present is None or present.describe() != dict(description):
            put_input_quantizer(module, ActivationQuantizer.rebuild(description).to(module.weight.device))


def _layer(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"the compression state names layer {name!r}, which this model does not have: "
                         "was it saved from a different architecture?") from None


def finalize_for_export(model: nn.Module) -> None:
    """Prepare ``model`` for an entry: bake masks into the weights, fix every step size.

    Pruned weights become exact zeros of the stored tensor and the mask parametrizations are removed
    (the scorer measures sparsity from the executed weights, so nothing is lost) — except block masks,
    which stay because the scorer charges them 1 bit per block only while they declare it; quantizers stay, with
    weight observers set from the final weights and every quantizer frozen, so the saved entry
    reproduces the evaluated model without depending on training-mode updates. Idempotent.
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
        if quantizer is not None:
            if quantizer.method != "lsq" and not quantizer.is_frozen:
                quantizer.observe(original_weight(module))
            quantizer.freeze()
        if isinstance(module, ActivationQuantizer):
            module.freeze()
