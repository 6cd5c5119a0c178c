"""Hugging Face ``tokenizer.json`` in and out: the byte-level BPE of Llama-3, Qwen2, SmolLM and GPT-2.

    tok = load_hf_tokenizer("Qwen2.5-0.5B-Instruct")      # a folder with tokenizer.json
    tok.encode("<|im_start|>user\\nHi<|im_end|>", special=True)
    save_hf_tokenizer(tok, "exported")                     # tokenizer.json + tokenizer_config.json

A ``tokenizer.json`` describes a pipeline, applied to each stretch of text between added tokens:

    added tokens   "<|im_start|>", "<|endoftext|>", ...: found in the text first, never split
    normalizer     none, or NFC (Qwen2)
    pre-tokenizer  cut the text into pre-tokens: a Split by a regex (Llama-3, Qwen2), ByteLevel's
                   own GPT-2 regex (GPT-2), Digits (each digit alone), in sequence
    model          BPE: each pre-token's UTF-8 bytes merged by the ranked merges (`BPETokenizer`)
    decoder        ByteLevel: the tokens' bytes joined and read as UTF-8

`HFTokenizer` is `BPETokenizer` with that pipeline in front: the merge loop, its cache, the byte
alphabet and decoding are BPETokenizer's; this file reads the JSON and pre-tokenizes. The regexes
are written for Oniguruma (\\p{L}, \\p{N}); `minirlhf.tokenizer.translate_pattern` turns them into
Python `re` patterns, so no `regex` package is needed.

Special tokens follow the project's rule (see `minirlhf.tokenizer`): ``encode(text)`` never turns the
text "<|im_start|>" into its id, ``encode(text, special=True)`` does, as Hugging Face's ``encode``
does by default. Added tokens that are not special (Qwen2's ``<tool_call>``) are ordinary text
pieces with their own id, matched in both cases, as Hugging Face matches them. ``eot_id`` is the
folder's ``eos_token`` (tokenizer_config.json), ``bos_id`` its ``bos_token`` (None if it has none),
``pad_id`` its ``pad_token``, else ``eot_id`` (as TRL pads). Hugging Face's post-processor (which
puts Llama-3's ``<|begin_of_text|>`` in front) is not applied by ``encode``: minirlhf's data code
places the start token itself (`minirlhf.datasets`).
"""

import json
import pathlib
import re
import unicodedata

from .tokenizer import BYTE_TO_CHAR, CHAR_TO_BYTE, EOT_TEXT, GPT2_PATTERN, BPETokenizer, ByteTokenizer, \
    translate_pattern


class TokenizerFileError(ValueError):
    """A tokenizer.json this module cannot read; the message names the file and what is wrong."""


