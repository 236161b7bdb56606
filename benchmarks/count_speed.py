"""How long the MicroNet counter takes on ResNet-50 at 224×224, beside torch's FlopCounterMode.

    python benchmarks/count_speed.py [--model resnet50] [--size 224] [--repeats 3] [--limit 3.0]

Both count the same model on the same batch of one in the same process, after a warm-up forward pass;
the best of ``--repeats`` runs is reported. Exits 1 when our counter takes longer than ``--limit`` seconds.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from models import create_model
from scoring import count_model


def best_time(run: Callable[[], object], repeats: int) -> float:
    """Fastest wall time of ``repeats`` calls, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--limit", type=float, default=3.0, help="seconds our counter may take")
    args = parser.parse_args(argv)

    model = create_model(args.model, num_classes=1000).eval()
    x = torch.randn(1, 3, args.size, args.size)

    def forward() -> None:
        with torch.no_grad():
            model(x)

    def flop_counter() -> None:
        with FlopCounterMode(display=False), torch.no_grad():
            model(x)

    forward()  # warm-up: first-call allocation and kernel selection
    plain = best_time(forward, args.repeats)
    theirs = best_time(flop_counter, args.repeats)
    ours = best_time(lambda: count_model(model, x), args.repeats)
    count = count_model(model, x)
    print(f"{args.model} at {args.size}×{args.size}, batch 1, {torch.get_num_threads()} threads")
    print(f"  plain forward                    {plain:7.3f} s")
    print(f"  torch FlopCounterMode            {theirs:7.3f} s")
    print(f"  scoring.count_model              {ours:7.3f} s  ({ours / theirs:.2f}× FlopCounterMode, limit {args.limit:g} s)")
    print(f"  counted: {count.mults:,.0f} mults, {count.adds:,.0f} adds, {count.params:,.0f} params (32-bit eq.)")
    return 0 if ours <= args.limit else 1


if __name__ == "__main__":
    sys.exit(main())
