"""The 2019 MicroNet challenge's verified leaderboard, as data, and where a score would place on it.

The scores are those of the verified leaderboard (micronet-challenge.github.io, ``leaderboard.md``); docs/rules.md
("The results to beat") restates them. The CIFAR-100 and ImageNet winners (RIAIR) counted additions with an adder
tree (each level at the width it needs), which the rules allow; their own score tables also give the same models
under 32-bit accumulation, the mode this kit counts by default (``score.accumulator_bits=32``), so a score counted
at 32 bits is compared with those figures where they exist. The other entries' accumulation widths are not
recorded here: their verified scores are compared as they are.

Part of the judge's core: imports nothing of ours but :mod:`scoring.rules`.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

from scoring.rules import ADDER_TREE

#: Where the figures come from.
SOURCES = (
    "micronet-challenge.github.io, leaderboard.md (the verified leaderboard)",
    "RIAIR: github.com/peiswang/MicroNetChallenge, Score.md on master (ImageNet) and on the cifar100 branch "
    "(their scores under 32-bit accumulation)",
    "OSI-AI: github.com/Lee-Gihun/MicroNet_OSI-AI, README table",
    "MIT-HAN-Lab: github.com/mit-han-lab/neurips-micronet, notebook 3",
)

#: Accumulator width of the winners' second score figures.
FULL_ACCUMULATOR_BITS = 32


@dataclass(frozen=True)
class Placing:
    """One entry of the 2019 leaderboard: its place, verified score, team and model where known, and the same
    model's score with additions counted at 32 bits where its authors published one."""

    place: int
    score: float
    team: str | None = None
    entry: str | None = None
    score_32bit_accumulation: float | None = None

    def compared_score(self, accumulator_bits: int | str) -> float:
        """The figure a score counted with ``accumulator_bits``-bit additions is compared with."""
        if accumulator_bits == FULL_ACCUMULATOR_BITS and self.score_32bit_accumulation is not None:
            return self.score_32bit_accumulation
        return self.score


#: The top three of each challenge task, best first.
LEADERBOARD: Mapping[str, tuple[Placing, ...]] = MappingProxyType({
    "imagenet": (
        Placing(1, 0.1295, "RIAIR", "MixNet-S, pruned, mixed 3-7 bit per layer from sensitivity, distilled, "
                                    "adder tree", 0.1893),
        Placing(2, 0.1887),
        Placing(3, 0.2968, "Qualcomm", "MixNet"),
    ),
    "cifar100": (
        Placing(1, 0.0044, "RIAIR", "DenseNet-BC-100 (k=12), 75% pruned, 4-bit weights and activations, FC 50% at "
                                    "6 bits, batch norm / ReLU / pooling in real fp16, per-tensor scales, distilled, "
                                    "adder tree", 0.0085),
        Placing(2, 0.0054, "KAIST"),
        Placing(3, 0.0058, "OSI-AI"),
    ),
    "wikitext103": (
        Placing(1, 0.0475, "MIT-HAN-Lab", "Transformer-XL style, 8 layers, d=256, tied adaptive input and softmax, "
                                          "34% sparse, 8-bit, distilled, non-parametric cache"),
        Placing(2, 0.1657, "Clova", "group transformer"),
        Placing(3, 0.8232, None, "4-layer QRNN, full-vocabulary tied softmax, 16-bit freebie"),
    ),
})


def place_of(task: str, score: float, accumulator_bits: int | str) -> int | None:
    """The place ``score`` (counted with ``accumulator_bits``-bit additions) would take on ``task``'s leaderboard:
    1 + the entries with a lower compared score (a tie places behind); 4 is off the podium. None for a task the
    challenge did not have."""
    placings = LEADERBOARD.get(task)
    if placings is None:
        return None
    return 1 + sum(placing.compared_score(accumulator_bits) <= score for placing in placings)


def compare(task: str, score: float, accumulator_bits: int | str) -> dict[str, Any] | None:
    """``score`` beside ``task``'s leaderboard, as plain data (JSON-able): every placing with the figure it is
    compared with, and the place ``score`` would take. None for a task the challenge did not have."""
    placings = LEADERBOARD.get(task)
    if placings is None:
        return None
    return {
        "task": task, "score": score, "accumulator_bits": accumulator_bits,
        "place": place_of(task, score, accumulator_bits),
        "placings": [{"place": p.place, "team": p.team, "entry": p.entry, "score": p.score,
                      "score_32bit_accumulation": p.score_32bit_accumulation,
                      "compared_with": p.compared_score(accumulator_bits)} for p in placings],
        "sources": list(SOURCES),
    }


def comparison_note(comparison: Mapping[str, Any]) -> str:
    """One sentence: which of the leaderboard's figures :func:`compare` compared the score with, and why."""
    bits = comparison["accumulator_bits"]
    if bits == FULL_ACCUMULATOR_BITS:
        return ("Additions counted at 32 bits: compared with the winners' scores under 32-bit accumulation where "
                "their authors give them, else with the verified scores.")
    counted = "in adder trees" if bits == ADDER_TREE else f"at {bits} bits"
    return f"Additions counted {counted}: compared with the verified scores as they are."


def _ordinal(place: int) -> str:
    return {1: "1st", 2: "2nd", 3: "3rd"}.get(place, f"{place}th")


def comparison_table(comparison: Mapping[str, Any], label: str) -> str:
    """The markdown table of :func:`compare`'s result, ordered by the compared figure, with ``score`` as a row named
    ``label`` where it would place (behind the entries it ties with)."""
    rows = ["| 2019 place | entry | verified score | with 32-bit accumulation | compared |",
            "|---|---|---:|---:|---:|"]
    ours = f"| **would be {_ordinal(comparison['place'])}** | **{label}** | – | – | **{comparison['score']:.4f}** |"
    placings = sorted(comparison["placings"], key=lambda placing: placing["compared_with"])
    for placing in placings:
        name = ": ".join(part for part in (placing["team"], placing["entry"]) if part) or "–"
        full = placing["score_32bit_accumulation"]
        rows.append(f"| {_ordinal(placing['place'])} | {name} | {placing['score']:.4f} | "
                    f"{'–' if full is None else f'{full:.4f}'} | {placing['compared_with']:.4f} |")
    rows.insert(2 + comparison["place"] - 1, ours)
    return "\n".join(rows)
