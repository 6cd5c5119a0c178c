"""Checkpoints: the model, the optimizer, the step and the RNG state in one ``.npz`` file.

The file is a plain NumPy archive (readable with ``np.load(path, allow_pickle=False)``, no pickle
anywhere, so loading a file cannot run code). Its entries are

    __header__                      JSON bytes: format name and version, model class, config, step,
                                    and the structure of everything else
    model/<parameter name>          one array per parameter
    optimizer/state/<i>/m, ...      the optimizer's per-parameter arrays
    rng/..., extra/...              arrays inside the RNG state or the extra metadata, if any

In the header an array is written ``{"__array__": "<entry name>"}``, so nested dicts of arrays and
numbers (an optimizer state, an RNG state) come back as they were saved, with string dict keys.

Saving writes a temporary file in the same folder, fsyncs it, then renames it over ``path``
(``os.replace`` is atomic): a crash leaves either the old checkpoint or the new one, never half a file.
The file gets the permissions of any new file (the umask decides), not those of a temporary file.
Weights that are NaN or infinite are never written, and a file that holds some is refused on loading.
"""

import contextlib
import dataclasses
import json
import os
import tempfile

import numpy as np

from . import backend
from .nn import non_finite  # noqa: F401  (re-exported: the trainers' runs check with it too)

FORMAT = "minirlhf-checkpoint"
VERSION = 1
# config fields that change the shapes or the meaning of the weights (dropout and dtype do not)
ARCHITECTURE_FIELDS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "bias", "norm", "pos",
                       "mlp", "n_kv_head", "n_inner", "rope_theta", "rope_scaling", "rms_norm_eps",
                       "tie_word_embeddings", "attention_bias")


class CheckpointError(Exception):
    """The file is missing, truncated, not a minirlhf checkpoint, or for another model."""


def save_checkpoint(path, model, config, optimizer=None, step=0, rng_state=None, extra=None):
    """Write ``model`` (and optionally the optimizer, step, RNG state, extra metadata) to ``path``.

    ``rng_state``: a ``numpy.random.Generator``, its ``bit_generator.state``, or a dict of them
    (e.g. ``{"data": data_rng, "dropout": model.dropout_rng}``); Generators are saved as their state.
    ``extra``: any JSON-like metadata (numbers, strings, lists, dicts, NumPy arrays).
    """
    path = os.fspath(path)
    state = model.state_dict()
    bad = non_finite(state)
    if bad:
        raise CheckpointError(f"{path}: not written: the weights {bad} are NaN or infinite")
    arrays = {}
    header = {
        "format": FORMAT,
        "version": VERSION,
        "model_class": type(model).__name__,
        "config": _config_dict(config),
        "step": int(step),
        "model": _pack(state, "model", arrays),
        "optimizer": _pack(optimizer.state_dict(), "optimizer", arrays) if optimizer else None,
        "rng_state": _pack(rng_state, "rng", arrays),
        "extra": _pack(extra, "extra", arrays),
    }
    arrays["__header__"] = np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8)

    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        os.chmod(tmp, 0o666 & ~_umask())         # mkstemp makes 0600; a checkpoint is an ordinary file
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())                 # the bytes are on disk before the rename
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_folder(folder)                        # and so is the rename
    return path


def load_checkpoint(path, model=None, optimizer=None):
    """Read a checkpoint: {"config", "model_class", "model" (name -> array), "optimizer", "step",
    "rng_state", "extra", "version"}.

    With ``model`` (and ``optimizer``), also check that the checkpoint is of the same architecture and
    load the weights (and optimizer state) into them, in place, on their device.
    Every problem is a `CheckpointError` whose message names the file.
    """
    path = os.fspath(path)
    arrays, header = _read(path)
    ckpt = {
        "version": header["version"],
        "model_class": header.get("model_class"),
        "config": header.get("config"),
        "step": header.get("step", 0),
        "model": _unpack(header.get("model"), arrays, path),
        "optimizer": _unpack(header.get("optimizer"), arrays, path),
        "rng_state": _unpack(header.get("rng_state"), arrays, path),
        "extra": _unpack(header.get("extra"), arrays, path),
    }
    if model is not None:
        _check_finite(path, ckpt["model"])
        _check_architecture(path, ckpt, model)
        try:
            model.load_state_dict(ckpt["model"])
        except ValueError as e:
            raise CheckpointError(f"{path}: the weights do not fit the model: {e}") from None
    if optimizer is not None:
        if ckpt["optimizer"] is None:
            raise CheckpointError(f"{path}: the checkpoint holds no optimizer state")
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError, IndexError) as e:
            raise CheckpointError(f"{path}: the optimizer state does not fit the optimizer: {e}") from None
    return ckpt


