"""Make the tiny GPT-2, Llama and Qwen2 folders and the recordings that tests/test_hf.py,
tests/test_hf_llama.py and tests/test_bpe.py read.

    python scripts/make_hf_fixtures.py          # both; offline; needs torch, transformers, tokenizers
    python scripts/make_hf_fixtures.py gpt2     # only the GPT-2 ones (or: llama)

It writes, under tests/fixtures/ (well under 1 MB in all):

    gpt2_lm/     a GPT2LMHeadModel with random weights (2 layers, 32 wide, 16 positions) and a
                 byte-level BPE of 400 tokens trained on a piece of Hamlet by Hugging Face's
                 `tokenizers` (so its vocab.json orders the bytes as GPT-2's does, not as ours)
    gpt2_rm/     a GPT2ForSequenceClassification (num_labels=1) on the same shapes and vocabulary
    gpt2_logits.npz          token ids and what transformers computes from them, in float32 and
                             float64: the LM's logits, the reward model's rewards
    gpt2_tokenizer.json      transformers' GPT2Tokenizer encodings of tricky strings (spaces,
                             newlines, contractions, digits, emoji, <|endoftext|>) and decodings of
                             ids that are not whole UTF-8 characters

LayerNorm weights and all biases are drawn at random too (GPT-2 initialises them to 1 and 0, which
would hide a swapped or missing one). Run it again only to change the fixtures: the tests compare
against what it recorded.

The Llama family (`make_llama_fixtures`), with our byte-level vocabulary (258 tokens, written as
vocab.json/merges.txt) so that every stage's ``--init`` reads them:

    llama_lm/    a LlamaForCausalLM: 2 layers, 16 wide, 4 heads sharing 2 k/v heads, untied head
    llama_rm/    a LlamaForSequenceClassification (num_labels=1, pad_token_id 257) on those shapes
    qwen2_lm/    a Qwen2ForCausalLM: q/k/v biases, 1 k/v head, tied head, rope_theta 1e6, saved in
                 shards with a model.safetensors.index.json
    llama_logits.npz   per folder: logits of a batch, of the same batch run through transformers'
                       KV cache, of a left-padded batch (attention_mask and position ids counting
                       real tokens only), and the reward model's rewards, in float32 and float64

transformers computes LlamaRMSNorm in float32 and the rotary angles in float32 whatever the model's
dtype; for the float64 recordings both are patched to compute in float64 (the formula unchanged),
so that they are the float64 oracle the 1e-10 tests need.
"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, GPT2Tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from minirlhf.datasets import load_text  # noqa: E402

OUT = ROOT / "tests" / "fixtures"
VOCAB_SIZE = 400
SHAPE = dict(n_positions=16, n_embd=32, n_layer=2, n_head=4)
TRICKY = [
    "Hello world", " leading space", "two  spaces   three", "trailing  ", "\n", "a\n\nb\n \n  c",
    "It's they're we've I'm you'll he'd 'S", "1234567 3.14 2nd 10,000", "🎉 emoji 🎉🎉 👩‍👩‍👧", "tab\there",
    "Ça va? Über straße ñ 中文字 ١٢٣", "to be<|endoftext|>or not", "<|endoftext|>", "'''", "",
    "\u3000ideographic space", "e\u0301 combining", "!!!???...", "x" * 40,
]


def train_tokenizer(folder):
    """A byte-level BPE trained by `tokenizers` (GPT-2's pre-tokeniser), EOT as its last id."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE - 1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([load_text()[:60_000]], trainer)
    tok.model.save(str(folder))
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    return len(vocab)


def randomise(model, seed):
    """Every parameter random (N(0, 0.02) weights, LayerNorm weights near 1, biases near 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
                p.copy_(1 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.05 * noise)
            else:
                p.copy_(0.3 * noise)   # bigger than GPT-2's 0.02, so that logits differ visibly
    return model.eval()


def main():
    if OUT.exists():
        for name in ("gpt2_lm", "gpt2_rm"):
            shutil.rmtree(OUT / name, ignore_errors=True)
    lm_dir, rm_dir = OUT / "gpt2_lm", OUT / "gpt2_rm"
    lm_dir.mkdir(parents=True)
    vocab_size = train_tokenizer(lm_dir)
    eot = vocab_size - 1

    config = GPT2Config(vocab_size=vocab_size, bos_token_id=eot, eos_token_id=eot, **SHAPE)
    lm = randomise(GPT2LMHeadModel(config), seed=0)
    lm.save_pretrained(lm_dir)

    rm_config = GPT2Config(vocab_size=vocab_size, bos_token_id=eot, eos_token_id=eot,
                           pad_token_id=eot, num_labels=1, **SHAPE)
    rm = randomise(GPT2ForSequenceClassification(rm_config), seed=1)
    rm.save_pretrained(rm_dir)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(lm_dir / name, rm_dir / name)
    for folder in (lm_dir, rm_dir):
        (folder / "generation_config.json").unlink(missing_ok=True)

    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab_size, size=(3, SHAPE["n_positions"]))
    ids[ids == eot] = 0
    lengths = np.array([16, 9, 1])                       # right-padded with EOT (the pad id) after
    rm_ids = ids.copy()
    for row, n in enumerate(lengths):
        rm_ids[row, n:] = eot
    recorded = {"ids": ids, "rm_ids": rm_ids, "rm_lengths": lengths}
    for dtype, suffix in ((torch.float32, "32"), (torch.float64, "64")):
        with torch.no_grad():
            recorded["logits" + suffix] = lm.to(dtype)(torch.tensor(ids)).logits.numpy()
            recorded["rewards" + suffix] = rm.to(dtype)(torch.tensor(rm_ids)).logits[:, 0].numpy()
    np.savez_compressed(OUT / "gpt2_logits.npz", **recorded)

    tok = GPT2Tokenizer(str(lm_dir / "vocab.json"), str(lm_dir / "merges.txt"))
    cases = []
    for text in TRICKY:
        ids_ = tok(text)["input_ids"]
        cases.append({"text": text, "ids": ids_, "decoded": tok.decode(ids_)})
    emoji = tok("🎉")["input_ids"]
    broken = [emoji[:1], emoji[1:], emoji[:1] + tok("a")["input_ids"], [tok.convert_tokens_to_ids("ÿ")]]
    decodes = [{"ids": b, "text": tok.decode(b)} for b in broken]
    (OUT / "gpt2_tokenizer.json").write_text(
        json.dumps({"cases": cases, "decodes": decodes}, ensure_ascii=False, indent=1), encoding="utf-8")

    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({total / 1024:.0f} KiB); vocab {vocab_size}, EOT {eot}")


LLAMA_SHAPE = dict(vocab_size=258, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                   num_attention_heads=4, max_position_embeddings=64, rms_norm_eps=1e-6)


def randomise_llama(model, seed):
    """Every parameter random: norm weights near 1, biases near 0, the rest N(0, 0.3²)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.05 * noise)
            else:
                p.copy_(0.3 * noise)
    return model.eval()


