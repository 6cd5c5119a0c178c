"""Corpus loading, splitting, batching, JSONL records, rows and masks."""

import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minirlhf.datasets import (
    DataError,
    Minibatches,
    TextDataset,
    builtin_corpus_path,
    collate,
    encode_corpus,
    encode_prompt,
    encode_prompt_completion,
    get_batch,
    iterate_minibatches,
    load_jsonl,
    load_preferences,
    load_prompts,
    load_sft,
    load_text,
    train_val_split,
)
from minirlhf.tokenizer import EOT, PAD, ByteTokenizer

tok = ByteTokenizer()

PLAYS = ["hamlet", "julius_caesar", "lear", "macbeth", "midsummer_nights_dream",
         "much_ado_about_nothing", "othello", "romeo_and_juliet", "tempest", "twelfth_night"]


@pytest.fixture(scope="module")
def corpus():
    return load_text()


# --- the corpus ----------------------------------------------------------------

def test_builtin_corpus_ships_ten_plays_and_their_notice():
    folder = builtin_corpus_path()
    assert sorted(p.stem for p in folder.glob("*.txt")) == PLAYS
    assert (folder / "NOTICE.md").is_file()


def test_builtin_corpus_is_the_ten_plays_in_sorted_order(corpus):
    folder = builtin_corpus_path()
    plays = [(folder / f"{name}.txt").read_text(encoding="utf-8") for name in PLAYS]
    assert corpus == "\n\n".join(plays)
    assert 1_200_000 < len(corpus) < 1_350_000
    assert "Ham." in corpus
    assert corpus.startswith("HAMLET")


def test_builtin_corpus_encodes_to_one_token_per_byte(corpus):
    tokens = encode_corpus(corpus)
    assert tokens.dtype == np.int64 and tokens.ndim == 1
    assert len(tokens) == len(corpus.encode("utf-8"))
    assert tokens.max() < 256


def test_load_text_reads_a_single_file(tmp_path):
    file = tmp_path / "a.txt"
    file.write_text("To be, or not to be.", encoding="utf-8")
    assert load_text(file) == "To be, or not to be."
    assert load_text(str(file)) == "To be, or not to be."


def test_load_text_reads_a_folders_txt_files_sorted(tmp_path):
    (tmp_path / "b.txt").write_text("second", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    assert load_text(tmp_path) == "first\n\nsecond"


def test_missing_corpus_is_file_not_found(tmp_path):
    missing = tmp_path / "nowhere.txt"
    with pytest.raises(FileNotFoundError, match="corpus not found") as excinfo:
        load_text(missing)
    assert str(missing) in str(excinfo.value)


def test_folder_without_txt_files_is_an_error_naming_it(tmp_path):
    (tmp_path / "readme.md").write_text("hi", encoding="utf-8")
    with pytest.raises(ValueError) as excinfo:
        load_text(tmp_path)
    assert str(tmp_path) in str(excinfo.value)


@pytest.mark.parametrize("content", ["", "  \n\t\n"])
def test_empty_or_blank_file_is_an_error_naming_it(tmp_path, content):
    file = tmp_path / "empty.txt"
    file.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match="empty") as excinfo:
        load_text(file)
    assert "empty.txt" in str(excinfo.value)


def test_non_utf8_file_is_an_error_naming_it(tmp_path):
    file = tmp_path / "latin1.txt"
    file.write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8") as excinfo:
        load_text(file)
    assert "latin1.txt" in str(excinfo.value)


# --- splitting -----------------------------------------------------------------

def test_split_is_a_cut_last_tenth_to_validation():
    tokens = np.arange(1000)
    train, val = train_val_split(tokens)
    assert len(train) == 900 and len(val) == 100
    assert np.array_equal(np.concatenate([train, val]), tokens)
    assert train[-1] == 899 and val[0] == 900


@given(st.integers(100, 5000), st.floats(0.05, 0.5))
def test_split_sizes_add_up_and_follow_the_fraction(n, fraction):
    tokens = np.arange(n)
    train, val = train_val_split(tokens, fraction)
    assert len(train) + len(val) == n
    assert abs(len(val) - n * fraction) <= 0.5 + 1e-9
    assert np.array_equal(np.concatenate([train, val]), tokens)


def test_split_is_deterministic(corpus):
    tokens = encode_corpus(corpus[:50_000])
    first = train_val_split(tokens, 0.1)
    second = train_val_split(tokens, 0.1)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("n", [0, 1, 3, 10])
def test_split_refuses_a_corpus_too_short(n):
    with pytest.raises(ValueError, match="too short"):
        train_val_split(np.arange(n), 0.1)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_refuses_a_fraction_outside_0_1(fraction):
    with pytest.raises(ValueError, match="val_fraction"):
        train_val_split(np.arange(1000), fraction)


