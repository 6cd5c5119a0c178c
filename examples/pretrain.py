"""Pretraining, the loop written out: next-token cross-entropy on Shakespeare, then a sample.

    python examples/pretrain.py             # ~20 seconds on 2 CPU cores
    python examples/pretrain.py --smoke     # a few steps

    L(θ) = -1/(B·T) Σ_b Σ_t log p_θ(x_{t+1} | x_≤t)

`minirlhf pretrain` runs the same loop with checkpoints, validation and logging
(minirlhf/train/pretrain.py).
"""

import argparse

import numpy as np

import minirlhf.functional as F
from minirlhf.datasets import encode_corpus, get_batch, load_text, train_val_split
from minirlhf.model import GPT, GPTConfig, generate
from minirlhf.optim import AdamW, clip_grad_norm_, lr_schedule, param_groups
from minirlhf.tensor import Tensor, no_grad
from minirlhf.tokenizer import ByteTokenizer


def main(smoke=False):
    steps = 5 if smoke else 600
    tok = ByteTokenizer()
    train, val = train_val_split(encode_corpus(load_text(), tok))    # the built-in plays, as bytes
    config = GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_embd=64)
    model = GPT(config, seed=0)
    optimizer = AdamW(param_groups(model, weight_decay=0.1), lr=3e-3)
    rng = np.random.default_rng(0)
    print(f"GPT with {model.num_parameters():,} parameters")

    for step in range(1, steps + 1):
        optimizer.lr = lr_schedule(step, 3e-3, warmup_steps=50, total_steps=steps, min_lr=3e-4)
        x, y = get_batch(train, config.block_size, batch_size=16, rng=rng)    # (B, T), (B, T)
        logits = model(Tensor(x))                                             # (B, T, vocab)
        loss = F.cross_entropy(logits, Tensor(y))
        optimizer.zero_grad()
        loss.backward()
        clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 100 == 0 or step == steps:
            with no_grad():
                xv, yv = get_batch(val, config.block_size, 64, np.random.default_rng(1))
                val_loss = F.cross_entropy(model(Tensor(xv)), Tensor(yv)).item()
            print(f"step {step}: train {loss.item():.3f}, validation {val_loss:.3f} nats/byte")

    prompt = [tok.eot_id] + tok.encode("Ham.\n")
    out = generate(model, [prompt], max_new_tokens=30 if smoke else 200, temperature=0.8, top_k=40, seed=0)
    print("--- sample ---\nHam.\n" + tok.decode(out.tokens[0]))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps, to check it runs")
    main(parser.parse_args().smoke)