class HFTokenizer(BPETokenizer):
    """Byte-level BPE read from a ``tokenizer.json``: `BPETokenizer` plus added tokens, a normalizer
    and a pre-tokenizer pipeline. Build it with `load_hf_tokenizer` or `HFTokenizer.from_json`."""

    def __init__(self, vocab, merges, added_tokens, pre_tokenizer, normalizer=None,
                 ignore_merges=False, eos_token=EOT_TEXT, bos_token=None, pad_token=None,
                 chat_template=None, source=None, config=None):
        # added_tokens: [{"id", "content", "special"}]; the names the model stops and pads with count
        # as special, whatever the file says, so that eot_id and pad_id name tokens
        controls = {eos_token, bos_token, pad_token}
        specials = {t["content"]: t["id"] for t in added_tokens if t["special"] or t["content"] in controls}
        super().__init__(vocab, merges, specials, eos_token=eos_token, pad_token=pad_token)
        self.added_tokens = {t["content"]: t["id"] for t in added_tokens if t["content"] not in specials}
        self.id_to_bytes.update({i: name.encode("utf-8") for name, i in self.added_tokens.items()})
        self.vocab_size = max([self.vocab_size, *[i + 1 for i in self.added_tokens.values()]])
        self.bos_id = specials.get(bos_token)
        self.pre_tokenizer = pre_tokenizer      # compiled patterns, each an isolated split, in order
        self.normalizer = normalizer            # None or "NFC"
        self.ignore_merges = ignore_merges
        self.chat_template = chat_template
        self.source, self.config = source, dict(config or {})

    # ----- the pipeline --------------------------------------------------------------------------
    def _matched_tokens(self, special):
        return {**self.added_tokens, **self.special_tokens} if special else self.added_tokens

    def normalize(self, text: str) -> str:
        """The text as the normalizer leaves it (NFC, or unchanged)."""
        return unicodedata.normalize("NFC", text) if self.normalizer == "NFC" else text

    def pretokenize(self, text: str) -> list[str]:
        """The pre-tokens of a text holding no added token: normalize, then each split in turn.

        A split is "isolated", as all these files use it: every match is a pre-token, and so is the
        text between two matches.
        """
        pieces = [self.normalize(text)]
        for pattern in self.pre_tokenizer:
            pieces = [part for piece in pieces for part in _isolated(pattern, piece)]
        return pieces

    def _bpe(self, data: bytes) -> list[int]:
        """`BPETokenizer._bpe`, except that with ``ignore_merges`` (Llama-3) a pre-token that is a
        whole token of the vocabulary is that token, whatever the merges would make of it."""
        if self.ignore_merges and data in self.vocab:
            return [self.vocab[data]]
        return super()._bpe(data)

    # ----- files ---------------------------------------------------------------------------------
    @classmethod
    def from_json(cls, data: dict, config: dict | None = None, chat_template: str | None = None,
                  where: str = "tokenizer.json") -> "HFTokenizer":
        """The tokenizer of a parsed tokenizer.json (``data``) and tokenizer_config.json (``config``)."""
        config = config or {}
        model = data.get("model") or {}
        kind = model.get("type", "BPE" if "merges" in model else None)
        if kind != "BPE":
            raise TokenizerFileError(f"{where}: the model type is {kind!r}; minirlhf reads byte-level "
                                     "BPE only (not Unigram, WordPiece or WordLevel)")
        if not isinstance(model.get("vocab"), dict):
            raise TokenizerFileError(f"{where}: the BPE model has no vocab object")
        for field in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "byte_fallback"):
            if model.get(field):
                raise TokenizerFileError(f"{where}: BPE with {field}={model[field]!r} is not supported")

        added = []
        for t in data.get("added_tokens") or []:
            for flag in ("single_word", "lstrip", "rstrip"):
                if t.get(flag):
                    raise TokenizerFileError(f"{where}: the added token {t['content']!r} has {flag}=true, "
                                             "which is not supported")
            added.append({"id": t["id"], "content": t["content"], "special": bool(t.get("special"))})
        added_ids = {t["id"] for t in added}

        vocab = {}
        for token, i in model["vocab"].items():
            if i in added_ids:          # GPT-2 lists <|endoftext|> in both: the added token wins
                continue
            if not all(c in CHAR_TO_BYTE for c in token):
                raise TokenizerFileError(f"{where}: the token {token!r} is not byte-level BPE "
                                         "(a character outside the ByteLevel alphabet)")
            vocab[_bytes(token)] = i
        merges = []
        for n, merge in enumerate(model.get("merges") or []):
            pair = merge.split(" ") if isinstance(merge, str) else merge
            if len(pair) != 2 or any(c not in CHAR_TO_BYTE for c in "".join(pair)):
                raise TokenizerFileError(f"{where}: merge {n} is not two byte-level tokens: {merge!r}")
            merges.append((_bytes(pair[0]), _bytes(pair[1])))

        names = [t["content"] for t in added]
        eos = _token_name(config.get("eos_token")) or (EOT_TEXT if EOT_TEXT in names else None)
        if eos not in names:
            raise TokenizerFileError(f"{where}: no end-of-sequence token (tokenizer_config.json's "
                                     f"eos_token is {eos!r}, which is not an added token)")
        bos, pad = _token_name(config.get("bos_token")), _token_name(config.get("pad_token"))
        for role, name in (("bos_token", bos), ("pad_token", pad)):
            if name is not None and name not in names:
                raise TokenizerFileError(f"{where}: tokenizer_config.json's {role} {name!r} is not an added token")
        try:
            return cls(vocab, merges, added, _pre_tokenizer(data.get("pre_tokenizer"), where),
                       _normalizer(data.get("normalizer"), where), bool(model.get("ignore_merges")),
                       eos_token=eos, bos_token=bos, pad_token=pad, chat_template=chat_template,
                       source=data, config=config)
        except ValueError as e:
            raise TokenizerFileError(f"{where}: {e}") from None

    def to_json(self) -> dict:
        """tokenizer.json's contents: the file this tokenizer was read from, unchanged."""
        return self.source

    def __eq__(self, other):
        return (isinstance(other, HFTokenizer) and self.source == other.source
                and (self.eot_id, self.bos_id, self.pad_id, self.chat_template)
                == (other.eot_id, other.bos_id, other.pad_id, other.chat_template))

    def __repr__(self):
        return (f"HFTokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, "
                f"eot_id={self.eot_id}, bos_id={self.bos_id}, pad_id={self.pad_id})")


