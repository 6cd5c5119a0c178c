"""Step 1, supervised fine-tuning, the loop written out: learn the completions, never the prompts.

    python examples/sft.py             # under a minute (pretrains a tiny model first if needed)
    python examples/sft.py --smoke

    L_SFT = -(1/N) Σ_t m_t · log p_θ(y_t | x, y_<t)      m = completion_mask (prompt and padding are 0)
"""

import argparse

import numpy as np

import toy_task
from minirlhf.checkpoint import load_model
from minirlhf.datasets import collate, encode_prompt, encode_prompt_completion, load_sft
from minirlhf.losses import sft_loss
from minirlhf.model import generate
from minirlhf.optim import AdamW
from minirlhf.tensor import Tensor
from minirlhf.tokenizer import ByteTokenizer


def main(smoke=False):
    tok = ByteTokenizer()
    files = toy_task.make_files()
    model = load_model(toy_task.ensure_pretrained(smoke))
    rows = [encode_prompt_completion(tok, r["prompt"], r["completion"], model.config.block_size)
            for r in load_sft(files["sft"])]
    optimizer = AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    rng = np.random.default_rng(0)

    batch = collate(rows[:2])
    print("a batch row:      ", repr(tok.decode(batch["input_ids"][0], show_special=True)))
    print("its completion mask", batch["completion_mask"][0].astype(int))

    for step in range(1, (3 if smoke else 150) + 1):
        batch = collate([rows[i] for i in rng.choice(len(rows), 16)])
        input_ids = Tensor(batch["input_ids"])                        # (B, T)
        loss = sft_loss(model(input_ids), input_ids, batch["completion_mask"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == 1:
            print(f"step {step}: SFT loss {loss.item():.3f} nats per completion token")

    prompt = encode_prompt(tok, toy_task.prompt_of("the moon"), model.config.block_size, 20)
    out = generate(model, [prompt], 20, temperature=0, eot_id=tok.eot_id)
    print("greedy reply to 'Tell me of the moon.':", repr(tok.decode(out.tokens[0])))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps, to check it runs")
    main(parser.parse_args().smoke)
