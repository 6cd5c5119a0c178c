"""Tasks with verifiable rewards: data that a program generates and a reward that a program checks.

`minirlhf.tasks.addition`: ``a + b = `` prompts, the sum written with its digits reversed, and an
exact-match reward usable as ``--reward-fn minirlhf.tasks.addition:reward`` by rl, ppo and grpo.
"""
