"""Step 2, a Bradley-Terry reward model, the loop written out.

    python examples/reward_model.py   # under a minute (the first example run also trains the tiny
                                      # pretrained and SFT models it starts from, ~1 minute)
    python examples/reward_model.py --smoke

    P(y_w ≻ y_l | x) = σ(r(x, y_w) - r(x, y_l))          L_BT = -mean log σ(r_w - r_l)

r is the SFT model's trunk with a scalar head read at the last token of prompt + completion.
"""

import argparse

import numpy as np

import toy_task
from minirlhf.checkpoint import load_model
from minirlhf.datasets import collate, encode_prompt_completion, load_preferences
from minirlhf.losses import bt_loss
from minirlhf.model import RewardModel
from minirlhf.optim import AdamW
from minirlhf.tensor import Tensor, no_grad
from minirlhf.tokenizer import ByteTokenizer


def rewards(rm, tok, prompt, completions):
    """r(x, y) of each completion: (N,)."""
    batch = collate([encode_prompt_completion(tok, prompt, c, rm.config.block_size) for c in completions])
    return rm(Tensor(batch["input_ids"]), batch["lengths"])


def main(smoke=False):
    tok = ByteTokenizer()
    files = toy_task.make_files()
    rm = RewardModel.from_gpt(load_model(toy_task.ensure_sft(smoke)), seed=0)
    pairs = load_preferences(files["prefs"])
    optimizer = AdamW(rm.parameters(), lr=3e-4, weight_decay=0.0)
    rng = np.random.default_rng(0)

    for step in range(1, (3 if smoke else 120) + 1):
        batch = [pairs[i] for i in rng.choice(len(pairs), 16)]
        # score every chosen, then every rejected completion, in one pass
        rows = [encode_prompt_completion(tok, p["prompt"], p[key], rm.config.block_size)
                for key in ("chosen", "rejected") for p in batch]
        both = collate(rows)
        r = rm(Tensor(both["input_ids"]), both["lengths"])               # (2B,)
        r_chosen, r_rejected = r[:len(batch)], r[len(batch):]            # (B,), (B,)
        loss, metrics = bt_loss(r_chosen, r_rejected)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 40 == 0 or step == 1:
            print(f"step {step}: loss {loss.item():.3f}, accuracy {metrics['accuracy']:.2f}, "
                  f"margin {metrics['margin']:.2f}")

    with no_grad():
        r = rewards(rm, tok, toy_task.prompt_of("the moon"),
                    ["The moon is fair.\n", "The moon is vile.\n", "The moon is gentle.\n"])
    print("r(fair), r(vile), r(gentle) for 'Tell me of the moon.':", r.numpy().round(2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps, to check it runs")
    main(parser.parse_args().smoke)
