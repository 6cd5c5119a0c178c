"""Checkpoints to and from Hugging Face: ``minirlhf export`` and ``minirlhf import``.

    minirlhf export --ckpt runs/dpo/ckpt.npz --out my-model    # a folder transformers loads
    minirlhf import --hf gpt2 --out gpt2.npz                    # a folder as a minirlhf checkpoint

GPT-2 configs are written as GPT-2, Llama-style ones as Llama (Qwen2 when q, k, v have biases).

Every stage's ``--init`` also reads a Hugging Face folder directly; import is for keeping a
checkpoint in one file. The imported file stores the folder's tokenizer (``extra["tokenizer"]``), so
the stages and ``export`` find it again (`minirlhf.checkpoint.tokenizer_for`).
"""

import sys
from dataclasses import dataclass

from ..checkpoint import load_model, save_checkpoint, tokenizer_for
from ..hf import load_hf, save_hf
from ..hf_tokenizer import HFTokenizer
from ..tokenizer import BPETokenizer
from .common import option


@dataclass
class ExportConfig:
    ckpt: str = option("", "a minirlhf checkpoint (.npz): a GPT or a RewardModel", required=True)
    out: str = option("", "the Hugging Face folder to write (GPT-2, Llama or Qwen2)", required=True)


@dataclass
class ImportConfig:
    hf: str = option("", "a Hugging Face GPT-2, Llama or Qwen2 folder (config.json, model.safetensors, "
                      "and its tokenizer)", required=True)
    out: str = option("", "the minirlhf checkpoint (.npz) to write", required=True)


def export(cfg):
    """Write ``cfg.ckpt``'s model and tokenizer as a Hugging Face folder; returns the folder."""
    model = load_model(cfg.ckpt)
    folder = save_hf(model, cfg.out, tokenizer_for(cfg.ckpt))
    print(f"export: {type(model).__name__} of {cfg.ckpt} -> {folder}", file=sys.stderr)
    return str(folder)


def import_hf(cfg):
    """Write the model of a Hugging Face folder (with its tokenizer) as one ``.npz``; returns the path."""
    model, tokenizer = load_hf(cfg.hf)
    extra = {"stage": "import", "source": cfg.hf}
    if isinstance(tokenizer, BPETokenizer) and not isinstance(tokenizer, HFTokenizer):
        vocab, merges = tokenizer.to_texts()
        extra["tokenizer"] = {"vocab.json": vocab, "merges.txt": merges}
    else:   # a tokenizer.json one: found again in the folder, as a stage's --init is followed back
        extra["init"] = cfg.hf
    path = save_checkpoint(cfg.out, model, model.config, extra=extra)
    print(f"import: {type(model).__name__} of {cfg.hf} -> {path}", file=sys.stderr)
    return path
