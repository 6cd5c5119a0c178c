"""Chat templates render as transformers renders them; conversational JSONL trains with SFT and DPO."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from minirlhf import cli
from minirlhf.chat import (ChatTemplateError, encode_chat, render_chat, render_chatml, shared_prompt,
                           split_last_turn)
from minirlhf.datasets import DataError, encode_prompt_completion, load_preferences, load_sft
from minirlhf.hf_tokenizer import load_hf_tokenizer, save_hf_tokenizer
from minirlhf.tokenizer import EOT, ByteTokenizer

FIXTURES = Path(__file__).parent / "fixtures"
CHATS = json.loads((FIXTURES / "chat_cases.json").read_text(encoding="utf-8"))
TEMPLATED = ["tok_qwen2", "tok_llama3", "tok_smollm"]     # Qwen2-style, Llama-3-style, ChatML + {% generation %}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


# ----- against transformers' apply_chat_template, recorded by scripts/make_tokenizer_fixtures.py --------

@pytest.mark.parametrize("name", TEMPLATED)
def test_rendered_conversations_equal_transformers(name):
    pytest.importorskip("jinja2")
    tok, recorded = load_hf_tokenizer(FIXTURES / name), CHATS["folders"][name]
    for messages, full, prompt in zip(CHATS["conversations"], recorded["full"], recorded["prompt"]):
        assert render_chat(messages, tok) == full
        assert render_chat(messages[:-1], tok, add_generation_prompt=True) == prompt


@pytest.mark.parametrize("name", TEMPLATED)
def test_rows_are_the_templates_tokens_split_where_trl_splits_them(name):
    pytest.importorskip("jinja2")
    tok, recorded = load_hf_tokenizer(FIXTURES / name), CHATS["folders"][name]
    for messages, ids, n_prompt in zip(CHATS["conversations"], recorded["full_ids"], recorded["prompt_len"]):
        prompt, completion = encode_chat(tok, messages[:-1], messages[-1:])
        assert prompt + completion == ids and len(prompt) == n_prompt


def test_the_chatml_fallback_equals_transformers_rendering_of_chatml():
    for messages, full, prompt in zip(CHATS["conversations"], CHATS["chatml"]["full"], CHATS["chatml"]["prompt"]):
        assert render_chatml(messages) == full
        assert render_chatml(messages[:-1], add_generation_prompt=True) == prompt


def test_without_a_template_rows_get_the_start_token_and_eot_around_chatml():
    prompt, completion = encode_chat(ByteTokenizer(), [{"role": "user", "content": "Hi"}],
                                     [{"role": "assistant", "content": "Yo"}])
    tok = ByteTokenizer()
    assert prompt == [EOT] + tok.encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert completion == tok.encode("Yo<|im_end|>\n") + [EOT]


def test_llama3_rows_start_with_its_bos_from_the_template_and_end_with_eot_id():
    pytest.importorskip("jinja2")
    tok = load_hf_tokenizer(FIXTURES / "tok_llama3")
    ids, n_prompt = encode_prompt_completion(tok, [{"role": "user", "content": "Hi"}],
                                             [{"role": "assistant", "content": "Yo"}], block_size=64)
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1 and ids[-1] == tok.eot_id
    assert tok.decode(ids[n_prompt:], show_special=True) == "Yo<|eot_id|>"


def test_a_long_conversation_loses_its_oldest_tokens_never_the_answer():
    messages = [{"role": "user", "content": "word " * 40}, {"role": "assistant", "content": "answer"}]
    ids, n_prompt = encode_prompt_completion(ByteTokenizer(), messages[:-1], messages[-1:], block_size=32)
    assert len(ids) == 32 and ByteTokenizer().decode(ids[n_prompt:]) == "answer<|im_end|>\n"


def test_without_jinja2_a_folder_template_is_an_error_and_chatml_needs_none(monkeypatch):
    monkeypatch.setitem(sys.modules, "jinja2", None)
    monkeypatch.setattr("minirlhf.chat._TEMPLATES", {})
    tok = load_hf_tokenizer(FIXTURES / "tok_qwen2")
    with pytest.raises(ChatTemplateError, match=r"needs jinja2: pip install 'minirlhf\[hf\]'"):
        render_chat([{"role": "user", "content": "Hi"}], tok)
    assert render_chat([{"role": "user", "content": "Hi"}], ByteTokenizer()) == "<|im_start|>user\nHi<|im_end|>\n"


def test_a_template_that_refuses_a_conversation_says_so_in_one_line():
    pytest.importorskip("jinja2")
    tok = load_hf_tokenizer(FIXTURES / "tok_llama3")
    with pytest.raises(DataError, match="refused the conversation: a conversation needs a message"):
        encode_prompt_completion(tok, [], [{"role": "assistant", "content": "x"}], block_size=64)


# ----- records ----------------------------------------------------------------------------------------

def test_a_messages_record_learns_its_last_assistant_turn(tmp_path):
    messages = CHATS["conversations"][2]
    [record] = load_sft(write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}]))
    assert (record["prompt"], record["completion"]) == (messages[:-1], messages[-1:])
    assert split_last_turn(messages) == (messages[:-1], messages[-1:])


def test_preferences_without_a_prompt_share_their_leading_messages(tmp_path):
    user = {"role": "user", "content": "Q"}
    good, bad = {"role": "assistant", "content": "good"}, {"role": "assistant", "content": "bad"}
    [record] = load_preferences(write_jsonl(tmp_path / "p.jsonl", [{"chosen": [user, good], "rejected": [user, bad]}]))
    assert (record["prompt"], record["chosen"], record["rejected"]) == ([user], [good], [bad])
    assert shared_prompt([user, good], [user, good]) == ([user], [good], [good])


@pytest.mark.parametrize("record, message", [
    ({"messages": [{"role": "user", "content": "Hi"}]}, "the last message is the 'user''s"),
    ({"messages": [{"role": "assistant"}]}, "message 0: 'content' must be a string, got nothing"),
    ({"messages": [{"role": "assistant", "content": ["x"]}]}, "'content' must be a string, got list"),
    ({"messages": "Hi"}, "field 'messages' must be a list of messages, got str"),
    ({"messages": []}, "field 'messages' is an empty list"),
    ({"prompt": [{"role": "user", "content": "Hi"}], "completion": "Yo"},
     "field 'completion' is string but 'prompt' is a list of messages"),
])
def test_a_bad_conversation_names_the_file_and_line(tmp_path, record, message):
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [good, record])
    with pytest.raises(DataError, match=message) as err:
        load_sft(path)
    assert "chat.jsonl, line 2: " in str(err.value) and "\n" not in str(err.value)


# ----- end to end: minirlhf sft and dpo on conversational files (byte model: the ChatML fallback) -------

@pytest.fixture(scope="module")
def chat_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    (root / "corpus.txt").write_text("To be, or not to be, that is the question.\n" * 40)
    assert cli.main(["pretrain", "--data", str(root / "corpus.txt"), "--out-dir", str(root / "pre"),
                     "--max-steps", "2", "--eval-interval", "2", "--sample-interval", "0", "--quiet",
                     "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "64"]) == 0
    words = ["love", "hate", "fair", "foul"]
    rng = np.random.default_rng(0)
    sft, prefs = [], []
    for i in range(8):
        user = {"role": "user", "content": " ".join(rng.choice(words, 2))}
        sft.append({"messages": [user, {"role": "assistant", "content": "fair love"}]})
        prefs.append({"prompt": [user], "chosen": [{"role": "assistant", "content": "fair"}],
                      "rejected": [{"role": "assistant", "content": "foul"}]})
    return {"root": root, "pre": str(root / "pre" / "ckpt.npz"),
            "sft": write_jsonl(root / "chat.jsonl", sft), "prefs": write_jsonl(root / "prefs.jsonl", prefs)}


def test_sft_then_dpo_run_on_conversational_files(chat_files):
    root = chat_files["root"]
    common = ["--max-steps", "3", "--batch-size", "4", "--eval-interval", "3", "--quiet"]
    assert cli.main(["sft", "--data", chat_files["sft"], "--init", chat_files["pre"],
                     "--out-dir", str(root / "sft"), *common]) == 0
    assert cli.main(["dpo", "--data", chat_files["prefs"], "--init", str(root / "sft" / "ckpt.npz"),
                     "--out-dir", str(root / "dpo"), *common]) == 0
    rows = [json.loads(line) for line in (root / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(np.log(2), abs=1e-5)    # policy = reference at step 1


def test_a_bad_conversation_stops_sft_with_one_line(chat_files, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "Hi"}]}])
    assert cli.main(["sft", "--data", bad, "--init", chat_files["pre"], "--out-dir", str(tmp_path / "o"),
                     "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl, line 1" in err and "Traceback" not in err


# ----- against transformers itself (optional) ---------------------------------------------------------

@pytest.mark.parametrize("name", TEMPLATED)
def test_a_saved_folder_reads_in_transformers_with_the_same_template_and_ids(name, tmp_path):
    transformers = pytest.importorskip("transformers")
    ours = load_hf_tokenizer(FIXTURES / name)
    theirs = transformers.AutoTokenizer.from_pretrained(str(save_hf_tokenizer(ours, tmp_path)))
    assert theirs.eos_token_id == ours.eot_id and theirs.pad_token_id == ours.pad_id
    assert theirs.bos_token_id == ours.bos_id
    for messages in CHATS["conversations"]:
        text = theirs.apply_chat_template(messages, tokenize=False)
        assert render_chat(messages, ours) == text
        assert theirs.encode(text, add_special_tokens=False) == ours.encode(text, special=True)


RICH_TEMPLATE = (  # what Llama-3.1-style templates use: tools, a date, loop controls, tojson
    "{{- bos_token }}\n"
    "{%- if not date_string is defined %}{%- set date_string = strftime_now('%d %b %Y') %}{%- endif %}\n"
    "{%- if tools is not none %}{{- raise_exception('tools are not expected here') }}{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if loop.index0 > 2 %}{% break %}{% endif %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}\n"
    "    {{- message['content'] | trim + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{{- {'date': date_string, 'n': messages | length} | tojson }}\n")


def test_a_template_with_tools_dates_and_loop_controls_renders_as_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    ours = load_hf_tokenizer(FIXTURES / "tok_llama3")
    ours.chat_template = RICH_TEMPLATE
    theirs = transformers.AutoTokenizer.from_pretrained(str(save_hf_tokenizer(ours, tmp_path)))
    for messages in CHATS["conversations"]:
        assert render_chat(messages, ours) == theirs.apply_chat_template(messages, tokenize=False)
