"""Hugging Face folders in and out: ``load_hf``/``save_hf`` for GPT-2, Llama and Qwen2 (and
``load_gpt2``/``save_gpt2``, GPT-2 only).

GPT-2 first; the Llama family's mapping is at the end of this docstring.

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

Llama and Qwen2 (``LlamaForCausalLM``, ``Qwen2ForCausalLM`` and their ``*ForSequenceClassification``)
are a `GPTConfig` with ``norm="rms", pos="rope", mlp="swiglu"`` (see `minirlhf.model`). Their tensors
are torch Linears, stored (out, in), and q, k, v come in three; ours are (in, out) and packed:

    model.embed_tokens                 transformer.wte
    model.layers.i.input_layernorm     transformer.h.i.ln_1       (post_attention_layernorm: ln_2)
    self_attn.{q,k,v}_proj             attn.c_attn  = [qᵀ | kᵀ | vᵀ]  (biases side by side: Qwen2)
    self_attn.o_proj                   attn.c_proj  = o_projᵀ
    mlp.up_proj, gate_proj, down_proj  mlp.c_fc, mlp.c_gate, mlp.c_proj  (each transposed)
    model.norm                         transformer.ln_f
    lm_head (untied), score            lm_head = lm_headᵀ, head = scoreᵀ

What is not computed here is refused by name, in one line: rope scaling other than linear and
llama3, sliding-window attention, mixtures of experts, a head size other than n_embd/n_head,
Llama's attention_bias/mlp_bias (biases on o_proj and the MLP).

Reading and writing the weights needs the ``safetensors`` package: ``pip install 'minirlhf[hf]'``.
"""

import json
from pathlib import Path

import numpy as np

from .hf_tokenizer import HFTokenizer, TokenizerFileError, load_hf_tokenizer, save_hf_tokenizer
from .model import GPT, GPTConfig, RewardModel
from .nn import non_finite
from .rotary import ROPE_SCALINGS
from .tokenizer import BPETokenizer, ByteTokenizer

ARCHITECTURES = {"GPT2LMHeadModel": GPT, "GPT2Model": GPT, "GPT2ForSequenceClassification": RewardModel}
# config.json's switches of GPT-2 variants this GPT does not compute: (field, the value we compute)
UNSUPPORTED = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
               "reorder_and_upcast_attn": False, "add_cross_attention": False}
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")   # both are GELU's tanh form, as F.gelu
INSTALL = "pip install 'minirlhf[hf]'"


class HFError(Exception):
    """A folder that is not a checkpoint minirlhf can read (or a model with no Hugging Face form);
    the message says why."""


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
    weights = _read_weights(folder, config["architectures"][0])
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


def _config_json(folder):
    """config.json of a folder, as a dict (one HFError line if there is none or it is not JSON)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise HFError(f"{folder}: no such folder")
    path = folder / "config.json"
    if not path.is_file():
        raise HFError(f"{folder} has no config.json: not a Hugging Face checkpoint folder")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise HFError(f"{path} is not valid JSON ({e})") from None


def read_config(folder):
    """config.json of a GPT-2 folder, checked: anything this GPT would compute differently is refused."""
    path = Path(folder) / "config.json"
    config = _config_json(folder)
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


def _read_weights(folder, architecture):
    """{name: array} of model.safetensors (or of the shards its index lists)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as e:
            raise HFError(f"{index} is not a safetensors index (no weight_map: {e})") from None
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    elif any(folder.glob("*.bin")):
        raise HFError(
            f"{folder} holds PyTorch .bin weights; minirlhf reads safetensors only (unpickling can run "
            "code): convert them once with transformers: python -c \"from transformers import "
            f"{architecture} as M; M.from_pretrained('{folder}').save_pretrained('{folder}', "
            "safe_serialization=True)\"")
    else:
        raise HFError(f"{folder} has no model.safetensors")
    weights = {}
    for name in files:
        if not (folder / name).is_file():
            raise HFError(f"{folder}: the shard {name} that {index.name} lists is missing")
        try:
            try:
                weights.update(_safetensors().load_file(str(folder / name)))
            except TypeError as e:                       # bfloat16, which NumPy lacks
                if "bfloat16" not in str(e):
                    raise
                weights.update(read_bfloat16_safetensors(folder / name))
        except (OSError, ValueError, TypeError, KeyError) as e:   # a damaged file
            raise HFError(f"{folder / name} cannot be read: {e}") from None
    return weights


SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4",
                      "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}


def read_bfloat16_safetensors(path):
    """{name: array} of a safetensors file holding bfloat16 tensors (SmolLM's and Qwen's uploads),
    read as float32. The format is 8 bytes of header length, a JSON header {name: {dtype, shape,
    data_offsets}}, then the bytes; a bfloat16 is the upper half of a float32, so it becomes one
    by a 16-bit shift, exactly."""
    raw = np.fromfile(path, dtype=np.uint8)
    n = int(raw[:8].view("<u8")[0])
    header = json.loads(raw[8:8 + n].tobytes().decode("utf-8"))
    data, out = raw[8 + n:], {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        chunk = data[start:end]
        if info["dtype"] == "BF16":
            array = (chunk.view("<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            array = chunk.view(SAFETENSORS_DTYPES[info["dtype"]])
        out[name] = array.reshape(info["shape"])
    return out


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


def load_hf(path, dtype="float32", device="cpu"):
    """(model, tokenizer) from a local Hugging Face folder: GPT-2 (`load_gpt2`), Llama or Qwen2.

    The model is a `GPT` (``*ForCausalLM``) or a `RewardModel` (``*ForSequenceClassification``) in
    ``dtype`` on ``device``. The tokenizer: `load_folder_tokenizer`. Every problem is one `HFError` line.
    """
    folder = Path(path)
    config = _config_json(folder)
    if config.get("model_type", "gpt2") == "gpt2":
        return load_gpt2(folder, dtype, device)
    gpt_config, cls = llama_config(config, folder, dtype)
    tokenizer = load_folder_tokenizer(folder)
    if tokenizer is not None and tokenizer.vocab_size > gpt_config.vocab_size:
        raise HFError(f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                      f"vocab_size is {gpt_config.vocab_size}")
    weights = _read_weights(folder, config["architectures"][0])
    bad = non_finite(weights)
    if bad:
        raise HFError(f"{folder}: the weights {bad} are NaN or infinite")
    model = cls(gpt_config)
    state = _llama_to_minirlhf(weights, gpt_config, folder, cls)
    _check_shapes(model, state, folder)
    model.load_state_dict(state)
    return model.to(device), tokenizer


def load_folder_tokenizer(folder):
    """The tokenizer of a Hugging Face folder: vocab.json/merges.txt (GPT-2's files) if present, else
    tokenizer.json (`minirlhf.hf_tokenizer.load_hf_tokenizer`, with its chat template); None if the
    folder has neither."""
    folder = Path(folder)
    if (folder / "vocab.json").is_file() or not (folder / "tokenizer.json").is_file():
        return load_tokenizer(folder)
    try:
        return load_hf_tokenizer(folder)
    except TokenizerFileError as e:
        raise HFError(str(e)) from None


LLAMA_ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", GPT), "LlamaForSequenceClassification": ("llama", RewardModel),
    "Qwen2ForCausalLM": ("qwen2", GPT), "Qwen2ForSequenceClassification": ("qwen2", RewardModel),
}
# config.json fields (with the value we compute) of features this model does not have
LLAMA_UNSUPPORTED = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
                     "use_sliding_window": False, "pretraining_tp": 1}
MOE_FIELDS = ("num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size")


def llama_config(config, folder, dtype="float32"):
    """(GPTConfig, GPT or RewardModel) of a Llama or Qwen2 config.json, checked field by field."""
    path = Path(folder) / "config.json"
    model_type = config.get("model_type")
    architectures = config.get("architectures") or [{"llama": "LlamaForCausalLM",
                                                     "qwen2": "Qwen2ForCausalLM"}.get(model_type)]
    arch = architectures[0]
    if arch not in LLAMA_ARCHITECTURES or LLAMA_ARCHITECTURES[arch][0] != model_type:
        raise HFError(f"{path}: model_type {model_type!r}, architectures {architectures}: minirlhf reads "
                      f"GPT-2, Llama and Qwen2 only ({', '.join(['GPT2LMHeadModel', *LLAMA_ARCHITECTURES])})")
    for field, ours in LLAMA_UNSUPPORTED.items():
        if field == "attention_bias" and model_type == "qwen2":
            continue                                     # Qwen2's q, k, v biases: always there
        if config.get(field, ours) not in (ours, None):
            raise HFError(f"{path}: {field}={config[field]!r} is not supported (minirlhf computes {ours})")
    for field in MOE_FIELDS:
        if config.get(field):
            raise HFError(f"{path}: {field}={config[field]!r}: mixtures of experts are not supported")
    for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "intermediate_size", "max_position_embeddings"):
        if not isinstance(config.get(field), int):
            raise HFError(f"{path}: {field} is missing or not an integer")
    C, nh = config["hidden_size"], config["num_attention_heads"]
    if config.get("head_dim") not in (None, C // nh):
        raise HFError(f"{path}: head_dim={config['head_dim']} is not supported (minirlhf's head size "
                      f"is hidden_size / num_attention_heads = {C // nh})")
    theta, scaling = _rope(config, path)
    if arch.endswith("ForSequenceClassification") and _num_labels(config) != 1:
        raise HFError(f"{path}: num_labels={_num_labels(config)}; a reward model has one")
    try:
        gpt_config = GPTConfig(
            block_size=config["max_position_embeddings"], vocab_size=config["vocab_size"],
            n_layer=config["num_hidden_layers"], n_head=nh, n_embd=C, dropout=0.0, bias=False,
            dtype=dtype, norm="rms", pos="rope", mlp="swiglu",
            n_kv_head=config.get("num_key_value_heads") or nh, n_inner=config["intermediate_size"],
            rope_theta=theta, rope_scaling=scaling, rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=model_type == "qwen2")
    except (TypeError, ValueError) as e:
        raise HFError(f"{path}: {e}") from None
    return gpt_config, LLAMA_ARCHITECTURES[arch][1]


def _rope(config, path):
    """(rope_theta, rope_scaling) of a config.json: the old fields (``rope_theta``, ``rope_scaling``)
    or transformers 5's ``rope_parameters``; scaling types other than linear/llama3 refused."""
    params = dict(config.get("rope_parameters") or {})
    theta = params.pop("rope_theta", config.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in (None, "default"):
        return float(theta), None
    if kind not in ROPE_SCALINGS:
        raise HFError(f"{path}: rope_scaling type {kind!r} is not supported (none, "
                      f"{', '.join(ROPE_SCALINGS)})")
    return float(theta), {k: v for k, v in scaling.items() if k != "type"} | {"rope_type": kind}


def _llama_to_minirlhf(weights, config, folder, cls):
    """transformers' Llama/Qwen2 tensors -> our state dict: q, k, v packed, Linears transposed."""
    original = {name[len("model."):] if name.startswith("model.") else name: name for name in weights}
    w = {short: weights[name] for short, name in original.items()}
    used = set()

    def take(name):
        if name not in w:
            full = name if name.startswith(("lm_head", "score")) else "model." + name
            raise HFError(f"{folder}: missing tensor {full} (does config.json describe these weights?)")
        used.add(name)
        return w[name]

    state = {"transformer.wte.weight": take("embed_tokens.weight"),
             "transformer.ln_f.weight": take("norm.weight")}
    for i in range(config.n_layer):
        src, dst = f"layers.{i}.", f"transformer.h.{i}."
        state[dst + "ln_1.weight"] = take(src + "input_layernorm.weight")
        state[dst + "ln_2.weight"] = take(src + "post_attention_layernorm.weight")
        qkv = [take(f"{src}self_attn.{p}_proj.weight") for p in "qkv"]
        _check_rows(qkv, [config.n_embd, config.n_kv_head * config.head_size, config.n_kv_head * config.head_size],
                    [f"model.{src}self_attn.{p}_proj.weight" for p in "qkv"], folder)
        state[dst + "attn.c_attn.weight"] = np.concatenate([a.T for a in qkv], axis=1)
        if config.attention_bias:
            state[dst + "attn.c_attn.bias"] = np.concatenate(
                [take(f"{src}self_attn.{p}_proj.bias") for p in "qkv"])
        state[dst + "attn.c_proj.weight"] = take(src + "self_attn.o_proj.weight").T
        for ours, theirs in (("c_fc", "up_proj"), ("c_gate", "gate_proj"), ("c_proj", "down_proj")):
            state[dst + f"mlp.{ours}.weight"] = take(f"{src}mlp.{theirs}.weight").T
    if cls is RewardModel:
        state["head.weight"] = take("score.weight").T                      # (1, C) -> (C, 1)
        state["head.bias"] = np.zeros(1, dtype=state["head.weight"].dtype)   # HF's score has none
    elif not config.tie_word_embeddings:
        state["lm_head.weight"] = take("lm_head.weight").T                 # (V, C) -> (C, V)
    elif "lm_head.weight" in w:
        used.add("lm_head.weight")
        if not np.array_equal(w["lm_head.weight"], w["embed_tokens.weight"]):
            raise HFError(f"{folder}: tie_word_embeddings is true but lm_head.weight differs from "
                          "embed_tokens.weight")
    extra = sorted(set(w) - used - {n for n in w if n.endswith("rotary_emb.inv_freq")})
    if extra:
        raise HFError(f"{folder}: unexpected tensor {original[extra[0]]} {tuple(w[extra[0]].shape)} "
                      "(does config.json describe these weights?)")
    return state


def _check_rows(arrays, rows, names, folder):
    for a, n, name in zip(arrays, rows, names):
        if a.ndim != 2 or a.shape[0] != n:
            raise HFError(f"{folder}: tensor {name} has shape {tuple(a.shape)} but config.json "
                          f"gives ({n}, ...)")


# ===================================================================================================
# out


def save_hf(model, path, tokenizer=None):
    """Write ``model`` (a `GPT` or `RewardModel`) as a Hugging Face folder: GPT-2 (`save_gpt2`) for
    a GPT-2 config, else Llama, or Qwen2 when it has q/k/v biases (``attention_bias``).

    ``AutoModelForCausalLM.from_pretrained(path)`` (``AutoModelForSequenceClassification`` for a
    reward model) loads it and computes the same logits. Returns the folder.
    """
    if _is_gpt2(model.config):
        return save_gpt2(model, path, tokenizer)
    _check_savable(model, "save_hf")
    c = model.config
    if (c.norm, c.pos, c.mlp, c.bias) != ("rms", "rope", "swiglu", False):
        raise HFError(f"save_hf: norm={c.norm!r}, pos={c.pos!r}, mlp={c.mlp!r}, bias={c.bias} is neither "
                      "GPT-2 (layer, learned, gelu, bias) nor Llama/Qwen2 (rms, rope, swiglu, no bias): "
                      "it has no Hugging Face form")
    tokenizer = _tokenizer_to_write(tokenizer, c, "save_hf")
    reward = isinstance(model, RewardModel)
    state = model.state_dict()
    if reward and state["head.bias"][0] != 0:
        raise HFError("save_hf: the reward head has a bias, which Llama's bias-free score cannot hold")
    tensors = {"model.embed_tokens.weight": state["transformer.wte.weight"],
               "model.norm.weight": state["transformer.ln_f.weight"]}
    C, kv = c.n_embd, c.n_kv_head * c.head_size
    for i in range(c.n_layer):
        src, dst = f"transformer.h.{i}.", f"model.layers.{i}."
        tensors[dst + "input_layernorm.weight"] = state[src + "ln_1.weight"]
        tensors[dst + "post_attention_layernorm.weight"] = state[src + "ln_2.weight"]
        w = state[src + "attn.c_attn.weight"]                                # (C, C + 2kv)
        for name, cols in zip("qkv", (slice(0, C), slice(C, C + kv), slice(C + kv, C + 2 * kv))):
            tensors[dst + f"self_attn.{name}_proj.weight"] = w[:, cols].T
            if c.attention_bias:
                tensors[dst + f"self_attn.{name}_proj.bias"] = state[src + "attn.c_attn.bias"][cols]
        tensors[dst + "self_attn.o_proj.weight"] = state[src + "attn.c_proj.weight"].T
        for ours, theirs in (("c_fc", "up_proj"), ("c_gate", "gate_proj"), ("c_proj", "down_proj")):
            tensors[dst + f"mlp.{theirs}.weight"] = state[src + f"mlp.{ours}.weight"].T
    if reward:
        tensors["score.weight"] = state["head.weight"].T                     # (1, C)
    elif not c.tie_word_embeddings:
        tensors["lm_head.weight"] = state["lm_head.weight"].T                # (V, C)
    folder = _write_weights(tensors, path)
    _write_config(folder, _llama_hf_config(model, tokenizer))
    _write_tokenizer(folder, tokenizer, c.block_size)
    return folder


def _is_gpt2(c):
    return (c.norm, c.pos, c.mlp, c.n_kv_head, c.n_inner, c.tie_word_embeddings, c.attention_bias) == (
        "layer", "learned", "gelu", c.n_head, 4 * c.n_embd, True, False)


def _check_savable(model, fn):
    if type(model) not in (GPT, RewardModel):   # a ValueModel would lose its head, silently
        raise HFError(f"{fn}: a {type(model).__name__} has no Hugging Face form: export the policy "
                      f"(ckpt.npz) or a reward model")


def _tokenizer_to_write(tokenizer, config, fn):
    if tokenizer is None and config.vocab_size == ByteTokenizer.vocab_size:
        tokenizer = ByteTokenizer()
    if isinstance(tokenizer, ByteTokenizer):
        tokenizer = BPETokenizer.byte_level()
    # a GPT-2 BPE's ids are exactly the model's; a tokenizer.json one may have fewer (a padded embedding)
    exact = isinstance(tokenizer, BPETokenizer) and not isinstance(tokenizer, HFTokenizer)
    if tokenizer is not None and (tokenizer.vocab_size > config.vocab_size
                                  or exact and tokenizer.vocab_size != config.vocab_size):
        raise HFError(f"{fn}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                      f"vocab_size is {config.vocab_size}")
    return tokenizer


def _write_weights(tensors, path):
    save_file = _safetensors().save_file
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    return folder


def _write_config(folder, config):
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _write_tokenizer(folder, tokenizer, block_size):
    """vocab.json/merges.txt and GPT2Tokenizer's small files for a `BPETokenizer`; tokenizer.json and
    its config (chat template included) for one read from a tokenizer.json."""
    if tokenizer is None:
        return
    if isinstance(tokenizer, HFTokenizer):
        save_hf_tokenizer(tokenizer, folder, model_max_length=block_size)
        return
    tokenizer.save(folder)
    specials = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                "pad_token": tokenizer.special_ids[tokenizer.pad_id]}
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "model_max_length": block_size,
         "add_prefix_space": False, **specials}, indent=2) + "\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n",
                                                    encoding="utf-8")


