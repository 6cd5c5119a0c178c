"""Tokenizers: bytes (`ByteTokenizer`, what the models trained here read) and GPT-2's byte-level BPE
(`BPETokenizer`, what a GPT-2 checkpoint reads; below, after the byte tokenizer). Both have one
interface: ``encode``, ``decode``, ``eot_id``, ``pad_id``, ``vocab_size``, ``special_tokens``.

The byte-level tokenizer: the 256 UTF-8 bytes plus two special tokens.

Token ids 0..255 are the bytes of the UTF-8 encoding of the text, so every
string round-trips exactly and there is no vocabulary file to train or ship.
Two ids sit above the bytes:

    EOT = 256   "<|endoftext|>"  ends a document; also used as the start token
                                  placed before every prompt (see datasets.py)
    PAD = 257   "<|pad|>"        fills the right end of short rows in a batch

No string can encode to a special id: ``encode("<|endoftext|>")`` gives the
13 bytes of those characters, not 256. Specials only enter a sequence when
code puts them there on purpose, so a user's text can never forge the end of a
document (the mistake that lets a prompt inject a fake turn boundary).

The price of bytes is length: a sequence is as many tokens as the text has
bytes (one per ASCII character). For a teaching model on Shakespeare that is
the right trade.

    >>> tok = ByteTokenizer()
    >>> tok.encode("Hi!")
    [72, 105, 33]
    >>> tok.decode([72, 105, 33, tok.eot_id])
    'Hi!'
    >>> tok.decode([72, 105, 33, tok.eot_id], show_special=True)
    'Hi!<|endoftext|>'
"""

import collections
import functools
import json
import math
import pathlib
import re
import sys
import unicodedata
from numbers import Integral

EOT = 256
PAD = 257
VOCAB_SIZE = 258

EOT_TEXT = "<|endoftext|>"
PAD_TEXT = "<|pad|>"


class ByteTokenizer:
    """Text <-> token ids, one id per UTF-8 byte, plus ``EOT`` and ``PAD``."""

    eot_id = EOT
    pad_id = PAD
    vocab_size = VOCAB_SIZE
    special_tokens = {EOT_TEXT: EOT, PAD_TEXT: PAD}

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of ``text`` as a list of ints in 0..255.

        Never returns a special id, whatever the text says.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        try:
            return list(text.encode("utf-8"))
        except UnicodeEncodeError as err:
            # Only lone surrogates (e.g. "\ud800") get here; they are not text.
            raise ValueError(
                f"cannot encode the character {text[err.start]!r} at position "
                f"{err.start}: it has no UTF-8 encoding (a lone surrogate)"
            ) from None

    def encode_batch(self, texts) -> list[list[int]]:
        """``encode`` applied to each string of ``texts``."""
        if isinstance(texts, str):
            raise TypeError("encode_batch expects a list of str, got one str; use encode")
        return [self.encode(text) for text in texts]

    def decode(self, ids, show_special: bool = False) -> str:
        """The text of a sequence of token ids (a list, tuple or 1-D array).

        Special tokens are dropped, or written as their names
        (``<|endoftext|>``, ``<|pad|>``) when ``show_special`` is true. Bytes
        that are not valid UTF-8, as a freshly initialised model will happily
        sample, become U+FFFD instead of raising. A special token is a hard
        boundary: the bytes on its two sides are decoded separately, so a
        character split by a special shows up as broken rather than being
        silently glued back together.
        """
        ids = self._check_ids(ids)

        pieces, run = [], bytearray()
        for i in ids:
            if i < 256:
                run.append(i)
                continue
            pieces.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            if show_special:
                pieces.append(EOT_TEXT if i == EOT else PAD_TEXT)
        pieces.append(run.decode("utf-8", errors="replace"))
        return "".join(pieces)

    def decode_batch(self, batch, show_special: bool = False) -> list[str]:
        """``decode`` applied to each row of ``batch`` (a list of lists or a 2-D array)."""
        return [self.decode(ids, show_special=show_special) for ids in batch]

    def _check_ids(self, ids) -> list[int]:
        return _check_ids(ids, self.vocab_size)

    def __repr__(self):
        return (f"ByteTokenizer(vocab_size={self.vocab_size}, "
                f"eot_id={self.eot_id}, pad_id={self.pad_id})")


