"""Generate text from a checkpoint: ``minirlhf sample --ckpt runs/demo/pretrain/ckpt.npz --prompt "Ham."``
(the demo's pretrained model; ``minirlhf pretrain`` writes ``runs/pretrain/ckpt.npz``, the default)."""

from dataclasses import dataclass

from ..checkpoint import load_model, tokenizer_for
from ..model import GPT, generate
from .common import ConfigError, check_common, option, require


@dataclass
class SampleConfig:
    ckpt: str = option("runs/pretrain/ckpt.npz", "a GPT checkpoint (from pretrain, sft, rl or dpo)")
    prompt: str = option("\n", "text to continue")
    num_samples: int = option(1, "how many continuations")
    max_new_tokens: int = option(300, "tokens (bytes) to add")
    temperature: float = option(0.8, "0 = greedy; higher = more random")
    top_k: int | None = option(None, "sample only among the k most likely tokens")
    top_p: float | None = option(None, "sample only among the most likely tokens whose mass reaches p")
    seed: int = option(0, "sampling seed")
    device: str = option("cpu", "cpu (NumPy) or cuda (CuPy)", choices=["cpu", "cuda"])


def sample(cfg):
    """Print ``num_samples`` continuations of ``prompt``; returns them as a list of strings."""
    check_common(cfg)
    require(cfg.num_samples >= 1, f"num_samples must be at least 1, got {cfg.num_samples}")
    require(cfg.max_new_tokens >= 1, f"max_new_tokens must be at least 1, got {cfg.max_new_tokens}")
    model = load_model(cfg.ckpt, cfg.device)
    require(isinstance(model, GPT), f"{cfg.ckpt} holds a {type(model).__name__}, not a GPT to sample from")
    tok = tokenizer_for(cfg.ckpt)
    ids = [tok.eot_id] + tok.encode(cfg.prompt)
    try:
        out = generate(model, [ids] * cfg.num_samples, cfg.max_new_tokens, temperature=cfg.temperature,
                       top_k=cfg.top_k, top_p=cfg.top_p, eot_id=tok.eot_id, seed=cfg.seed)
    except ValueError as e:  # bad sampling settings: say which
        raise ConfigError(str(e)) from None
    texts = [cfg.prompt + tok.decode(t) for t in out.tokens]
    for i, text in enumerate(texts):
        if cfg.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print(text)
    return texts
