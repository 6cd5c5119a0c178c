"""Best-of-n, the baseline every RLHF result is measured against: no training, only sampling.

    minirlhf bon --init runs/sft/ckpt.npz --reward-model runs/reward/ckpt.npz \\
                 --prompts prompts.jsonl --n 1,2,4,8,16,32,64

For each prompt it samples max(n) replies from the policy once (temperature 1: the policy is the
reference), scores them all, and for every n keeps the best of the first n (`minirlhf.bon`). One
line per n goes to ``bon.jsonl``: the mean reward-model score of the kept replies, their gold
reward (`minirlhf.gold`, the demo's hidden sentiment score: held out, never used to choose), and
KL(π_bon ‖ π_ref) two ways: the formula ``log n - (n-1)/n`` (``kl_analytic``) and the estimate
from the samples, the formula less the overstatement of the ties they reveal (``kl``,
`minirlhf.bon.tie_corrected_kl`). Each run step is a batch of prompts; ``metrics.jsonl`` holds
every prompt's numbers, and a run stopped half-way goes on from its last batch (`Run`).
"""

import json
import math
import os
from dataclasses import dataclass, fields

import numpy as np

from ..bon import analytic_kl, best_of_n, tie_corrected_kl
from ..datasets import encode_prompt, load_prompts
from ..gold import gold_reward
from .common import ConfigError, check_rollout, config_summary, option, overwrite_option, require
from .rollout import open_stage
from .folder import _jsonable
from .run import Run


@dataclass
class BonConfig:
    prompts: str = option("", "JSONL of {\"prompt\"} records", required=True)
    init: str = option("runs/sft/ckpt.npz", "the policy to sample from, also the reference")
    reward_model: str | None = option(None, "a reward-model checkpoint (from `minirlhf reward`)")
    reward_fn: str | None = option(None, "or a reward function 'module:function' or 'file.py:function'")
    n: str = option("1,2,4,8,16,32,64", "comma-separated n values (integers >= 1)")
    num_prompts: int | None = option(None, "use the first N prompts of the file (default: all)")
    prompts_per_step: int = option(8, "prompts per step (each sampled max(n) times in one batch)")
    max_new_tokens: int | None = option(None, "longest reply, in tokens (default: 48, or "
                                           "block_size - 2 of a smaller policy)")
    out_dir: str = option("runs/bon", "where bon.jsonl, metrics.jsonl and run.json go")
    seed: int = option(0, "seed of the sampling")
    overwrite: bool = overwrite_option()
    device: str = option("cpu", "cpu (NumPy) or cuda (CuPy)", choices=["cpu", "cuda"])
    quiet: bool = option(False, "no progress bar or messages")


@dataclass
class _Steps(BonConfig):
    """What `Run` needs besides the settings: one step per batch of prompts, saved after each."""
    max_steps: int = 1
    ckpt_interval: int = 1


def parse_ns(text):
    """``"1,2,4"`` -> (1, 2, 4): distinct integers >= 1, in increasing order, or a ConfigError."""
    bad = f"n must be comma-separated integers >= 1 like '1,2,4,8', got {text!r}"
    try:
        ns = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ConfigError(bad) from None
    require(ns and min(ns) >= 1, bad)
    require(len(set(ns)) == len(ns), f"n: a value is repeated in {text!r}")
    return tuple(sorted(ns))


def bon(cfg):
    """Best-of-n for each n of ``cfg.n``; returns {"table": one dict per n, ...} (also bon.jsonl)."""
    check_rollout(cfg, "num_prompts")
    ns = parse_ns(cfg.n)
    records = load_prompts(cfg.prompts)
    count = len(records) if cfg.num_prompts is None else min(cfg.num_prompts, len(records))
    steps = math.ceil(count / cfg.prompts_per_step)
    run_cfg = _Steps(**{f.name: getattr(cfg, f.name) for f in fields(BonConfig)}, max_steps=steps)
    with Run(run_cfg, "bon") as run:
        return run.result if run.finished else _sample(run_cfg, run, ns, records[:count])