def load_model(path, device="cpu"):
    """Rebuild the model saved in ``path`` (a `GPT`, `RewardModel` or `ValueModel`) with its weights,
    on ``device``.

    ``path`` may also be a Hugging Face folder (one with a config.json; GPT-2, Llama or Qwen2):
    `minirlhf.hf.load_hf`.
    """
    from .model import GPT, GPTConfig, RewardModel, ValueModel  # here: checkpoint.py works alone
    from .hf import is_hf_folder, load_hf   # hf.py never imports checkpoint.py: no import loop

    if is_hf_folder(path):
        return load_hf(path, device=device)[0]
    ckpt = load_checkpoint(path)
    classes = {"GPT": GPT, "RewardModel": RewardModel, "ValueModel": ValueModel}
    if ckpt["model_class"] not in classes:
        raise CheckpointError(f"{path}: cannot rebuild a model of class {ckpt['model_class']!r} "
                              f"(known: {', '.join(classes)})")
    try:
        config = GPTConfig(**ckpt["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad model config {ckpt['config']}: {e}") from None
    _check_finite(path, ckpt["model"])
    model = classes[ckpt["model_class"]](config)
    try:
        model.load_state_dict(ckpt["model"])
    except ValueError as e:
        raise CheckpointError(f"{path}: the weights do not fit the model: {e}") from None
    return model.to(device)


def tokenizer_for(path):
    """The tokenizer a model in ``path`` reads: what the JSONL stages must encode with.

    A Hugging Face folder: its vocab.json/merges.txt (or tokenizer.json, `minirlhf.hf.load_folder_tokenizer`).
    A ``.npz``: the tokenizer stored in its
    ``extra["tokenizer"]`` (``minirlhf import`` puts it there); else that of the checkpoint it was
    trained from (``extra["init"]``, which every trainer records), followed back to where the run
    began; else the byte tokenizer, if the model has its 258 tokens.
    """
    from .hf import is_hf_folder, load_folder_tokenizer
    from .tokenizer import BPETokenizer, ByteTokenizer

    seen = []
    while True:
        if is_hf_folder(path):
            tokenizer = load_folder_tokenizer(path)
            if tokenizer is None:
                raise CheckpointError(f"{path} has no vocab.json (nor a tokenizer.json minirlhf reads): "
                                      "which tokenizer does the model read?")
            return tokenizer
        header = read_header(path)
        extra, config = header.get("extra") or {}, header.get("config") or {}
        if isinstance(extra.get("tokenizer"), dict):
            stored = extra["tokenizer"]
            return BPETokenizer.from_texts(stored["vocab.json"], stored["merges.txt"], where=str(path))
        seen.append(str(path))
        init = extra.get("init")
        if isinstance(init, str) and os.path.exists(init) and init not in seen:
            path = init
            continue
        if config.get("vocab_size") == ByteTokenizer.vocab_size:
            return ByteTokenizer()
        raise CheckpointError(f"{seen[0]}: the model has {config.get('vocab_size')} tokens and no "
                              f"tokenizer was found with it (looked in: {', '.join(seen)})")


def read_header(path):
    """The header of a checkpoint without reading its arrays (an .npz is read member by member)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return json.loads(npz["__header__"].tobytes().decode("utf-8"))
    except Exception:   # not found, not a checkpoint, ...: _read says precisely what is wrong
        return _read(path)[1]


def rng_from_state(state):
    """A new ``numpy.random.Generator`` in the saved ``state`` (a ``bit_generator.state`` dict)."""
    bit_generator = getattr(np.random, state["bit_generator"])()
    bit_generator.state = state
    return np.random.Generator(bit_generator)


# ===================================================================================================
# helpers


def _read(path):
    """(arrays, header) of a checkpoint file, or a CheckpointError that says what is wrong."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file") from None
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read: {e}") from None
    if magic != b"PK\x03\x04":  # every .npz is a zip archive, and every zip starts so
        raise CheckpointError(f"{path} is not a minirlhf checkpoint (not a .npz archive)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except Exception as e:  # BadZipFile, EOFError, a bad .npy header, ...: all one answer
        raise CheckpointError(f"{path} is damaged (truncated or corrupt: {type(e).__name__}: {e})") from None
    not_arrays = [name for name, a in arrays.items() if not isinstance(a, np.ndarray)]
    if not_arrays:  # NpzFile hands back raw bytes for a member that is not a .npy array
        raise CheckpointError(f"{path} is damaged (entries that are not arrays: {', '.join(not_arrays)})")
    if "__header__" not in arrays:
        raise CheckpointError(f"{path} is a .npz archive but not a minirlhf checkpoint (no header)")
    try:
        header = json.loads(arrays.pop("__header__").tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: the checkpoint header is not valid JSON ({e})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a minirlhf checkpoint (format "
                              f"{header.get('format') if isinstance(header, dict) else None!r})")
    if not isinstance(header.get("version"), int) or header["version"] > VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {header.get('version')!r} is newer "
                              f"than this minirlhf reads ({VERSION}); upgrade minirlhf")
    return arrays, header


def _check_finite(path, weights):
    bad = non_finite(weights or {})
    if bad:
        raise CheckpointError(f"{path}: the weights {bad} are NaN or infinite (the run that wrote it "
                              f"diverged); use an earlier checkpoint")


def _umask():
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def _check_architecture(path, ckpt, model):
    if ckpt["model_class"] != type(model).__name__:
        raise CheckpointError(f"{path} holds a {ckpt['model_class']}, not a {type(model).__name__}")
    config = getattr(model, "config", None)
    if config is None or ckpt["config"] is None:
        return
    ours, theirs = _config_dict(config), ckpt["config"]
    if dataclasses.is_dataclass(config):   # fields an older checkpoint lacks take their defaults
        try:
            theirs = dataclasses.asdict(type(config)(**theirs))
        except (TypeError, ValueError):
            pass
    diff = [f"{k}: checkpoint {theirs.get(k)!r} vs model {ours.get(k)!r}"
            for k in ARCHITECTURE_FIELDS if k in ours and theirs.get(k) != ours.get(k)]
    if diff:
        raise CheckpointError(f"{path} is for another architecture: " + "; ".join(diff))


def _config_dict(config):
    if config is None:
        return None
    if dataclasses.is_dataclass(config):
        return dataclasses.asdict(config)
    return dict(config)


def _pack(obj, key, arrays):
    """A JSON-able copy of ``obj`` with every array moved into ``arrays`` under its path."""
    if isinstance(obj, np.random.Generator):
        obj = obj.bit_generator.state
    if hasattr(obj, "__array__") and hasattr(obj, "shape") and not isinstance(obj, np.generic):
        arrays[key] = backend.to_numpy(obj)
        return {"__array__": key}
    if isinstance(obj, dict):
        return {str(k): _pack(v, f"{key}/{k}", arrays) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_pack(v, f"{key}/{i}", arrays) for i, v in enumerate(obj)]
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"save_checkpoint: cannot store {key} of type {type(obj).__name__} "
                    "(use numbers, strings, lists, dicts and arrays)")


def _unpack(obj, arrays, path):
    if isinstance(obj, dict):
        if set(obj) == {"__array__"}:
            try:
                return arrays[obj["__array__"]]
            except KeyError:
                raise CheckpointError(f"{path} is damaged: array {obj['__array__']!r} is missing") from None
        return {k: _unpack(v, arrays, path) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unpack(v, arrays, path) for v in obj]
    return obj


def _fsync_folder(folder):
    """Make the rename itself durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
