"""A byte-level tokenizer: the 256 UTF-8 bytes plus two special tokens.

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
            if not 0 <= i < VOCAB_SIZE:
                raise ValueError(
                    f"token id {i} at position {position} is out of range: "
                    f"ids must be in 0..{VOCAB_SIZE - 1}"
                )
        return [int(i) for i in ids]

    def __repr__(self):
        return (f"ByteTokenizer(vocab_size={self.vocab_size}, "
                f"eot_id={self.eot_id}, pad_id={self.pad_id})")


# The tokenizer has no state, so one shared instance serves everyone.
tokenizer = ByteTokenizer()