def float64_patches():
    """Make RMSNorm and the rotary tables of Llama and Qwen2 compute in float64 for float64 inputs."""
    from transformers.models.llama import modeling_llama
    from transformers.models.qwen2 import modeling_qwen2

    def rms_forward(self, h, _orig=None):
        if h.dtype != torch.float64:
            return self._float32_forward(h)
        variance = h.pow(2).mean(-1, keepdim=True)
        return self.weight * (h * torch.rsqrt(variance + self.variance_epsilon))

    def rope_forward(self, x, position_ids):
        if x.dtype != torch.float64:
            return self._float32_forward(x, position_ids)
        c = self.config
        dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        theta = c.rope_parameters["rope_theta"]
        inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        freqs = position_ids[..., None].double() * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    for module, prefix in ((modeling_llama, "Llama"), (modeling_qwen2, "Qwen2")):
        norm, rope = getattr(module, prefix + "RMSNorm"), getattr(module, prefix + "RotaryEmbedding")
        norm._float32_forward, norm.forward = norm.forward, rms_forward
        rope._float32_forward, rope.forward = rope.forward, rope_forward


def record_llama(model, prefix, recorded, rng, reward=False):
    """What ``model`` computes, in float32 and float64, on a batch, through the KV cache (one
    token at a time after a prefill of 7), and on a left-padded batch; or, for a reward model, on
    right-padded rows."""
    V = model.config.vocab_size
    T, prefill = 10, 7
    ids = rng.integers(0, 256, size=(3, T))
    pad = np.array([0, 3, 6])                              # left padding of each row
    padded = ids.copy()
    for row, n in enumerate(pad):
        padded[row, :n] = 257
    mask = (np.arange(T)[None] >= pad[:, None]).astype(np.int64)
    positions = np.maximum(np.arange(T)[None] - pad[:, None], 0)
    recorded[prefix + "ids"], recorded[prefix + "pad"] = ids, pad
    lengths = np.array([T, 5, 1])                          # rewards: right-padded with 257
    rm_ids = ids.copy()
    for row, n in enumerate(lengths):
        rm_ids[row, n:] = 257
    if reward:
        recorded[prefix + "rm_ids"], recorded[prefix + "rm_lengths"] = rm_ids, lengths
    for dtype, suffix in ((torch.float32, "32"), (torch.float64, "64")):
        m = model.to(dtype)
        with torch.no_grad():
            if reward:
                recorded[prefix + "rewards" + suffix] = m(torch.tensor(rm_ids)).logits[:, 0].numpy()
                continue
            recorded[prefix + "logits" + suffix] = m(torch.tensor(ids)).logits.numpy()
            out = m(torch.tensor(ids[:, :prefill]), use_cache=True)
            steps, past = [], out.past_key_values           # only the steps after the prefill
            for t in range(prefill, T):
                out = m(torch.tensor(ids[:, t:t + 1]), past_key_values=past, use_cache=True)
                steps.append(out.logits)
                past = out.past_key_values
            recorded[prefix + "cached" + suffix] = torch.cat(steps, dim=1).numpy()
            recorded[prefix + "padded" + suffix] = m(
                torch.tensor(padded), attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(positions)).logits.numpy()
    assert recorded[prefix + ("rewards64" if reward else "logits64")].shape[0] == 3 and V == 258