def _sample(cfg, run, ns, records):
    cfg, tokenizer, policy, _, rewarder = open_stage(cfg, reference=False)   # the policy is p_ref
    rng = np.random.default_rng(cfg.seed)
    start = run.restore(policy, None, rngs={"sampling": rng})
    run.print(f"bon: {len(records)} prompts from {cfg.prompts}, n = {', '.join(map(str, ns))}\n"
              f"{config_summary(cfg)}")
    texts = [r["prompt"] for r in records]
    for step in run.steps(start):
        chunk = texts[(step - 1) * cfg.prompts_per_step:step * cfg.prompts_per_step]
        row = _step(policy, chunk, ns, rewarder, tokenizer, cfg.max_new_tokens, rng)
        run.log(step, row)
        run.save_if_due(step)
    table = _table(run.folder.metrics_path, ns)
    _write_jsonl(run.folder.out / "bon.jsonl", table)
    top = table[-1]
    return run.finish({"table": table}, f"best of {top['n']}: reward {top['reward']:.3f}, gold "
                                        f"{top['gold']:.3f}, kl {top['kl']:.3f}")


def _step(policy, prompt_texts, ns, rewarder, tokenizer, max_new, rng):
    """Best-of-max(n) on a batch of prompts; every prompt's reward, gold and KL for each n."""
    n_max = ns[-1]
    prompt_ids = [encode_prompt(tokenizer, p, policy.config.block_size, max_new + 1)
                  for p in prompt_texts]
    row_prompts = [p for p in prompt_texts for _ in range(n_max)]

    def reward(seqs):
        return rewarder(seqs, row_prompts[:len(seqs)], [tokenizer.decode(ids[k:]) for ids, k in seqs])

    out = best_of_n(policy, prompt_ids, n_max, reward, max_new, tokenizer.eot_id, seed=rng,
                    max_rows=len(prompt_ids) * n_max)
    replies = [[tokenizer.decode(t) for t in s] for s in out.samples]       # (P, n_max) texts
    gold = np.array([[gold_reward(t) for t in r] for r in replies])          # (P, n_max)
    masses = np.exp(out.logprobs)                                            # (P, n_max) p_ref(y|x)
    result = {"reward": {}, "gold": {}, "kl": {}}
    for n in ns:
        chosen, rewards = out.select(n)
        p = np.arange(len(chosen))
        result["reward"][n] = rewards.tolist()
        result["gold"][n] = gold[p, chosen].tolist()
        result["kl"][n] = [tie_corrected_kl(n, out.scores[i], masses[i], keys=replies[i])
                           for i in p]
    return {"mean_reward": float(np.mean(result["reward"][n_max])),
            "mean_gold": float(np.mean(result["gold"][n_max])),
            **{f"{k}@{n}": v for k, by_n in result.items() for n, v in by_n.items()},
            "replies": [r[c] for r, c in zip(replies, out.select(n_max)[0])]}


def _table(metrics_path, ns):
    """One dict per n: the means over prompts (± standard errors) of every step's rows."""
    rows = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line]
    table = []
    for n in ns:
        entry = {"n": n}
        for key in ("reward", "gold", "kl"):
            values = np.array([v for r in rows for v in r[f"{key}@{n}"]], dtype=np.float64)
            entry[key] = float(values.mean())
            entry[f"{key}_se"] = (float(values.std(ddof=1) / math.sqrt(len(values)))
                                  if len(values) > 1 else None)
        entry["kl_analytic"] = analytic_kl(n)
        entry["prompts"] = len(values)
        table.append(entry)
    return table


def _write_jsonl(path, rows):
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps({k: _jsonable(v) for k, v in r.items()}) + "\n" for r in rows),
                   encoding="utf-8")
    os.replace(tmp, path)
