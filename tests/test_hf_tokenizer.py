"""tokenizer.json read here gives Hugging Face's ids: Qwen2's, Llama-3's, GPT-2's and SmolLM's pipelines."""

import json
import random
import unicodedata
from pathlib import Path

import pytest

from minirlhf.hf_tokenizer import HFTokenizer, TokenizerFileError, load_hf_tokenizer, save_hf_tokenizer
from minirlhf.tokenizer import BPETokenizer, ByteTokenizer

FIXTURES = Path(__file__).parent / "fixtures"
FOLDERS = ["tok_qwen2", "tok_llama3", "tok_gpt2", "tok_smollm"]
CASES = json.loads((FIXTURES / "hf_tokenizer_cases.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module", params=FOLDERS)
def folder(request):
    return FIXTURES / request.param


# ----- against the ids `tokenizers` recorded (scripts/make_tokenizer_fixtures.py) ---------------------

@pytest.mark.parametrize("name", FOLDERS)
def test_encodings_equal_hugging_faces_on_mixed_scripts(name):
    tok, recorded = load_hf_tokenizer(FIXTURES / name), CASES["tokenizers"][name]
    assert len(CASES["strings"]) > 300
    for text, special, plain in zip(CASES["strings"], recorded["special"], recorded["plain"]):
        assert tok.encode(text, special=True) == special, text
        assert tok.encode(text) == (special if plain is None else plain), text
        assert tok.decode(special, show_special=True) == tok.normalize(text), text


def test_special_tokens_are_matched_only_on_purpose_and_plain_added_tokens_always():
    tok = load_hf_tokenizer(FIXTURES / "tok_qwen2")
    start, end, call = (tok.special_tokens["<|im_start|>"], tok.special_tokens["<|im_end|>"],
                        tok.added_tokens["<tool_call>"])
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>", special=True)
    assert ids[0] == start and ids[-1] == end
    assert start not in tok.encode("<|im_start|>user") and end not in tok.encode("Hi<|im_end|>")
    assert call in tok.encode("a<tool_call>b") and call in tok.encode("a<tool_call>b", special=True)
    assert tok.decode(ids) == "user\nHi" and tok.decode(tok.encode("a<tool_call>b")) == "a<tool_call>b"


def test_eos_bos_and_pad_come_from_tokenizer_config():
    qwen, llama, gpt2 = (load_hf_tokenizer(FIXTURES / n) for n in ("tok_qwen2", "tok_llama3", "tok_gpt2"))
    assert qwen.special_ids[qwen.eot_id] == "<|im_end|>" and qwen.bos_id is None
    assert qwen.special_ids[qwen.pad_id] == "<|endoftext|>"
    assert llama.special_ids[llama.bos_id] == "<|begin_of_text|>"
    assert llama.special_ids[llama.eot_id] == llama.special_ids[llama.pad_id] == "<|eot_id|>"  # pad: eos
    assert gpt2.eot_id == gpt2.bos_id == gpt2.special_tokens["<|endoftext|>"]
    assert qwen.vocab_size == 701 and qwen.chat_template.startswith("{%- if messages[0]")


def test_llama3_pattern_cuts_digits_in_threes_and_qwen2s_one_by_one():
    llama, qwen = load_hf_tokenizer(FIXTURES / "tok_llama3"), load_hf_tokenizer(FIXTURES / "tok_qwen2")
    assert llama.pretokenize("abc 1234567") == ["abc", " ", "123", "456", "7"]
    assert qwen.pretokenize("abc 1234") == ["abc", " ", "1", "2", "3", "4"]
    assert llama.pretokenize("I'M here\n\n  x") == ["I", "'M", " here", "\n\n", " ", " x"]


def test_nfc_normalizer_composes_before_bpe():
    qwen, gpt2 = load_hf_tokenizer(FIXTURES / "tok_qwen2"), load_hf_tokenizer(FIXTURES / "tok_gpt2")
    assert qwen.encode("e\u0301") == qwen.encode("\u00e9")
    assert gpt2.encode("e\u0301") != gpt2.encode("\u00e9")       # GPT-2 has no normalizer


def _tokenizer_json(vocab, merges, ignore_merges=False, **changes):
    """A tokenizer.json of GPT-2's pipeline that both this module and `tokenizers` read."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    data = {"version": "1.0", "truncation": None, "padding": None, "normalizer": None,
            "added_tokens": [{"id": len(vocab), "content": "<|endoftext|>", "single_word": False,
                              "lstrip": False, "rstrip": False, "normalized": False, "special": True}],
            "pre_tokenizer": byte_level, "post_processor": None, "decoder": byte_level,
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "vocab": vocab, "merges": merges, "ignore_merges": ignore_merges}}
    data.update(changes)
    return data


def _byte_vocab():
    entries, _ = BPETokenizer.byte_level().to_texts()
    return {t: i for t, i in entries.items() if i < 256}


def test_ignore_merges_takes_a_whole_word_from_the_vocabulary():
    vocab = _byte_vocab() | {"cd": 256, "bc": 257, "bcd": 258}
    merges = ["c d", ["b", "c"], "bc d"]            # both forms of a merge: "a b" and [a, b]
    plain = HFTokenizer.from_json(_tokenizer_json(vocab, merges))
    whole = HFTokenizer.from_json(_tokenizer_json(vocab, merges, ignore_merges=True))
    assert plain.encode("bcd") == [ord("b"), 256]              # c+d is merged first: b never meets c
    assert whole.encode("bcd") == [258]
    tokenizers = pytest.importorskip("tokenizers")
    merges = ["c d", "b c", "bc d"]                  # `tokenizers` wants one form per file
    for ours, data in ((plain, _tokenizer_json(vocab, merges)),
                       (whole, _tokenizer_json(vocab, merges, ignore_merges=True))):
        theirs = tokenizers.Tokenizer.from_str(json.dumps(data))
        assert theirs.encode("bcd", add_special_tokens=False).ids == ours.encode("bcd")


# ----- files out ----------------------------------------------------------------------------------

def test_save_then_load_gives_the_same_tokenizer(folder, tmp_path):
    tok = load_hf_tokenizer(folder)
    again = load_hf_tokenizer(save_hf_tokenizer(tok, tmp_path))
    assert again == tok and again.chat_template == tok.chat_template
    assert (again.eot_id, again.bos_id, again.pad_id) == (tok.eot_id, tok.bos_id, tok.pad_id)
    for text in CASES["strings"][:50]:
        assert again.encode(text, special=True) == tok.encode(text, special=True)


@pytest.mark.parametrize("made", ["bpe", "bytes"])
def test_a_tokenizer_trained_here_is_written_as_gpt2s_pipeline(made, tmp_path):
    tok = (BPETokenizer.train("It's 1,234 o'clock; ça va? 中文 🎉 " * 5, vocab_size=300)
           if made == "bpe" else ByteTokenizer())
    again = load_hf_tokenizer(save_hf_tokenizer(tok, tmp_path))
    assert (again.vocab_size, again.eot_id, again.pad_id) == (tok.vocab_size, tok.eot_id, tok.pad_id)
    for text in CASES["strings"]:
        assert again.encode(text) == tok.encode(text), text
    tokenizers = pytest.importorskip("tokenizers")
    theirs = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in CASES["strings"]:
        assert theirs.encode(text, add_special_tokens=False).ids == again.encode(text, special=True), text


# ----- bad files: one line naming the file -------------------------------------------------------

def _write(tmp_path, data):
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    return tmp_path


@pytest.mark.parametrize("change, message", [
    ({"model": {"type": "Unigram", "vocab": []}}, "model type is 'Unigram'"),
    ({"model": {"type": "WordPiece", "vocab": {}}}, "model type is 'WordPiece'"),
    ({"pre_tokenizer": {"type": "Metaspace"}}, "pre-tokenizer 'Metaspace' is not supported"),
    ({"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True}}, "add_prefix_space"),
    ({"pre_tokenizer": {"type": "Split", "pattern": {"Regex": "a"}, "behavior": "Removed"}}, "Isolated only"),
    ({"pre_tokenizer": {"type": "Split", "pattern": {"Regex": r"\p{Foo}"}, "behavior": "Isolated"}},
     "not a Unicode general category"),
    ({"normalizer": {"type": "NFKC"}}, "normalizer \\['NFKC'\\] is not supported"),
    ({"added_tokens": [{"id": 256, "content": "<|endoftext|>", "special": True, "lstrip": True}]}, "lstrip"),
    ({"added_tokens": []}, "no end-of-sequence token"),
    ({"added_tokens": [{"content": "<|endoftext|>"}]}, "not a tokenizer.json as Hugging Face writes it"),
    ({"model": {"type": "BPE", "merges": []}}, "the BPE model has no vocab"),
    ({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}}, "lacks 255 of the 256 single bytes"),
    ({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": ["a b"]}}, "makes a token not in"),
])
def test_unsupported_files_are_refused_in_one_line(tmp_path, change, message):
    folder = _write(tmp_path, _tokenizer_json(_byte_vocab(), [], **change))
    with pytest.raises(TokenizerFileError, match=message) as err:
        load_hf_tokenizer(folder)
    assert str(folder / "tokenizer.json") in str(err.value) and "\n" not in str(err.value)


def test_a_missing_or_broken_file_is_named(tmp_path):
    with pytest.raises(TokenizerFileError, match="no tokenizer.json"):
        load_hf_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerFileError, match="tokenizer.json is not valid JSON"):
        load_hf_tokenizer(tmp_path)


# ----- against `tokenizers` and `regex` on random text (optional) --------------------------------------

def _random_strings(n, seed=0):
    """Pieces of the recorded strings and random assigned characters of the Basic and Supplementary
    planes (the Unicode version of Python's `unicodedata` and of `tokenizers` may differ on others)."""
    rng, pieces = random.Random(seed), CASES["strings"]
    chars = [chr(cp) for cp in range(0x20000) if unicodedata.category(chr(cp)) not in ("Cn", "Cs", "Co")]
    texts = []
    for _ in range(n):
        parts = [rng.choice(pieces)[:rng.randint(0, 12)] if rng.random() < 0.6 else
                 "".join(rng.choice(chars) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 6))]
        texts.append("".join(parts))
    return texts


RANDOM = _random_strings(2000)


def test_encodings_equal_tokenizers_on_thousands_of_random_strings(folder):
    tokenizers = pytest.importorskip("tokenizers")
    ours = load_hf_tokenizer(folder)
    theirs = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    for text, ids in zip(RANDOM, theirs.encode_batch(RANDOM, add_special_tokens=False)):
        assert ours.encode(text, special=True) == ids.ids, repr(text)


def test_translated_patterns_equal_the_regex_packages():
    regex = pytest.importorskip("regex")
    import re
    from minirlhf.tokenizer import translate_pattern
    for name in ("tok_qwen2", "tok_llama3"):
        pattern = json.loads((FIXTURES / name / "tokenizer.json").read_text(encoding="utf-8"))[
            "pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"]
        ours = re.compile(translate_pattern(pattern))
        for text in RANDOM[:500]:
            assert ours.findall(text) == regex.findall(pattern, text), repr(text)