# --- batches of windows ----------------------------------------------------------------

@given(st.integers(1, 16), st.integers(1, 8), st.integers(0, 2**32 - 1))
def test_get_batch_shapes_and_next_token_targets(block_size, batch_size, seed):
    tokens = np.arange(100, dtype=np.int64) * 7 % 258
    x, y = get_batch(tokens, block_size, batch_size, np.random.default_rng(seed))
    assert x.shape == y.shape == (batch_size, block_size)
    assert x.dtype == y.dtype == np.int64
    assert np.array_equal(x[:, 1:], y[:, :-1])
    # Every row is a real window of the data: y is x moved on by one token.
    for row_x, row_y in zip(x, y):
        start = int(np.flatnonzero(tokens == row_x[0])[0])
        assert np.array_equal(row_x, tokens[start:start + block_size])
        assert np.array_equal(row_y, tokens[start + 1:start + block_size + 1])


def test_get_batch_reaches_the_last_window_and_never_past_it():
    tokens = np.arange(10)
    x, y = get_batch(tokens, 4, 2000, np.random.default_rng(0))
    assert set(x[:, 0].tolist()) == set(range(6))
    assert y.max() == 9


def test_get_batch_is_deterministic_for_a_seed():
    tokens = np.arange(1000)
    a = get_batch(tokens, 8, 4, np.random.default_rng(42))
    b = get_batch(tokens, 8, 4, np.random.default_rng(42))
    c = get_batch(tokens, 8, 4, np.random.default_rng(43))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_get_batch_works_with_exactly_block_size_plus_one_tokens():
    x, y = get_batch(np.arange(5), 4, 3, np.random.default_rng(0))
    assert np.array_equal(x, np.tile(np.arange(4), (3, 1)))
    assert np.array_equal(y, np.tile(np.arange(1, 5), (3, 1)))


def test_get_batch_refuses_data_shorter_than_a_window():
    with pytest.raises(ValueError, match="block_size"):
        get_batch(np.arange(4), 4, 1, np.random.default_rng(0))


def test_get_batch_wants_a_generator():
    with pytest.raises(TypeError, match="Generator"):
        get_batch(np.arange(100), 4, 1, 0)


def test_text_dataset_windows():
    data = TextDataset(np.arange(10), block_size=3)
    assert len(data) == 7
    x, y = data[6]
    assert x.tolist() == [6, 7, 8] and y.tolist() == [7, 8, 9]
    with pytest.raises(IndexError):
        data[7]
    xb, yb = data.get_batch(5, np.random.default_rng(0))
    assert xb.shape == (5, 3) and np.array_equal(xb + 1, yb)


# --- JSONL -------------------------------------------------------------------------

def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_load_sft_reads_records_and_skips_blank_lines(tmp_path):
    file = write_lines(tmp_path / "sft.jsonl", [
        json.dumps({"prompt": "Who's there?", "completion": "Nay, answer me."}),
        "",
        "   ",
        json.dumps({"prompt": "", "completion": "é", "source": "extra fields are kept"}),
    ])
    records = load_sft(file)
    assert [r["prompt"] for r in records] == ["Who's there?", ""]
    assert records[1]["completion"] == "é" and records[1]["source"] == "extra fields are kept"


def test_load_preferences_and_prompts(tmp_path):
    prefs = write_lines(tmp_path / "prefs.jsonl", [
        json.dumps({"prompt": "p", "chosen": "good", "rejected": "bad"})])
    prompts = write_lines(tmp_path / "prompts.jsonl", [json.dumps({"prompt": "p"})] * 3)
    assert load_preferences(prefs) == [{"prompt": "p", "chosen": "good", "rejected": "bad"}]
    assert load_prompts(prompts) == [{"prompt": "p"}] * 3


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)


GOOD = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})


@pytest.mark.parametrize("bad_line, expected", [
    ('{"prompt": "p", "chosen": "a"', "not valid JSON"),
    ('[1, 2, 3]', "got array"),
    ('"just a string"', "got string"),
    ('{"prompt": "p", "chosen": "a"}', "missing field 'rejected'"),
    ('{"prompt": "p", "chosen": 3, "rejected": "b"}',
     "field 'chosen' must be a string, got number"),
    ('{"prompt": null, "chosen": "a", "rejected": "b"}',
     "field 'prompt' must be a string, got null"),
    ('{"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}',
     "field 'prompt', message 0: 'content' must be a string, got nothing"),
    ('{"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"}',
     "field 'chosen' is string but 'prompt' is a list of messages"),
    ('{"prompt": "p", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}',
     "field 'chosen' must be a string, got array (a list of messages"),
])
def test_bad_line_names_the_file_the_line_and_the_problem(tmp_path, bad_line, expected):
    # Line 3 is bad; a blank line 2 still counts in the numbering.
    file = write_lines(tmp_path / "prefs_bad.jsonl", [GOOD, "", bad_line, GOOD])
    with pytest.raises(DataError) as excinfo:
        load_preferences(file)
    message = str(excinfo.value)
    assert "prefs_bad.jsonl" in message
    assert "line 3" in message
    assert expected in message


