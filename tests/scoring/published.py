"""Rebuilds of two verified 2019 CIFAR-100 entries, for recounting them with this kit (test_published_entries.py).

Each network is rebuilt in PyTorch with the architecture of the entry's own repository and exactly the nonzero
weights of its released checkpoint (``published/*.json``, read from those checkpoints): the counts depend on the
shapes, the nonzeros and the bit widths, not on the trained values, so each output's kept weights are one value
(its mean: activations stay bounded; a fake quantizer keeps a constant row exactly).

* RIAIR (1st): ``models.densenet_bc_100`` (the bearpaw DenseNet-BC-100, k = 12, that the entry trained), 4-bit weights
  and inputs declared by ``compress``'s quantizers, the stem input and the classifier input unquantized, the
  classifier's weights 6-bit.
* OSI-AI (3rd): their EfficientNet-style network (``models/EfficientNet.py`` of Lee-Gihun/MicroNet_OSI-AI) with its
  early exit after block 4, unquantized (16-bit freebie); as two models, one per path a test image takes.

Imports torch, :mod:`compress` and :mod:`models`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from compress import QuantizeTechnique
from models import create_model

DATA = Path(__file__).with_name("published")


def published(name: str) -> dict[str, Any]:
    """The data file ``published/<name>.json``."""
    return json.loads((DATA / f"{name}.json").read_text())


def keep_nonzeros(weight: torch.Tensor, per_output: list[int]) -> None:
    """Keep ``per_output[c]`` nonzero weights in output row ``c`` (the first ones, each 1 / that count), zero the rest."""
    rows = weight.detach().reshape(weight.shape[0], -1)
    counts = torch.tensor(per_output)[:, None]
    kept = torch.arange(rows.shape[1]) < counts
    with torch.no_grad():
        weight.copy_((kept / counts.clamp(min=1)).to(weight.dtype).reshape(weight.shape))


def spread(nonzeros: int, rows: int) -> list[int]:
    """``nonzeros`` spread over ``rows`` output rows as evenly as possible."""
    return [nonzeros // rows + (row < nonzeros % rows) for row in range(rows)]


# --- RIAIR: DenseNet-BC-100, 4-bit ------------------------------------------------------------------------------------
#: Bit widths of RIAIR's score.py (branch cifar100): weights 4, inputs 4, except the stem's input and the classifier's
#: input (32, unquantized) and the classifier's weights (6). ``activation: None`` leaves an input unquantized; the
#: step sizes do not matter to the count (minmax: the cheapest to calibrate).
RIAIR_BITS = {"method": "minmax", "weight_bits": 4, "activation_bits": 4, "first_last_bits": None,
              "layer_bits": {"conv1": {"weight": 4, "activation": None}, "fc": {"weight": 6, "activation": None}}}
#: Their fp16 run (Test.md, ``--half True``: 80.17 %): batch norm, ReLU, pooling and every per-channel scale in fp16.
RIAIR_FP16 = {"scale_bits": 16, "other_ops": "fp16"}


def riair_densenet(fp16: bool = False) -> nn.Module:
    """RIAIR's DenseNet-BC-100 with its checkpoint's nonzeros per output channel and its bit widths, calibrated;
    with ``fp16``, as their fp16 run (:data:`RIAIR_FP16`)."""
    torch.manual_seed(0)
    model = create_model("densenet_bc_100", num_classes=100)
    weights = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    layers = published("riair_cifar100")["layers"]
    if [list(m.weight.shape) for m in weights] != [shape for _, shape, _ in layers]:
        raise AssertionError("models.densenet_bc_100's layers are not RIAIR's (published/riair_cifar100.json)")
    for module, (_, _, per_output) in zip(weights, layers):
        keep_nonzeros(module.weight, per_output)
    technique = QuantizeTechnique({**RIAIR_BITS, **(RIAIR_FP16 if fp16 else {})}, stage_epochs=1, where="riair")
    technique.configure(steps_per_epoch=1)
    technique.attach(model)
    model.train()
    model(torch.rand(1, 3, 32, 32))  # one training batch calibrates the input quantizers (unsigned after ReLU)
    return model.eval()


# --- OSI-AI: EfficientNet-style, early exit, unquantized -------------------------------------------------------------
#: Their ``blocks_args='default'`` after width 0.9 / depth 1.0 rounding (models/utils.py): (in, out, expansion, stride,
#: squeezed channels). Every kernel is 3×3; the early exit reads block 4's output.
OSI_BLOCKS = ((24, 16, 1, 1, 4), (16, 24, 6, 1, 3), (24, 40, 6, 2, 4), (40, 40, 6, 1, 8), (40, 48, 6, 1, 8),
              (48, 64, 6, 1, 9), (64, 64, 6, 1, 12), (64, 80, 6, 2, 12), (80, 80, 6, 1, 16), (80, 96, 6, 1, 16))
OSI_EXIT_AFTER = 4
#: The exit test (models/early_exit/layers.py LogitCond, Config/test.json): exit when the max softmax exceeds it.
OSI_THRESHOLD = 0.85


def _same_pad(stride: int) -> nn.ZeroPad2d:
    """Their static TF 'same' padding of a 3×3 conv, computed for 32×32 whatever the real size (models/utils.py)."""
    return nn.ZeroPad2d((0, 1, 0, 1) if stride == 2 else (1, 1, 1, 1))


class MBConv(nn.Module):
    """Their MBConvBlock: [expand 1×1-BN-swish] depthwise 3×3-BN-swish, squeeze-excite, project 1×1-BN, [+ input]."""

    def __init__(self, in_chs: int, out_chs: int, expansion: int, stride: int, squeezed: int) -> None:
        super().__init__()
        mid = in_chs * expansion
        if expansion != 1:
            self._expand_conv = nn.Conv2d(in_chs, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid)
        self._pad = _same_pad(stride)
        self._conv = nn.Conv2d(mid, mid, 3, stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid)
        self._se_reduce = nn.Conv2d(mid, squeezed, 1)
        self._se_expand = nn.Conv2d(squeezed, mid, 1)
        self._project_conv = nn.Conv2d(mid, out_chs, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(out_chs)
        self.skip = stride == 1 and in_chs == out_chs

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = F.silu(self._bn0(self._expand_conv(inputs))) if hasattr(self, "_expand_conv") else inputs
        x = F.silu(self._bn1(self._conv(self._pad(x))))
        x = torch.sigmoid(self._se_expand(F.silu(self._se_reduce(F.adaptive_avg_pool2d(x, 1))))) * x
        x = self._bn2(self._project_conv(x))
        return x + inputs if self.skip else x


class OsiExit(nn.Module):
    """Their EarlyExitBlock on 48×15×15: depthwise 3×3-BN-swish, 1×1 48→136-BN-swish, average pool, 1×1 136→100."""

    def __init__(self, in_chs: int = 48, width: int = 136, num_classes: int = 100) -> None:
        super().__init__()
        self._pad = _same_pad(1)
        self._depthwise_conv = nn.Conv2d(in_chs, in_chs, 3, groups=in_chs, bias=False)
        self._bn0 = nn.BatchNorm2d(in_chs)
        self._expand_conv = nn.Conv2d(in_chs, width, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(width)
        self._fc = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(self._bn0(self._depthwise_conv(self._pad(x))))
        x = F.silu(self._bn1(self._expand_conv(x)))
        return self._fc(F.adaptive_avg_pool2d(x, 1)).flatten(1)


class OsiPath(nn.Module):
    """The ops one test image runs through their early-exiting network (EfficientNet_EarlyExiting.forward): upsample
    to 63×63, stem, blocks 0..4, the exit module and its test; then, unless ``exits``, blocks 5..9, the head and the
    classifier. Returns the logits of the path taken and the exit test's outcome."""

    def __init__(self, exits: bool) -> None:
        super().__init__()
        self.exits = exits
        self.upsample = nn.Upsample(63, mode="nearest")  # ceil(32 · 1.96), resolution coefficient round(1.4², 2)
        self._pad = _same_pad(2)
        self._conv_stem = nn.Conv2d(3, 24, 3, 2, bias=False)
        self._bn0 = nn.BatchNorm2d(24)
        self._blocks = nn.ModuleList(MBConv(*block) for block in OSI_BLOCKS)
        self._conv_head = nn.Conv2d(96, 136, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(136)
        self._fc = nn.Linear(136, 100)
        self._exit = OsiExit()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.silu(self._bn0(self._conv_stem(self._pad(self.upsample(images)))))
        for block in self._blocks[:OSI_EXIT_AFTER + 1]:
            x = block(x)
        early = self._exit(x)
        confident = torch.softmax(early, 1).amax(1) > OSI_THRESHOLD  # their LogitCond
        if self.exits:
            return early, confident
        for block in self._blocks[OSI_EXIT_AFTER + 1:]:
            x = block(x)
        x = F.silu(self._bn1(self._conv_head(x)))
        return self._fc(F.adaptive_avg_pool2d(x, 1).flatten(1)), confident


def osi_ai_path(exits: bool) -> nn.Module:
    """One path of OSI-AI's network with its checkpoint's nonzeros per layer (``published/osi_ai.json``), spread
    evenly over each layer's output rows: every layer has a bias (its own or a folded batch norm's), so its additions
    are its nonzeros × positions however they are spread."""
    model = OsiPath(exits)
    nonzeros = published("osi_ai")["nonzeros"]
    weights = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    if sorted(weights) != sorted(nonzeros):
        raise AssertionError("the rebuilt OSI-AI network's layers are not those of published/osi_ai.json")
    for name, module in weights.items():
        keep_nonzeros(module.weight, spread(nonzeros[name], module.weight.shape[0]))
    return model.eval()
