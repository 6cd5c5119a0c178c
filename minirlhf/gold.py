"""The stand-in human: a hidden "gold" reward and a labeler that compares replies with it.

RLHF learns from people's preferences. A demo cannot ask people, so it asks a rule whose taste we
know, in the spirit of the DPO paper's controlled-sentiment task (where a sentiment classifier
played the human): the sentiment of a reply, counted with two small lists of Shakespearean words,

    R_gold(y) = #positive words in y - #negative words in y

on lowercase word tokens (``"Sweet love, good night!"`` scores 3; ``"O villain, villain!"`` -2).
The labeler compares two replies y1, y2 to a prompt as Bradley-Terry says a person would:

    P(y1 preferred to y2) = σ((R_gold(y1) - R_gold(y2)) / τ)

so a clear difference is usually, not always, won by the better reply. τ is the labeler's
temperature (τ = 1 is the plain Bradley-Terry model; a smaller τ is a more careful labeler: with
τ = 0.5 one sentiment word more wins 88% of the time instead of 73%). When both replies score the
same, the labeler has no preference: `label` flips a coin, and `label_pairs` can leave such pairs
out (``drop_ties``), as preference datasets leave out the pairs their labelers called a tie; a
coin-flip label carries no information and only adds noise to what the reward model fits.

That is exactly the model the reward model assumes, so a reward model can recover R_gold/τ up to a
constant; we keep R_gold hidden from the learners and use it only to label pairs and to grade.
"""

import math
import re

import numpy as np

POSITIVE = frozenset("""
    love loves loved lov'd loving lovely lover beloved sweet sweetest sweetly sweetness
    fair fairest gentle gently joy joys joyful happy happiness good goodness kind kindly kindness
    merry mirth honour honourable honor honest noble grace gracious blessed bless blessing
    dear dearest heaven heavenly hope peace smile smiles delight beauty beauteous
    friend friends thanks thank welcome worthy brave true truly glad comfort pleasure
    pretty virtue virtuous faith faithful praise best
""".split())

NEGATIVE = frozenset("""
    death dead die dies died dying hate hated hateful foul villain villains villainy
    blood bloody curse cursed curses grief grieve woe woes murder murderer murder'd kill kill'd
    killed slain poison poison'd traitor treason devil devils hell fear afraid sorrow sorrows
    vile wicked damn damn'd damned plague sick mad evil false fool fools wretch wretched
    tears weep weeping shame cruel ill monster base coward slave fiend rogue knave
    alas bad worse worst
""".split())

_TOKEN = re.compile(r"[a-z]+(?:'[a-z]+)*")


def words(text):
    """Lowercase word tokens; an apostrophe inside a word keeps it whole (``lov'd``, ``'tis``)."""
    return _TOKEN.findall(text.lower())


def gold_reward(text):
    """R_gold(y) = #positive words - #negative words (an integer, as a float)."""
    tokens = words(text)
    return float(sum(t in POSITIVE for t in tokens) - sum(t in NEGATIVE for t in tokens))


def gold_reward_fn(prompt, completion):
    """The gold reward as a reward function ``(prompt, completion) -> float`` for ``minirlhf rl
    --reward-fn minirlhf.gold:gold_reward_fn`` (RL against the true reward, no reward model)."""
    return gold_reward(completion)


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def preference_probability(y1, y2, temperature=1.0):
    """P(y1 ≻ y2) = σ((R_gold(y1) - R_gold(y2)) / τ) under the Bradley-Terry labeler."""
    if not temperature > 0:
        raise ValueError(f"the labeler's temperature must be positive, got {temperature}")
    return sigmoid((gold_reward(y1) - gold_reward(y2)) / temperature)


def label(prompt, y1, y2, rng, temperature=1.0):
    """One preference record ``{"prompt", "chosen", "rejected"}``: y1 wins with σ(ΔR/τ), drawn from
    ``rng`` (a ``numpy.random.Generator``), else y2."""
    first = rng.random() < preference_probability(y1, y2, temperature)
    chosen, rejected = (y1, y2) if first else (y2, y1)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def label_pairs(prompts, first, second, seed=0, temperature=1.0, drop_ties=False):
    """Preference records for prompts and two replies each (first[i], second[i]), drawn with one
    seeded generator. ``drop_ties``: leave out the pairs whose gold rewards are equal (the
    labeler has no preference between them), and pairs of two identical replies always."""
    rng = np.random.default_rng(seed) if isinstance(seed, (int, np.integer)) else seed
    records = []
    for p, a, b in zip(prompts, first, second):
        if a == b or (drop_ties and gold_reward(a) == gold_reward(b)):
            continue
        records.append(label(p, a, b, rng, temperature))
    return records


def agreement(diffs, gold_diffs):
    """Share of pairs where sign(diffs) = sign(gold_diffs), over the pairs whose gold diff is not 0.

    With ``diffs`` a reward model's r(y_chosen) - r(y_rejected), this is how often the model orders
    a pair as the hidden gold reward does (ties in gold say nothing and are left out). Returns
    ``(agreement, pairs counted)``; agreement is nan when every pair is a tie.
    """
    diffs, gold_diffs = np.asarray(diffs, dtype=float), np.asarray(gold_diffs, dtype=float)
    keep = gold_diffs != 0
    n = int(keep.sum())
    if n == 0:
        return float("nan"), 0
    return float(np.mean(np.sign(diffs[keep]) == np.sign(gold_diffs[keep]))), n