def test_invalid_json_includes_the_json_error(tmp_path):
    file = write_lines(tmp_path / "x.jsonl", ['{"prompt": }'])
    with pytest.raises(DataError, match="line 1") as excinfo:
        load_prompts(file)
    assert "Expecting value" in str(excinfo.value)


def test_non_utf8_line_names_the_line(tmp_path):
    file = tmp_path / "latin.jsonl"
    file.write_bytes(b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match="line 2") as excinfo:
        load_prompts(file)
    assert "latin.jsonl" in str(excinfo.value)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_dataset_is_an_error_naming_the_file(tmp_path, content):
    file = tmp_path / "nothing.jsonl"
    file.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match="no records") as excinfo:
        load_sft(file)
    assert "nothing.jsonl" in str(excinfo.value)


def test_missing_dataset_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError) as excinfo:
        load_jsonl(tmp_path / "gone.jsonl", ["prompt"])
    assert "gone.jsonl" in str(excinfo.value)


def test_byte_order_mark_is_tolerated(tmp_path):
    file = tmp_path / "bom.jsonl"
    file.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "p"}).encode() + b"\n")
    assert load_prompts(file) == [{"prompt": "p"}]


# --- rows, padding and masks -------------------------------------------------------------

def test_row_is_start_token_prompt_completion_eot():
    ids, n_prompt = encode_prompt_completion(tok, "Who", "Me", block_size=32)
    assert ids == [EOT] + tok.encode("Who") + tok.encode("Me") + [EOT]
    assert n_prompt == 4
    assert tok.decode(ids[n_prompt:]) == "Me"


def test_row_without_final_eot():
    ids, n_prompt = encode_prompt_completion(tok, "Who", "Me", block_size=32, add_eot=False)
    assert ids == [EOT] + tok.encode("WhoMe") and n_prompt == 4


def test_empty_prompt_keeps_the_start_token():
    ids, n_prompt = encode_prompt_completion(tok, "", "Me", block_size=32)
    assert ids == [EOT] + tok.encode("Me") + [EOT] and n_prompt == 1


def test_long_prompt_is_cut_from_the_left():
    prompt = "abcdefghijklmnopqrstuvwxyz"
    ids, n_prompt = encode_prompt_completion(tok, prompt, "XY", block_size=10)
    assert len(ids) == 10
    assert ids[n_prompt:] == tok.encode("XY") + [EOT]
    assert tok.decode(ids[:n_prompt]) == "tuvwxyz"       # the prompt's last 7 tokens


@given(st.integers(0, 40), st.integers(0, 40), st.integers(2, 48))
def test_rows_fit_and_keep_the_whole_completion(n_p, n_c, block_size):
    prompt, completion = "p" * n_p, "c" * n_c
    if n_c + 1 > block_size - 1:
        with pytest.raises(ValueError, match=f"completion is {n_c + 1} tokens"):
            encode_prompt_completion(tok, prompt, completion, block_size)
        return
    ids, n_prompt = encode_prompt_completion(tok, prompt, completion, block_size)
    assert len(ids) == min(block_size, n_p + n_c + 2)
    assert n_prompt >= 1
    assert ids[n_prompt:] == tok.encode(completion) + [EOT]
    full_prompt = [EOT] + tok.encode(prompt)
    assert ids[:n_prompt] == full_prompt[len(full_prompt) - n_prompt:]


def test_completion_that_cannot_fit_is_an_error_with_sizes():
    with pytest.raises(DataError) as excinfo:
        encode_prompt_completion(tok, "hi", "x" * 20, block_size=16)
    message = str(excinfo.value)
    assert "completion is 21 tokens" in message
    assert "context is 16 tokens" in message


def test_completion_filling_all_but_one_position_fits():
    ids, n_prompt = encode_prompt_completion(tok, "long prompt", "x" * 14, block_size=16)
    assert len(ids) == 16 and n_prompt == 1


def test_encode_prompt_leaves_room_for_generation():
    assert encode_prompt(tok, "abc", block_size=16, max_new_tokens=4) == [EOT] + tok.encode("abc")
    ids = encode_prompt(tok, "abcdefghij", block_size=8, max_new_tokens=4)
    assert ids == tok.encode("ghij")
    with pytest.raises(ValueError, match="max_new_tokens"):
        encode_prompt(tok, "abc", block_size=8, max_new_tokens=8)


