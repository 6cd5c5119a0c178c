"""The addition task: its data is deterministic and its held-out pairs unseen, its reward is exact
and never raises, pass@k is Chen et al.'s estimator, and rl, ppo and grpo take the reward by name
and stop with one line, at their last good checkpoint, on a reward function that fails."""

import itertools
import json
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

from minirlhf import cli
from minirlhf.checkpoint import read_header
from minirlhf.tasks import addition as A

operands = st.integers(1, A.MAX_DIGITS).flatmap(lambda d: st.integers(0, 10 ** d - 1))


@given(operands, operands)
def test_the_reward_is_one_on_the_right_answer(a, b):
    assert A.reward(A.prompt_text(a, b), A.answer_text(a, b)) == 1.0
    assert A.reward(A.prompt_text(a, b), " " + A.answer_text(a, b) + "\n") == 1.0   # whitespace


@given(operands, operands, st.integers(0, 10 ** 7))
def test_the_reward_is_zero_on_any_other_number(a, b, c):
    completion = str(c)[::-1]
    assert A.reward(A.prompt_text(a, b), completion) == float(c == a + b)


@given(operands, operands, st.text(max_size=12))
def test_any_completion_scores_zero_or_one_and_never_raises(a, b, completion):
    r = A.reward(A.prompt_text(a, b), completion)
    assert r == float(A.parse_answer(completion) == a + b)
    assert A.reward_with_format(A.prompt_text(a, b), completion) in (0.0, A.FORMAT_BONUS, 1 + A.FORMAT_BONUS)


@pytest.mark.parametrize("prompt, completion", [
    ("2 + 3 = ", "5x"), ("2 + 3 = ", ""), ("2 + 3 = ", "-5"), ("2 + 3 = ", "٥"), ("2 + 3 = ", "5 5"),
    ("2+3=", "5"), ("two + 3 = ", "5"), (None, "5"), ("2 + 3 = ", None), ("2 + 3 = ", 5),
])
def test_malformed_prompts_and_answers_score_zero(prompt, completion):
    assert A.reward(prompt, completion) == 0.0
    assert A.reward_with_format(prompt, completion) == 0.0


def test_the_answer_is_written_least_significant_digit_first():
    assert A.prompt_text(543854, 143865) == "543854 + 143865 = "
    assert A.answer_text(543854, 143865) == "917786"                  # 687719 reversed
    assert A.reward("5 + 7 = ", "21") == 1.0 and A.reward("5 + 7 = ", "12") == 0.0
    assert A.reward_with_format("5 + 7 = ", "31") == pytest.approx(A.FORMAT_BONUS)
    assert A.reward_with_format("5 + 7 = ", "210") == 1.0            # 012: right, one digit too many


def test_the_split_is_deterministic_and_holds_out_pairs_in_either_order():
    train, held = A.make_split(3000, 600, max_digits=4, seed=3)
    assert (train, held) == A.make_split(3000, 600, max_digits=4, seed=3)
    assert (train, held) != A.make_split(3000, 600, max_digits=4, seed=4)
    keys = {(min(a, b), max(a, b)) for a, b in held}
    assert len(keys) == len(held)                                      # distinct
    assert not any((min(a, b), max(a, b)) in keys for a, b in train)
    by_digits = {d: sum(A.digits(a, b) == d for a, b in held) for d in range(1, 5)}
    assert by_digits == {1: 11, 2: 150, 3: 150, 4: 150}                # 1 digit: 20% of 55 pairs
    assert {A.digits(a, b) for a, b in train} == {1, 2, 3, 4}
    assert all(0 <= a < 10 ** 4 and 0 <= b < 10 ** 4 for a, b in train)


def test_the_bucket_sizes_count_the_unordered_pairs():
    for d in (1, 2):
        pairs = {(min(a, b), max(a, b)) for a in range(10 ** d) for b in range(10 ** d)
                 if A.digits(a, b) == d}
        assert A._bucket_size(d) == len(pairs)


def test_records_and_corpus_agree_with_the_reward():
    pairs = [(12, 345), (0, 9)]
    for r in A.sft_records(pairs):
        assert A.reward(r["prompt"], r["completion"]) == 1.0
    assert A.prompt_records(pairs) == [{"prompt": "12 + 345 = "}, {"prompt": "0 + 9 = "}]
    assert A.corpus_text(pairs) == "12 + 345 = 753\n0 + 9 = 9\n"


@given(st.integers(1, 9).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_is_the_share_of_k_subsets_with_a_right_sample(nck):
    n, c, k = nck
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(samples, k))
    brute = sum(any(s) for s in subsets) / len(subsets)
    assert A.pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)
    assert A.pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


def test_pass_at_1_is_the_share_right_and_bad_counts_are_refused():
    assert A.pass_at_k(16, 4, 1) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="n=4, c=5"):
        A.pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        A.pass_at_k(4, 2, 5)


# ----- the reward by name in the trainers, and a reward function that fails ---------------------

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "32", "--batch-size", "4"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A tiny GPT pretrained for a few steps on addition lines, and a file of prompts."""
    root = tmp_path_factory.mktemp("addition")
    train, _ = A.make_split(40, 0, max_digits=2, seed=0)
    (root / "corpus.txt").write_text(A.corpus_text(train) * 3)
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in A.prompt_records(train)))
    assert cli.main(["pretrain", "--data", str(root / "corpus.txt"), "--out-dir", str(root / "pre"),
                     "--max-steps", "2", "--eval-interval", "2", "--sample-interval", "0",
                     "--quiet", *TINY]) == 0
    return root


def trainer_args(stage, task, out, reward_fn, steps=2):
    group = {"rl": ["--samples-per-prompt", "2"], "ppo": ["--samples-per-prompt", "2"],
             "grpo": ["--num-generations", "2"]}[stage]
    return [stage, "--prompts", str(task / "prompts.jsonl"), "--init", str(task / "pre" / "ckpt.npz"),
            "--reward-fn", reward_fn, "--out-dir", str(out), "--prompts-per-step", "2", *group,
            "--max-new-tokens", "4", "--max-steps", str(steps), "--ckpt-interval", "1", "--quiet"]


@pytest.mark.parametrize("stage", ["rl", "ppo", "grpo"])
def test_rl_ppo_and_grpo_take_the_reward_by_name(stage, task, tmp_path):
    assert cli.main(trainer_args(stage, task, tmp_path, "minirlhf.tasks.addition:reward")) == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    key = {"rl": "reward", "ppo": "objective/scores", "grpo": "reward"}[stage]
    assert len(rows) == 2 and all(0.0 <= row[key] <= 1.0 for row in rows)


FAILING = """
calls = 0

def reward(prompt, completion):
    global calls
    calls += 1
    if calls > {after}:
        return {bad}
    return 0.0
"""


@pytest.mark.parametrize("stage", ["rl", "ppo", "grpo"])
@pytest.mark.parametrize("bad, message", [("'one'", "returned nan, not a finite number"),
                                          ("1 / 0", "raised ZeroDivisionError")])
def test_a_failing_reward_fn_is_one_line_and_the_last_good_checkpoint_stays(stage, bad, message,
                                                                             task, tmp_path, capsys):
    fn = tmp_path / "failing.py"
    fn.write_text(FAILING.format(after=2 * 2 * 2, bad=bad))     # two steps of 2 x 2 samples go well
    spec = f"{fn}:reward"
    code = cli.main(trainer_args(stage, task, tmp_path / "run", spec, steps=4))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert message in err and spec in err and "prompt '" in err
    assert read_header(tmp_path / "run" / "ckpt.npz")["step"] == 2
