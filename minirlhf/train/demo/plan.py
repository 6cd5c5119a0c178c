"""The lecture's whole pipeline on the built-in Shakespeare, through the same trainers a user calls.

    minirlhf demo                      # the quick preset: about five minutes on 2 CPU cores
    minirlhf demo --preset large       # bigger model, longer runs: hours on a CPU, use --device cuda

1. **Pretrain** a small GPT on the ten plays (`pretrain`).
2. **Demonstrations**: each speech of a play and the reply that follows it, by another speaker in
   the same scene, become prompt/completion pairs (`minirlhf.dialogue`); **SFT** on them (`sft`).
3. **Human feedback**, played by a rule whose taste we know (`minirlhf.gold`): the SFT model writes
   two replies to a prompt and the "labeler" prefers y1 with probability σ((R_gold(y1) -
   R_gold(y2))/τ), R_gold being the sentiment of a reply counted with small lists of words (love,
   sweet, fair, ... against death, hate, foul, ...); pairs it calls a tie are left out. The
   learners never see R_gold, only the preferences.
4. A **reward model** learns from those preferences (`reward`); we check how often it orders
   held-out pairs as R_gold does.
5. **REINFORCE with a KL penalty** against the reward model (`rl`), **PPO** as InstructGPT ran it
   (`ppo`, its value model a copy of the reward model), and **DPO** on the same preferences
   (`dpo`), each at a few β (PPO at RL's); **GRPO** (`grpo`) against the same reward model, at
   β = 0 (TRL's default: no reference in the loss) and β = 0.1 (k3 in the loss). During RL and PPO
   we also log the gold reward of the samples: where the reward model's score climbs and the gold
   reward does not, the policy over-optimises a proxy.
6. **Evaluation** on held-out prompts: mean gold reward ± standard error, mean reward-model score,
   and KL(p_θ ‖ p_sft) estimated by Monte Carlo, mean over samples y ~ p_θ of
   log p_θ(y|x) - log p_sft(y|x); how often each policy's implicit reward β·log(p_θ/p_sft) orders
   held-out pairs as R_gold does; and a few replies side by side.
7. **report.md** in ``out_dir``, and with matplotlib two plots: gold reward against KL for RL and DPO
   across β (the DPO paper's Figure 2 in miniature), and gold against reward-model reward during RL.

Every stage writes its outputs atomically and is skipped when they are up to date (finished, and
newer than what they were made from, as ``make`` decides), so a demo that was interrupted goes on
where it stopped when run again: an unfinished stage resumes from its last checkpoint; a stage that
ran again makes the stages after it run again too. A run folder made with other settings is refused.
"""

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ... import kernels
from ...backend import to_numpy
from ...checkpoint import load_checkpoint, load_model
from ...datasets import (collate, encode_prompt, encode_prompt_completion, load_preferences,
                        load_prompts)
from ...dialogue import corpus_pairs, split_pairs, write_jsonl
from ...gold import agreement, gold_reward, label_pairs
from ...logprobs import sequence_logprobs
from ...model import generate
from ...tensor import no_grad
from ...tokenizer import ByteTokenizer
from ..common import ConfigError, batch_tensor, check_common, opt, require
from ..dpo import DPOConfig, dpo
from ..grpo import GRPOConfig, grpo
from ..ppo import PPOConfig, ppo
from ..pretrain import PretrainConfig, pretrain
from ..reward import RewardConfig, reward
from ..rl import RLConfig, rl
from ..sft import SFTConfig, sft

# ----- the presets ------------------------------------------------------------------------------------
# Each stage's entries are fields of that stage's config; "data", "labels" and "eval" are the demo's.
# The quick preset is sized to run in about five minutes on two CPU cores (measured: 291 to 397 s
# in the runs so far; 478 s with one BLAS thread on a busy machine), and to meet its target: RL and
# DPO each raise the held-out gold reward over SFT by more than two standard errors. Two settings
# matter most for that, found by trying: a model that writes real words (2 x 128 wide beats 2 x 64,
# and costs less than 3 layers), and a reward model trained on enough informative labels (4000
# prompts, ties left out, τ = 0.5); from 2000 prompts with coin-flip ties and τ = 1 it stayed at
# chance. PPO runs at RL's β values and reuses each rollout for 4 updates (2 epochs x 2
# minibatches), so it moves further per iteration than RL: 25 iterations are enough (at β = 0.05 the
# gold reward of its samples passed 2.5 by iteration 20 in a tuning run).

