"""Where one PPO and one GRPO iteration spend their time, on the demo's quick preset.

    python benchmarks/bench_rl_iteration.py                 # PPO and GRPO, 2 iterations each
    python benchmarks/bench_rl_iteration.py --iterations 3 --threads 1

The policy, the reference and the reward model have the quick preset's shape (2 layers, 128 wide,
context 96, the byte vocabulary) with fresh weights: the time of an iteration depends on the shapes
and the settings (8 prompts × 4 samples, 40 new tokens; PPO's 2 epochs × 2 minibatches), not on
what the weights have learned, except through the completions' lengths (untrained weights rarely
sample EOT, so every completion runs to 40 tokens: the slowest case). Each phase is timed by
wrapping the function the trainer calls for it:

- rollout: sampling the completions with the KV cache (`rollout.sample_completions`);
- scoring: the reward model on the completions (`rollout.Rewarder.__call__`);
- reference: the frozen reference's forward for log p_ref (the second model `load_policy` loads);
- PPO's policy and value forward of the rollout (log p_old, V_old) with GAE: the rest of `ppo.rollout`;
- update: PPO's `ppo.update` (each minibatch step), GRPO's forward, loss, backward and step (from the
  end of `grpo.generate_batch` to the step's log line).

The last iteration is reported (the first warms up). Runs in a temporary folder.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled


def make_inputs(folder):
    """A policy and a reward model of the quick preset's shape, and 64 prompts."""
    from minirlhf.checkpoint import save_checkpoint
    from minirlhf.model import GPT, GPTConfig, RewardModel
    from minirlhf.train.demo.plan import QUICK

    config = GPTConfig(vocab_size=258, **QUICK["model"])
    policy, rm = GPT(config, seed=0), RewardModel(config, seed=1)
    save_checkpoint(folder / "sft.npz", policy, config, extra={"stage": "sft"})
    save_checkpoint(folder / "rm.npz", rm, config, extra={"stage": "reward"})
    words = ["the king", "a rose", "my lord", "to be", "good night", "what light", "fair", "o"]
    with open(folder / "prompts.jsonl", "w") as f:
        for i in range(64):
            f.write(json.dumps({"prompt": f"{words[i % 8]} {i}: "}) + "\n")


class Timer:
    """Seconds per phase of the current iteration."""

    def __init__(self):
        self.iterations, self.now = [], defaultdict(float)

    def wrap(self, phase, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.now[phase] += time.perf_counter() - t0
        return timed

    def end_iteration(self):
        self.iterations.append(dict(self.now))
        self.now = defaultdict(float)


def instrument(module, timer):
    """Wrap the phases of ``module`` (minirlhf.train.ppo or .grpo) in ``timer``."""
    from minirlhf.train import rollout, run

    rollout.sample_completions = timer.wrap("rollout", rollout.sample_completions)
    rollout.Rewarder.__call__ = timer.wrap("scoring", rollout.Rewarder.__call__)
    loaded = []

    def load_policy(*args):
        model = original_load(*args)
        loaded.append(model)
        if len(loaded) == 2:                        # policy first, then the reference
            model.forward = timer.wrap("reference", model.forward)
        return model

    # the stages load their models through rollout.open_stage (or, in older trees, themselves)
    owner = rollout if hasattr(rollout, "open_stage") else module
    original_load = owner.load_policy
    owner.load_policy = load_policy
    original_log = run.Run.log
    if module.__name__.endswith("ppo"):
        module.rollout = timer.wrap("rollout total", module.rollout)
        module.update = timer.wrap("update", module.update)

        def log(self, step, row):
            timer.end_iteration()
            return original_log(self, step, row)
    else:
        generated = module.generate_batch

        def generate_batch(*args, **kwargs):
            result = generated(*args, **kwargs)
            timer.now["_update_from"] = time.perf_counter()
            return result

        module.generate_batch = generate_batch

        def log(self, step, row):
            timer.now["update"] += time.perf_counter() - timer.now.pop("_update_from")
            timer.end_iteration()
            return original_log(self, step, row)
    run.Run.log = log


def measure(kind, iterations, folder):
    """The phases of each iteration of one PPO or GRPO run: a list of {phase: seconds}."""
    from minirlhf.train import grpo, ppo
    from minirlhf.train.demo.plan import QUICK

    module = ppo if kind == "ppo" else grpo
    settings = {k: v for k, v in QUICK[kind].items() if k not in ("betas", "max_steps")}
    beta = QUICK["rl"]["betas"][0] if kind == "ppo" else QUICK["grpo"]["betas"][-1]  # GRPO: β > 0
    config_cls = ppo.PPOConfig if kind == "ppo" else grpo.GRPOConfig
    cfg = config_cls(prompts=str(folder / "prompts.jsonl"), init=str(folder / "sft.npz"),
                     reward_model=str(folder / "rm.npz"), out_dir=str(folder / kind), beta=beta,
                     max_steps=iterations, ckpt_interval=iterations, seed=0, **settings)
    timer = Timer()
    instrument(module, timer)
    module.ppo(cfg) if kind == "ppo" else module.grpo(cfg)
    result = []
    for it in timer.iterations:
        phases = {"rollout": it["rollout"], "scoring": it["scoring"],
                  "reference": it.get("reference", 0.0)}
        if kind == "ppo":          # the rest of ppo.rollout: log p_old, V_old, GAE
            phases["policy and value forward"] = (it["rollout total"] - it["rollout"]
                                                  - it["scoring"] - phases["reference"])
        phases["update"] = it["update"]
        result.append(phases)
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kinds", nargs="+", default=["ppo", "grpo"], choices=["ppo", "grpo"])
    p.add_argument("--iterations", type=int, default=2, help="iterations per run (the last reported)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            make_inputs(folder)
            print(json.dumps(measure(args.worker, args.iterations, folder)))
        return
    import subprocess
    env = {**os.environ, "MINIRLHF_NUM_THREADS": str(args.threads),
           "OMP_NUM_THREADS": str(args.threads), "OPENBLAS_NUM_THREADS": str(args.threads)}
    print(f"quick preset, {args.threads} threads, the last of {args.iterations} iterations\n")
    print("| algorithm | phase | seconds | share |")
    print("|---|---|---|---|")
    for kind in args.kinds:                       # each in its own process
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", kind,
                              "--iterations", str(args.iterations)],
                             capture_output=True, text=True, env=env)
        if out.returncode:
            sys.exit(out.stderr)
        phases = json.loads(out.stdout.strip().splitlines()[-1])[-1]
        total = sum(phases.values())
        for phase, seconds in phases.items():
            print(f"| {kind} | {phase} | {seconds:.2f} | {seconds / total:.0%} |")
        print(f"| {kind} | **iteration** | {total:.2f} | 100% |")


if __name__ == "__main__":
    main()