def make_llama_fixtures():
    from transformers import (LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification,
                              Qwen2Config, Qwen2ForCausalLM)

    sys.path.insert(0, str(ROOT))
    from minirlhf.tokenizer import BPETokenizer

    float64_patches()
    for name in ("llama_lm", "llama_rm", "qwen2_lm"):
        shutil.rmtree(OUT / name, ignore_errors=True)
    specials = dict(bos_token_id=256, eos_token_id=256)
    llama = LlamaConfig(**LLAMA_SHAPE, num_key_value_heads=2, tie_word_embeddings=False,
                        rope_theta=10000.0, **specials)
    qwen = Qwen2Config(**LLAMA_SHAPE, num_key_value_heads=1, tie_word_embeddings=True,
                       rope_theta=1e6, use_sliding_window=False, **specials)
    rm_config = LlamaConfig(**LLAMA_SHAPE, num_key_value_heads=2, rope_theta=10000.0, num_labels=1,
                            pad_token_id=257, **specials)
    models = {"llama_lm": randomise_llama(LlamaForCausalLM(llama), seed=2),
              "llama_rm": randomise_llama(LlamaForSequenceClassification(rm_config), seed=3),
              "qwen2_lm": randomise_llama(Qwen2ForCausalLM(qwen), seed=4)}
    recorded, rng = {}, np.random.default_rng(1)
    for name, model in models.items():
        folder = OUT / name
        shards = {"max_shard_size": "20KB"} if name == "qwen2_lm" else {}
        model.save_pretrained(folder, **shards)
        (folder / "generation_config.json").unlink(missing_ok=True)
        BPETokenizer.byte_level().save(folder)
        record_llama(model, name + "/", recorded, rng, reward=name.endswith("_rm"))
    np.savez_compressed(OUT / "llama_logits.npz", **recorded)
    total = sum(p.stat().st_size for n in models for p in (OUT / n).rglob("*") if p.is_file())
    total += (OUT / "llama_logits.npz").stat().st_size
    print(f"wrote {', '.join(models)} and llama_logits.npz ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "all"
    if which in ("gpt2", "all"):
        main()
    if which in ("llama", "all"):
        make_llama_fixtures()
