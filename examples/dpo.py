"""DPO, the loop written out: preferences straight into the policy, no reward model, no sampling.

    python examples/dpo.py            # under a minute (the first example run also trains the tiny
                                      # pretrained and SFT models it starts from, ~1 minute)
    python examples/dpo.py --smoke

    L_DPO = -mean log σ(β·[(log p_θ(y_w) - log p_ref(y_w)) - (log p_θ(y_l) - log p_ref(y_l))])

It follows from the closed-form optimum p*(y|x) ∝ p_ref(y|x)·exp(R(y|x)/β): see minirlhf/losses.py.
"""

import argparse

import numpy as np

import toy_task
from minirlhf.checkpoint import load_model
from minirlhf.datasets import collate, encode_prompt_completion, load_preferences
from minirlhf.logprobs import sequence_logprobs
from minirlhf.losses import dpo_loss
from minirlhf.optim import AdamW
from minirlhf.tensor import Tensor, no_grad
from minirlhf.tokenizer import ByteTokenizer


def logps(model, tok, pairs):
    """log p(y_w|x), log p(y_l|x) of each pair, from one forward pass: (B,), (B,)."""
    rows = [encode_prompt_completion(tok, p["prompt"], p[key], model.config.block_size)
            for key in ("chosen", "rejected") for p in pairs]
    batch = collate(rows)
    _, logp = sequence_logprobs(model, Tensor(batch["input_ids"]), batch["completion_mask"])
    return logp[:len(pairs)], logp[len(pairs):]


def main(smoke=False, beta=0.1):
    tok = ByteTokenizer()
    files = toy_task.make_files()
    sft_path = toy_task.ensure_sft(smoke)
    policy, ref = load_model(sft_path), load_model(sft_path)
    pairs = load_preferences(files["prefs"])
    optimizer = AdamW(policy.parameters(), lr=3e-4, weight_decay=0.0)
    rng = np.random.default_rng(0)

    with no_grad():                                      # the reference log-probs, once
        ref_chosen, ref_rejected = (t.numpy() for t in logps(ref, tok, pairs))

    for step in range(1, (3 if smoke else 100) + 1):
        idx = rng.choice(len(pairs), 16)
        pi_chosen, pi_rejected = logps(policy, tok, [pairs[i] for i in idx])
        loss, m = dpo_loss(pi_chosen, pi_rejected, ref_chosen[idx], ref_rejected[idx], beta=beta)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 25 == 0 or step == 1:
            print(f"step {step}: loss {loss.item():.3f} (log 2 = 0.693 at the start), "
                  f"reward margin {m['rewards/margins']:.2f}, accuracy {m['rewards/accuracies']:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps, to check it runs")
    parser.add_argument("--beta", type=float, default=0.1, help="β of the implicit KL penalty")
    args = parser.parse_args()
    main(args.smoke, args.beta)
