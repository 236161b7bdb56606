"""Training throughput (images/s, tokens/s) of our loop against a minimal plain PyTorch loop, in the same process.

    python benchmarks/train_speed.py                       # CPU: small batches, a few dozen steps
    python benchmarks/train_speed.py --device cuda --steps 200 --batch-size 512
    python benchmarks/train_speed.py --models --lm lstm_lm  # a language model only: tokens/s

For each model (default ``resnet18_cifar`` and ``efficientnet_b0_cifar``) on synthetic CIFAR-shaped data:

* **plain**: the minimal loop of a PyTorch tutorial: a CPU ``DataLoader`` over normalised fp32 tensors,
  SGD, cross-entropy, fp32, no augmentation;
* **ours**: ``train.loop.Trainer`` as ``train/run.py`` runs it on this device (GPU-resident loader with
  crop + flip done per batch, bf16 autocast + channels_last + fused SGD on CUDA), same model and SGD settings;
* **ours + prune + QAT8**: the same with a compress stage of gradual pruning and 8-bit quantization-aware
  training (weights and activations) attached.

A language model (a registered model following the contract of ``models/lm_blocks.py``, e.g. ``lstm_lm``) is
measured on a synthetic Zipf-distributed token stream of the demo's vocabulary instead, in windows of ``--bptt``
tokens of ``--batch-size`` streams: **plain** is the tutorial loop (the stream cut into windows by hand, the
state carried and detached, AdamW, the cheap NLL); **ours** is ``train.loop.Trainer`` with the language-model
objective over ``data.streams.TrainStreams``, as ``train/run.py`` runs ``task=wikitext_demo``.

Throughput counts only steps after ``--warmup`` steps (compilation, cuDNN autotuning, allocator growth),
with the device synchronised at both ends of the timed window; the loops take turns ``--repeats`` times and
the best of each is kept. Prints one line per model and, with ``--json``, writes the numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if not __package__:  # run as a file: import the repository's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TQDM_DISABLE", "1")  # the Trainer's progress bars would interleave with the results

import numpy as np
import torch
import torch.nn as nn
from omegaconf import OmegaConf
from torch.utils._pytree import tree_map
from torch.utils.data import DataLoader, TensorDataset

from compress import Technique, build_stages
from data.augment import AugmentOptions
from data.datasets import ArrayImageDataset
from data.gpu_loader import GpuResidentLoader
from data.streams import TrainStreams, zipf_tokens
from models import create_model
from train import distributed
from train.config import TrainConfig
from train.loop import Trainer, make_deterministic
from train.objectives import ClassificationObjective, LanguageModelObjective

MEAN, STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
PRUNE_QAT8 = {"name": "bench", "stages": [{"name": "prune_q8", "epochs": 1, "prune": {"final_sparsity": 0.5},
                                           "quantize": {"weight_bits": 8, "activation_bits": 8}}]}


class Timer:
    """Wall time of the steps after ``warmup``, with the device synchronised at both ends."""

    def __init__(self, warmup: int, device: torch.device) -> None:
        self.warmup, self.device = warmup, device
        self.start = time.perf_counter()

    def step_done(self, step: int) -> None:
        if step == self.warmup - 1:
            self._sync()
            self.start = time.perf_counter()

    def finish(self) -> float:
        self._sync()
        return time.perf_counter() - self.start

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class TimerHook(Technique):
    """Feeds the Trainer's step-end hook to a :class:`Timer` (a no-op on the model)."""

    name = "timer"

    def __init__(self, timer: Timer) -> None:
        self.timer = timer

    def on_step_end(self, model: nn.Module, step: int) -> None:
        self.timer.step_done(step)


def backend_flags() -> tuple[bool, bool, bool]:
    """The global cuDNN / TF32 switches that :func:`make_deterministic` turns on for our loop."""
    return (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)


def set_backend_flags(flags: tuple[bool, bool, bool]) -> None:
    """Set what :func:`backend_flags` reads."""
    (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) = flags


def synthetic_cifar(examples: int, seed: int = 0) -> ArrayImageDataset:
    """Random uint8 32x32 RGB images with labels of 100 classes."""
    rng = np.random.default_rng(seed)
    return ArrayImageDataset(rng.integers(0, 256, (examples, 32, 32, 3), dtype=np.uint8),
                             rng.integers(0, 100, examples))


