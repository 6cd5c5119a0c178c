"""Multi-digit addition, the lecture's own example of what a pretrained model gets wrong
("Large number additions: 543854 + 143865?"), as a task with a reward a program checks.

A prompt is ``"a + b = "`` with a and b of 1 … D digits; the answer is the sum with its digits
**reversed**, least significant first (543854 + 143865 = 687719 is written ``917786``), and the
completion ends there (EOT). Why reversed: a left-to-right model writing the sum most significant
digit first must know every carry before it writes the first digit; written least significant first,
each digit depends only on the two operand digits at that place and the carry of the digit just
written, the order in which a person adds. Lee et al., "Teaching arithmetic to small transformers"
(2023), found that this reversed output lets a small GPT trained from scratch learn addition from far
fewer examples than the plain format; a scratchpad ("detailed" format) helps more per example but
makes each answer several times longer, and every token costs sampling time in RL on two CPU cores.

The reward is exact:  R(x, y) = 1 if the completion, read as reversed digits, is a + b, else 0
(`reward`), plus, if asked, a small reward for a well-formed answer (`reward_with_format`: digits
only, as many as the sum has). Both are pure functions of the two strings; anything malformed
scores 0 and never raises.

The data (`make_split`) is deterministic given a seed; the held-out pairs are never seen in
training, in either order (a + b and b + a count as one pair). `pass_at_k` is the unbiased estimator
of Chen et al. (2021).
"""

import math
import re

import numpy as np

MAX_DIGITS = 6

_PROMPT = re.compile(r"^\s*(\d+) \+ (\d+) = $")


def prompt_text(a, b):
    """The prompt of a + b: ``"12 + 345 = "``."""
    return f"{a} + {b} = "


def answer_text(a, b):
    """The completion the model should write: the digits of a + b, least significant first."""
    return str(a + b)[::-1]


def parse_prompt(prompt):
    """``"12 + 345 = "`` -> (12, 345), or None if the prompt is not of that form."""
    m = _PROMPT.match(prompt) if isinstance(prompt, str) else None
    return (int(m.group(1)), int(m.group(2))) if m else None


def parse_answer(completion):
    """The number a completion writes, its digits reversed (surrounding whitespace ignored), or None
    if it is not a string of ASCII digits."""
    if not isinstance(completion, str):
        return None
    text = completion.strip()
    if not text or not (text.isascii() and text.isdigit()):
        return None
    return int(text[::-1])


def reward(prompt, completion):
    """1.0 if the completion is the right sum (digits reversed), else 0.0; never raises.

    ``--reward-fn minirlhf.tasks.addition:reward`` for rl, ppo and grpo."""
    operands, value = parse_prompt(prompt), parse_answer(completion)
    return float(operands is not None and value is not None and value == sum(operands))


FORMAT_BONUS = 0.1


def format_reward(prompt, completion):
    """FORMAT_BONUS if the completion is digits only and as many as the right sum has, else 0."""
    operands = parse_prompt(prompt)
    if operands is None or parse_answer(completion) is None:
        return 0.0
    return FORMAT_BONUS * float(len(completion.strip()) == len(str(sum(operands))))


def reward_with_format(prompt, completion):
    """The exact reward plus the format reward: 1.1 right, 0.1 well-formed but wrong, 0 malformed.

    ``--reward-fn minirlhf.tasks.addition:reward_with_format``."""
    return reward(prompt, completion) + format_reward(prompt, completion)


def digits(a, b):
    """The bucket a pair is reported in: the number of digits of its longer operand."""
    return max(len(str(a)), len(str(b)))


def _pair_key(a, b):
    return (a, b) if a <= b else (b, a)


def _draw(rng, max_digits, d=None):
    """One pair: each operand's number of digits uniform in 1 … max_digits, then the number uniform
    among those of that many digits (0 counts as a 1-digit number). With ``d``, the longer operand
    has exactly d digits."""
    while True:
        da, db = rng.integers(1, max_digits + 1, size=2)
        if d is None or max(da, db) == d:
            break
    a, b = (int(rng.integers(0 if n == 1 else 10 ** (n - 1), 10 ** n)) for n in (da, db))
    return a, b


def _bucket_size(d):
    """Unordered pairs whose longer operand has d digits."""
    n = 10 ** d                       # numbers of at most d digits
    m = 10 ** (d - 1) if d > 1 else 0  # numbers of at most d-1 digits
    return (n * (n + 1) - m * (m + 1)) // 2


def make_split(n_train, n_held_out, max_digits=MAX_DIGITS, seed=0, held_out_share=0.2):
    """(train, held_out): lists of (a, b). The held-out pairs are ``n_held_out // max_digits`` per
    number of digits (capped at ``held_out_share`` of that bucket's pairs, so that 1-digit sums
    are left to learn from), distinct; training pairs are drawn at random and never one of them
    in either order (training pairs may repeat). Deterministic given ``seed``."""
    if not (isinstance(max_digits, int) and max_digits >= 1):
        raise ValueError(f"max_digits must be a positive integer, got {max_digits!r}")
    rng = np.random.default_rng(seed)
    held_out, seen = [], set()
    for d in range(1, max_digits + 1):
        want = min(n_held_out // max_digits, int(held_out_share * _bucket_size(d)))
        got = 0
        while got < want:
            a, b = _draw(rng, max_digits, d)
            if _pair_key(a, b) not in seen:
                seen.add(_pair_key(a, b))
                held_out.append((a, b))
                got += 1
    train = []
    while len(train) < n_train:
        a, b = _draw(rng, max_digits)
        if _pair_key(a, b) not in seen:
            train.append((a, b))
    return train, held_out


def sft_records(pairs):
    """``{"prompt", "completion"}`` records of pairs, for `minirlhf sft`."""
    return [{"prompt": prompt_text(a, b), "completion": answer_text(a, b)} for a, b in pairs]


def prompt_records(pairs):
    """``{"prompt"}`` records, for rl, ppo and grpo."""
    return [{"prompt": prompt_text(a, b)} for a, b in pairs]


def corpus_text(pairs):
    """Lines ``"a + b = reversed-sum"``, for `minirlhf pretrain --data`."""
    return "".join(prompt_text(a, b) + answer_text(a, b) + "\n" for a, b in pairs)


def pass_at_k(n, c, k):
    """The unbiased estimate of pass@k from n samples of which c are right (Chen et al., 2021):

        pass@k = 1 - C(n - c, k) / C(n, k)

    the chance that k of the n samples, drawn without replacement, hold at least one right one.
    Computed as 1 - Π_{i = n-c+1}^{n} (1 - k/i), which never forms the large binomials."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))
