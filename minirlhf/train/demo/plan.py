"""The demo's plan: the presets, the settings of every stage, and which stages are up to date.

`make_plan` turns a `DemoConfig` into the settings of every stage; `open_out_dir` refuses a run
folder made with other settings; `Stages` runs each stage unless its outputs are up to date
(finished, and newer than what they were made from, as ``make`` decides). The JSON helpers here
write and read the run folder's small files, atomically.
"""

import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from ...checkpoint import read_header
from ..common import ConfigError, check_common, require

# ----- the presets ------------------------------------------------------------------------------------
# Each stage's entries are fields of that stage's config; "data", "labels" and "eval" are the demo's.
# The quick preset is sized to run in about six minutes on two CPU cores and to meet its target:
# RL, PPO, DPO and GRPO each raise the held-out gold reward over SFT by more than two standard
# errors. How its settings were found, and what each run measured: benchmarks/README.md.

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
    "kto": dict(beta=0.1, batch_size=32, max_steps=80, lr=2e-4, warmup_steps=10, val_fraction=0.05,
                eval_interval=40),
    "simpo": dict(beta=2.0, gamma=0.5, batch_size=16, max_steps=80, lr=2e-4, warmup_steps=10,
                  val_fraction=0.05, eval_interval=40),
    "orpo": dict(beta=0.1, batch_size=16, max_steps=80, lr=2e-4, warmup_steps=10, val_fraction=0.05,
                 eval_interval=40),
}

# Meant for --device cuda: on 2 CPU cores it would take hours.
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
    "kto": dict(beta=0.1, batch_size=64, max_steps=200, lr=1e-4, warmup_steps=20, val_fraction=0.05,
                eval_interval=50),
    "simpo": dict(beta=2.0, gamma=0.5, batch_size=32, max_steps=200, lr=1e-4, warmup_steps=20,
                  val_fraction=0.05, eval_interval=50),
    "orpo": dict(beta=0.1, batch_size=32, max_steps=200, lr=1e-4, warmup_steps=20, val_fraction=0.05,
                 eval_interval=50),
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
    "kto": dict(beta=0.1, batch_size=4, max_steps=2, lr=1e-4, warmup_steps=1, val_fraction=0.1,
                eval_interval=2),
    "simpo": dict(beta=2.0, gamma=0.5, batch_size=4, max_steps=2, lr=1e-4, warmup_steps=1,
                  val_fraction=0.1, eval_interval=2),
    "orpo": dict(beta=0.1, batch_size=4, max_steps=2, lr=1e-4, warmup_steps=1, val_fraction=0.1,
                 eval_interval=2),
}

PRESETS = {"quick": QUICK, "large": LARGE}


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
    plan["ppo"]["betas"] = plan["rl"]["betas"]                            # PPO and RL side by side
    block = plan["model"]["block_size"]
    for stage in ("labels", "rl", "ppo", "grpo", "eval"):
        n = plan[stage]["max_new_tokens"]
        require(n < block - 1, f"{stage}: max_new_tokens ({n}) must leave room for a prompt in "
                               f"block_size {block}")
    return plan


# ----- the run folder -----------------------------------------------------------------------------

def say(cfg, text):
    """A progress line on stderr, unless ``cfg.quiet``."""
    if not cfg.quiet:
        print(f"demo: {text}", file=sys.stderr, flush=True)


def write_json(path, obj):
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


def read_json(path):
    """One of the run folder's small JSON files; a damaged one is named in a one-line error."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg}, line {e.lineno}); delete the file, or "
                          "the run folder, to start that part again") from None


def read_metrics(folder):
    """The rows a trainer logged in ``folder``/metrics.jsonl, one dict per step ([] if none)."""
    path = Path(folder) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _steps(ckpt_path):
    """The step a checkpoint was saved at, or None if there is none."""
    return read_header(ckpt_path).get("step", 0) if Path(ckpt_path).exists() else None


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


def beta_name(beta):
    """β as run folders and policy names write it: 0.05 -> "0.05", 0.0 -> "0"."""
    return f"{beta:g}"


def sentiment_key(plan, cfg):
    """What a sentiment demo folder must agree on to be reused: every setting but the swept betas."""
    swept = ("rl", "dpo", "ppo", "grpo")                 # their β may change; the rest may not
    return {"plan": {k: v for k, v in plan.items() if k not in swept}, "seed": cfg.seed,
            **{stage: {k: v for k, v in plan[stage].items() if k != "betas"} for stage in swept}}


def open_out_dir(cfg, key):
    """The demo's folder, made if missing. A folder that holds a demo of other settings (its
    plan.json differs from ``key``) is refused: its outputs would be mixed up with these."""
    out = Path(cfg.out_dir)
    require(not out.exists() or out.is_dir(), f"out_dir {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "plan.json"
    key = json.loads(json.dumps(key, default=_json_default))
    if path.exists():
        require(read_json(path) == key, f"{out} holds a demo run with other settings (task, preset, "
                                        f"seed or smoke); use another --out-dir or delete that folder")
    else:
        write_json(path, key)
    return out


class Stages:
    """Runs the stages in order, skipping those whose outputs are up to date, and keeps their wall
    times in times.json."""

    def __init__(self, out, cfg):
        self.cfg, self.path = cfg, out / "times.json"
        self.times = read_json(self.path) if self.path.exists() else {}
        self.reused, self.ran = [], []

    def run(self, name, output, fn, inputs=(), steps=None):
        """``fn()`` unless ``output`` is up to date (`_up_to_date`)."""
        if _up_to_date(output, inputs, steps):
            self.reused.append(name)
            say(self.cfg, f"{name}: reused the finished outputs in the run folder")
            return
        say(self.cfg, f"{name} ...")
        t0 = time.time()
        fn()
        self.times[name] = round(time.time() - t0, 1)
        self.ran.append(name)
        write_json(self.path, self.times)
        say(self.cfg, f"{name}: done in {self.times[name]:.0f} s")
