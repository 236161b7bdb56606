"""Cost of compression in training: one step of resnet18_cifar with pruning masks + 8-bit QAT vs a plain step.

    python benchmarks/compress_step.py [--batch-size 16] [--steps 10] [--warmup 3] [--method lsq]
                                       [--device cpu] [--threads N]

Both models are built in the same run from the registry with the same seed; the compressed one carries a
pruning mask on every conv/linear weight (50% pruned) and 8-bit weight and input quantizers, attached by
the same stage objects ``conf/compress/prune_q8.yaml`` uses. A step is forward + loss + backward +
SGD step + the techniques' ``on_step_end``; each configuration is timed as the median of ``--steps``
steps after ``--warmup`` steps. The issue's target is a ratio of at most 1.5.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from compress import build_stages
from models import create_model


def step_times(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *, steps: int, warmup: int,
               on_step_end: Callable[[int], None]) -> list[float]:
    """Seconds of each timed training step (after ``warmup`` untimed ones)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    model.train()
    times = []
    for step in range(warmup + steps):
        if inputs.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = F.cross_entropy(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        on_step_end(step)
        if inputs.is_cuda:
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--method", default="lsq", choices=("lsq", "minmax", "moving_average"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    inputs = torch.randn(args.batch_size, 3, 32, 32, device=device)
    targets = torch.randint(0, 100, (args.batch_size,), device=device)

    plain = create_model("resnet18_cifar", num_classes=100).to(device)
    compressed = create_model("resnet18_cifar", num_classes=100).to(device)
    compressed.load_state_dict(plain.state_dict())
    # Pruning starts at step 0 and recomputes masks every 100 steps, as a real schedule would: the timed
    # steps carry the masks and the per-step zeroing of pruned weights, not a mask update every step.
    stage, = build_stages({"name": "bench", "stages": [{
        "name": "prune_q8", "epochs": 1,
        "prune": {"final_sparsity": 0.5, "unit": "step", "start": 0, "end": 0, "frequency": 100,
                  "first_last_sparsity": None},
        "quantize": {"weight_bits": 8, "activation_bits": 8, "method": args.method},
    }]}, load_teacher=lambda spec: None)
    for technique in stage.techniques:
        technique.configure(steps_per_epoch=args.warmup + args.steps)
        technique.attach(compressed)

    def compressed_step_end(step: int) -> None:
        for technique in stage.techniques:
            technique.on_step_end(compressed, step)

    timings = {}
    # Interleave the two configurations so that machine load affects both alike.
    for _ in range(2):
        for name, model, hook in (("plain", plain, lambda step: None), ("prune+q8", compressed, compressed_step_end)):
            timings.setdefault(name, []).extend(step_times(model, inputs, targets, steps=args.steps // 2 or 1,
                                                           warmup=args.warmup, on_step_end=hook))
    plain_s, compressed_s = (statistics.median(timings[k]) for k in ("plain", "prune+q8"))
    print(f"resnet18_cifar, batch {args.batch_size}, {device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {len(timings['plain'])} steps")
    print(f"plain step:              {plain_s * 1e3:8.1f} ms")
    print(f"prune + 8-bit QAT step:  {compressed_s * 1e3:8.1f} ms   ({args.method})")
    print(f"ratio:                   {compressed_s / plain_s:8.2f}   (target <= 1.5)")


if __name__ == "__main__":
    main()
