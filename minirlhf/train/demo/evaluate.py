"""Evaluation of the policies on held-out prompts, and the gold reward logged during RL.

For each policy: the mean gold reward of its replies ± standard error, the reward model's mean
score, KL(p_θ ‖ p_sft) estimated by Monte Carlo, and how often its implicit reward orders held-out
preference pairs as R_gold does; for the reward model, how often it orders them as R_gold does.
"""

import math

import numpy as np

from ...backend import to_numpy
from ...checkpoint import load_model
from ...datasets import collate, encode_prompt_completion, load_preferences, load_prompts
from ...gold import agreement, gold_reward
from ...logprobs import sequence_logprobs
from ...tensor import no_grad
from ...tokenizer import ByteTokenizer
from ..common import batch_tensor
from .labels import sample_replies
from .plan import read_json, write_json


def gold_metrics(prompts, completions):
    """RL's metrics_fn: the hidden gold reward of this step's samples (never used to train)."""
    return {"gold": float(np.mean([gold_reward(c) for c in completions]))}


def evaluate_all(out, plan, cfg, policies, rm_ckpt, sft_ckpt, stages):
    """eval/reward.json (the reward model's agreement with gold) and eval/<policy>.json each."""
    e = plan["eval"]
    held_prompts = out / "data" / "prompts_held_out.jsonl"
    held_prefs = out / "labels" / "prefs_held_out.jsonl"
    prompts = [r["prompt"] for r in load_prompts(held_prompts)][:e["prompts"]]
    models, sft_pairs = {}, []

    def model(path):
        if path not in models:
            models[path] = load_model(path, cfg.device)
        return models[path]

    def sft_pair_logprobs():   # computed once for every policy's implicit reward, and only if needed
        if not sft_pairs:
            sft_pairs.append(pair_logprobs(model(sft_ckpt), held_prefs, cfg.device))
        return sft_pairs[0]

    rm_path = out / "eval" / "reward.json"
    stages.run("eval reward model", rm_path, lambda: write_json(
        rm_path, reward_agreement(model(rm_ckpt), held_prefs, cfg.device)),
        inputs=[rm_ckpt, held_prefs])
    evals = {"reward": read_json(rm_path)}
    for name, ckpt in policies.items():
        path = out / "eval" / f"{name.replace(' β=', '_beta').lower()}.json"

        def run(name=name, ckpt=ckpt, path=path):
            policy, sft_model = model(ckpt), model(sft_ckpt)
            result = evaluate_policy(name, policy, sft_model, model(rm_ckpt), prompts, e,
                                     cfg.seed + 7, cfg.device, held_prefs,
                                     sft_pair_logprobs() if policy is not sft_model else None)
            write_json(path, result)

        stages.run(f"eval {name}", path, run,
                   inputs=[ckpt, sft_ckpt, rm_ckpt, held_prompts, held_prefs])
        evals[name] = read_json(path)
    return evals


def evaluate_policy(name, policy, sft_model, rm, prompts, e, seed, device, held_prefs=None,
                    sft_pairs=None):
    """Sample ``e["samples_per_prompt"]`` replies to each held-out prompt and measure them.

    KL(p_θ ‖ p_sft) is estimated by Monte Carlo on the policy's own samples: the mean over y ~ p_θ
    of log p_θ(y|x) - log p_sft(y|x), summed over the generated tokens (k1, an unbiased estimate).
    With ``held_prefs`` (a preference file), also the agreement of the policy's implicit reward
    with gold on those pairs (`implicit_agreement`); ``sft_pairs`` is the SFT model's
    `pair_logprobs` of them, if computed already.
    """
    k = e["samples_per_prompt"]
    repeated = [p for p in prompts for _ in range(k)]                # N = k·len(prompts) prompts
    rng = np.random.default_rng(seed)
    prompt_ids, replies, texts = sample_replies(policy, repeated, e["max_new_tokens"], rng)
    seqs = [(p + r, len(p)) for p, r in zip(prompt_ids, replies)]
    logp = batched_logprobs(policy, seqs, device)                                    # (N,)
    logp_sft = logp if policy is sft_model else batched_logprobs(sft_model, seqs, device)  # (N,)
    kl = logp - logp_sft                                                             # (N,)
    gold = np.array([gold_reward(t) for t in texts])                                 # (N,)
    rm_scores = batched_rewards(rm, _with_eot(prompt_ids, replies), device)          # (N,)
    g_mean, g_se = mean_se(gold)
    r_mean, r_se = mean_se(rm_scores)
    kl_mean, kl_se = mean_se(kl)
    implicit = None
    if held_prefs is not None and policy is not sft_model:
        if sft_pairs is None:
            sft_pairs = pair_logprobs(sft_model, held_prefs, device)
        implicit = implicit_agreement(policy, sft_pairs, held_prefs, device)
    return {"name": name, "n": len(texts), "gold": g_mean, "gold_se": g_se, "rm": r_mean,
            "rm_se": r_se, "kl": kl_mean, "kl_se": kl_se,
            "length": float(np.mean([len(r) for r in replies])),
            "implicit_agreement": implicit,
            "samples": [{"prompt": p, "reply": t, "gold": g} for p, t, g in
                        zip(repeated[::k], texts[::k], gold[::k])]}