rows = st.lists(st.tuples(st.text(max_size=12), st.text(max_size=12)), min_size=1, max_size=6)


@settings(max_examples=60)
@given(rows)
def test_collate_masks_mark_exactly_the_completion(pairs):
    block_size = 64
    batch = [encode_prompt_completion(tok, p, c, block_size) for p, c in pairs]
    out = collate(batch, tok.pad_id)
    ids, mask, att = out["input_ids"], out["completion_mask"], out["attention_mask"]

    B, T = ids.shape
    assert B == len(pairs) and T == max(len(row) for row, _ in batch)
    assert ids.dtype == np.int64 and out["lengths"].dtype == np.int64
    assert mask.dtype == np.float32 and att.dtype == np.float32
    for b, ((p, c), (row, n_prompt)) in enumerate(zip(pairs, batch)):
        length = len(row)
        assert out["lengths"][b] == length and out["prompt_lengths"][b] == n_prompt
        assert mask[b].sum() == len(c.encode("utf-8")) + 1                # completion + EOT
        assert np.array_equal(ids[b, :length], row)
        assert np.all(ids[b, length:] == PAD)                            # right padding
        assert np.all(mask[b, length:] == 0) and np.all(mask[b, :n_prompt] == 0)
        assert np.all(att[b, :length] == 1) and np.all(att[b, length:] == 0)
        # The scored tokens decode back to the completion.
        assert tok.decode(ids[b][mask[b] == 1]) == c
    # Position 0 is never scored, so shifting by one loses nothing.
    assert np.all(mask[:, 0] == 0)
    assert mask[:, 1:].sum() == mask.sum()


def test_collate_pads_to_a_fixed_width():
    batch = [([EOT, 65, 66, EOT], 2), ([EOT, 67], 1)]
    out = collate(batch, PAD, pad_to=6)
    assert out["input_ids"].tolist() == [[EOT, 65, 66, EOT, PAD, PAD],
                                         [EOT, 67, PAD, PAD, PAD, PAD]]
    assert out["completion_mask"].tolist() == [[0, 0, 1, 1, 0, 0], [0, 1, 0, 0, 0, 0]]
    with pytest.raises(ValueError, match="pad_to"):
        collate(batch, PAD, pad_to=3)


def test_collate_refuses_rows_without_a_prompt_token():
    with pytest.raises(ValueError, match="row 1"):
        collate([([EOT, 65], 1), ([65, 66], 0)], PAD)
    with pytest.raises(ValueError):
        collate([], PAD)


# --- minibatches -------------------------------------------------------------------------

def test_minibatches_cover_each_item_once_per_epoch():
    items = list(range(10))
    batches = list(iterate_minibatches(items, 3, np.random.default_rng(0), epochs=2))
    assert [len(b) for b in batches] == [3, 3, 3, 1] * 2
    first, second = sum(batches[:4], []), sum(batches[4:], [])
    assert sorted(first) == sorted(second) == items
    assert first != second                                                # reshuffled


def test_minibatches_are_deterministic_and_can_drop_the_last():
    a = list(iterate_minibatches(range(10), 4, np.random.default_rng(1), drop_last=True))
    b = list(iterate_minibatches(range(10), 4, np.random.default_rng(1), drop_last=True))
    assert a == b and [len(x) for x in a] == [4, 4]


def test_minibatches_forever_and_in_order_without_shuffle():
    batches = iterate_minibatches("abc", 2, np.random.default_rng(0), epochs=None, shuffle=False)
    assert [next(batches) for _ in range(4)] == [["a", "b"], ["c"], ["a", "b"], ["c"]]


def test_any_batch_of_the_endless_order_is_known_from_the_seed_alone():
    """What a resumed run needs: batch k without replaying batches 0..k-1."""
    items = list(range(10))
    batches = Minibatches(items, 3, seed=5)
    walked = [batches[k] for k in range(12)]                     # three epochs, in order
    assert len(batches) == 4 and [len(b) for b in walked] == [3, 3, 3, 1] * 3
    assert all(sorted(sum(walked[e * 4:(e + 1) * 4], [])) == items for e in range(3))
    assert walked[:4] != walked[4:8]                             # each epoch reshuffled
    assert Minibatches(items, 3, seed=5)[9] == walked[9]         # a fresh object jumps straight there
    assert Minibatches(items, 3, seed=6)[0] != walked[0]
    with pytest.raises(ValueError, match="empty"):
        Minibatches([], 3, seed=0)


def test_a_bad_corpus_is_a_data_error_naming_the_file(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9")
    with pytest.raises(DataError, match="bad.txt is not UTF-8"):
        load_text(tmp_path / "bad.txt")
