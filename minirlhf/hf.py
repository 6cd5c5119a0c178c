"""Hugging Face GPT-2 folders in and out: ``load_gpt2`` and ``save_gpt2``.

A Hugging Face GPT-2 folder holds

    config.json          the architecture (n_layer, n_head, n_embd, n_positions, vocab_size, ...)
    model.safetensors    the weights, by name (``transformer.h.0.attn.c_attn.weight``, ...)
    vocab.json           the byte-level BPE vocabulary, {token: id}   (minirlhf.tokenizer)
    merges.txt           its merges, best first

minirlhf's GPT is GPT-2 with GPT-2's parameter names, and its `Linear` stores W as (in, out) as
GPT-2's Conv1D does, so the weights map one to one: the packed ``c_attn`` (C, 3C) is ours as it is,
nothing is transposed. What differs is only around the edges:

- the LM head: GPT-2's ``lm_head.weight`` is tied to ``wte`` (ours is ``wte`` itself); a folder
  whose head is not tied is refused;
- the prefix: ``GPT2Model`` (and the original ``gpt2`` upload) names its weights ``h.0...``, without
  ``transformer.``; both are read;
- the attention's causal-mask buffers ``attn.bias``/``attn.masked_bias`` in older files are skipped;
- the reward model is ``GPT2ForSequenceClassification``: its ``score`` (num_labels=1, no bias, stored
  (1, C) as torch's Linear) is our ``head`` (C, 1) transposed. Our head has a bias. A Bradley-Terry
  loss only sees reward differences, so the bias gets no gradient and stays at its initial 0; if it
  is not 0, ``save_gpt2`` folds it into ``ln_f``'s bias (b·w/|w|² added to the last hidden state
  adds exactly b to w·h, up to rounding), which only the score reads in that model.

Hugging Face reads a sequence-classification reward at the last token that is not
``pad_token_id``; minirlhf reads it at position ``length - 1`` of a right-padded row. The two agree
when the padding id never ends a real row: ``save_gpt2`` writes ``pad_token_id = tokenizer.pad_id``
(``<|pad|>``, 257, for byte-level models; for GPT-2's vocabulary, which has no padding token, EOT,
as Hugging Face pads GPT-2 - and then a row ending with EOT is read one token earlier there).

Reading and writing the weights needs the ``safetensors`` package: ``pip install 'minirlhf[hf]'``.
"""

import json
from pathlib import Path

import numpy as np

from .checkpoint import CheckpointError, non_finite
from .model import GPT, GPTConfig, RewardModel
from .tokenizer import BPETokenizer, ByteTokenizer

ARCHITECTURES = {"GPT2LMHeadModel": GPT, "GPT2Model": GPT, "GPT2ForSequenceClassification": RewardModel}
# config.json's switches of GPT-2 variants this GPT does not compute: (field, the value we compute)
UNSUPPORTED = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
               "reorder_and_upcast_attn": False, "add_cross_attention": False}
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")   # both are GELU's tanh form, as F.gelu
INSTALL = "pip install 'minirlhf[hf]'"


class HFError(CheckpointError):
    """A folder that is not a GPT-2 checkpoint minirlhf can read; the message says why."""


def is_hf_folder(path):
    """True for a folder with a ``config.json``: a Hugging Face checkpoint, not a minirlhf ``.npz``."""
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


# ===================================================================================================
# in


def load_gpt2(path, dtype="float32", device="cpu"):
    """(model, tokenizer) from a local Hugging Face GPT-2 folder.

    The model is a `GPT` (GPT2LMHeadModel, GPT2Model) or a `RewardModel`
    (GPT2ForSequenceClassification), in ``dtype`` on ``device``; the tokenizer is a `BPETokenizer`
    read from vocab.json/merges.txt, or a `ByteTokenizer` when those files describe exactly the bytes
    (a model trained here and exported). Dropout is 0: GPT-2's ``resid_pdrop``/``embd_pdrop`` were
    its pretraining's. Every problem is one `HFError` line.
    """
    folder = Path(path)
    config = read_config(folder)
    tokenizer = load_tokenizer(folder)
    if tokenizer is not None and tokenizer.vocab_size != config["vocab_size"]:
        raise HFError(f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                      f"vocab_size is {config['vocab_size']}")
    weights = _read_weights(folder)
    bad = non_finite(weights)   # refused as load_model refuses a diverged .npz
    if bad:
        raise HFError(f"{folder}: the weights {bad} are NaN or infinite")

    cls = ARCHITECTURES[config["architectures"][0]]
    try:
        gpt_config = GPTConfig(block_size=config["n_positions"], vocab_size=config["vocab_size"],
                               n_layer=config["n_layer"], n_head=config["n_head"],
                               n_embd=config["n_embd"], dropout=0.0, dtype=dtype)
    except ValueError as e:
        raise HFError(f"{folder / 'config.json'}: {e}") from None
    model = cls(gpt_config)
    state = _to_minirlhf_names(weights, folder, cls)
    _check_shapes(model, state, folder)
    model.load_state_dict(state)
    return model.to(device), tokenizer


