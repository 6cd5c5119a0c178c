"""The stand-in labeler: a word-count gold reward and Bradley-Terry preferences drawn from it."""

import math

import numpy as np
import pytest

from minirlhf.datasets import load_preferences
from minirlhf.dialogue import write_jsonl
from minirlhf.gold import (NEGATIVE, POSITIVE, agreement, gold_reward, gold_reward_fn, label,
                           label_pairs, preference_probability, sigmoid, words)


def test_the_word_lists_do_not_overlap_and_are_lowercase():
    assert not POSITIVE & NEGATIVE
    assert all(w == w.lower() for w in POSITIVE | NEGATIVE)
    assert {"love", "sweet", "fair", "gentle", "joy", "happy", "good", "kind", "merry",
            "honour"} <= POSITIVE
    assert {"death", "hate", "foul", "villain", "blood", "curse", "grief"} <= NEGATIVE


def test_words_are_lowercase_tokens_that_keep_inner_apostrophes():
    assert words("Sweet LOVE, lov'd 'tis--good!") == ["sweet", "love", "lov'd", "tis", "good"]


@pytest.mark.parametrize("text, expected", [
    ("", 0),
    ("Ham.\nWho's there?\n", 0),
    ("Sweet love, good night!", 3),
    ("O villain, villain, smiling, damned villain!", -4),
    ("Love and hate", 0),                       # one of each cancels
    ("GENTLE Juliet, my love, my joy", 3),      # case does not matter
    ("lovely, lovers, loveless", 1),            # whole words only: 'lovely' counts, the others not
])
def test_gold_reward_is_positive_minus_negative_word_count(text, expected):
    assert gold_reward(text) == expected


def test_gold_reward_fn_scores_the_completion_not_the_prompt():
    assert gold_reward_fn("Death, blood and curses!", "Sweet love.") == 2


def test_preference_probability_is_bradley_terry_on_the_gold_difference():
    assert preference_probability("love love", "hate") == pytest.approx(sigmoid(3))
    assert preference_probability("hate", "love love") == pytest.approx(1 - sigmoid(3))
    assert preference_probability("night", "day") == 0.5
    assert sigmoid(-800) == pytest.approx(0) and sigmoid(800) == pytest.approx(1)  # no overflow


@pytest.mark.parametrize("y1, y2", [("sweet", "night"), ("love and joy", "death"), ("foul", "fair"),
                                    ("day", "night")])
def test_the_labeler_prefers_y1_at_the_rate_sigma_delta_r(y1, y2):
    rng = np.random.default_rng(0)
    n = 20000
    wins = sum(label("p", y1, y2, rng)["chosen"] == y1 for _ in range(n))
    p = sigmoid(gold_reward(y1) - gold_reward(y2))
    assert abs(wins / n - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-9


def test_a_labelled_record_keeps_both_replies():
    rec = label("Ham.\nSpeak.\n", "Hor.\nGood.\n", "Hor.\nFoul.\n", np.random.default_rng(1))
    assert rec["prompt"] == "Ham.\nSpeak.\n"
    assert {rec["chosen"], rec["rejected"]} == {"Hor.\nGood.\n", "Hor.\nFoul.\n"}


def test_label_pairs_is_reproducible_with_a_seed():
    prompts, a, b = ["x"] * 50, ["love"] * 50, ["hate"] * 50
    assert label_pairs(prompts, a, b, seed=3) == label_pairs(prompts, a, b, seed=3)
    assert label_pairs(prompts, a, b, seed=3) != label_pairs(prompts, a, b, seed=4)


def test_preference_jsonl_loads_with_load_preferences(tmp_path):
    records = label_pairs(["Rom.\nO, speak again!\n", "Jul.\nAy me!\n"],
                          ["Jul.\nSweet love.\n", "Rom.\nShe speaks.\n"],
                          ["Jul.\nFoul night.\n", "Rom.\nO death!\n"], seed=0)
    path = write_jsonl(tmp_path / "prefs.jsonl", records)
    loaded = load_preferences(path)
    assert [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in loaded] == records
    assert not list(tmp_path.glob("*.tmp"))  # written atomically, nothing left behind


def test_agreement_counts_sign_matches_and_ignores_gold_ties():
    assert agreement([1.0, -2.0, 0.5, 3.0], [2, -1, 0, -1]) == (2 / 3, 3)
    agree, n = agreement([1.0], [0])
    assert math.isnan(agree) and n == 0
