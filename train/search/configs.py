"""The compress config an allocation is trained with: a template's stages (gradual pruning, then QAT) with the
chosen sparsity of every pruned layer as its ``layer_sparsity`` and the chosen bits of every quantized layer as its
``layer_bits`` (weights and inputs), written as a YAML file headed by where it comes from and what it predicts. The
layers an allocation does not set keep the template's settings (the allocate stage) or stay as trained (the
command), as each measured them (:func:`fill_stages`).

Imports conf (the config folder), scoring.entry (atomic writes), train.config and the search's grid and solve.
"""
from __future__ import annotations

import copy
import fnmatch
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from conf import CONF_DIR
from scoring.entry import atomic_write
from train.config import ConfigError
from train.search.grid import Setting, layer_pattern, settings_text
from train.search.solve import Allocation


def load_template(template: str) -> dict[str, Any]:
    """A compress config by name (conf/compress/NAME.yaml) or path, interpolations kept (``${train.epochs}``)."""
    path = Path(template) if template.endswith((".yaml", ".yml")) else CONF_DIR / "compress" / f"{template}.yaml"
    if not path.is_file():
        raise ConfigError(f"template {template!r}: no file {path}",
                          f"name a config of {CONF_DIR / 'compress'} (e.g. prune_q4, distill_prune_q8) or a yaml path")
    config = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    try:
        check_template(config.get("stages") if isinstance(config, dict) else None, f"template {path}")
    except ValueError as err:
        raise ConfigError(str(err), "use prune_q4, prune_q8 or distill_prune_q8, or a config of the same shape "
                                    "with unstructured pruning") from None
    return config


def check_template(stages: Any, where: str) -> None:
    """ValueError unless ``stages`` (a list of stage mappings) has a stage with ``prune:`` (unstructured: what the
    sensitivity measures) and a stage with ``quantize:``: the stages that train an allocation."""
    if not isinstance(stages, list) or not any("prune" in s for s in stages) or not any("quantize" in s for s in stages):
        raise ValueError(f"{where} needs a stage with prune: and a stage with quantize:")
    structure = (next(s for s in stages if "prune" in s)["prune"] or {}).get("structure", "unstructured")
    if structure != "unstructured":
        raise ValueError(f"{where} prunes with structure={structure}; the sensitivity measured unstructured "
                         "magnitude pruning")


def fill_stages(stages: Sequence[Mapping[str, Any]], settings: Mapping[str, Setting], *,
                keep_template: bool) -> list[dict[str, Any]]:
    """A copy of ``stages`` in which the first ``prune:`` and the first ``quantize:`` carry the per-layer
    ``settings`` as overrides, the template's schedule and layer-wide keys kept. The layers ``settings`` leaves out
    keep the template's settings with ``keep_template`` (the allocate stage, which measured them so: the settings
    come first in ``layer_sparsity`` / ``layer_bits``, where the first match wins, and an unquantized one joins the
    quantizer's ``exclude``); without it they stay as trained (the command, whose measurement left them so: a
    stage left with nothing to prune or quantize loses its technique). ValueError where the template's
    ``exclude`` holds a layer of ``settings`` (it could not be set)."""
    stages = copy.deepcopy([dict(stage) for stage in stages])
    pruned = {layer_pattern(layer): s.sparsity for layer, s in settings.items() if keep_template or s.sparsity}
    quantized = {layer_pattern(layer): s.bits for layer, s in settings.items() if s.quantized}
    unquantized = [layer_pattern(layer) for layer, s in settings.items() if not s.quantized]
    prune_stage = next(s for s in stages if "prune" in s)
    quantize_stage = next(s for s in stages if "quantize" in s)
    if keep_template:
        for stage, key, per_layer, chosen, excluded in ((prune_stage, "prune", "layer_sparsity", pruned, []),
                                                        (quantize_stage, "quantize", "layer_bits", quantized,
                                                         unquantized)):
            stage[key] = _ahead(stage[key] or {}, per_layer, chosen, excluded, settings, f"stage {stage['name']}")
        return stages
    if pruned:
        prune = {k: v for k, v in (prune_stage["prune"] or {}).items()
                 if k not in ("final_sparsity", "layers", "exclude", "first_last_sparsity", "layer_sparsity")}
        prune_stage["prune"] = {"final_sparsity": max(pruned.values()), **prune, "layers": list(pruned),
                                "first_last_sparsity": None, "layer_sparsity": pruned}
    else:
        del prune_stage["prune"]
    if quantized:
        quantize = {k: v for k, v in (quantize_stage["quantize"] or {}).items()
                    if k not in ("weight_bits", "activation_bits", "layers", "exclude", "first_last_bits", "layer_bits")}
        quantize_stage["quantize"] = {**quantize, "layers": list(quantized), "first_last_bits": None,
                                      "layer_bits": quantized}
    else:
        del quantize_stage["quantize"]
    return stages


