"""How long the MicroNet counter takes, beside torch's FlopCounterMode: an image model, or a language model per token.

    python benchmarks/count_speed.py [--model resnet50] [--size 224] [--repeats 3] [--limit 3.0]
    python benchmarks/count_speed.py --lm lstm_lm_baseline [--tokens 64] [--repeats 1] [--limit 3.0]
    python benchmarks/count_speed.py --lm txl_micronet [--tokens 64] [--threads 1]

Image models: both count the same model on the same batch of one in the same process, after a warm-up forward
pass. Language models (``--lm``, a registered one at the full WikiText-103 vocabulary: the baseline LSTM
``lstm_lm_baseline``, or ``txl_micronet`` with its 96-entry memory, first filled by 96 uncounted tokens) are fed
``--tokens`` Zipf-distributed tokens on-line, one per call with the state carried: a plain loop, the loop under
FlopCounterMode, and ``scoring.count_stream``. The best of ``--repeats`` runs is reported. ``--threads`` sets torch's
intra-op threads (default: torch's choice); on a shared machine one thread gives repeatable times, where a thread
per core contends with the other processes. Exits 1 when our counter takes longer than ``--limit`` seconds.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

if not __package__:  # run as a file: import the repository's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from data.streams import zipf_tokens
from models import create_model
from scoring import count_model, count_stream


def best_time(run: Callable[[], object], repeats: int) -> float:
    """Fastest wall time of ``repeats`` calls, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def language_model(name: str) -> nn.Module:
    """A registered language model at WikiText-103's vocabulary, exact zeros of the random init nudged (the counter
    rightly skips zeros, which would make the timing depend on the seed)."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=267_735).eval()
    with torch.no_grad():
        for param in model.parameters():
            param[param == 0] = 1e-3
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--lm", choices=("lstm_lm_baseline", "txl_micronet"),
                        help="time a language model per token instead")
    parser.add_argument("--tokens", type=int, default=64, help="tokens fed on-line (--lm)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--limit", type=float, default=3.0, help="seconds our counter may take")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.lm:
        model = language_model(args.lm)
        warmup = getattr(model, "mem_len", 0)
        tokens = torch.from_numpy(zipf_tokens(warmup + args.tokens, 267_735, seed=1).astype("int64"))[None]

        def forward() -> None:
            with torch.no_grad():
                state = model.initial_state(1, "cpu")
                for t in range(tokens.shape[1]):
                    _, state = model(tokens[:, t:t + 1], state)

        def count() -> object:
            return count_stream(model, tokens, warmup_tokens=warmup)

        title = f"{args.lm} language model, {args.tokens} tokens on-line"
    else:
        model = create_model(args.model, num_classes=1000).eval()
        x = torch.randn(1, 3, args.size, args.size)

        def forward() -> None:
            with torch.no_grad():
                model(x)

        def count() -> object:
            return count_model(model, x)

        title = f"{args.model} at {args.size}×{args.size}, batch 1"

    def flop_counter() -> None:
        with FlopCounterMode(display=False):
            forward()

    forward()  # warm-up: first-call allocation and kernel selection
    plain = best_time(forward, args.repeats)
    theirs = best_time(flop_counter, args.repeats)
    ours = best_time(count, args.repeats)
    counted = count()
    name = "scoring.count_stream" if args.lm else "scoring.count_model"
    print(f"{title}, {torch.get_num_threads()} threads")
    print(f"  plain forward                    {plain:7.3f} s")
    print(f"  torch FlopCounterMode            {theirs:7.3f} s")
    print(f"  {name:<32} {ours:7.3f} s  ({ours / theirs:.2f}× FlopCounterMode, {ours / plain:.2f}× plain, "
          f"limit {args.limit:g} s)")
    per = "per token" if args.lm else "per example"
    print(f"  counted {per}: {counted.mults:,.0f} mults, {counted.adds:,.0f} adds; {counted.params:,.0f} params "
          f"(32-bit eq., freebie {'on' if counted.freebie else 'off'})")
    return 0 if ours <= args.limit else 1


if __name__ == "__main__":
    sys.exit(main())