def read_config(folder):
    """config.json of a GPT-2 folder, checked: anything this GPT would compute differently is refused."""
    folder = Path(folder)
    if not folder.is_dir():
        raise HFError(f"{folder}: no such folder")
    path = folder / "config.json"
    if not path.is_file():
        raise HFError(f"{folder} has no config.json: not a Hugging Face checkpoint folder")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise HFError(f"{path} is not valid JSON ({e})") from None

    model_type = config.get("model_type")
    architectures = config.get("architectures") or ["GPT2LMHeadModel"]
    if model_type != "gpt2" or architectures[0] not in ARCHITECTURES:
        raise HFError(f"{path}: model_type {model_type!r}, architectures {architectures}: minirlhf reads "
                      f"GPT-2 only (model_type 'gpt2', one of {', '.join(ARCHITECTURES)})")
    config["architectures"] = architectures
    activation = config.get("activation_function", "gelu_new")
    if activation not in ACTIVATIONS:
        raise HFError(f"{path}: activation_function {activation!r} is not supported (GPT-2's gelu_new only)")
    for field, ours in UNSUPPORTED.items():
        if config.get(field, ours) != ours:
            raise HFError(f"{path}: {field}={config[field]!r} is not supported (minirlhf computes {ours})")
    if config.get("layer_norm_epsilon", 1e-5) != 1e-5:
        raise HFError(f"{path}: layer_norm_epsilon={config['layer_norm_epsilon']} is not supported "
                      "(minirlhf's LayerNorm uses GPT-2's 1e-5)")
    for field in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
        if not isinstance(config.get(field), int):
            raise HFError(f"{path}: {field} is missing or not an integer")
    if config.get("n_ctx", config["n_positions"]) != config["n_positions"]:
        raise HFError(f"{path}: n_ctx={config['n_ctx']} differs from n_positions={config['n_positions']}; "
                      "minirlhf's context is both")
    if config.get("n_inner") not in (None, 4 * config["n_embd"]):
        raise HFError(f"{path}: n_inner={config['n_inner']} is not supported (the MLP is 4 * n_embd wide)")
    if architectures[0] == "GPT2ForSequenceClassification" and _num_labels(config) != 1:
        raise HFError(f"{path}: num_labels={_num_labels(config)}; a reward model has one")
    return config


def load_tokenizer(folder):
    """The tokenizer of a folder: `ByteTokenizer` if its files are the bytes with EOT 256 and PAD 257,
    else a `BPETokenizer`; None if the folder has no vocab.json."""
    folder = Path(folder)
    if not (folder / "vocab.json").is_file():
        return None
    if not (folder / "merges.txt").is_file():
        raise HFError(f"{folder} has vocab.json but no merges.txt")
    try:
        tokenizer = BPETokenizer.from_files(folder / "vocab.json", folder / "merges.txt")
    except (ValueError, KeyError) as e:
        raise HFError(str(e)) from None
    return ByteTokenizer() if tokenizer == BPETokenizer.byte_level() else tokenizer


def _num_labels(config):
    return config.get("num_labels", len(config.get("id2label") or {0: 0, 1: 1}))


def _safetensors():
    try:
        import safetensors.numpy
    except ImportError:
        raise HFError(f"Hugging Face checkpoints need the safetensors package: {INSTALL}") from None
    return safetensors.numpy


def _read_weights(folder):
    """{name: array} of model.safetensors (or of the shards its index lists)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    elif any((folder / name).is_file() for name in ("pytorch_model.bin", "model.bin")):
        raise HFError(
            f"{folder} holds PyTorch .bin weights, which minirlhf does not read (unpickling can run "
            "code); convert them once with transformers: python -c \"from transformers import "
            f"AutoModel as M; M.from_pretrained('{folder}').save_pretrained('{folder}')\"")
    else:
        raise HFError(f"{folder} has no model.safetensors")
    weights = {}
    for name in files:
        try:
            weights.update(_safetensors().load_file(str(folder / name)))
        except (OSError, ValueError, TypeError) as e:   # a damaged file, or bf16 that NumPy lacks
            raise HFError(f"{folder / name} cannot be read: {e}") from None
    return weights


def _to_minirlhf_names(weights, folder, cls):
    """Hugging Face's tensor names and layouts -> our state dict (the tied head and buffers dropped)."""
    state = {}
    for name, array in weights.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")) and array.ndim == 4:
            continue                                   # the causal mask, a buffer: no weight
        if name == "lm_head.weight":
            continue                                   # checked below: it must be wte
        if name == "score.weight":
            state["head.weight"] = array.T             # torch's (1, C) -> our (C, 1)
            continue
        state[name if name.startswith("transformer.") else "transformer." + name] = array
    wte = state.get("transformer.wte.weight")
    head = weights.get("lm_head.weight")
    if head is not None and wte is not None and not np.array_equal(head, wte):
        raise HFError(f"{folder}: lm_head.weight is not tied to wte; minirlhf's GPT ties them")
    if cls is RewardModel:
        if "head.weight" not in state:
            raise HFError(f"{folder}: a GPT2ForSequenceClassification without score.weight")
        state["head.bias"] = np.zeros(1, dtype=state["head.weight"].dtype)   # HF's score has none
    return state