def _check_ids(ids, vocab_size) -> list[int]:
    """``ids`` as a list of Python ints, or a clear error naming the bad one."""
    # tolist() turns NumPy and CuPy arrays alike into Python ints in one step.
    if hasattr(ids, "tolist"):
        if getattr(ids, "ndim", 1) != 1:
            raise ValueError(
                f"decode expects one 1-D sequence of ids, got an array of shape "
                f"{ids.shape}; use decode_batch for a batch"
            )
        ids = ids.tolist()
    if isinstance(ids, (str, bytes)):
        raise TypeError(f"decode expects a sequence of int ids, got {type(ids).__name__}")

    ids = list(ids)
    for position, i in enumerate(ids):
        if not isinstance(i, Integral) or isinstance(i, bool):
            raise TypeError(
                f"token id at position {position} is {i!r} "
                f"({type(i).__name__}), not an int"
            )
        if not 0 <= i < vocab_size:
            raise ValueError(
                f"token id {i} at position {position} is out of range: "
                f"ids must be in 0..{vocab_size - 1}"
            )
    return [int(i) for i in ids]


# The tokenizer has no state, so one shared instance serves everyone.
tokenizer = ByteTokenizer()


# ===================================================================================================
# GPT-2's byte-level BPE
#
# Byte-pair encoding (Sennrich et al., 2016) as GPT-2 uses it: text is first cut into pre-tokens
# (words with their leading space, runs of digits, of punctuation, of whitespace), each pre-token's
# UTF-8 bytes start as one token each, and a ranked list of merges glues adjacent tokens together,
# always the best-ranked pair first, until no listed pair is left. Tokens are byte strings, so any
# text round-trips and no character is ever unknown.


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from the 256 byte values to 256 printable characters (vocab.json's alphabet).

    vocab.json and merges.txt are text files, and a token such as b" the" must be written in them
    without spaces or control characters. GPT-2 keeps the 188 bytes that print as themselves
    ('!'..'~', '¡'..'¬', '®'..'ÿ') and moves the other 68 to U+0100 and up, in byte order: the space
    b" " becomes "Ġ", the newline "Ċ".
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + n) for n, b in enumerate(moved)})
    return table


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}

# GPT-2's pre-tokenisation pattern, as OpenAI wrote it for the `regex` package:
#     's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
# Python's `re` has no \p{L} (letters) or \p{N} (numbers), so `translate_pattern` spells them out as
# character ranges read from `unicodedata`, and \s as Unicode's White_Space list (what \s means in
# `regex` and in Oniguruma, which Hugging Face's tokenizers use; `re`'s own \s would add
# U+001C..U+001F).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_WHITE_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_PRETOKENIZER = None


@functools.lru_cache(maxsize=None)
def _category_ranges(prefix):
    """A character-class body (``\\U0000-\\U0001...``) of every code point whose Unicode general
    category starts with ``prefix`` ("L": Lu Ll Lt Lm Lo; "N": Nd Nl No; "Lu": upper-case letters)."""
    ranges, start = [], None
    for cp in range(sys.maxunicode + 2):
        inside = cp <= sys.maxunicode and unicodedata.category(chr(cp)).startswith(prefix)
        if inside and start is None:
            start = cp
        elif not inside and start is not None:
            ranges.append(f"\\U{start:08x}-\\U{cp - 1:08x}")
            start = None
    return "".join(ranges)


_CATEGORIES = {"L", "Lu", "Ll", "Lt", "Lm", "Lo", "M", "Mn", "Mc", "Me", "N", "Nd", "Nl", "No",
               "P", "Pc", "Pd", "Ps", "Pe", "Pi", "Pf", "Po", "S", "Sm", "Sc", "Sk", "So",
               "Z", "Zs", "Zl", "Zp", "C", "Cc", "Cf", "Co"}


