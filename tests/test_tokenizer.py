"""The byte tokenizer: exact round trips, specials only on purpose, clear errors."""

import numpy as np
import pytest
from hypothesis import given, strategies as st

from minirlhf.tokenizer import EOT, PAD, VOCAB_SIZE, ByteTokenizer, tokenizer

tok = ByteTokenizer()


def test_vocabulary_is_256_bytes_plus_two_specials():
    assert (tok.eot_id, tok.pad_id, tok.vocab_size) == (256, 257, 258)
    assert (EOT, PAD, VOCAB_SIZE) == (256, 257, 258)
    assert isinstance(tokenizer, ByteTokenizer)


def test_ids_are_the_utf8_bytes():
    assert tok.encode("Hi!") == [72, 105, 33]
    assert tok.encode("é") == [0xC3, 0xA9]
    assert tok.encode("") == []


@given(st.text())
def test_any_text_round_trips_exactly(text):
    assert tok.decode(tok.encode(text)) == text


@given(st.text())
def test_encode_gives_one_byte_id_per_utf8_byte(text):
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)


@given(st.lists(st.sampled_from(["<|endoftext|>", "<|pad|>", "a", " ", "\n", "<", "|"])))
def test_text_can_never_produce_a_special_id(parts):
    text = "".join(parts)
    ids = tok.encode(text)
    assert EOT not in ids and PAD not in ids
    assert tok.decode(ids) == text


def test_literal_endoftext_is_encoded_as_its_characters():
    assert tok.encode("<|endoftext|>") == list(b"<|endoftext|>")


def test_decode_drops_specials_by_default():
    ids = [EOT] + tok.encode("to be") + [EOT, PAD, PAD]
    assert tok.decode(ids) == "to be"


def test_decode_shows_specials_by_name_on_request():
    ids = [EOT] + tok.encode("to be") + [EOT, PAD]
    assert tok.decode(ids, show_special=True) == "<|endoftext|>to be<|endoftext|><|pad|>"


def test_decode_of_invalid_utf8_replaces_instead_of_raising():
    assert tok.decode([0xFF, 65]) == "\ufffdA"
    assert tok.decode([0xC3]) == "\ufffd"        # a character cut in half by sampling


def test_a_special_token_splits_a_multibyte_character():
    # Gluing the two halves of "é" across a PAD would invent text the ids do not hold.
    assert tok.decode([0xC3, PAD, 0xA9]) == "\ufffd\ufffd"


@given(st.lists(st.integers(0, VOCAB_SIZE - 1), max_size=64))
def test_decode_never_raises_on_valid_ids(ids):
    text = tok.decode(ids)
    assert isinstance(text, str)
    shown = tok.decode(ids, show_special=True)
    assert shown.count("<|endoftext|>") >= ids.count(EOT)


def test_decode_accepts_numpy_arrays():
    ids = np.array(tok.encode("Ham.") + [EOT], dtype=np.int64)
    assert tok.decode(ids) == "Ham."
    assert tok.decode_batch(np.stack([ids, ids])) == ["Ham.", "Ham."]


def test_decode_rejects_a_2d_array_with_a_pointer_to_decode_batch():
    with pytest.raises(ValueError, match="decode_batch"):
        tok.decode(np.zeros((2, 3), dtype=np.int64))


@pytest.mark.parametrize("bad, position", [(258, 2), (-1, 1), (1000, 0)])
def test_out_of_range_id_is_named_with_its_position(bad, position):
    ids = [65, 66, 67]
    ids[position] = bad
    with pytest.raises(ValueError) as excinfo:
        tok.decode(ids)
    message = str(excinfo.value)
    assert f"token id {bad}" in message
    assert f"position {position}" in message


def test_non_integer_id_is_a_type_error():
    with pytest.raises(TypeError, match="position 1"):
        tok.decode([65, 1.5])


def test_encode_rejects_non_strings():
    with pytest.raises(TypeError):
        tok.encode(b"bytes")


def test_encode_names_a_lone_surrogate():
    with pytest.raises(ValueError, match="position 1"):
        tok.encode("a\ud800b")


@given(st.lists(st.text(), max_size=5))
def test_encode_batch_is_encode_on_each(texts):
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.decode_batch(tok.encode_batch(texts)) == texts