def _check_shapes(model, state, folder):
    own = dict(model.named_parameters())
    for name, array in state.items():
        if name not in own:
            raise HFError(f"{folder}: unexpected tensor {name} {tuple(array.shape)}")
        if tuple(array.shape) != own[name].shape:
            raise HFError(f"{folder}: tensor {name} has shape {tuple(array.shape)} but config.json "
                          f"gives {own[name].shape}")
    missing = [name for name in own if name not in state]
    if missing:
        raise HFError(f"{folder}: missing tensors: {', '.join(missing[:5])}"
                      + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))


# ===================================================================================================
# out


def save_gpt2(model, path, tokenizer=None):
    """Write ``model`` (a `GPT` or `RewardModel`) as a Hugging Face GPT-2 folder at ``path``.

    ``transformers.GPT2LMHeadModel.from_pretrained(path)`` (``GPT2ForSequenceClassification`` for a
    reward model) loads it and computes the same logits. ``tokenizer`` (default: `ByteTokenizer` for
    a 258-token model) is written as vocab.json and merges.txt; a `ByteTokenizer` becomes a BPE with
    no merges whose ids are the bytes, 256 ``<|endoftext|>`` and 257 ``<|pad|>``, which encodes every
    text exactly as it does. Returns the folder.
    """
    if type(model) not in (GPT, RewardModel):   # a ValueModel would lose its head, silently
        raise HFError(f"save_gpt2: a {type(model).__name__} has no GPT-2 form: export the policy "
                      f"(ckpt.npz) or a reward model")
    folder = Path(path)
    config = model.config
    if tokenizer is None and config.vocab_size == ByteTokenizer.vocab_size:
        tokenizer = ByteTokenizer()
    if isinstance(tokenizer, ByteTokenizer):
        tokenizer = BPETokenizer.byte_level()
    if tokenizer is not None and tokenizer.vocab_size != config.vocab_size:
        raise HFError(f"save_gpt2: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                      f"vocab_size is {config.vocab_size}")
    if not config.bias:
        raise HFError("save_gpt2: GPT-2 has biases; a model with bias=False has no Hugging Face form")
    save_file = _safetensors().save_file
    folder.mkdir(parents=True, exist_ok=True)

    state = model.state_dict()
    tensors = {name: array for name, array in state.items() if name.startswith("transformer.")}
    if isinstance(model, RewardModel):
        w, b = state["head.weight"][:, 0], state["head.bias"][0]            # (C,), ()
        if b != 0 and not w @ w > 0:
            raise HFError("save_gpt2: the reward head's weight is zero and its bias is not: "
                          "Hugging Face's bias-free score cannot hold that constant reward")
        if b != 0:   # fold the bias into ln_f's: w·(h + b·w/|w|²) = w·h + b
            tensors["transformer.ln_f.bias"] = tensors["transformer.ln_f.bias"] + b * w / (w @ w)
        tensors["score.weight"] = state["head.weight"].T                    # (1, C)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})

    eot = tokenizer.eot_id if tokenizer is not None else None
    (folder / "config.json").write_text(json.dumps(_hf_config(model, eot, tokenizer), indent=2) + "\n",
                                        encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save(folder)
        specials = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                    "pad_token": tokenizer.special_ids[tokenizer.pad_id]}
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "GPT2Tokenizer", "model_max_length": config.block_size,
             "add_prefix_space": False, **specials}, indent=2) + "\n", encoding="utf-8")
        (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n",
                                                        encoding="utf-8")
    return folder


def _hf_config(model, eot, tokenizer):
    """config.json for ``model``: GPT-2's fields, the ones this GPT fixes written out explicitly."""
    c = model.config
    reward = isinstance(model, RewardModel)
    config = {
        "architectures": ["GPT2ForSequenceClassification" if reward else "GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": c.vocab_size, "n_positions": c.block_size, "n_ctx": c.block_size,
        "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": 0.0,   # see model.py
        "initializer_range": 0.02, "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True, "use_cache": True,
        "bos_token_id": eot, "eos_token_id": eot,
        "torch_dtype": str(np.dtype(c.dtype)),
    }
    if reward:
        config.update(id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0}, num_labels=1,
                      pad_token_id=tokenizer.pad_id if tokenizer is not None else None)
    return config
