"""Golden counts: every registered model, compressed ones and the recurrent kernels, counted and dumped per layer.

    python benchmarks/count_golden.py --save /tmp/golden.json          # before changing the counter
    python benchmarks/count_golden.py --compare /tmp/golden.json       # after: exits 1 unless byte-identical

A change to scoring/counter/ that must not change any count (a restructuring, a speed-up) is checked by saving the
counts before it and comparing after. Image models are counted with ``count_model`` on one random input of their
task's size (ImageNet 224, CIFAR 32, digits 8), language models with ``count_stream`` on Zipf tokens at their full
vocabulary (a memory filled first by uncounted tokens, as benchmarks/count_speed.py does); beside them, models with
8-bit quantization and 50% pruning from compress/, nn.LSTM / GRU / RNN and their cells, timm's ViT and ConvNeXt, and
a channel shuffle. Each case is seeded, and exact zeros of a random init are nudged, so the counts repeat.
``--only`` picks cases by name (shell patterns).
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable

if not __package__:  # run as a file: import the repository's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm
import torch
import torch.nn as nn

from compress import PruneTechnique, QuantizeTechnique
from data.streams import zipf_tokens
from models import create_model, list_models
from scoring import Count, count_model, count_stream

#: Image models: (classes, input channels, input size, batch).
IMAGE_TASKS = {"digits_cnn": (10, 1, 8, 4), "resnet18_cifar": (100, 3, 32, 2), "wrn28_10": (100, 3, 32, 2),
               "efficientnet_b0_cifar": (100, 3, 32, 2)}
IMAGENET = (1000, 3, 224, 1)
#: Language models: vocabulary, counted tokens.
LANGUAGE_MODELS = {"lstm_lm": (10_000, 16), "lstm_lm_baseline": (267_735, 8), "txl_micronet": (267_735, 16),
                   "txl_teacher": (267_735, 4)}


def _no_exact_zeros(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for param in model.parameters():
            param[param == 0] = 1e-3
    return model


def _image(name: str) -> Callable[[], Count]:
    def count() -> Count:
        classes, channels, size, batch = IMAGE_TASKS.get(name, IMAGENET)
        model = _no_exact_zeros(create_model(name, num_classes=classes).eval())
        return count_model(model, torch.randn(batch, channels, size, size))
    return count


def _tokens(model: nn.Module, vocabulary: int, counted: int) -> tuple[torch.Tensor, int]:
    warmup = getattr(model, "mem_len", 0)
    return torch.from_numpy(zipf_tokens(warmup + counted, vocabulary, seed=1).astype("int64"))[None], warmup


def _language(name: str) -> Callable[[], Count]:
    def count() -> Count:
        vocabulary, counted = LANGUAGE_MODELS[name]
        model = _no_exact_zeros(create_model(name, num_classes=vocabulary).eval())
        tokens, warmup = _tokens(model, vocabulary, counted)
        return count_stream(model, tokens, warmup_tokens=warmup)
    return count


def _compress(model: nn.Module, *, structure: str = "unstructured", **prune: Any) -> nn.Module:
    """8-bit weights and inputs (minmax), then every conv/linear pruned to 50% at once."""
    quantize = QuantizeTechnique({"method": "minmax", "weight_bits": 8, "activation_bits": 8}, stage_epochs=1,
                                 where="quantize")
    quantize.configure(steps_per_epoch=1)
    quantize.attach(model)
    pruning = PruneTechnique({"final_sparsity": 0.5, "first_last_sparsity": None, "unit": "step", "start": 0,
                              "end": 0, "frequency": 1, "structure": structure, **prune}, stage_epochs=1, where="prune")
    pruning.configure(steps_per_epoch=1)
    pruning.attach(model)
    pruning.on_step_end(model, 0)
    return model


def _compressed_image(name: str, **prune: Any) -> Callable[[], Count]:
    def count() -> Count:
        classes, channels, size, batch = IMAGE_TASKS[name]
        model = _compress(_no_exact_zeros(create_model(name, num_classes=classes)), **prune)
        inputs = torch.randn(batch, channels, size, size)
        model.train()
        model(inputs)  # calibrates the input quantizers
        return count_model(model.eval(), inputs)
    return count


def _compressed_lstm_lm() -> Count:
    vocabulary, counted = LANGUAGE_MODELS["lstm_lm"]
    model = _compress(_no_exact_zeros(create_model("lstm_lm", num_classes=vocabulary)))
    tokens, _ = _tokens(model, vocabulary, counted)
    model.train()
    with torch.no_grad():
        model(tokens[:, :4], model.initial_state(1))  # calibrates the input quantizers
    return count_stream(model.eval(), tokens)


class _Recurrent(nn.Module):
    """A token embedding and a torch recurrent module (a cell when ``cell``) fed one token per call, then a decoder."""

    def __init__(self, recurrent: nn.Module, cell: bool):
        super().__init__()
        self.recurrent, self.cell = recurrent, cell
        self.lstm = isinstance(recurrent, (nn.LSTM, nn.LSTMCell))
        self.out = getattr(recurrent, "proj_size", 0) or recurrent.hidden_size
        self.embed, self.decoder = nn.Embedding(50, recurrent.input_size), nn.Linear(self.out, 50)

    def initial_state(self, batch_size: int, device: Any = None) -> Any:
        hidden = self.recurrent.hidden_size
        if self.cell:
            zeros = torch.zeros(batch_size, hidden, device=device)
            return (zeros, zeros) if self.lstm else zeros
        layers = self.recurrent.num_layers * (1 + self.recurrent.bidirectional)
        h = torch.zeros(layers, batch_size, self.out, device=device)
        return (h, torch.zeros(layers, batch_size, hidden, device=device)) if self.lstm else h

    def forward(self, tokens: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        x = self.embed(tokens)[:, 0]  # [batch, E]
        if self.cell:
            state = self.recurrent(x, state)
            out = state[0] if self.lstm else state
        else:
            out, state = self.recurrent(x[None], state)
            out = out[0]
        return torch.log_softmax(self.decoder(out[..., :self.out]), -1), state


def _recurrent(recurrent: Callable[[], nn.Module], *, cell: bool = False) -> Callable[[], Count]:
    def count() -> Count:
        model = _no_exact_zeros(_Recurrent(recurrent(), cell).eval())
        return count_stream(model, torch.from_numpy(zipf_tokens(6, 50, seed=1).astype("int64")))
    return count


class _Shuffle(nn.Module):
    """Grouped convs with a view-transpose-view channel shuffle, a roll and a flip between them."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.Conv2d(8, 8, 1, groups=4)
        self.norm = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(x)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        x = torch.roll(torch.flip(self.norm(self.b(x)), [3]), 1, 2)
        return torch.nn.functional.channel_shuffle(x, 4).mean((2, 3))