def reward_agreement(rm, path, device):
    """How often the reward model orders held-out pairs as the gold reward does."""
    records = load_preferences(path)
    chosen_seqs, rejected_seqs = _pair_sequences(records, rm.config.block_size)
    diff = (batched_rewards(rm, chosen_seqs, device)
            - batched_rewards(rm, rejected_seqs, device))                               # (P,) pairs
    agree, n = agreement(diff, _gold_diffs(records))
    return {"agreement": agree, "pairs_counted": n, "pairs": len(records),
            "label_accuracy": float(np.mean(diff > 0))}


def implicit_agreement(policy, sft_pairs, path, device):
    """How often a policy's implicit reward β·log(p_θ(y|x)/p_sft(y|x)) orders held-out pairs as the
    gold reward does. The KL-regularised optimum is p* ∝ p_sft·exp(R/β), so a policy trained
    towards it (by DPO, or by RL) holds a reward model of its own; the sign needs no β.
    ``sft_pairs`` is ``pair_logprobs(sft_model, path, device)``, the same for every policy."""
    (sft_c, sft_r), (logp_c, logp_r) = sft_pairs, pair_logprobs(policy, path, device)  # (P,) each
    ratio_c, ratio_r = logp_c - sft_c, logp_r - sft_r    # log p_θ(y|x) - log p_sft(y|x)  (P,) each
    return agreement(ratio_c - ratio_r, _gold_diffs(load_preferences(path)))[0]


def pair_logprobs(model, path, device):
    """(log p(chosen|x), log p(rejected|x)) of the preference pairs in ``path``: (P,) each."""
    chosen_seqs, rejected_seqs = _pair_sequences(load_preferences(path), model.config.block_size)
    return batched_logprobs(model, chosen_seqs, device), batched_logprobs(model, rejected_seqs, device)


def batched_logprobs(model, seqs, device, batch_size=64):
    """log p(y|x) (host float64 array, (N,)) of N ``(ids, n_prompt)`` sequences under ``model``."""
    out = []
    model.eval()
    with no_grad():
        for i in range(0, len(seqs), batch_size):
            batch = collate(seqs[i:i + batch_size])
            _, logp = sequence_logprobs(model, batch_tensor(batch["input_ids"], device),  # (B, T)
                                        batch_tensor(batch["completion_mask"], device))  # -> (B,)
            out.append(to_numpy(logp.data).astype(np.float64))
    return np.concatenate(out)


def batched_rewards(rm, seqs, device, batch_size=64):
    """The reward model's score (host float64 array, (N,)) of each of N ``(ids, n_prompt)`` sequences."""
    out = []
    rm.eval()
    with no_grad():
        for i in range(0, len(seqs), batch_size):
            batch = collate(seqs[i:i + batch_size])
            r = rm(batch_tensor(batch["input_ids"], device), batch["lengths"])       # (B,)
            out.append(to_numpy(r.data).astype(np.float64))
    return np.concatenate(out)


def _with_eot(prompt_ids, reply_ids):
    """Rows for the reward model: prompt + reply + EOT (appended if the reply was cut off), as RL
    scores its samples."""
    tok = ByteTokenizer()
    return [(p + (r if r and r[-1] == tok.eot_id else r + [tok.eot_id]), len(p))
            for p, r in zip(prompt_ids, reply_ids)]


def _pair_sequences(records, block):
    """(chosen sequences, rejected sequences) of preference records, as the trainers encode them."""
    tok = ByteTokenizer()
    return ([encode_prompt_completion(tok, r["prompt"], r["chosen"], block) for r in records],
            [encode_prompt_completion(tok, r["prompt"], r["rejected"], block) for r in records])


def _gold_diffs(records):
    """R_gold(chosen) - R_gold(rejected) of each preference record: (P,)."""
    return np.array([gold_reward(r["chosen"]) - gold_reward(r["rejected"]) for r in records])


def mean_se(values):
    """(mean, standard error) of a sample."""
    v = np.asarray(values, dtype=np.float64)
    se = v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else float("nan")
    return float(v.mean()), float(se)
