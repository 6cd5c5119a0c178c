"""Step 0 of the lecture: pretraining, "learn the probabilities of the next token".

Minimise the average next-token cross-entropy over random windows x of a corpus,

    L(θ) = -1/(B·T) Σ_b Σ_t log p_θ(x_{t+1} | x_≤t),

with AdamW, a linear warm-up and a cosine decay. The loss is in nats per byte (the tokenizer is
byte-level), so ``exp(loss)`` is the per-byte perplexity and ``loss / ln 2`` bits per byte.
"""

from dataclasses import dataclass

import numpy as np

from .. import functional as F
from ..datasets import DataError, encode_corpus, get_batch, load_text, train_val_split
from ..model import GPT, GPTConfig, generate
from ..optim import AdamW, lr_schedule, param_groups
from ..tensor import no_grad
from ..tokenizer import ByteTokenizer
from .common import batch_tensor, check_common, config_summary, option, overwrite_option, require
from .run import Run

# what --arch turns on in GPTConfig (the Llama block as SmolLM has it: embeddings tied to the head)
ARCHS = {"gpt2": {}, "llama": dict(norm="rms", pos="rope", mlp="swiglu", bias=False)}


@dataclass
class PretrainConfig:
    data: str | None = option(None, "a .txt file or a folder of them; default: the built-in Shakespeare")
    out_dir: str = option("runs/pretrain", "where metrics.jsonl and checkpoints go")
    n_layer: int = option(4, "transformer blocks")
    n_head: int = option(4, "attention heads")
    n_embd: int = option(128, "width of the residual stream")
    arch: str = option("gpt2", "gpt2, or llama: RMSNorm, rotary positions, SwiGLU MLP, no biases "
                       "(minirlhf.model.GPTConfig)", choices=list(ARCHS))
    n_kv_head: int | None = option(None, "key/value heads, shared by groups of query heads "
                                   "(default: n_head, no grouping)")
    block_size: int = option(128, "context length in tokens (bytes)")
    dropout: float = option(0.0, "dropout probability")
    batch_size: int = option(16, "windows per step")
    max_steps: int = option(1500, "optimisation steps")
    lr: float = option(3e-3, "peak learning rate")
    min_lr: float = option(3e-4, "learning rate at the end of the cosine decay")
    warmup_steps: int = option(100, "steps of linear warm-up")
    weight_decay: float = option(0.1, "AdamW's decoupled weight decay (weight matrices only)")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0: no clipping)")
    eval_interval: int = option(250, "estimate the validation loss every N steps")
    eval_batches: int = option(8, "batches in each validation estimate")
    sample_interval: int = option(1000, "print a sample every N steps (0: never)")
    ckpt_interval: int = option(500, "write a checkpoint every N steps (and at the end)")
    seed: int = option(1337, "seed of the weights and the batches")
    device: str = option("cpu", "cpu (NumPy) or cuda (CuPy)", choices=["cpu", "cuda"])
    overwrite: bool = overwrite_option()
    quiet: bool = option(False, "no progress bar or messages")