def _isolated(pattern, text):
    """``text`` cut at every match of ``pattern``: the matches and the stretches between them."""
    pieces, end = [], 0
    for match in pattern.finditer(text):
        pieces += [text[end:match.start()], match.group()]
        end = match.end()
    pieces.append(text[end:])
    return [p for p in pieces if p]


def _bytes(token: str) -> bytes:
    return bytes(CHAR_TO_BYTE[c] for c in token)


def _token_name(entry):
    """A token as tokenizer_config.json writes it: a string, or an AddedToken dict with "content"."""
    return entry.get("content") if isinstance(entry, dict) else entry


def _pre_tokenizer(spec, where):
    """The pre-tokenizer of tokenizer.json as a list of compiled patterns, each an isolated split."""
    if spec is None:
        return []
    kind = spec.get("type")
    if kind == "Sequence":
        return [p for step in spec["pretokenizers"] for p in _pre_tokenizer(step, where)]
    if kind == "ByteLevel":
        if spec.get("add_prefix_space"):
            raise TokenizerFileError(f"{where}: ByteLevel with add_prefix_space=true is not supported")
        return [_compile(GPT2_PATTERN, where)] if spec.get("use_regex", True) else []
    if kind == "Split":
        pattern = spec.get("pattern") or {}
        if spec.get("behavior") != "Isolated" or spec.get("invert"):
            raise TokenizerFileError(f"{where}: a Split with behavior {spec.get('behavior')!r}, "
                                     f"invert={spec.get('invert')} is not supported (Isolated only)")
        if "Regex" in pattern:
            return [_compile(pattern["Regex"], where)]
        if "String" in pattern:
            return [re.compile(re.escape(pattern["String"]))]
        raise TokenizerFileError(f"{where}: a Split without a pattern: {spec!r}")
    if kind == "Digits":   # Rust's is_numeric: the N categories; one pre-token per digit or per run
        return [_compile(r"\p{N}" if spec.get("individual_digits") else r"\p{N}+", where)]
    raise TokenizerFileError(f"{where}: the pre-tokenizer {kind!r} is not supported "
                             "(Split, ByteLevel, Digits and Sequences of them are)")


def _compile(pattern, where):
    try:
        return re.compile(translate_pattern(pattern))
    except (ValueError, re.error) as e:
        raise TokenizerFileError(f"{where}: the pre-tokenizer pattern {pattern!r} is not supported ({e})") from None