def _pad_token_id(tokenizer, fn):
    """The padding id a reward model's config must carry (transformers reads the reward at the last
    token that is not it, and refuses batches without it): the tokenizer's pad token, else EOS."""
    if tokenizer is None:
        raise HFError(f"{fn}: a reward model needs its tokenizer (pass tokenizer=) to write pad_token_id")
    pad = getattr(tokenizer, "pad_id", None)
    return pad if pad is not None else tokenizer.eot_id


def _llama_hf_config(model, tokenizer):
    c = model.config
    reward = isinstance(model, RewardModel)
    qwen = c.attention_bias
    name = "Qwen2" if qwen else "Llama"
    eot = getattr(tokenizer, "eot_id", None)
    rope = {"rope_type": "default", "rope_theta": c.rope_theta, **(c.rope_scaling or {})}
    config = {
        "architectures": [name + ("ForSequenceClassification" if reward else "ForCausalLM")],
        "model_type": name.lower(),
        "vocab_size": c.vocab_size, "hidden_size": c.n_embd, "intermediate_size": c.n_inner,
        "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head,
        "num_key_value_heads": c.n_kv_head, "head_dim": c.head_size,
        "max_position_embeddings": c.block_size, "hidden_act": "silu", "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta, "rope_scaling": c.rope_scaling, "rope_parameters": rope,
        "tie_word_embeddings": c.tie_word_embeddings, "attention_dropout": 0.0,
        "initializer_range": 0.02, "use_cache": True, "bos_token_id": eot, "eos_token_id": eot,
        "torch_dtype": str(np.dtype(c.dtype)),
    }
    if qwen:
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=c.n_layer)
    else:
        config.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    if reward:
        config.update(id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0}, num_labels=1,
                      pad_token_id=_pad_token_id(tokenizer, "save_hf"))
    return config