QUICK = {
    "model": dict(n_layer=2, n_head=4, n_embd=128, block_size=96),
    "pretrain": dict(batch_size=16, max_steps=1500, lr=3e-3, min_lr=3e-4, warmup_steps=50,
                     eval_interval=250, eval_batches=4, ckpt_interval=250),
    "data": dict(max_reply_bytes=39, held_out_fraction=0.1),
    "sft": dict(batch_size=16, max_steps=250, lr=1e-3, warmup_steps=20, val_fraction=0.05,
                eval_interval=125),
    "labels": dict(prompts=4000, held_out_prompts=400, max_new_tokens=40, temperature=0.5,
                   drop_ties=True),
    "reward": dict(batch_size=16, max_steps=300, lr=1e-3, warmup_steps=20, val_fraction=0.05,
                   eval_interval=100),
    "rl": dict(betas=(0.05, 0.2), prompts_per_step=8, samples_per_prompt=4, max_new_tokens=40,
               max_steps=60, lr=2e-4, baseline="loo"),
    "dpo": dict(betas=(0.1, 0.5), batch_size=16, max_steps=80, lr=2e-4, warmup_steps=10,
                val_fraction=0.05, eval_interval=40),
    "ppo": dict(prompts_per_step=8, samples_per_prompt=4, max_new_tokens=40, max_steps=25,
                ppo_epochs=2, num_minibatches=2, lr=2e-4, vf_coef=0.1),
    "grpo": dict(betas=(0.0, 0.1), prompts_per_step=8, num_generations=4, max_new_tokens=40,
                 max_steps=60, lr=2e-4),
    "eval": dict(prompts=256, samples_per_prompt=3, max_new_tokens=40, shown=4),
}

# Not measured end to end here: on 2 CPU cores it would take hours (an estimate from the quick
# preset's rates); meant for --device cuda.
LARGE = {
    "model": dict(n_layer=4, n_head=4, n_embd=128, block_size=128),
    "pretrain": dict(batch_size=32, max_steps=4000, lr=2e-3, min_lr=2e-4, warmup_steps=100,
                     eval_interval=500, eval_batches=8, ckpt_interval=500),
    "data": dict(max_reply_bytes=63, held_out_fraction=0.1),
    "sft": dict(batch_size=32, max_steps=500, lr=5e-4, warmup_steps=30, val_fraction=0.05,
                eval_interval=100),
    "labels": dict(prompts=10000, held_out_prompts=1000, max_new_tokens=64, temperature=0.5,
                   drop_ties=True),
    "reward": dict(batch_size=32, max_steps=600, lr=5e-4, warmup_steps=40, val_fraction=0.05,
                   eval_interval=100),
    "rl": dict(betas=(0.02, 0.05, 0.1, 0.2), prompts_per_step=16, samples_per_prompt=4,
               max_new_tokens=64, max_steps=150, lr=1e-4, baseline="loo"),
    "dpo": dict(betas=(0.05, 0.1, 0.2, 0.5), batch_size=32, max_steps=200, lr=1e-4,
                warmup_steps=20, val_fraction=0.05, eval_interval=50),
    "ppo": dict(prompts_per_step=16, samples_per_prompt=4, max_new_tokens=64, max_steps=100,
                ppo_epochs=4, num_minibatches=2, lr=1e-4, vf_coef=0.1),
    "grpo": dict(betas=(0.0, 0.1), prompts_per_step=16, num_generations=4, max_new_tokens=64,
                 max_steps=150, lr=1e-4),
    "eval": dict(prompts=512, samples_per_prompt=4, max_new_tokens=64, shown=4),
}

# A few steps of everything: to test the plumbing, not to learn anything. A model this small
# rarely writes a whole word, so ties are kept (as coin flips) to have pairs at all.
SMOKE = {
    "model": dict(n_layer=1, n_head=2, n_embd=16, block_size=96),
    "pretrain": dict(batch_size=4, max_steps=4, lr=3e-3, min_lr=3e-4, warmup_steps=1,
                     eval_interval=2, eval_batches=1, ckpt_interval=2),
    "data": dict(max_reply_bytes=23, held_out_fraction=0.1),
    "sft": dict(batch_size=4, max_steps=3, lr=1e-3, warmup_steps=1, val_fraction=0.1,
                eval_interval=3),
    "labels": dict(prompts=12, held_out_prompts=6, max_new_tokens=24, temperature=0.5,
                   drop_ties=False),
    "reward": dict(batch_size=4, max_steps=3, lr=1e-3, warmup_steps=1, val_fraction=0.1,
                   eval_interval=3),
    "rl": dict(betas=(0.1,), prompts_per_step=2, samples_per_prompt=2, max_new_tokens=24,
               max_steps=2, lr=1e-4, baseline="loo"),
    "dpo": dict(betas=(0.1,), batch_size=4, max_steps=2, lr=1e-4, warmup_steps=1,
                val_fraction=0.1, eval_interval=2),
    "ppo": dict(prompts_per_step=2, samples_per_prompt=2, max_new_tokens=24, max_steps=2,
                ppo_epochs=2, num_minibatches=2, lr=1e-4, vf_coef=0.1),
    "grpo": dict(betas=(0.0,), prompts_per_step=2, num_generations=2, max_new_tokens=24,
                 max_steps=2, lr=1e-4),
    "eval": dict(prompts=6, samples_per_prompt=2, max_new_tokens=24, shown=2),
}

PRESETS = {"quick": QUICK, "large": LARGE}


@dataclass
class DemoConfig:
    out_dir: str = opt("runs/demo", "where every stage's outputs, report.md and the plots go")
    preset: str = opt("quick", "quick (about 5 minutes on 2 CPU cores) or large (hours on a CPU: "
                               "use a GPU)", choices=["quick", "large"])
    rl_betas: str | None = opt(None, "comma-separated β values for RL and PPO, e.g. '0.05,0.2' "
                                     "(default: the preset's)")
    dpo_betas: str | None = opt(None, "comma-separated β values for DPO (default: the preset's)")
    seed: int = opt(0, "seed of every stage (weights, data order, sampling, labels)")
    device: str = opt("cpu", "cpu (NumPy) or cuda (CuPy)", choices=["cpu", "cuda"])
    smoke: bool = opt(False, "a few steps of everything with a tiny model: tests the plumbing")
    quiet: bool = opt(False, "no progress bars or messages")


