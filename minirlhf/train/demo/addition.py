"""`minirlhf demo --task addition`: RL with a verifiable reward on the lecture's own example.

    minirlhf demo --task addition --out-dir runs/addition      # the quick preset, 2 CPU cores

1. **Data** (`minirlhf.tasks.addition`): ``a + b = `` prompts, the sum written least significant
   digit first, a held-out split of operand pairs never seen in training (in either order).
2. **Pretrain** a small GPT (byte tokenizer) on lines ``a + b = s`` briefly, then **SFT** on
   prompt/completion pairs, deliberately short, so that the model is right often on few digits
   and rarely on many: room for RL.
3. **REINFORCE** (leave-one-out baseline, `rl`), **PPO** (`ppo`) and **GRPO** (`grpo`) from the SFT
   model with the exact reward ``--reward-fn minirlhf.tasks.addition:reward`` (1 if the sum is
   right, else 0). GRPO logs ``frac_reward_zero_std``: the share of its groups whose G rewards are
   all equal (all right or all wrong), whose advantages are all 0 and which teach nothing.
4. **Evaluation** on the held-out pairs: n samples per prompt at temperature 1, pass@1 and pass@k
   (the unbiased estimator, `pass_at_k`) by number of digits; each policy's pass@1 gain over SFT
   with its standard error (paired over the prompts).
5. **report.md** (tables) and **accuracy.png** (pass@1 against digits, one line per policy) in
   ``out_dir``; summary.json.

The stages are skipped when their outputs are up to date, as in the sentiment demo (`Stages`): a run
that stopped goes on where it stopped.
"""

import json
import time
from pathlib import Path

import numpy as np

from ...checkpoint import load_model
from ...datasets import encode_prompt
from ...model import generate
from ...tasks import addition as A
from ...tokenizer import ByteTokenizer
from ..common import require
from ..grpo import GRPOConfig, grpo
from ..ppo import PPOConfig, ppo
from ..pretrain import PretrainConfig, pretrain
from ..rl import RLConfig, rl
from ..sft import SFTConfig, sft
from .addition_report import write_report
from .plan import Stages, open_out_dir, read_json, say, write_json

REWARD_FN = "minirlhf.tasks.addition:reward"

# The quick preset: how it was tuned, and what each run measured, is in benchmarks/README.md.
QUICK = {
    "task": dict(max_digits=2, train_pairs=20000, held_out=400),
    "model": dict(n_layer=2, n_head=4, n_embd=64, block_size=24),
    "pretrain": dict(batch_size=32, max_steps=100, lr=3e-3, min_lr=3e-4, warmup_steps=30,
                     eval_interval=100, eval_batches=1, ckpt_interval=100),
    "sft": dict(batch_size=32, max_steps=1000, lr=5e-3, warmup_steps=20, val_fraction=0.02,
                eval_interval=1000),
    "rl": dict(beta=0.01, baseline="loo", prompts_per_step=16, samples_per_prompt=8,
               max_steps=150, lr=3e-4),
    "ppo": dict(beta=0.01, prompts_per_step=16, samples_per_prompt=8, max_steps=75, ppo_epochs=2,
                num_minibatches=2, lr=3e-4, vf_coef=0.1),
    "grpo": dict(beta=0.0, prompts_per_step=16, num_generations=8, max_steps=150, lr=3e-4),
    "eval": dict(samples=16, k=8),
}

SMOKE = {
    "task": dict(max_digits=2, train_pairs=200, held_out=20),
    "model": dict(n_layer=1, n_head=2, n_embd=16, block_size=16),
    "pretrain": dict(batch_size=4, max_steps=3, lr=3e-3, min_lr=3e-4, warmup_steps=1,
                     eval_interval=3, eval_batches=1, ckpt_interval=3),
    "sft": dict(batch_size=4, max_steps=3, lr=1e-3, warmup_steps=1, val_fraction=0.1,
                eval_interval=3),
    "rl": dict(beta=0.01, baseline="loo", prompts_per_step=2, samples_per_prompt=2, max_steps=2,
               lr=1e-4),
    "ppo": dict(beta=0.01, prompts_per_step=2, samples_per_prompt=2, max_steps=2, ppo_epochs=1,
                num_minibatches=1, lr=1e-4, vf_coef=0.1),
    "grpo": dict(beta=0.0, prompts_per_step=2, num_generations=2, max_steps=2, lr=1e-4),
    "eval": dict(samples=8, k=8),
}

PRESETS = {"quick": QUICK}

METHODS = (("REINFORCE (RLOO)", "rl", RLConfig, rl), ("PPO", "ppo", PPOConfig, ppo),
           ("GRPO", "grpo", GRPOConfig, grpo))


def make_plan(cfg):
    """The settings of every stage: the preset (or the smoke settings)."""
    require(cfg.rl_betas is None and cfg.dpo_betas is None,
            "--rl-betas and --dpo-betas belong to the sentiment task; the addition task has its "
            "β in its preset")
    require(cfg.smoke or cfg.preset in PRESETS,
            f"--task addition has the presets {', '.join(PRESETS)}, got {cfg.preset!r}")
    plan = {k: dict(v) for k, v in (SMOKE if cfg.smoke else PRESETS[cfg.preset]).items()}
    longest = plan["task"]["max_digits"] + 1 + 1                        # the sum's digits and EOT
    for stage in ("rl", "ppo", "grpo"):
        plan[stage]["max_new_tokens"] = longest
    prompt = len(A.prompt_text(10 ** plan["task"]["max_digits"] - 1, 0)) + 1   # with the start token
    require(prompt + longest <= plan["model"]["block_size"],
            f"block_size {plan['model']['block_size']} cannot hold a prompt and its answer")
    return plan