def _normalizer(spec, where):
    """None or "NFC": the normalizers of byte-level BPE files (a Sequence of them included)."""
    if spec is None:
        return None
    steps = spec.get("normalizers") if spec.get("type") == "Sequence" else [spec]
    kinds = [step.get("type") for step in steps]
    if kinds == []:
        return None
    if kinds == ["NFC"]:
        return "NFC"
    raise TokenizerFileError(f"{where}: the normalizer {kinds} is not supported (none or NFC)")


# ===================================================================================================
# folders


def load_hf_tokenizer(folder) -> HFTokenizer:
    """The tokenizer of a Hugging Face folder: ``tokenizer.json``, with ``tokenizer_config.json``'s
    eos/bos/pad tokens and chat template (or ``chat_template.jinja``, which wins) when present.
    ``folder`` may also be the path of a tokenizer.json. Every problem is one `TokenizerFileError`."""
    path = pathlib.Path(folder)
    file = path if path.is_file() else path / "tokenizer.json"
    if not file.is_file():
        raise TokenizerFileError(f"{path}: no tokenizer.json")
    data = _read_json(file)
    config_file = file.with_name("tokenizer_config.json")
    config = _read_json(config_file) if config_file.is_file() else {}
    template = config.get("chat_template")
    if isinstance(template, list):   # several named templates: the one called "default"
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    jinja_file = file.with_name("chat_template.jinja")
    if jinja_file.is_file():
        template = jinja_file.read_text(encoding="utf-8")
    try:
        return HFTokenizer.from_json(data, config, template, where=str(file))
    except (KeyError, TypeError, AttributeError) as e:   # a field missing or of the wrong kind
        raise TokenizerFileError(f"{file}: not a tokenizer.json as Hugging Face writes it "
                                 f"({type(e).__name__}: {e})") from None


def _read_json(file):
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise TokenizerFileError(f"{file} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise TokenizerFileError(f"{file}: expected a JSON object")
    return data


def save_hf_tokenizer(tokenizer, folder, model_max_length=None):
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``folder``; returns the folder.

    An `HFTokenizer` writes back the file it was read from, with its config (eos, bos and pad tokens,
    chat template). A `BPETokenizer` or `ByteTokenizer` trained here becomes GPT-2's pipeline (a
    ByteLevel pre-tokenizer and decoder), its special tokens added tokens, so that transformers'
    ``AutoTokenizer`` reads the folder with the same ids.
    """
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(tokenizer, ByteTokenizer):
        tokenizer = BPETokenizer.byte_level()
    if isinstance(tokenizer, HFTokenizer):
        data, config = tokenizer.to_json(), dict(tokenizer.config)
        if tokenizer.chat_template is not None:
            config["chat_template"] = tokenizer.chat_template
    else:
        data, config = _gpt2_json(tokenizer), {}
    names = tokenizer.special_ids
    config.update({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": names[tokenizer.eot_id],
                   "pad_token": names[tokenizer.pad_id],
                   "bos_token": names.get(getattr(tokenizer, "bos_id", None))})
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    config.pop("added_tokens_decoder", None)    # tokenizer.json's added_tokens say it, and say it right
    (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n",
                                                  encoding="utf-8")
    return folder


def _gpt2_json(tokenizer: BPETokenizer) -> dict:
    """tokenizer.json of a `BPETokenizer`: GPT-2's pipeline, its vocabulary and merges."""
    text = lambda token: "".join(BYTE_TO_CHAR[b] for b in token)
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    added = [{"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for name, i in sorted(tokenizer.special_tokens.items(),
                                                                          key=lambda item: item[1])]
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": None, "pre_tokenizer": byte_level, "post_processor": None, "decoder": byte_level,
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": False,
                      "vocab": {text(t): i for t, i in sorted(tokenizer.vocab.items(), key=lambda item: item[1])},
                      "merges": [[text(a), text(b)] for a, b in tokenizer.merges]}}
