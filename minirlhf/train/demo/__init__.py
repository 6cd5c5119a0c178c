"""The lecture's whole pipeline on the built-in Shakespeare, through the same trainers a user calls.

    minirlhf demo                      # the quick preset: about six minutes on 2 CPU cores
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
   β = 0 (TRL's default: no reference in the loss) and β = 0.1 (k3 in the loss). During RL, PPO
   and GRPO we also log the gold reward of the samples: where the reward model's score climbs and the gold
   reward does not, the policy over-optimises a proxy.
6. **Evaluation** on held-out prompts: mean gold reward ± standard error, mean reward-model score,
   and KL(p_θ ‖ p_sft) estimated by Monte Carlo, mean over samples y ~ p_θ of
   log p_θ(y|x) - log p_sft(y|x); how often each policy's implicit reward β·log(p_θ/p_sft) orders
   held-out pairs as R_gold does; and a few replies side by side.
   **Best-of-n** (`bon`): the SFT model's best of n = 1 … 64 replies by the reward model, the
   baseline RL is measured against, with its KL and Gao et al.'s fitted forms (``bon``).
7. **report.md** in ``out_dir``, and with matplotlib two plots: gold reward against KL for RL, PPO, DPO
   and GRPO across β (the DPO paper's Figure 2 in miniature), and gold against reward-model reward during RL.

Every stage writes its outputs atomically and is skipped when they are up to date (finished, and
newer than what they were made from, as ``make`` decides), so a demo that was interrupted goes on
where it stopped when run again: an unfinished stage resumes from its last checkpoint; a stage that
ran again makes the stages after it run again too. A run folder made with other settings is refused.

This file holds `DemoConfig` and `demo`, the story in order; each job has a module of its own:
``plan`` (presets, the settings of every stage, which stages are up to date), ``labels``
(demonstrations from the plays, preferences from the stand-in labeler), ``evaluate`` (gold reward,
reward-model score and KL of each policy), ``report`` (report.md, summary.json) and ``plots``.
"""

import time
from dataclasses import dataclass

from ..common import option
from ..dpo import DPOConfig, dpo
from ..grpo import GRPOConfig, grpo
from ..ppo import PPOConfig, ppo
from ..pretrain import PretrainConfig, pretrain
from ..reward import RewardConfig, reward
from ..rl import RLConfig, rl
from ..sft import SFTConfig, sft
from .bon import run_bon
from .family import train_family
from .evaluate import (batched_logprobs, batched_rewards, evaluate_all, evaluate_policy,
                       gold_metrics, implicit_agreement, mean_se, pair_logprobs, reward_agreement)
from .labels import make_data, make_labels, sample_replies
from .plan import (LARGE, PRESETS, QUICK, SMOKE, Stages, beta_name, make_plan, open_out_dir,
                   parse_betas, say, sentiment_key)
from .plots import make_plots
from .report import write_report

# what `minirlhf.train.demo` offers; each name lives in the module of its job
__all__ = ["DemoConfig", "demo", "QUICK", "LARGE", "SMOKE", "PRESETS", "parse_betas", "make_plan",
           "Stages", "make_data", "make_labels", "sample_replies", "evaluate_all",
           "evaluate_policy", "reward_agreement", "implicit_agreement", "pair_logprobs",
           "gold_metrics", "batched_logprobs", "batched_rewards", "mean_se", "write_report", "make_plots"]


@dataclass
class DemoConfig:
    task: str = option("sentiment", "sentiment (Shakespeare, a learned reward model) or addition "
                                   "(a + b, an exact reward: minirlhf.train.demo.addition)",
                       choices=["sentiment", "addition"])
    out_dir: str = option("runs/demo", "where every stage's outputs, report.md and the plots go")
    preset: str = option("quick", "quick (about 6 minutes on 2 CPU cores) or large (hours on a CPU: "
                               "use a GPU)", choices=["quick", "large"])
    rl_betas: str | None = option(None, "comma-separated β values for RL and PPO, e.g. '0.05,0.2' "
                                     "(default: the preset's)")
    dpo_betas: str | None = option(None, "comma-separated β values for DPO (default: the preset's)")
    seed: int = option(0, "seed of every stage (weights, data order, sampling, labels)")
    device: str = option("cpu", "cpu (NumPy) or cuda (CuPy)", choices=["cpu", "cuda"])
    smoke: bool = option(False, "a few steps of everything with a tiny model: tests the plumbing")
    quiet: bool = option(False, "no progress bars or messages")


def demo(cfg):
    """Run the whole pipeline into ``cfg.out_dir``; returns a summary dict (also in summary.json)."""
    if cfg.task == "addition":
        from . import addition
        return addition.demo(cfg)
    plan = make_plan(cfg)
    out = open_out_dir(cfg, sentiment_key(plan, cfg))
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

    # 5. RL, PPO and GRPO against the reward model, DPO on the preferences, each at a few β
    policies = {"SFT": sft_ckpt}

    def against_reward_model(kind, config_cls, train):
        """``kind`` (rl, ppo or grpo) from the SFT model at each β, scored by the reward model; the
        gold reward of its samples is logged as it trains (`gold_metrics`), never used."""
        settings = {k: v for k, v in plan[kind].items() if k != "betas"}
        for beta in plan[kind]["betas"]:
            name = f"{kind}_beta{beta_name(beta)}"
            run_cfg = config_cls(prompts=str(data / "prompts_train.jsonl"), init=str(sft_ckpt),
                                 reward_model=str(rm_ckpt), out_dir=str(out / name), beta=beta,
                                 **settings, ckpt_interval=settings["max_steps"], seed=cfg.seed,
                                 **common)
            ckpt = out / name / "ckpt.npz"
            stages.run(name, ckpt, lambda c=run_cfg: train(c, metrics_fn=gold_metrics),
                       inputs=[sft_ckpt, rm_ckpt, run_cfg.prompts], steps=run_cfg.max_steps)
            policies[f"{kind.upper()} β={beta_name(beta)}"] = ckpt

    against_reward_model("rl", RLConfig, rl)
    against_reward_model("ppo", PPOConfig, ppo)
    dpo_settings = {k: v for k, v in plan["dpo"].items() if k != "betas"}
    for beta in plan["dpo"]["betas"]:
        name = f"dpo_beta{beta_name(beta)}"
        dpo_cfg = DPOConfig(data=str(prefs), init=str(sft_ckpt), out_dir=str(out / name),
                            beta=beta, **dpo_settings, seed=cfg.seed, **common)
        ckpt = out / name / "ckpt.npz"
        stages.run(name, ckpt, lambda c=dpo_cfg: dpo(c), inputs=[sft_ckpt, prefs],
                   steps=dpo_cfg.max_steps)
        policies[f"DPO β={beta_name(beta)}"] = ckpt
    train_family(out, plan, cfg, stages, prefs, sft_ckpt, policies, common)   # KTO, SimPO, ORPO
    against_reward_model("grpo", GRPOConfig, grpo)

    # 6. evaluation on held-out prompts
    evals = evaluate_all(out, plan, cfg, policies, rm_ckpt, sft_ckpt, stages)

    # 6b. the best-of-n baseline on held-out prompts
    bon_table = run_bon(out, cfg, stages, sft_ckpt, rm_ckpt)

    # 7. the report
    summary = write_report(out, plan, cfg, evals, stages, time.time() - t_start, bon_table)
    say(cfg, f"report: {out / 'report.md'}")
    return summary
