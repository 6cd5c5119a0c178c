"""Checkpoints to and from Hugging Face: ``minirlhf export`` and ``minirlhf import``.

    minirlhf export --ckpt runs/dpo/ckpt.npz --out my-gpt2     # a folder transformers loads
    minirlhf import --hf gpt2 --out gpt2.npz                    # a folder as a minirlhf checkpoint

Every stage's ``--init`` also reads a Hugging Face folder directly; import is for keeping a
checkpoint in one file. The imported file stores the folder's tokenizer (``extra["tokenizer"]``), so
the stages and ``export`` find it again (`minirlhf.checkpoint.tokenizer_for`).
"""

import sys
from dataclasses import dataclass

from ..checkpoint import load_model, save_checkpoint, tokenizer_for
from ..hf import load_gpt2, save_gpt2
from ..tokenizer import BPETokenizer
from .common import option


@dataclass
class ExportConfig:
    ckpt: str = option("", "a minirlhf checkpoint (.npz): a GPT or a RewardModel", required=True)
    out: str = option("", "the Hugging Face GPT-2 folder to write", required=True)


@dataclass
class ImportConfig:
    hf: str = option("", "a Hugging Face GPT-2 folder (config.json, model.safetensors, vocab.json, "
                      "merges.txt)", required=True)
    out: str = option("", "the minirlhf checkpoint (.npz) to write", required=True)


def export(cfg):
    """Write ``cfg.ckpt``'s model and tokenizer as a Hugging Face folder; returns the folder."""
    model = load_model(cfg.ckpt)
    folder = save_gpt2(model, cfg.out, tokenizer_for(cfg.ckpt))
    print(f"export: {type(model).__name__} of {cfg.ckpt} -> {folder}", file=sys.stderr)
    return str(folder)


def import_hf(cfg):
    """Write the model of a Hugging Face folder (with its tokenizer) as one ``.npz``; returns the path."""
    model, tokenizer = load_gpt2(cfg.hf)
    extra = {"stage": "import", "source": cfg.hf}
    if isinstance(tokenizer, BPETokenizer):
        vocab, merges = tokenizer.to_texts()
        extra["tokenizer"] = {"vocab.json": vocab, "merges.txt": merges}
    path = save_checkpoint(cfg.out, model, model.config, extra=extra)
    print(f"import: {type(model).__name__} of {cfg.hf} -> {path}", file=sys.stderr)
    return path