def make_data(out, plan, cfg):
    """data/: the pretraining lines, SFT pairs and RL prompts (training pairs), held_out.json."""
    t = plan["task"]
    train, held_out = A.make_split(t["train_pairs"], t["held_out"], t["max_digits"], seed=cfg.seed)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    half = len(train) // 2                  # SFT sees one half, RL prompts come from the other
    (data / "pretrain.txt").write_text(A.corpus_text(train[:half]), encoding="utf-8")
    for name, records in (("sft_train.jsonl", A.sft_records(train[:half])),
                          ("prompts_train.jsonl", A.prompt_records(train[half:]))):
        tmp = data / (name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        tmp.replace(data / name)
    write_json(data / "held_out.json", [list(p) for p in held_out])


def sample_answers(model, prompts, n, max_new_tokens, rng, batch_size=256):
    """n completions of each prompt at temperature 1 (exactly p_θ), as text: (P, n) nested lists."""
    tok = ByteTokenizer()
    block = model.config.block_size
    ids = [encode_prompt(tok, p, block, max_new_tokens) for p in prompts for _ in range(n)]
    texts = []
    for i in range(0, len(ids), batch_size):
        out = generate(model, ids[i:i + batch_size], max_new_tokens, temperature=1.0,
                       eot_id=tok.eot_id, seed=rng)
        texts += [tok.decode(t) for t in out.tokens]
    return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]


def evaluate_policy(model, pairs, plan, seed):
    """For each held-out pair, how many of n samples are right; pass@1 and pass@k by digits."""
    e, max_new = plan["eval"], plan["rl"]["max_new_tokens"]
    prompts = [A.prompt_text(a, b) for a, b in pairs]
    answers = sample_answers(model, prompts, e["samples"], max_new, np.random.default_rng(seed))
    right = [int(sum(A.reward(p, y) for y in ys)) for p, ys in zip(prompts, answers)]
    return {"right": right, "samples": e["samples"], "digits": [A.digits(a, b) for a, b in pairs],
            "shown": [[p, ys[0]] for p, ys in zip(prompts[::max(1, len(prompts) // 4)],
                                                   answers[::max(1, len(prompts) // 4)])]}


def demo(cfg):
    """The addition demo into ``cfg.out_dir``; returns the summary (also in summary.json)."""
    plan = make_plan(cfg)
    out = open_out_dir(cfg, {"task": "addition", "plan": plan, "seed": cfg.seed})  # other tasks refused
    stages = Stages(out, cfg)
    t_start = time.time()
    common = dict(device=cfg.device, quiet=cfg.quiet, overwrite=True)
    data = out / "data"

    stages.run("data", data / "held_out.json", lambda: make_data(out, plan, cfg))
    pre_cfg = PretrainConfig(data=str(data / "pretrain.txt"), out_dir=str(out / "pretrain"),
                             **plan["model"], **plan["pretrain"], sample_interval=0,
                             seed=cfg.seed + 1337, **common)
    pre_ckpt = out / "pretrain" / "ckpt.npz"
    stages.run("pretrain", pre_ckpt, lambda: pretrain(pre_cfg), inputs=[pre_cfg.data],
               steps=pre_cfg.max_steps)
    sft_cfg = SFTConfig(data=str(data / "sft_train.jsonl"), init=str(pre_ckpt),
                        out_dir=str(out / "sft"), **plan["sft"], ckpt_interval=plan["sft"]["max_steps"],
                        seed=cfg.seed, **common)
    sft_ckpt = out / "sft" / "ckpt.npz"
    stages.run("sft", sft_ckpt, lambda: sft(sft_cfg), inputs=[pre_ckpt, sft_cfg.data],
               steps=sft_cfg.max_steps)

    policies = {"SFT": sft_ckpt}
    for label, kind, config_cls, train in METHODS:
        settings = plan[kind]
        run_cfg = config_cls(prompts=str(data / "prompts_train.jsonl"), init=str(sft_ckpt),
                             reward_fn=REWARD_FN, out_dir=str(out / kind), **settings,
                             ckpt_interval=max(1, settings["max_steps"] // 2), seed=cfg.seed,
                             **common)
        ckpt = out / kind / "ckpt.npz"
        stages.run(kind, ckpt, lambda c=run_cfg, f=train: f(c), inputs=[sft_ckpt, run_cfg.prompts],
                   steps=run_cfg.max_steps)
        policies[label] = ckpt

    pairs = [tuple(p) for p in read_json(data / "held_out.json")]
    evals = {}
    for name, ckpt in policies.items():
        path = out / "eval" / f"{Path(ckpt).parent.name}.json"
        stages.run(f"eval {name}", path, lambda c=ckpt, p=path: write_json(
            p, evaluate_policy(load_model(c, cfg.device), pairs, plan, cfg.seed + 7)),
            inputs=[ckpt, data / "held_out.json"])
        evals[name] = read_json(path)

    summary = write_report(out, plan, cfg, evals, stages, time.time() - t_start)
    say(cfg, f"report: {out / 'report.md'}")
    return summary

