"""Make the tiny GPT-2 folders and the recordings that tests/test_hf.py and tests/test_bpe.py read.

    python scripts/make_hf_fixtures.py          # offline; needs torch, transformers and tokenizers

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


if __name__ == "__main__":
    main()
