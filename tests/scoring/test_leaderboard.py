"""The 2019 leaderboard as data (scoring/leaderboard.py): its figures, and where a score would place."""
from __future__ import annotations

import re

import pytest

from scoring.leaderboard import LEADERBOARD, compare, comparison_table, place_of
from tests.conftest import REPO


def test_the_figures_are_the_ones_docs_rules_md_states():
    text = (REPO / "docs" / "rules.md").read_text()
    table = text[text.index("## The results to beat (2019)"):].split("\n\n")[1]
    for line in table.splitlines()[2:]:
        task, *places = [cell.strip() for cell in line.strip("|").split("|")]
        assert [float(re.match(r"[\d.]+", cell).group()) for cell in places] == \
            [placing.score for placing in LEADERBOARD[task]], task
    assert {task: placing.score_32bit_accumulation for task, (placing, *_) in LEADERBOARD.items()} == \
        {"imagenet": 0.1893, "cifar100": 0.0085, "wikitext103": None}


@pytest.mark.parametrize("score, bits, place", [
    (0.0050, 32, 1),   # behind RIAIR's 0.0044 (an adder tree), ahead of its 0.0085 with 32-bit accumulation
    (0.0050, 16, 2),   # narrower accumulation: compared with the verified scores as they are
    (0.0056, 32, 2), (0.0058, 32, 3), (0.0085, 32, 4), (0.5, 32, 4),  # a tie places behind
])
def test_a_score_counted_at_32_bits_is_compared_with_the_winners_32_bit_figures(score, bits, place):
    assert place_of("cifar100", score, bits) == place


def test_a_task_the_challenge_did_not_have_has_no_leaderboard():
    assert place_of("digits", 0.1, 32) is None and compare("wikitext_demo", 0.1, 32) is None


def test_the_comparison_table_puts_the_score_at_its_place():
    table = comparison_table(compare("imagenet", 0.25, 32), "this plan").splitlines()
    # RIAIR's 32-bit figure 0.1893 is compared, so it sits behind 2nd place's 0.1887.
    assert [line.split("|")[1].strip() for line in table[2:]] == ["2nd", "1st", "**would be 3rd**", "3rd"]
    assert "| 0.1295 | 0.1893 | 0.1893 |" in table[3] and "**0.2500**" in table[4]


def test_the_table_is_ordered_by_the_figure_each_entry_is_compared_with():
    # At 32 bits RIAIR (1st, verified 0.0044) is compared at its 32-bit figure 0.0085, behind KAIST's 0.0054 and
    # OSI-AI's 0.0058: 0.0060 beats only RIAIR's, so it would be 3rd, between OSI-AI and RIAIR.
    table = comparison_table(compare("cifar100", 0.0060, 32), "this plan").splitlines()
    assert [line.split("|")[1].strip() for line in table[2:]] == ["2nd", "3rd", "**would be 3rd**", "1st"]
    assert [line.split("|")[-2].strip().strip("*") for line in table[2:]] == ["0.0054", "0.0058", "0.0060", "0.0085"]
