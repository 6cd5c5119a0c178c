"""Step 3, REINFORCE with a KL penalty, the loop written out.

    python examples/reinforce_kl.py            # under a minute (plus ~1 minute the first time)
    python examples/reinforce_kl.py --smoke

    maximise  E_{y~p_θ}[R(y|x)] - β·KL(p_θ ‖ p_ref)
    R̂(y) = R(y|x) - β·log(p_θ(y|x)/p_ref(y|x))          (a constant: no gradient through it)
    loss = -mean[(R̂(y) - b)·log p_θ(y|x)]                 (its gradient is the REINFORCE estimator)

The reward is a Python function here (toy_task.reward); `minirlhf rl --reward-model` uses a trained one.
"""

import argparse

import numpy as np

import toy_task
from minirlhf.checkpoint import load_model
from minirlhf.datasets import collate, encode_prompt
from minirlhf.logprobs import sequence_logprobs
from minirlhf.losses import reinforce_kl_loss
from minirlhf.model import generate
from minirlhf.optim import AdamW
from minirlhf.tensor import Tensor, no_grad
from minirlhf.tokenizer import ByteTokenizer


def main(smoke=False, beta=0.1):
    tok = ByteTokenizer()
    sft_path = toy_task.ensure_sft(smoke)
    policy, ref = load_model(sft_path), load_model(sft_path)           # p_θ starts at p_ref
    optimizer = AdamW(policy.parameters(), lr=3e-4, weight_decay=0.0)
    rng = np.random.default_rng(0)
    k, max_new = 4, 24                                                  # samples per prompt, length

    for step in range(1, (2 if smoke else 60) + 1):
        topics = rng.choice(toy_task.TOPICS, 4, replace=False)
        prompts = [encode_prompt(tok, toy_task.prompt_of(t), policy.config.block_size, max_new + 1)
                   for t in topics for _ in range(k)]
        out = generate(policy, prompts, max_new, temperature=1.0, eot_id=tok.eot_id, seed=rng)
        rows = [(p + y + ([tok.eot_id] if y[-1] != tok.eot_id else []), len(p))
                for p, y in zip(prompts, out.tokens)]
        R = np.array([toy_task.reward("", tok.decode(y)) for y in out.tokens])   # (N,)

        batch = collate(rows)
        input_ids, mask = Tensor(batch["input_ids"]), batch["completion_mask"]
        _, logp = sequence_logprobs(policy, input_ids, mask)                    # (N,) log p_θ(y|x)
        with no_grad():
            _, ref_logp = sequence_logprobs(ref, input_ids, mask)               # (N,) log p_ref(y|x)
        group = np.repeat(np.arange(len(topics)), k)                            # baseline per prompt
        loss, m = reinforce_kl_loss(logp, ref_logp.data, R, beta, baseline="loo", group=group)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == 1:
            print(f"step {step}: reward {m['reward']:+.2f}, KL {m['kl']:.3f} nats, "
                  f"e.g. {tok.decode(out.tokens[0])!r}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps, to check it runs")
    parser.add_argument("--beta", type=float, default=0.1, help="weight of the KL penalty")
    args = parser.parse_args()
    main(args.smoke, args.beta)