def parse_betas(text, name):
    """``"0.05, 0.2"`` -> (0.05, 0.2): positive, distinct numbers, or a ConfigError."""
    try:
        betas = tuple(float(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise ConfigError(f"{name} must be comma-separated numbers like '0.05,0.2', got {text!r}") from None
    require(betas, f"{name} must name at least one β, got {text!r}")
    require(all(math.isfinite(b) and b > 0 for b in betas), f"{name}: every β must be positive, got {text!r}")
    require(len(set(betas)) == len(betas), f"{name}: a β is repeated in {text!r}")
    return betas


def make_plan(cfg):
    """The settings of every stage for ``cfg``: the preset (or the smoke settings), β overrides."""
    check_common(cfg)
    require(cfg.preset in PRESETS, f"preset must be one of {', '.join(PRESETS)}, got {cfg.preset!r}")
    base = SMOKE if cfg.smoke else PRESETS[cfg.preset]
    plan = {stage: dict(settings) for stage, settings in base.items()}
    if cfg.rl_betas is not None:
        plan["rl"]["betas"] = parse_betas(cfg.rl_betas, "rl_betas")
    if cfg.dpo_betas is not None:
        plan["dpo"]["betas"] = parse_betas(cfg.dpo_betas, "dpo_betas")
    plan["rl"]["betas"] = tuple(plan["rl"]["betas"])
    plan["dpo"]["betas"] = tuple(plan["dpo"]["betas"])
    plan["ppo"]["betas"] = plan["rl"]["betas"]                            # PPO and RL side by side
    plan["grpo"]["betas"] = tuple(plan["grpo"]["betas"])
    block = plan["model"]["block_size"]
    for stage in ("labels", "rl", "ppo", "grpo", "eval"):
        n = plan[stage]["max_new_tokens"]
        require(n < block - 1, f"{stage}: max_new_tokens ({n}) must leave room for a prompt in "
                               f"block_size {block}")
    return plan


# ----- small helpers ----------------------------------------------------------------------------------

def _say(cfg, text):
    if not cfg.quiet:
        print(f"demo: {text}", file=sys.stderr, flush=True)


def _write_json(path, obj):
    """JSON, atomically: a temporary file, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=_json_default) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _json_default(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, tuple):
        return list(v)
    raise TypeError(f"cannot write {type(v).__name__} as JSON")


def _read_json(path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _steps(ckpt_path):
    """The step a checkpoint was saved at, or None if there is none."""
    return load_checkpoint(ckpt_path)["step"] if Path(ckpt_path).exists() else None


def _up_to_date(output, inputs=(), steps=None):
    """Is ``output`` finished and newer than every input (as ``make`` decides)?

    A checkpoint is finished when it reached ``steps``. An output older than one of its inputs was
    made from an earlier version of it (a stage that ran again), so it is made again too.
    """
    output = Path(output)
    if not output.exists() or (steps is not None and _steps(output) != steps):
        return False
    made = output.stat().st_mtime_ns
    return all(Path(i).exists() and Path(i).stat().st_mtime_ns <= made for i in inputs)


def _beta_name(beta):
    return f"{beta:g}"


def _check_out_dir(out, plan, cfg):
    """An out_dir that holds a demo of other settings is refused (its outputs would be mixed up)."""
    path = out / "plan.json"
    key = {"plan": {k: v for k, v in plan.items() if k not in ("rl", "dpo", "ppo", "grpo")},
           "rl": {k: v for k, v in plan["rl"].items() if k != "betas"},
           "dpo": {k: v for k, v in plan["dpo"].items() if k != "betas"}, "seed": cfg.seed}
    key["ppo"] = {k: v for k, v in plan["ppo"].items() if k != "betas"}
    key["grpo"] = {k: v for k, v in plan["grpo"].items() if k != "betas"}
    key = json.loads(json.dumps(key, default=_json_default))
    if path.exists():
        old = _read_json(path)
        require(old == key, f"{out} holds a demo run with other settings (preset, seed or smoke); "
                            f"use another --out-dir or delete that folder")
    else:
        _write_json(path, key)


class Stages:
    """Runs the stages in order, skipping those whose outputs are up to date, and keeps their wall
    times in times.json."""

    def __init__(self, out, cfg):
        self.cfg, self.path = cfg, out / "times.json"
        self.times = _read_json(self.path) if self.path.exists() else {}
        self.reused, self.ran = [], []

    def run(self, name, output, fn, inputs=(), steps=None):
        """``fn()`` unless ``output`` is up to date (`_up_to_date`)."""
        if _up_to_date(output, inputs, steps):
            self.reused.append(name)
            _say(self.cfg, f"{name}: reused the finished outputs in the run folder")
            return
        _say(self.cfg, f"{name} ...")
        t0 = time.time()
        fn()
        self.times[name] = round(time.time() - t0, 1)
        self.ran.append(name)
        _write_json(self.path, self.times)
        _say(self.cfg, f"{name}: done in {self.times[name]:.0f} s")


# ----- sampling and scoring -----------------------------------------------------------------------------

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


def batched_logprobs(model, rows, device, batch_size=64):
    """log p(y|x) (host float64 array) of ``(ids, n_prompt)`` rows under ``model``."""
    out = []
    model.eval()
    with no_grad():
        for i in range(0, len(rows), batch_size):
            batch = collate(rows[i:i + batch_size])
            _, logp = sequence_logprobs(model, batch_tensor(batch["input_ids"], device),
                                        batch_tensor(batch["completion_mask"], device))
            out.append(to_numpy(logp.data).astype(np.float64))
    return np.concatenate(out)


def batched_rewards(rm, rows, device, batch_size=64):
    """The reward model's score (host float64 array) of each ``(ids, n_prompt)`` row."""
    out = []
    rm.eval()
    with no_grad():
        for i in range(0, len(rows), batch_size):
            batch = collate(rows[i:i + batch_size])
            r = rm(batch_tensor(batch["input_ids"], device), batch["lengths"])
            out.append(to_numpy(r.data).astype(np.float64))
    return np.concatenate(out)


def _with_eot(prompt_ids, reply_ids):
    """Rows for the reward model: prompt + reply + EOT (appended if the reply was cut off), as RL
    scores its samples."""
    tok = ByteTokenizer()
    return [(p + (r if r and r[-1] == tok.eot_id else r + [tok.eot_id]), len(p))
            for p, r in zip(prompt_ids, reply_ids)]


def mean_se(values):
    """(mean, standard error) of a sample."""
    v = np.asarray(values, dtype=np.float64)
    se = v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else float("nan")
    return float(v.mean()), float(se)


def evaluate_policy(name, policy, sft_model, rm, prompts, e, seed, device, held_prefs=None):
    """Sample ``e["samples_per_prompt"]`` replies to each held-out prompt and measure them.

    KL(p_θ ‖ p_sft) is estimated by Monte Carlo on the policy's own samples: the mean over y ~ p_θ
    of log p_θ(y|x) - log p_sft(y|x), summed over the generated tokens (k1, an unbiased estimate).
    With ``held_prefs`` (a preference file), also the agreement of the policy's implicit reward
    with gold on those pairs (`implicit_agreement`).
    """
    k = e["samples_per_prompt"]
    repeated = [p for p in prompts for _ in range(k)]
    rng = np.random.default_rng(seed)
    prompt_ids, replies, texts = sample_replies(policy, repeated, e["max_new_tokens"], rng)
    rows = [(p + r, len(p)) for p, r in zip(prompt_ids, replies)]
    logp = batched_logprobs(policy, rows, device)
    logp_sft = logp if policy is sft_model else batched_logprobs(sft_model, rows, device)
    kl = logp - logp_sft
    gold = np.array([gold_reward(t) for t in texts])
    rm_scores = batched_rewards(rm, _with_eot(prompt_ids, replies), device)
    g_mean, g_se = mean_se(gold)
    r_mean, r_se = mean_se(rm_scores)
    kl_mean, kl_se = mean_se(kl)
    return {"name": name, "n": len(texts), "gold": g_mean, "gold_se": g_se, "rm": r_mean,
            "rm_se": r_se, "kl": kl_mean, "kl_se": kl_se,
            "length": float(np.mean([len(r) for r in replies])),
            "implicit_agreement": (implicit_agreement(policy, sft_model, held_prefs, device)
                                   if held_prefs is not None and policy is not sft_model else None),
            "samples": [{"prompt": p, "reply": t, "gold": g} for p, t, g in
                        zip(repeated[::k], texts[::k], gold[::k])]}


# ----- the stages ---------------------------------------------------------------------------------------

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
    _say(cfg, f"data: {len(train)} training and {len(held)} held-out prompt/reply pairs")


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
        _say(cfg, f"labels: {len(records)} {split.replace('_', '-')} preference pairs from {n} "
                  f"prompts (the others: ties or two identical replies, left out)")


def _pair_rows(records, block):
    """(chosen rows, rejected rows) of preference records, as the trainers encode them."""
    tok = ByteTokenizer()
    return ([encode_prompt_completion(tok, r["prompt"], r["chosen"], block) for r in records],
            [encode_prompt_completion(tok, r["prompt"], r["rejected"], block) for r in records])


def _gold_diffs(records):
    return np.array([gold_reward(r["chosen"]) - gold_reward(r["rejected"]) for r in records])


def reward_agreement(rm, path, device):
    """How often the reward model orders held-out pairs as the gold reward does."""
    records = load_preferences(path)
    rows_c, rows_r = _pair_rows(records, rm.config.block_size)
    diff = batched_rewards(rm, rows_c, device) - batched_rewards(rm, rows_r, device)
    agree, n = agreement(diff, _gold_diffs(records))
    return {"agreement": agree, "pairs_counted": n, "pairs": len(records),
            "label_accuracy": float(np.mean(diff > 0))}


def implicit_agreement(policy, sft_model, path, device):
    """How often a policy's implicit reward β·log(p_θ(y|x)/p_sft(y|x)) orders held-out pairs as the
    gold reward does. The KL-regularised optimum is p* ∝ p_sft·exp(R/β), so a policy trained
    towards it (by DPO, or by RL) holds a reward model of its own; the sign needs no β."""
    records = load_preferences(path)
    rows_c, rows_r = _pair_rows(records, policy.config.block_size)
    ratio_c = batched_logprobs(policy, rows_c, device) - batched_logprobs(sft_model, rows_c, device)
    ratio_r = batched_logprobs(policy, rows_r, device) - batched_logprobs(sft_model, rows_r, device)
    return agreement(ratio_c - ratio_r, _gold_diffs(records))[0]


def demo(cfg):
    """Run the whole pipeline into ``cfg.out_dir``; returns a summary dict (also in summary.json)."""
    plan = make_plan(cfg)
    out = Path(cfg.out_dir)
    require(not out.exists() or out.is_dir(), f"out_dir {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    _check_out_dir(out, plan, cfg)
    stages = Stages(out, cfg)
    t_start = time.time()
    # the demo decides itself which stages are up to date (`Stages`); one it runs again is replaced
    common = dict(device=cfg.device, quiet=cfg.quiet, overwrite=True)
    data, labels = out / "data", out / "labels"

    # 1. pretraining, resumed from its last checkpoint if an earlier run stopped half-way
    pre_cfg = PretrainConfig(out_dir=str(out / "pretrain"), **plan["model"], **plan["pretrain"],
                             sample_interval=0, seed=cfg.seed + 1337, **common)
    pre_ckpt = out / "pretrain" / "ckpt.npz"
    stages.run("pretrain", pre_ckpt, lambda: pretrain(pre_cfg), steps=pre_cfg.max_steps)

    # 2. demonstrations from the plays, and SFT on them
    stages.run("data", data / "prompts_train.jsonl", lambda: make_data(out, plan, cfg))
    sft_cfg = SFTConfig(data=str(data / "sft_train.jsonl"), init=str(pre_ckpt),
                        out_dir=str(out / "sft"), **plan["sft"], seed=cfg.seed, **common)
    sft_ckpt = out / "sft" / "ckpt.npz"
    stages.run("sft", sft_ckpt, lambda: sft(sft_cfg), inputs=[pre_ckpt, sft_cfg.data],
               steps=sft_cfg.max_steps)

    # 3. preferences from the stand-in labeler
    prefs = labels / "prefs_train.jsonl"
    stages.run("labels", prefs, lambda: make_labels(out, plan, cfg, sft_ckpt), inputs=[sft_ckpt])

    # 4. the reward model
    rm_cfg = RewardConfig(data=str(prefs), init=str(sft_ckpt), out_dir=str(out / "reward"),
                          **plan["reward"], seed=cfg.seed, **common)
    rm_ckpt = out / "reward" / "ckpt.npz"
    stages.run("reward", rm_ckpt, lambda: reward(rm_cfg), inputs=[prefs, sft_ckpt],
               steps=rm_cfg.max_steps)

    # 5. RL against the reward model, DPO on the preferences, at each β
    policies = {"SFT": sft_ckpt}
    rl_settings = {k: v for k, v in plan["rl"].items() if k != "betas"}
    for beta in plan["rl"]["betas"]:
        name = f"rl_beta{_beta_name(beta)}"
        rl_cfg = RLConfig(prompts=str(data / "prompts_train.jsonl"), init=str(sft_ckpt),
                          reward_model=str(rm_ckpt), out_dir=str(out / name), beta=beta,
                          **rl_settings, ckpt_interval=rl_settings["max_steps"],
                          seed=cfg.seed, **common)
        ckpt = out / name / "ckpt.npz"
        stages.run(name, ckpt, lambda c=rl_cfg: rl(c, metrics_fn=gold_metrics),
                   inputs=[sft_ckpt, rm_ckpt, rl_cfg.prompts], steps=rl_cfg.max_steps)
        policies[f"RL β={_beta_name(beta)}"] = ckpt
    ppo_settings = {k: v for k, v in plan["ppo"].items() if k != "betas"}
    for beta in plan["ppo"]["betas"]:
        name = f"ppo_beta{_beta_name(beta)}"
        ppo_cfg = PPOConfig(prompts=str(data / "prompts_train.jsonl"), init=str(sft_ckpt),
                            reward_model=str(rm_ckpt), out_dir=str(out / name), beta=beta,
                            **ppo_settings, ckpt_interval=ppo_settings["max_steps"],
                            seed=cfg.seed, **common)
        ckpt = out / name / "ckpt.npz"
        stages.run(name, ckpt, lambda c=ppo_cfg: ppo(c, metrics_fn=gold_metrics),
                   inputs=[sft_ckpt, rm_ckpt, ppo_cfg.prompts], steps=ppo_cfg.max_steps)
        policies[f"PPO β={_beta_name(beta)}"] = ckpt
    dpo_settings = {k: v for k, v in plan["dpo"].items() if k != "betas"}
    for beta in plan["dpo"]["betas"]:
        name = f"dpo_beta{_beta_name(beta)}"
        dpo_cfg = DPOConfig(data=str(prefs), init=str(sft_ckpt), out_dir=str(out / name),
                            beta=beta, **dpo_settings, seed=cfg.seed, **common)
        ckpt = out / name / "ckpt.npz"
        stages.run(name, ckpt, lambda c=dpo_cfg: dpo(c), inputs=[sft_ckpt, prefs],
                   steps=dpo_cfg.max_steps)
        policies[f"DPO β={_beta_name(beta)}"] = ckpt
    grpo_settings = {k: v for k, v in plan["grpo"].items() if k != "betas"}
    for beta in plan["grpo"]["betas"]:
        name = f"grpo_beta{_beta_name(beta)}"
        grpo_cfg = GRPOConfig(prompts=str(data / "prompts_train.jsonl"), init=str(sft_ckpt),
                              reward_model=str(rm_ckpt), out_dir=str(out / name), beta=beta,
                              **grpo_settings, ckpt_interval=grpo_settings["max_steps"],
                              seed=cfg.seed, **common)
        ckpt = out / name / "ckpt.npz"
        stages.run(name, ckpt, lambda c=grpo_cfg: grpo(c, metrics_fn=gold_metrics),
                   inputs=[sft_ckpt, rm_ckpt, grpo_cfg.prompts], steps=grpo_cfg.max_steps)
        policies[f"GRPO β={_beta_name(beta)}"] = ckpt

    # 6. evaluation on held-out prompts
    evals = evaluate_all(out, plan, cfg, policies, rm_ckpt, sft_ckpt, stages)

    # 7. the report
    summary = write_report(out, plan, cfg, evals, stages, time.time() - t_start)
    _say(cfg, f"report: {out / 'report.md'}")
    return summary


def gold_metrics(prompts, completions):
    """RL's metrics_fn: the hidden gold reward of this step's samples (never used to train)."""
    return {"gold": float(np.mean([gold_reward(c) for c in completions]))}


def evaluate_all(out, plan, cfg, policies, rm_ckpt, sft_ckpt, stages):
    """eval/reward.json (the reward model's agreement with gold) and eval/<policy>.json each."""
    e = plan["eval"]
    held_prompts = out / "data" / "prompts_held_out.jsonl"
    held_prefs = out / "labels" / "prefs_held_out.jsonl"
    prompts = [r["prompt"] for r in load_prompts(held_prompts)][:e["prompts"]]
    models = {}

    def model(path):
        if path not in models:
            models[path] = load_model(path, cfg.device)
        return models[path]

    rm_path = out / "eval" / "reward.json"
    stages.run("eval reward model", rm_path, lambda: _write_json(
        rm_path, reward_agreement(model(rm_ckpt), held_prefs, cfg.device)),
        inputs=[rm_ckpt, held_prefs])
    evals = {"reward": _read_json(rm_path)}
    for name, ckpt in policies.items():
        path = out / "eval" / f"{name.replace(' β=', '_beta').lower()}.json"

        def run(name=name, ckpt=ckpt, path=path):
            result = evaluate_policy(name, model(ckpt), model(sft_ckpt), model(rm_ckpt), prompts, e,
                                     cfg.seed + 7, cfg.device, held_prefs)
            _write_json(path, result)

        stages.run(f"eval {name}", path, run,
                   inputs=[ckpt, sft_ckpt, rm_ckpt, held_prompts, held_prefs])
        evals[name] = _read_json(path)
    return evals


# ----- the report -----------------------------------------------------------------------------------

def _fmt(x, digits=3):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _one_line(text, width=70):
    text = text.strip().replace("\n", " / ")
    text = text.replace("|", "\\|")
    return text if len(text) <= width else text[:width - 1] + "…"


def _gain(ev, base):
    """The gain in mean gold reward over SFT and its standard error (the two samples independent)."""
    gain = ev["gold"] - base["gold"]
    se = math.sqrt(ev["gold_se"] ** 2 + base["gold_se"] ** 2)
    return gain, se


def _last(folder, key):
    """The last logged value of ``key`` in a run's metrics.jsonl, or None."""
    values = [r[key] for r in _read_metrics(folder) if key in r]
    return float(values[-1]) if values else None


def _count_lines(path):
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def _threads_note():
    """The thread settings, which change CPU timings a lot on a busy machine."""
    names = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    set_ = [f"{n}={os.environ[n]}" for n in names if n in os.environ]
    blas = f"BLAS threads: {', '.join(set_)}" if set_ else "BLAS threads: the library's default"
    return f"{blas}; minirlhf threads: {kernels.get_num_threads()}; {os.cpu_count()} CPUs."


def _read_metrics(folder):
    path = Path(folder) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def write_report(out, plan, cfg, evals, stages, seconds):
    """report.md (tables, verdict, plots, samples, settings, times) and summary.json."""
    base = evals["SFT"]
    policies = [n for n in evals if n not in ("reward",)]
    rows, verdicts = [], {}
    for name in policies:
        ev = evals[name]
        if name == "SFT":
            gain_text = "—"
        else:
            gain, se = _gain(ev, base)
            ok = gain > 2 * se
            kind = name.split()[0]
            verdicts.setdefault(kind, []).append((ok, name, gain, se, ev["kl"]))
            gain_text = f"{gain:+.3f} ± {se:.3f}" + (" ✓" if ok else "")
        rows.append(f"| {name} | {ev['gold']:.3f} ± {ev['gold_se']:.3f} | {gain_text} | "
                    f"{ev['rm']:.3f} | {ev['kl']:.2f} ± {ev['kl_se']:.2f} | {ev['length']:.1f} |")

    rm = evals["reward"]
    met = {kind: [v for v in vs if v[0]] for kind, vs in verdicts.items()}
    required = ["RL", "DPO"] + [k for k in ("PPO", "GRPO") if k in verdicts]
    target_met = bool(verdicts) and all(met.get(k) for k in required)
    lab = plan["labels"]
    all_stages = sum(stages.times.get(name, 0) for name in stages.ran + stages.reused)
    lines = [
        "# minirlhf demo report", "",
        f"Preset **{'smoke' if cfg.smoke else cfg.preset}**, seed {cfg.seed}, device {cfg.device}. "
        f"All stages took {all_stages:.0f} s of wall time as each was measured when it ran; this "
        f"run took {seconds:.0f} s"
        + (f" (it reused: {', '.join(stages.reused)})" if stages.reused else "")
        + f". {_threads_note()}", "",
        "## Result", "",
        f"Gold reward (the hidden sentiment score, R_gold = #positive - #negative words, "
        f"`minirlhf.gold`) of replies to {base['n'] // plan['eval']['samples_per_prompt']} held-out "
        f"prompts, {plan['eval']['samples_per_prompt']} samples each ({base['n']} replies per "
        f"policy, sampled at temperature 1). Gain: over SFT, ± the standard error of the "
        f"difference; ✓ marks a gain of more than two standard errors. KL: KL(p_θ ‖ p_sft) in nats "
        f"per reply, the mean over the policy's samples of log p_θ(y|x) - log p_sft(y|x). "
        f"The reward model and DPO learned from {_count_lines(out / 'labels' / 'prefs_train.jsonl')} "
        f"preference pairs: two SFT replies to each of {lab['prompts']} training prompts, the first "
        f"preferred with probability σ(ΔR_gold/τ), τ = {lab['temperature']:g}"
        + (", pairs the labeler called a tie (equal gold rewards) left out." if lab["drop_ties"]
           else "; ties were coin flips.") + " RL and DPO start from the SFT model, their "
        "reference.", "",
        "| policy | gold reward ± se | gain over SFT | reward model | KL to SFT | reply length |",
        "|---|---|---|---|---|---|", *rows, "",
        f"Reward model: on {rm['pairs']} held-out preference pairs it orders "
        f"{_fmt(rm['agreement'])} of the {rm['pairs_counted']} pairs whose gold rewards differ as the "
        f"gold reward does (ties left out), and agrees with {_fmt(rm['label_accuracy'])} of the "
        f"labeler's (noisy) choices.", "",
    ]
    lines.append(f"**Target** ({', '.join(required)} each raise the mean gold reward over SFT by more "
                 f"than two standard errors): **{'met' if target_met else 'not met'}**.")
    for kind in ("RL", "PPO", "DPO", "GRPO"):
        vs = verdicts.get(kind, [])
        if not vs:
            continue
        good = [v for v in vs if v[0]]
        if good:
            _, name, gain, se, kl = min(good, key=lambda v: v[4])
            _, best, best_gain, best_se, best_kl = max(good, key=lambda v: v[2])
            lines.append(f"- {kind}: yes, at {len(good)} of {len(vs)} β values; at the smallest KL, "
                         f"{name}: {gain:+.3f} ± {se:.3f} at KL {kl:.2f} nats"
                         + (f"; the largest gain, {best}: {best_gain:+.3f} ± {best_se:.3f} at KL "
                            f"{best_kl:.2f} nats" if best != name else "") + ".")
        else:
            _, name, gain, se, kl = max(vs, key=lambda v: v[2])
            lines.append(f"- {kind}: no; the best, {name}, gains {gain:+.3f} ± {se:.3f} at KL "
                         f"{kl:.2f} nats.")
    lines.append("")

    plots = make_plots(out, plan, evals, policies)
    lines += ["## Plots", ""]
    if plots is None:
        lines += ["matplotlib is not installed, so no plots were drawn (`pip install matplotlib`, "
                  "then run the demo again: it reuses every finished stage).", ""]
    else:
        lines += [f"![gold reward against KL]({plots[0]})", "",
                  "Gold reward against KL to the SFT model, one point per β (error bars: ± one "
                  "standard error): the reward-KL frontier.", "",
                  f"![gold and reward-model reward during RL]({plots[1]})", "",
                  "The reward model's score (what RL maximises) and the gold reward (what we want) of "
                  "each RL step's samples: where the first climbs and the second does not, the policy "
                  "over-optimises the proxy.", ""]

    lines += ["## Training", "", "| stage | held-out measure | value |", "|---|---|---|"]
    for stage, folder, key, what in (
            ("pretrain", "pretrain", "val_loss", "loss on the last plays, nats/byte"),
            ("SFT", "sft", "val_loss", "loss on held-out replies, nats/byte")):
        value = _last(out / folder, key)
        lines.append(f"| {stage} | {what} | {_fmt(value)} |")
    lines += ["", "Implicit reward models: a policy p_θ trained towards the KL-regularised optimum "
              "p* ∝ p_sft·exp(R/β) carries the reward β·log(p_θ(y|x)/p_sft(y|x)). How often it "
              f"orders the {rm['pairs_counted']} held-out pairs as gold does (the reward model: "
              f"{_fmt(rm['agreement'])}):", "", "| policy | implicit-reward agreement with gold |",
              "|---|---|"]
    for name in policies:
        if evals[name].get("implicit_agreement") is not None:
            lines.append(f"| {name} | {_fmt(evals[name]['implicit_agreement'])} |")
    lines.append("")

    lines += ["## RL and PPO: reward model against gold during training", "",
              "| run | steps | RM reward: first 10 → last 10 steps | gold: first 10 → last 10 steps | "
              "KL at the end |", "|---|---|---|---|---|"]
    for kind, reward_key, kl_key in (("rl", "reward", "kl"), ("ppo", "objective/scores", "objective/kl")):
        for beta in plan[kind]["betas"]:
            m = _read_metrics(out / f"{kind}_beta{_beta_name(beta)}")
            if not m:
                continue
            head, tail = m[:10], m[-10:]
            mean = lambda rows, k: float(np.mean([r[k] for r in rows]))  # noqa: E731
            lines.append(f"| {kind.upper()} β={_beta_name(beta)} | {len(m)} | "
                         f"{mean(head, reward_key):.3f} → {mean(tail, reward_key):.3f} | "
                         f"{mean(head, 'gold'):.3f} → {mean(tail, 'gold'):.3f} | {mean(tail, kl_key):.2f} |")
    lines.append("")

    lines += ["## Replies before and after", "",
              "The first sample of each policy for the same held-out prompts (newlines shown as /; "
              "a long prompt is cut from the left to fit the context).", ""]
    for i in range(min(plan["eval"]["shown"], len(base["samples"]))):
        lines += [f"**Prompt {i + 1}:** `{_one_line(base['samples'][i]['prompt'], 100)}`", "",
                  "| policy | reply | gold |", "|---|---|---|"]
        for name in policies:
            s = evals[name]["samples"][i]
            lines.append(f"| {name} | {_one_line(s['reply'])} | {s['gold']:+.0f} |")
        lines.append("")

    lines += ["## Settings", "", "```"]
    for stage, settings in plan.items():
        lines.append(f"{stage:<9} " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    lines += ["```", "", "## Times", "", "| stage | seconds |", "|---|---|"]
    for name, secs in stages.times.items():
        lines.append(f"| {name} | {secs:.1f}{' (reused)' if name in stages.reused else ''} |")
    lines += [f"| **all stages** | {all_stages:.0f} |", f"| this run | {seconds:.0f} |", ""]

    report = out / "report.md"
    tmp = report.with_name("report.md.tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    os.replace(tmp, report)

    summary = {"target_met": target_met, "seconds": seconds, "reused": stages.reused,
               "ran": stages.ran, "reward_agreement": rm["agreement"],
               "policies": {n: {k: evals[n][k] for k in ("gold", "gold_se", "rm", "kl", "kl_se")}
                            for n in policies}}
    _write_json(out / "summary.json", summary)
    return summary


def make_plots(out, plan, evals, policies):
    """frontier.png and rl_gold_vs_rm.png, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None

    fig, ax = plt.subplots(figsize=(6, 4.2))
    base = evals["SFT"]
    ax.errorbar([0], [base["gold"]], yerr=[base["gold_se"]], fmt="ks", label="SFT", capsize=3)
    for kind, style in (("RL", "o-"), ("PPO", "s-"), ("DPO", "^-"), ("GRPO", "D-")):
        names = [n for n in policies if n.startswith(kind + " ")]
        pts = sorted((evals[n]["kl"], evals[n]["gold"], evals[n]["gold_se"], n) for n in names)
        if not pts:
            continue
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], fmt=style,
                    label=kind, capsize=3)
        for kl, g, _, n in pts:
            ax.annotate(n.split()[1], (kl, g), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("KL(p_θ ‖ p_sft), nats per reply")
    ax.set_ylabel("gold reward (held-out prompts)")
    ax.set_title("Reward against KL")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "frontier.png.tmp.png", dpi=110)
    plt.close(fig)
    os.replace(out / "frontier.png.tmp.png", out / "frontier.png")

    betas = plan["rl"]["betas"]
    fig, axes = plt.subplots(1, len(betas), figsize=(4.2 * len(betas), 3.4), squeeze=False)
    for ax, beta in zip(axes[0], betas):
        m = _read_metrics(out / f"rl_beta{_beta_name(beta)}")
        if not m:
            continue
        steps = [r["step"] for r in m]
        ax.plot(steps, _smooth([r["reward"] for r in m]), color="C0", label="reward model")
        ax.set_xlabel("RL step")
        ax.set_ylabel("reward-model reward", color="C0")
        ax2 = ax.twinx()
        ax2.plot(steps, _smooth([r["gold"] for r in m]), color="C3", label="gold")
        ax2.set_ylabel("gold reward", color="C3")
        ax.set_title(f"RL β={_beta_name(beta)}")
    fig.tight_layout()
    fig.savefig(out / "rl_gold_vs_rm.png.tmp.png", dpi=110)
    plt.close(fig)
    os.replace(out / "rl_gold_vs_rm.png.tmp.png", out / "rl_gold_vs_rm.png")
    return "frontier.png", "rl_gold_vs_rm.png"


def _smooth(values, window=5):
    """A trailing moving average (the per-step means of a few dozen samples are noisy)."""
    v = np.asarray(values, dtype=np.float64)
    c = np.cumsum(np.insert(v, 0, 0.0))
    n = np.minimum(np.arange(1, len(v) + 1), window)
    return (c[1:] - c[np.arange(1, len(v) + 1) - n]) / n