def check(cfg):
    check_common(cfg)
    for name in ("n_layer", "n_head", "n_embd", "block_size", "eval_batches"):
        require(getattr(cfg, name) >= 1, f"{name} must be at least 1, got {getattr(cfg, name)}")
    require(cfg.n_embd % cfg.n_head == 0,
            f"n_embd ({cfg.n_embd}) must be divisible by n_head ({cfg.n_head})")
    require(cfg.n_kv_head is None or (cfg.n_kv_head >= 1 and cfg.n_head % cfg.n_kv_head == 0),
            f"n_head ({cfg.n_head}) must be divisible by n_kv_head ({cfg.n_kv_head})")
    require(cfg.arch == "llama" or cfg.n_kv_head in (None, cfg.n_head),
            "n_kv_head differs from n_head only with --arch llama (GPT-2 has no grouped heads)")
    require(cfg.arch != "llama" or (cfg.n_embd // cfg.n_head) % 2 == 0,
            f"--arch llama needs an even head size n_embd/n_head, got {cfg.n_embd // cfg.n_head}")
    require(0 <= cfg.dropout < 1, f"dropout must be in [0, 1), got {cfg.dropout}")
    require(0 <= cfg.min_lr <= cfg.lr, f"min_lr must be in [0, lr], got {cfg.min_lr}")
    require(cfg.warmup_steps >= 0, f"warmup_steps must be >= 0, got {cfg.warmup_steps}")
    require(cfg.sample_interval >= 0, f"sample_interval must be >= 0, got {cfg.sample_interval}")


def evaluate(model, tokens, cfg):
    """Mean loss on ``eval_batches`` fixed, evenly spaced windows: the same windows every time."""
    T, B = cfg.block_size, cfg.batch_size
    n = cfg.eval_batches * B
    starts = np.linspace(0, len(tokens) - T - 1, n).astype(np.int64)
    losses = []
    model.eval()
    with no_grad():
        for i in range(0, n, B):
            s = starts[i:i + B]
            x = np.stack([tokens[j:j + T] for j in s])                   # (B, T)
            y = np.stack([tokens[j + 1:j + T + 1] for j in s])           # (B, T)
            logits = model(batch_tensor(x, cfg.device))                  # (B, T, V)
            losses.append(F.cross_entropy(logits, batch_tensor(y, cfg.device)).item())
    model.train()
    return float(np.mean(losses))


def sample_text(model, tokenizer, prompt="\n", max_new_tokens=200, seed=0):
    ids = [tokenizer.eot_id] + tokenizer.encode(prompt)
    out = generate(model, [ids], max_new_tokens, temperature=0.8, top_k=40,
                   eot_id=tokenizer.eot_id, seed=seed)
    return prompt + tokenizer.decode(out.tokens[0])


def pretrain(cfg):
    """Train a GPT on a text corpus; returns {"checkpoint", "val_loss", "train_loss", "steps", "seconds"}.

    Running it again with the same ``out_dir`` goes on from the last checkpoint (`Run`).
    """
    check(cfg)
    with Run(cfg, "pretrain") as run:
        return run.result if run.finished else _train(cfg, run)


def _train(cfg, run):
    tokenizer = ByteTokenizer()
    text = load_text(cfg.data)
    tokens = encode_corpus(text, tokenizer)
    try:
        train_tokens, val_tokens = train_val_split(tokens)
    except ValueError:                       # fewer than 20 tokens: the check below says it
        train_tokens = val_tokens = tokens[:0]
    if min(len(train_tokens), len(val_tokens)) <= cfg.block_size + 1:
        raise DataError(f"the corpus ({len(tokens)} tokens) is too short for block_size="
                        f"{cfg.block_size}: its training part (90%) and validation part (10%) each "
                        f"need more than block_size + 1 = {cfg.block_size + 1} tokens")

    model_cfg = GPTConfig(block_size=cfg.block_size, vocab_size=tokenizer.vocab_size,
                          n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                          dropout=cfg.dropout, n_kv_head=cfg.n_kv_head, **ARCHS[cfg.arch])
    model = GPT(model_cfg, seed=cfg.seed).to(cfg.device)
    optimizer = AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    data_rng = np.random.default_rng(cfg.seed + 1)
    start = run.restore(model, optimizer, rngs={"data": data_rng})
    run.print(f"pretrain: {model.num_parameters():,} parameters, {len(train_tokens):,} training "
              f"tokens, starting at step {start}\n{config_summary(cfg)}")

    val_loss = run.last.get("val_loss")
    for step in run.steps(start):
        optimizer.lr = lr_schedule(step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr)
        x, y = get_batch(train_tokens, cfg.block_size, cfg.batch_size, data_rng)
        logits = model(batch_tensor(x, cfg.device))                  # (B, T, V)
        loss_t = F.cross_entropy(logits, batch_tensor(y, cfg.device))
        loss, grad_norm = run.update(loss_t)

        metrics = {"loss": loss, "lr": optimizer.lr, "grad_norm": grad_norm}
        if step % cfg.eval_interval == 0 or step == cfg.max_steps:
            val_loss = metrics["val_loss"] = evaluate(model, val_tokens, cfg)
            run.print(f"step {step}: train loss {loss:.4f}, val loss {val_loss:.4f} nats/byte")
        run.log(step, metrics)
        if cfg.sample_interval and step % cfg.sample_interval == 0:
            run.print("--- sample ---\n" + sample_text(model, tokenizer, seed=step) + "\n--------------")
        run.save_if_due(step)
    if val_loss is None:
        val_loss = evaluate(model, val_tokens, cfg)
    loss = run.last.get("loss")
    return run.finish({"val_loss": val_loss, "train_loss": loss},
                      f"train loss {loss:.4f}, val loss {val_loss:.4f} nats/byte")