def _ahead(mapping: Mapping[str, Any], per_layer: str, chosen: Mapping[str, Any], excluded: list[str],
           layers: Sequence[str], where: str) -> dict[str, Any]:
    """A technique's ``mapping`` with the ``chosen`` per-layer entries ahead of its own ``per_layer`` ones (the
    first match wins), ``excluded`` added to its ``exclude`` and, where it lists its ``layers``, the chosen ones
    added to them."""
    template_exclude = list(mapping.get("exclude") or [])
    blocked = [layer for layer in layers if any(fnmatch.fnmatchcase(layer, p) for p in template_exclude)]
    if blocked:
        raise ValueError(f"{where}: exclude {template_exclude} holds layer(s) {', '.join(blocked[:4])} the allocation "
                         "sets; add them to the allocate stage's exclude, or drop them from the stage's")
    mapping = dict(mapping)
    mapping[per_layer] = {**chosen, **{k: v for k, v in (mapping.get(per_layer) or {}).items() if k not in chosen}}
    if excluded:
        mapping["exclude"] = template_exclude + excluded
    if "layers" in mapping:
        mapping["layers"] = [*mapping["layers"], *(p for p in chosen if p not in mapping["layers"])]
    return mapping


def compress_config(allocation: Allocation, template: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The template's stages with the allocation as per-layer overrides (stages left without a technique dropped)."""
    config = {"name": name, "stages": fill_stages(template["stages"], allocation.settings, keep_template=False)}
    config["stages"] = [s for s in config["stages"] if any(k in s for k in ("prune", "quantize", "distill"))]
    quantize_stage = next((s for s in config["stages"] if "quantize" in s), None)
    teachers = {s["distill"].get("teacher") for s in config["stages"] if isinstance(s.get("distill"), Mapping)}
    if quantize_stage is not None and re.fullmatch(r"q\d+", quantize_stage["name"]) \
            and quantize_stage["name"] not in teachers and "qat" not in {s["name"] for s in config["stages"]}:
        quantize_stage["name"] = "qat"  # the template's q8 / q4 would misname mixed widths
    return config


def write_config(config: Mapping[str, Any], allocation: Allocation, sensitivity: Mapping[str, Any],
                 path: Path, template: str, command: str) -> None:
    """The YAML file, headed by comments saying where it comes from and what it predicts."""
    counted = allocation.counted
    header = [
        f"# Written by `{command}`",
        f"# from {sensitivity.get('path', 'a sensitivity measurement')}",
        f"# (run {sensitivity.get('run', '?')}, {sensitivity['validation']['examples']} validation examples), "
        f"template {template}.",
        f"# Constraint: {allocation.constraint} (per-layer increases added: see train/search/solve.py).",
        f"# Predicted: score {allocation.score:.6f} (freebie {'on' if allocation.freebie else 'off'}), validation "
        f"loss +{allocation.loss_increase:.4f}, {sensitivity['metric']} {allocation.metric:.4f}.",
    ]
    if counted:
        header.append(f"# Counted with every setting applied: score {counted['score']:.6f}; one-shot validation "
                      f"loss {counted['loss']:.4f}, {sensitivity['metric']} {counted['metric']:.4f} (before training).")
    header.append(f"# Layers: {settings_text(allocation.settings)}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(header) + "\n" + OmegaConf.to_yaml(OmegaConf.create(dict(config)))
    atomic_write(path, lambda tmp: tmp.write_text(text))