def plain_loop(model: nn.Module, dataset: ArrayImageDataset, batch_size: int, warmup: int,
               device: torch.device) -> float:
    """Images/s of the minimal loop: CPU DataLoader, fp32, SGD."""
    images = torch.from_numpy(dataset.images).permute(0, 3, 1, 2).float().div(255)
    images = (images - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    loader = DataLoader(TensorDataset(images, torch.from_numpy(dataset.targets)), batch_size=batch_size,
                        shuffle=True, drop_last=True, pin_memory=device.type == "cuda")
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    criterion = nn.CrossEntropyLoss()
    timer = Timer(warmup, device)
    for step, (inputs, targets) in enumerate(loader):
        inputs, targets = inputs.to(device), targets.to(device)
        loss = criterion(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        timer.step_done(step)
    return (len(loader) - warmup) * batch_size / timer.finish()


def _recipe(batch_size: int, compile_model: bool, **settings: object):
    return OmegaConf.merge(OmegaConf.structured(TrainConfig), {
        "epochs": 1, "batch_size": batch_size, "eval_batch_size": batch_size, "compile": compile_model,
        "log_every": 10_000, **settings})


def _trainer_throughput(model: nn.Module, train, loader, objective, warmup: int, device: torch.device,
                        compress: dict | None, per_step: int) -> float:
    """Examples/s of one epoch of train.loop.Trainer after ``warmup`` steps (``per_step`` examples each)."""
    timer = Timer(warmup, device)
    stages = build_stages(compress, load_teacher=lambda spec: None) if compress else []
    techniques = [t for stage in stages for t in stage.techniques]
    trainer = Trainer(model, train, techniques=[*techniques, TimerHook(timer)], loader=loader,
                      ctx=distributed.Context(device), objective=objective)
    trainer.train_epoch()
    return (len(loader) - warmup) * per_step / timer.finish()


def our_loop(model: nn.Module, dataset: ArrayImageDataset, batch_size: int, warmup: int, device: torch.device,
             compress: dict | None, compile_model: bool) -> float:
    """Images/s of train.loop.Trainer with the GPU-resident loader (on CPU tensors when on CPU)."""
    model.to(device)
    train = _recipe(batch_size, compile_model, lr=0.05, weight_decay=5e-4)
    loader = GpuResidentLoader(dataset, batch_size=batch_size, mean=MEAN, std=STD, device=device, seed=0,
                               options=AugmentOptions.from_mapping({"crop_padding": 4, "hflip": True}))
    return _trainer_throughput(model, train, loader, ClassificationObjective(train, {"num_classes": 100}), warmup,
                               device, compress, batch_size)


def plain_lm_loop(model: nn.Module, stream: np.ndarray, batch_size: int, bptt: int, warmup: int,
                  device: torch.device) -> float:
    """Tokens/s of the tutorial loop: the stream cut into batch_size rows, windows by hand, state detached."""
    rows = torch.from_numpy(stream[:len(stream) // batch_size * batch_size].astype(np.int64)).view(batch_size, -1)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    timer, state, windows = Timer(warmup, device), None, (rows.shape[1] - 1) // bptt
    for step in range(windows):
        inputs = rows[:, step * bptt:(step + 1) * bptt].to(device)
        targets = rows[:, step * bptt + 1:(step + 1) * bptt + 1].to(device)
        nll, state = model(inputs, state, targets)
        loss = nll.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        state = tree_map(torch.Tensor.detach, state)
        timer.step_done(step)
    return (windows - warmup) * batch_size * bptt / timer.finish()


def our_lm_loop(model: nn.Module, stream: np.ndarray, batch_size: int, bptt: int, warmup: int,
                device: torch.device, compile_model: bool) -> float:
    """Tokens/s of train.loop.Trainer with the language-model objective over TrainStreams."""
    model.to(device)
    train = _recipe(batch_size, compile_model, optimizer="adamw", lr=3e-3, weight_decay=0.0, nesterov=False)
    return _trainer_throughput(model, train, TrainStreams(stream, batch_size, bptt), LanguageModelObjective(train, {}),
                               warmup, device, None, batch_size * bptt)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["resnet18_cifar", "efficientnet_b0_cifar"])
    parser.add_argument("--lm", nargs="*", default=[], help="language models to measure in tokens/s, e.g. lstm_lm")
    parser.add_argument("--vocab", type=int, default=13_329, help="language models' vocabulary (the demo's)")
    parser.add_argument("--bptt", type=int, default=35, help="language models' training window")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 12 on CPU, 200 on CUDA)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 3 CPU, 30 CUDA)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 32 on CPU, 512 on CUDA")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per loop; the best is kept")
    parser.add_argument("--compile", action="store_true", help="torch.compile our loop's model")
    parser.add_argument("--no-compress", action="store_true", help="skip the prune + QAT8 measurement")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    device = distributed.resolve_device(args.device)
    cuda = device.type == "cuda"
    steps = args.steps or (200 if cuda else 12)
    warmup = args.warmup if args.warmup is not None else (30 if cuda else 3)
    batch_size = args.batch_size or (512 if cuda else 32)
    dataset = synthetic_cifar((steps + warmup) * batch_size)
    results = {"device": torch.cuda.get_device_name(device) if cuda else "cpu",
               "torch": torch.__version__, "threads": torch.get_num_threads(), "batch_size": batch_size,
               "timed_steps": steps, "repeats": args.repeats, "models": {}}
    loops = [("plain", lambda m: plain_loop(m, dataset, batch_size, warmup, device)),
             ("ours", lambda m: our_loop(m, dataset, batch_size, warmup, device, None, args.compile))]
    if not args.no_compress:
        loops.append(("ours_prune_qat8",
                      lambda m: our_loop(m, dataset, batch_size, warmup, device, PRUNE_QAT8, args.compile)))
    torch_defaults = backend_flags()
    for name in args.models:
        row: dict[str, float] = {}
        for _ in range(args.repeats):  # interleaved, best of each: robust to other load on the machine
            for label, run in loops:
                torch.manual_seed(0)
                if label == "plain":  # torch's defaults, also after our loop changed them
                    set_backend_flags(torch_defaults)
                else:  # as train/run.py does
                    make_deterministic(0, device)
                row[label] = max(row.get(label, 0.0), run(create_model(name, num_classes=100)))
        row["ratio_ours_vs_plain"] = row["ours"] / row["plain"]
        if "ours_prune_qat8" in row:
            row["step_cost_prune_qat8_vs_ours"] = row["ours"] / row["ours_prune_qat8"]
        results["models"][name] = row
        print(f"{name:24s} plain {row['plain']:9.1f} img/s | ours {row['ours']:9.1f} img/s | "
              f"ratio {row['ratio_ours_vs_plain']:.3f}"
              + (f" | prune+QAT8 {row['ours_prune_qat8']:9.1f} img/s "
                 f"(step costs {row['step_cost_prune_qat8_vs_ours']:.2f}x ours)" if "ours_prune_qat8" in row
                 else ""), flush=True)
    lm_batch = args.batch_size or (64 if cuda else 32)
    stream = zipf_tokens((steps + warmup) * lm_batch * args.bptt + lm_batch, args.vocab)
    for name in args.lm:
        row = {}
        for _ in range(args.repeats):
            for label, run in (("plain", lambda m: plain_lm_loop(m, stream, lm_batch, args.bptt, warmup, device)),
                               ("ours", lambda m: our_lm_loop(m, stream, lm_batch, args.bptt, warmup, device,
                                                              args.compile))):
                torch.manual_seed(0)
                if label == "plain":
                    set_backend_flags(torch_defaults)
                else:
                    make_deterministic(0, device)
                row[label] = max(row.get(label, 0.0), run(create_model(name, num_classes=args.vocab)))
        row["ratio_ours_vs_plain"] = row["ours"] / row["plain"]
        results["language_models"] = {**results.get("language_models", {}), name: row}
        print(f"{name:24s} plain {row['plain']:9.1f} tok/s | ours {row['ours']:9.1f} tok/s | "
              f"ratio {row['ratio_ours_vs_plain']:.3f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