def _timm(name: str, **kwargs: Any) -> Callable[[], Count]:
    def count() -> Count:
        model = _no_exact_zeros(timm.create_model(name, num_classes=10, **kwargs).eval())
        return count_model(model, torch.randn(1, 3, 32, 32))
    return count


def cases() -> dict[str, Callable[[], Count]]:
    """Every case by name, in the order they are counted."""
    found: dict[str, Callable[[], Count]] = {}
    for name in list_models():
        found[name] = _language(name) if name in LANGUAGE_MODELS else _image(name)
    found["digits_cnn+q8+prune50"] = _compressed_image("digits_cnn")
    found["resnet18_cifar+q8+block_prune50"] = _compressed_image("resnet18_cifar", structure="block",
                                                                 block_shape=[4, 4])
    found["lstm_lm+q8+prune50"] = _compressed_lstm_lm
    found["nn.LSTM 2 layers"] = _recurrent(lambda: nn.LSTM(6, 8, num_layers=2))
    found["nn.LSTM bidirectional proj"] = _recurrent(lambda: nn.LSTM(6, 8, bidirectional=True, proj_size=4))
    found["nn.GRU"] = _recurrent(lambda: nn.GRU(6, 8))
    found["nn.RNN relu"] = _recurrent(lambda: nn.RNN(6, 8, nonlinearity="relu"))
    found["nn.LSTMCell"] = _recurrent(lambda: nn.LSTMCell(6, 8), cell=True)
    found["nn.GRUCell"] = _recurrent(lambda: nn.GRUCell(6, 8), cell=True)
    found["channel shuffle"] = lambda: count_model(_no_exact_zeros(_Shuffle().eval()), torch.randn(2, 8, 6, 6))
    found["timm vit_tiny"] = _timm("vit_tiny_patch16_224", img_size=32, patch_size=4)
    found["timm convnext_atto"] = _timm("convnext_atto")
    return found


def record(count: Count) -> dict[str, Any]:
    """A count as JSON: ``to_dict()`` and the exact ops."""
    return {**count.to_dict(), "ops_exact": str(Fraction(count.ops_exact))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--save", type=Path, help="write the counts to this JSON file")
    action.add_argument("--compare", type=Path, help="compare the counts with this JSON file")
    parser.add_argument("--only", nargs="*", default=["*"], help="case name patterns (default: all)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    golden = json.loads(args.compare.read_text()) if args.compare else {}
    counts, differ = {}, []
    for name, count in cases().items():
        if not any(fnmatch.fnmatch(name, pattern) for pattern in args.only):
            continue
        torch.manual_seed(0)
        start = time.perf_counter()
        counts[name] = record(count())
        same = json.dumps(counts[name]) == json.dumps(golden.get(name))
        if args.compare and not same:
            differ.append(name)
        verdict = ("identical" if same else "DIFFERENT") if args.compare else ""
        print(f"{name:<36} {time.perf_counter() - start:7.2f} s  ops {counts[name]['ops']:.6g}  {verdict}",
              flush=True)
    if args.save:
        args.save.write_text(json.dumps(counts, indent=1) + "\n")
        print(f"{len(counts)} counts saved to {args.save}")
        return 0
    missing = [name for name in counts if name not in golden]
    print(f"{len(counts) - len(differ)} of {len(counts)} counts byte-identical"
          + (f"; different: {', '.join(differ)}" if differ else "") + (f" (not in the golden file: {missing})"
                                                                       if missing else ""))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