def translate_pattern(pattern: str) -> str:
    """A pre-tokenizer regex written for `regex`/Oniguruma (\\p{L}, \\p{N}, \\s) as a pattern for
    Python's `re` that matches the same strings.

    Outside a character class, \\p{X} becomes ``[ranges of category X]``, \\P{X} ``[^...]``, \\s the
    White_Space class and \\S its complement; inside a class, \\p{X} and \\s contribute their ranges
    to the class. Everything else is left as it is: `re` (Python 3.11+) has the rest of these
    patterns' syntax, scoped flags ``(?i:...)``, look-ahead, and the possessive ``?+``, ``++`` and
    atomic ``(?>...)`` forms. Each \\p{..} becomes the list of characters it names, so both engines
    run the same alternation with the same backtracking; the one difference is the Unicode version
    (`unicodedata` is the Python's), which only matters for characters assigned since.
    """
    out, i, in_class = [], 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            e = pattern[i + 1]
            if e in "pP":
                match = re.match(r"\{(\w+)\}", pattern[i + 2:])
                if not match or match.group(1) not in _CATEGORIES:
                    raise ValueError(f"the pattern {pattern!r}: \\{e} at character {i} is not a "
                                     f"Unicode general category such as \\p{{L}}")
                body = _category_ranges(match.group(1))
                if in_class and e == "P":
                    raise ValueError(f"the pattern {pattern!r}: \\P{{..}} inside [...] is not supported")
                out.append(body if in_class else f"[{'^' if e == 'P' else ''}{body}]")
                i += 2 + match.end()
                continue
            if e in "sS":
                if in_class and e == "S":
                    raise ValueError(f"the pattern {pattern!r}: \\S inside [...] is not supported")
                out.append(_WHITE_SPACE if in_class else f"[{'^' if e == 'S' else ''}{_WHITE_SPACE}]")
                i += 2
                continue
            out.append(pattern[i:i + 2])
            i += 2
            continue
        if c == "[" and not in_class:
            in_class = True
            out.append(c)
            i += 1
            for lead in ("^", "]"):        # a ']' right after '[' or '[^' is a member, not the end
                if pattern.startswith(lead, i):
                    out.append(lead)
                    i += 1
            continue
        if c == "]" and in_class:
            in_class = False
        out.append(c)
        i += 1
    return "".join(out)


def _pretokenizer():
    """GPT2_PATTERN compiled with Python's `re` (built once, on first use: it takes a moment).

    Why not the `regex` package? It would be one more dependency for one pattern, and this is the
    same pattern, not an imitation (`translate_pattern`; tests/test_bpe.py compares the two engines
    on assigned characters).
    """
    global _PRETOKENIZER
    if _PRETOKENIZER is None:
        _PRETOKENIZER = re.compile(translate_pattern(GPT2_PATTERN))
    return _PRETOKENIZER


def pretokenize(text: str) -> list[str]:
    """The pre-tokens of ``text`` by GPT-2's pattern: ``"Hello world!!"`` -> ["Hello", " world", "!!"]."""
    return _pretokenizer().findall(text)


