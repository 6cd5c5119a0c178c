"""Demonstrations from the plays, and preference labels from the stand-in labeler.

`make_data` turns each speech of a play and the reply that follows it into an SFT pair;
`make_labels` has the SFT model write two replies to a prompt and lets a labeler that knows the
hidden gold reward (`minirlhf.gold`) prefer one, y1 with probability σ((R_gold(y1) - R_gold(y2))/τ).
The learners never see R_gold, only these preferences.
"""

import numpy as np

from ...checkpoint import load_model
from ...datasets import encode_prompt, load_prompts
from ...dialogue import corpus_pairs, split_pairs, write_jsonl
from ...gold import label_pairs
from ...model import generate
from ...tokenizer import ByteTokenizer
from ..common import require
from .plan import say


def make_data(out, plan, cfg):
    """SFT pairs from the plays, split by a hash of the prompt; the prompts of each side."""
    d = plan["data"]
    train, held = split_pairs(corpus_pairs(max_reply_bytes=d["max_reply_bytes"]),
                              d["held_out_fraction"])
    require(train and held, "the dialogue parser found too few pairs in the corpus")

    def unique_prompts(pairs):
        return [{"prompt": p} for p in dict.fromkeys(r["prompt"] for r in pairs)]

    data = out / "data"
    write_jsonl(data / "sft_train.jsonl", train, ("prompt", "completion"))
    write_jsonl(data / "sft_held_out.jsonl", held, ("prompt", "completion"))
    write_jsonl(data / "prompts_held_out.jsonl", unique_prompts(held))
    write_jsonl(data / "prompts_train.jsonl", unique_prompts(train))   # written last: marks "done"
    say(cfg, f"data: {len(train)} training and {len(held)} held-out prompt/reply pairs")


def make_labels(out, plan, cfg, sft_path):
    """The stand-in labeler: two SFT replies per prompt, y1 preferred with σ(ΔR_gold/τ).

    Pairs the labeler calls a tie (equal gold rewards) are left out when ``drop_ties`` is set.
    """
    lab = plan["labels"]
    policy = load_model(sft_path, cfg.device)
    rng = np.random.default_rng(cfg.seed + 3)
    for split, n in (("held_out", lab["held_out_prompts"]), ("train", lab["prompts"])):
        prompts = [r["prompt"] for r in load_prompts(out / "data" / f"prompts_{split}.jsonl")]
        picked = rng.choice(len(prompts), size=n, replace=n > len(prompts))
        prompts = [prompts[i] for i in sorted(picked)]
        _, _, first = sample_replies(policy, prompts, lab["max_new_tokens"], rng)
        _, _, second = sample_replies(policy, prompts, lab["max_new_tokens"], rng)
        records = label_pairs(prompts, first, second, seed=rng, temperature=lab["temperature"],
                              drop_ties=lab["drop_ties"])
        require(records, f"labels: the labeler found no pair to compare among {n} {split} prompts")
        write_jsonl(out / "labels" / f"prefs_{split}.jsonl", records)
        say(cfg, f"labels: {len(records)} {split.replace('_', '-')} preference pairs from {n} "
                 f"prompts (the others: ties or two identical replies, left out)")


def sample_replies(model, prompts, max_new_tokens, rng, batch_size=64):
    """One reply per prompt, sampled at temperature 1 (exactly p_θ), as token lists and text.

    A reply is the tokens generated after ``[EOT] + prompt``; it ends with EOT unless it reached
    ``max_new_tokens``. The prompt keeps room for one token more, an EOT the reward model reads
    after a cut-off reply (as in RL). Returns ``(prompt_ids, reply_ids, reply_texts)``.
    """
    tok = ByteTokenizer()
    block = model.config.block_size
    prompt_ids = [encode_prompt(tok, p, block, max_new_tokens + 1) for p in prompts]
    replies = []
    for i in range(0, len(prompt_ids), batch_size):
        out = generate(model, prompt_ids[i:i + batch_size], max_new_tokens, temperature=1.0,
                       eot_id=tok.eot_id, seed=rng)
        replies += out.tokens
    return prompt_ids, replies, [tok.decode(r) for r in replies]
