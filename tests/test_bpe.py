"""GPT-2's byte-level BPE: lossless, deterministic, the same ids as GPT-2's own tokenizer."""

import json
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from minirlhf.tokenizer import (BYTE_TO_CHAR, EOT_TEXT, GPT2_PATTERN, BPETokenizer, ByteTokenizer,
                                pretokenize)

FIXTURES = Path(__file__).parent / "fixtures"
CORPUS = ("First Citizen: Before we proceed any further, hear me speak.\n\nAll: Speak, speak.\n"
          "It's 1,234 o'clock -- we'll see; they've 99 problems.  Ça va? 中文 🎉🎉\n")


@pytest.fixture(scope="module")
def trained():
    return BPETokenizer.train(CORPUS * 3, vocab_size=320)


def test_byte_map_is_a_bijection_onto_printable_characters():
    assert sorted(BYTE_TO_CHAR) == list(range(256))
    assert len(set(BYTE_TO_CHAR.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in BYTE_TO_CHAR.values())
    assert (BYTE_TO_CHAR[ord(" ")], BYTE_TO_CHAR[ord("\n")], BYTE_TO_CHAR[ord("A")]) == ("Ġ", "Ċ", "A")


def test_pretokens_keep_the_leading_space_and_split_contractions_digits_punctuation():
    assert pretokenize("Hello world!!  it's 123 \n\n x") == [
        "Hello", " world", "!!", " ", " it", "'s", " 123", " \n\n", " x"]


def test_training_is_deterministic_with_ties_to_the_smallest_pair():
    tok = BPETokenizer.train("ab ab ab cd", vocab_size=260)
    # pairs: (a,b) 3, (" ",a) 2, (" ",c) 1, (c,d) 1; after a+b: (" ",ab) 2, then (" ",c) ties (c,d)
    assert tok.merges == [(b"a", b"b"), (b" ", b"ab"), (b" ", b"c")]
    assert tok.vocab_size == 260 and tok.eot_id == 259
    assert BPETokenizer.train("ab ab ab cd", vocab_size=260) == tok


@given(st.text(max_size=60))
def test_train_then_encode_is_lossless_on_any_text(text):
    tok = BPETokenizer.train(text, vocab_size=300)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.eot_id not in ids


@given(st.text(max_size=60))
def test_trained_tokenizer_encodes_unseen_text_losslessly(trained, text):
    assert trained.decode(trained.encode(text)) == text


def test_merges_make_text_shorter_than_its_bytes(trained):
    assert len(trained.encode(CORPUS)) < len(CORPUS.encode()) / 2


@given(st.text(max_size=60))
def test_a_bpe_without_merges_is_the_byte_tokenizer(text):
    assert BPETokenizer.byte_level().encode(text) == ByteTokenizer().encode(text)


def test_byte_level_bpe_has_the_byte_tokenizers_ids():
    tok, byte = BPETokenizer.byte_level(), ByteTokenizer()
    assert (tok.eot_id, tok.pad_id, tok.vocab_size) == (byte.eot_id, byte.pad_id, byte.vocab_size)


def test_decode_replaces_invalid_utf8_as_gpt2_does(trained):
    lone = [trained.vocab[b"\xff"], trained.vocab[b"a"]]
    assert trained.decode(lone) == "\ufffda"
    half_emoji = trained.encode("🎉")[:1] if len(trained.encode("🎉")) > 1 else [trained.vocab[b"\xf0"]]
    assert trained.decode(half_emoji) == "\ufffd"


def test_endoftext_is_special_only_on_purpose(trained):
    text = f"one{EOT_TEXT}two"
    assert trained.eot_id not in trained.encode(text)
    assert trained.decode(trained.encode(text)) == text
    ids = trained.encode(text, special=True)
    assert ids == trained.encode("one") + [trained.eot_id] + trained.encode("two")
    assert trained.decode(ids) == "onetwo"
    assert trained.decode(ids, show_special=True) == text


def test_save_then_from_files_gives_the_same_tokenizer(trained, tmp_path):
    trained.save(tmp_path)
    again = BPETokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    assert again == trained
    assert again.encode(CORPUS) == trained.encode(CORPUS)
    assert json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))[EOT_TEXT] == trained.eot_id


def test_bad_ids_and_files_are_one_line_errors(trained, tmp_path):
    with pytest.raises(ValueError, match="out of range"):
        trained.decode([trained.vocab_size])
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(ValueError, match="no <\\|endoftext\\|>"):
        BPETokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt")


# ----- against GPT-2's own tokenizer, recorded by scripts/make_hf_fixtures.py ----------------------

def test_encodings_equal_gpt2_tokenizers_on_tricky_strings():
    folder = FIXTURES / "gpt2_lm"
    recorded = json.loads((FIXTURES / "gpt2_tokenizer.json").read_text(encoding="utf-8"))
    tok = BPETokenizer.from_files(folder / "vocab.json", folder / "merges.txt")
    for case in recorded["cases"]:
        assert tok.encode(case["text"], special=True) == case["ids"], case["text"]
        assert tok.decode(case["ids"], show_special=True) == case["decoded"], case["text"]
    for case in recorded["decodes"]:            # pieces of characters: U+FFFD, as GPT-2 decodes them
        assert tok.decode(case["ids"]) == case["text"], case["ids"]


# ----- the pattern against the `regex` package (optional) -------------------------------------------

ASSIGNED = st.characters(blacklist_categories=("Cs", "Cn"))
TRICKY = st.sampled_from([" ", "  ", "\n", "\t", "\u3000", "'", "'s", "'ll", "'S", "1", "٣", "½",
                          "é", "e\u0301", "中", "🎉", "!", "?!", "_", "\x1c", "\x85", "\u2028"])


@given(st.lists(st.one_of(ASSIGNED, TRICKY), max_size=40).map("".join))
def test_pattern_equals_the_regex_packages_on_assigned_characters(text):
    regex = pytest.importorskip("regex")
    assert pretokenize(text) == regex.findall(GPT2_PATTERN, text)


@pytest.fixture(scope="module")
def gpt2_tokenizer_pair():
    transformers = pytest.importorskip("transformers")
    folder = FIXTURES / "gpt2_lm"
    theirs = transformers.GPT2Tokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    return BPETokenizer.from_files(folder / "vocab.json", folder / "merges.txt"), theirs


@given(st.lists(st.one_of(ASSIGNED, TRICKY, st.sampled_from(["the", " the", "and", EOT_TEXT])),
                max_size=40).map("".join))
def test_encodings_equal_transformers_on_random_text(gpt2_tokenizer_pair, text):
    ours, theirs = gpt2_tokenizer_pair
    assert ours.encode(text, special=True) == theirs(text)["input_ids"]