class BPETokenizer:
    """GPT-2's byte-level BPE: ``vocab`` (token bytes -> id), ranked ``merges``, special tokens.

        tok = BPETokenizer.from_files("gpt2/vocab.json", "gpt2/merges.txt")
        tok.encode("Hello world")        # [15496, 995] with GPT-2's files
        tok.decode([15496, 995])         # 'Hello world'

    It has the interface of `ByteTokenizer` (``encode``, ``decode``, ``eot_id``, ``pad_id``,
    ``vocab_size``, ``special_tokens``), so every trainer takes either. ``<|endoftext|>`` is
    ``eot_id``; ``pad_id`` is ``<|pad|>`` where the vocabulary has one, else ``eot_id`` (GPT-2 has no
    padding token and Hugging Face pads GPT-2 with EOT). As with `ByteTokenizer`, text never encodes
    to a special id unless asked (``encode(text, special=True)`` does what Hugging Face's
    GPT2Tokenizer does by default: the string "<|endoftext|>" becomes ``eot_id``).
    """

    def __init__(self, vocab: dict[bytes, int], merges: list[tuple[bytes, bytes]],
                 special_tokens: dict[str, int] | None = None, eos_token: str = EOT_TEXT,
                 pad_token: str | None = PAD_TEXT):
        self.vocab = dict(vocab)
        self.merges = list(merges)
        self.special_tokens = dict(special_tokens or {EOT_TEXT: len(self.vocab)})
        if eos_token not in self.special_tokens:
            raise ValueError(f"the vocabulary has no {eos_token} token")
        self.eot_id = self.special_tokens[eos_token]
        self.pad_id = self.special_tokens.get(pad_token, self.eot_id)
        self.vocab_size = max([*self.vocab.values(), *self.special_tokens.values()]) + 1
        self.id_to_bytes = {i: b for b, i in self.vocab.items()}
        self.special_ids = {i: name for name, i in self.special_tokens.items()}
        self.ranks = {pair: rank for rank, pair in enumerate(self.merges)}   # lower merges first
        for left, right in self.merges:
            if left + right not in self.vocab:
                raise ValueError(f"the merge {left!r} + {right!r} makes a token not in the vocabulary")
        missing = [b for b in range(256) if bytes([b]) not in self.vocab]
        if missing:
            raise ValueError(f"the vocabulary lacks {len(missing)} of the 256 single bytes "
                             f"(e.g. {bytes(missing[:1])!r}): some text could not be encoded")
        self._cache = {}                 # pre-token -> ids: most words of a text repeat

    # ----- encoding ------------------------------------------------------------------------------
    def encode(self, text: str, special: bool = False) -> list[int]:
        """The token ids of ``text``: pre-tokenise, then merge each pre-token's bytes (`_bpe`).

        With ``special``, the names of special tokens in the text become their ids.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        names = self._matched_tokens(special)
        if not names:
            return self._encode_ordinary(text)
        # the longest name first, so that of two names starting at one place the longer wins
        alternatives = "|".join(re.escape(name) for name in sorted(names, key=len, reverse=True))
        ids = []
        for n, part in enumerate(re.split(f"({alternatives})", text)):
            ids += [names[part]] if n % 2 else self._encode_ordinary(part)
        return ids

    def _matched_tokens(self, special: bool) -> dict[str, int]:
        """The token names that ``encode`` finds in a text before BPE, {name: id}."""
        return self.special_tokens if special else {}

    def _encode_ordinary(self, text: str) -> list[int]:
        """The ids of a text that holds no token name: BPE on each pre-token, cached."""
        ids = []
        for piece in self.pretokenize(text):
            if piece not in self._cache:
                self._cache[piece] = self._bpe(_utf8(piece))
            ids += self._cache[piece]
        return ids

    def pretokenize(self, text: str) -> list[str]:
        """The pre-tokens of ``text``: GPT-2's pattern (`pretokenize`)."""
        return pretokenize(text)

    def _bpe(self, data: bytes) -> list[int]:
        """Merge the bytes of one pre-token: while some adjacent pair is a merge, join every
        occurrence of the best-ranked one (as GPT-2's encoder.py does)."""
        parts = [bytes([b]) for b in data]
        while len(parts) > 1:
            pairs = set(zip(parts, parts[1:]))
            best = min(pairs, key=lambda pair: self.ranks.get(pair, math.inf))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return [self.vocab[p] for p in parts]

    def encode_batch(self, texts) -> list[list[int]]:
        """``encode`` applied to each string of ``texts``."""
        if isinstance(texts, str):
            raise TypeError("encode_batch expects a list of str, got one str; use encode")
        return [self.encode(text) for text in texts]

    # ----- decoding ------------------------------------------------------------------------------
    def decode(self, ids, show_special: bool = False) -> str:
        """The text of ``ids``: the tokens' bytes joined and read as UTF-8, invalid bytes becoming
        U+FFFD (``errors="replace"``, as GPT-2's decoder does). Special tokens are dropped, or
        written as their names with ``show_special``; bytes across a special are decoded apart."""
        pieces, run = [], bytearray()
        for i in _check_ids(ids, self.vocab_size):
            if i in self.special_ids:
                pieces.append(run.decode("utf-8", errors="replace"))
                run = bytearray()
                if show_special:
                    pieces.append(self.special_ids[i])
            elif i in self.id_to_bytes:
                run += self.id_to_bytes[i]
            else:
                raise ValueError(f"token id {i} is not in the vocabulary")
        pieces.append(run.decode("utf-8", errors="replace"))
        return "".join(pieces)

    def decode_batch(self, batch, show_special: bool = False) -> list[str]:
        """``decode`` applied to each row of ``batch``."""
        return [self.decode(ids, show_special=show_special) for ids in batch]

    # ----- training ------------------------------------------------------------------------------
    @classmethod
    def train(cls, text: str, vocab_size: int) -> "BPETokenizer":
        """Learn merges on ``text`` until the vocabulary holds ``vocab_size`` tokens.

        The vocabulary starts as the 256 bytes (id = byte value, as in `ByteTokenizer`); each round
        counts adjacent pairs inside the pre-tokens (weighted by how often the pre-token occurs),
        merges the most frequent pair everywhere and gives it the next id. Ties go to the smallest
        pair in byte order, so training is deterministic. ``<|endoftext|>`` comes last, as in GPT-2.
        Training stops early when no pair is left. Each round recounts every pair: simple and slow
        (fine for a tokenizer of a few thousand tokens on a megabyte).
        """
        if vocab_size < 257:
            raise ValueError(f"vocab_size must be at least 257 (256 bytes + {EOT_TEXT}), got {vocab_size}")
        words = collections.Counter(pretokenize(text))
        words = [([bytes([b]) for b in _utf8(w)], n) for w, n in words.items()]
        vocab = {bytes([b]): b for b in range(256)}
        merges = []
        while len(vocab) < vocab_size - 1:
            counts = collections.Counter()
            for parts, n in words:
                for pair in zip(parts, parts[1:]):
                    counts[pair] += n
            if not counts:
                break
            best = min(counts, key=lambda pair: (-counts[pair], pair))
            merges.append(best)
            vocab[best[0] + best[1]] = len(vocab)
            for parts, _ in words:
                i = 0
                while i < len(parts) - 1:
                    if (parts[i], parts[i + 1]) == best:
                        parts[i:i + 2] = [best[0] + best[1]]
                    i += 1
        return cls(vocab, merges, {EOT_TEXT: len(vocab)})

    @classmethod
    def byte_level(cls) -> "BPETokenizer":
        """`ByteTokenizer` as a BPE with no merges: same ids for every text, EOT 256 and PAD 257."""
        return cls({bytes([b]): b for b in range(256)}, [], {EOT_TEXT: EOT, PAD_TEXT: PAD})

    # ----- files ---------------------------------------------------------------------------------
    @classmethod
    def from_files(cls, vocab_json, merges_txt) -> "BPETokenizer":
        """Read GPT-2's ``vocab.json`` ({token: id}, tokens in `bytes_to_unicode`'s alphabet) and
        ``merges.txt`` (a ``#version`` line, then one "left right" pair per line, best first)."""
        with open(vocab_json, encoding="utf-8") as f:
            entries = json.load(f)
        with open(merges_txt, encoding="utf-8") as f:
            merges = f.read()
        return cls.from_texts(entries, merges, where=f"{vocab_json}, {merges_txt}")

    @classmethod
    def from_texts(cls, entries: dict, merges: str, where="the tokenizer") -> "BPETokenizer":
        """`from_files` on the files' contents: vocab.json's dict and merges.txt's text."""
        vocab, specials = {}, {}
        for token, i in entries.items():
            if token in (EOT_TEXT, PAD_TEXT):
                specials[token] = i
            elif all(c in CHAR_TO_BYTE for c in token):
                vocab[bytes(CHAR_TO_BYTE[c] for c in token)] = i
            else:
                raise ValueError(f"{where}: the token {token!r} is not byte-level BPE "
                                 "(a character outside GPT-2's byte alphabet)")
        pairs = []
        for n, line in enumerate(merges.split("\n"), 1):
            if not line or line.startswith("#version"):
                continue
            left, _, right = line.partition(" ")
            if not right or " " in right or any(c not in CHAR_TO_BYTE for c in left + right):
                raise ValueError(f"{where}: merges line {n} is not two byte-level tokens: {line!r}")
            pairs.append(tuple(bytes(CHAR_TO_BYTE[c] for c in t) for t in (left, right)))
        if EOT_TEXT not in specials:
            raise ValueError(f"{where}: the vocabulary has no {EOT_TEXT} token")
        return cls(vocab, pairs, specials)

    def to_texts(self) -> tuple[dict, str]:
        """(vocab.json's dict, merges.txt's text): what `save` writes and `from_texts` reads."""
        as_text = lambda token: "".join(BYTE_TO_CHAR[b] for b in token)
        entries = {as_text(t): i for t, i in self.vocab.items()} | self.special_tokens
        entries = dict(sorted(entries.items(), key=lambda item: item[1]))
        merges = "#version: 0.2\n" + "".join(f"{as_text(a)} {as_text(b)}\n" for a, b in self.merges)
        return entries, merges

    def save(self, folder):
        """Write ``vocab.json`` and ``merges.txt`` into ``folder`` (Hugging Face's GPT-2 files)."""
        folder = pathlib.Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        entries, merges = self.to_texts()
        with open(folder / "vocab.json", "w", encoding="utf-8") as f:
            json.dump(entries, f, ensure_ascii=False)
        with open(folder / "merges.txt", "w", encoding="utf-8") as f:
            f.write(merges)
        return folder

    def __eq__(self, other):
        return (isinstance(other, BPETokenizer) and self.vocab == other.vocab
                and self.merges == other.merges and self.special_tokens == other.special_tokens)

    def __repr__(self):
        return (f"BPETokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, "
                f"eot_id={self.eot_id}, pad_id={self.pad_id})")


def _utf8(piece):
    """The UTF-8 bytes of ``piece`` (a piece of a text), or the error `ByteTokenizer.encode` gives."""
    try:
        return piece.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"cannot encode the character {piece[err.start]!r}: it has no UTF-8 "
                         "encoding (a lone surrogate)") from None