def save_gpt2(model, path, tokenizer=None):
    """Write ``model`` (a `GPT` or `RewardModel`) as a Hugging Face GPT-2 folder at ``path``.

    ``transformers.GPT2LMHeadModel.from_pretrained(path)`` (``GPT2ForSequenceClassification`` for a
    reward model) loads it and computes the same logits. ``tokenizer`` (default: `ByteTokenizer` for
    a 258-token model) is written as vocab.json and merges.txt; a `ByteTokenizer` becomes a BPE with
    no merges whose ids are the bytes, 256 ``<|endoftext|>`` and 257 ``<|pad|>``, which encodes every
    text exactly as it does. A reward model's config carries ``pad_token_id``. Returns the folder.
    """
    _check_savable(model, "save_gpt2")
    config = model.config
    if not _is_gpt2(config):
        raise HFError("save_gpt2: this model is not GPT-2 (norm, pos, mlp, heads or head differ): "
                      "use save_hf")
    tokenizer = _tokenizer_to_write(tokenizer, config, "save_gpt2")
    if not config.bias:
        raise HFError("save_gpt2: GPT-2 has biases; a model with bias=False has no Hugging Face form")
    reward = isinstance(model, RewardModel)
    pad = _pad_token_id(tokenizer, "save_gpt2") if reward else None

    state = model.state_dict()
    tensors = {name: array for name, array in state.items() if name.startswith("transformer.")}
    if reward:
        w, b = state["head.weight"][:, 0], state["head.bias"][0]            # (C,), ()
        if b != 0 and not w @ w > 0:
            raise HFError("save_gpt2: the reward head's weight is zero and its bias is not: "
                          "Hugging Face's bias-free score cannot hold that constant reward")
        if b != 0:   # fold the bias into ln_f's: w·(h + b·w/|w|²) = w·h + b
            tensors["transformer.ln_f.bias"] = tensors["transformer.ln_f.bias"] + b * w / (w @ w)
        tensors["score.weight"] = state["head.weight"].T                    # (1, C)
    folder = _write_weights(tensors, path)
    eot = tokenizer.eot_id if tokenizer is not None else None
    _write_config(folder, _hf_config(model, eot, pad))
    _write_tokenizer(folder, tokenizer, config.block_size)
    return folder


def _hf_config(model, eot, pad):
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
                      pad_token_id=pad)
    return config
