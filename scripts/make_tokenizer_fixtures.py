"""Make the tokenizer.json folders and the recordings that tests/test_hf_tokenizer.py and tests/test_chat.py
read.

    python scripts/make_tokenizer_fixtures.py      # offline; needs tokenizers and transformers

It writes, under tests/fixtures/ (about 250 KB in all):

    tok_qwen2/    byte-level BPE of 700 tokens trained by Hugging Face's `tokenizers` with Qwen2's
                  pipeline: NFC, a Split by Qwen2's regex, ByteLevel without its own regex;
                  <|endoftext|>, <|im_start|>, <|im_end|> special and <tool_call> a plain added
                  token; a Qwen2-style ChatML template (a default system turn) in tokenizer_config.json
    tok_llama3/   the same with Llama-3's regex (digits in runs of at most 3), ignore_merges, its
                  header tokens and a Llama-3-style template ({{ bos_token }}, trimmed contents)
    tok_gpt2/     GPT-2's pipeline: ByteLevel with its own regex, <|endoftext|>; no template
    tok_smollm/   Digits (each digit alone) then ByteLevel, ChatML with {% generation %} marks in
                  chat_template.jinja, as SmolLM's files have it
    hf_tokenizer_cases.json   a few hundred mixed-script strings and each folder's ids for them, as
                              `tokenizers` encodes them with and without special-token matching
    chat_cases.json           conversations and transformers' `apply_chat_template` of them for
                              each folder with a template, as text and as ids
"""

import json
import random
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures"

QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# Chat templates written for these fixtures in the two families' shapes
QWEN2_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}\n"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}\n")
LLAMA3_TEMPLATE = (
    "{%- if messages | length == 0 %}{{ raise_exception('a conversation needs a message') }}{%- endif %}\n"
    "{{- bos_token }}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}\n"
    "    {{- message['content'] | trim + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}\n")
CHATML_TEMPLATE = ("{% for message in messages %}"
                  "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
                  "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CHATML_GENERATION_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

PIECES = [
    "Hello", " world", "the", " The", "don't", "I'M", "it's", " they'LL", "we'd", "'ve", "O'Neil",
    "naïve", "café", "e\u0301", "A\u030a", "ﬁ", "ſ", "\u212a", "Straße", "ÆØÅ",
    "中文", "字符串", "こんにちは", "カタカナ", "안녕하세요", "Привет", " мир", "Ёлка",
    "مرحبا", " بالعالم", "שלום", "नमस्ते", "Γειά σου", "ไทย",
    "🎉", "👍🏽", "👨\u200d👩\u200d👧", "🇫🇷", "∑", "≠", "→", "½", "²", "٣٤٥", "१२३",
    "7", "42", "1234567", "3.14159", "2024-12-07", "1,000,000", "0x1F",
    " ", "  ", "   ", "\n", "\n\n", "\r\n", "\t", " \n ", "\u3000", "\xa0", "\u2028", "\x85",
    "?!", "...", "---", "__init__", "(x)", "def f(x):\n    return x**2\n", "<br/>", "#", "$5",
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|begin_of_text|>", "<tool_call>",
    "<|im_", "<|", "|>",
]
FIXED = ["", " ", "Hello world", "  leading and trailing  ", "a\n\n\nb", "x\r\ny", "12345678901",
         "<|im_start|>user\nHi<|im_end|>\n", "text<|endoftext|>more", "<|im_start|><|im_end|>",
         "I'm SURE it's 'quoted'", "e\u0301t\u00e9", "tab\tsep\tvalues", "ends with space ",
         "🎉🎉🎉", "中文 English 混合", "   \n   ", "\n", "a  b   c    d"]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello, how can I help?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}],
    [{"role": "user", "content": "Bonjour"}, {"role": "assistant", "content": "Salut !"},
     {"role": "user", "content": "Ça va? 中文 🎉"}, {"role": "assistant", "content": " Très bien. \n"}],
    [{"role": "user", "content": "  spaced  "}, {"role": "assistant", "content": "\nnewline first"}],
    [{"role": "user", "content": "Say <|im_end|> literally"}, {"role": "assistant", "content": "OK"}],
]


def corpus():
    rng = random.Random(1)
    lines = ["".join(rng.choice(PIECES[:-6]) for _ in range(12)) for _ in range(600)]
    return lines + ["First Citizen: Before we proceed any further, hear me speak."] * 20


def train(pre_tokenizer, normalizer, specials, added=(), vocab_size=700, ignore_merges=False):
    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    tok.add_tokens(list(added))
    if ignore_merges:   # the trainer makes a fresh model: set the flag in the file
        data = json.loads(tok.to_str())
        data["model"]["ignore_merges"] = True
        tok = Tokenizer.from_str(json.dumps(data))
    return tok


def write_folder(name, tok, config, jinja=None):
    folder = OUT / name
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if jinja is not None:
        (folder / "chat_template.jinja").write_text(jinja, encoding="utf-8")
    return folder


def ids_of(output):
    """apply_chat_template's ids: a list, or a BatchEncoding holding one."""
    return list(output["input_ids"] if hasattr(output, "keys") else output)


def strings():
    rng = random.Random(0)
    made = ["".join(rng.choice(PIECES) for _ in range(rng.randint(1, 8))) for _ in range(300)]
    return FIXED + made


def main():
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    folders = {
        "tok_qwen2": write_folder("tok_qwen2", train(
            pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_PATTERN), "isolated"), byte_level]),
            normalizers.NFC(), ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], added=["<tool_call>"]),
            {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
             "chat_template": QWEN2_TEMPLATE}),
        "tok_llama3": write_folder("tok_llama3", train(
            pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_PATTERN), "isolated"), byte_level]),
            None, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|eot_id|>"], ignore_merges=True),
            {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3_TEMPLATE}),
        "tok_gpt2": write_folder("tok_gpt2", train(
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), None, ["<|endoftext|>"],
            vocab_size=500), {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}),
        "tok_smollm": write_folder("tok_smollm", train(
            pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]),
            None, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], vocab_size=500),
            {"eos_token": "<|im_end|>", "bos_token": "<|im_start|>", "pad_token": "<|im_end|>"},
            jinja=CHATML_GENERATION_TEMPLATE),
    }

    texts = strings()
    cases = {"strings": texts, "tokenizers": {}}
    for name, folder in folders.items():
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        special = [tok.encode(t, add_special_tokens=False).ids for t in texts]
        tok.encode_special_tokens = True
        plain = [tok.encode(t, add_special_tokens=False).ids for t in texts]
        # "plain" only where it differs from "special": where the string names a special token
        cases["tokenizers"][name] = {"special": special,
                                     "plain": [p if p != s else None for p, s in zip(plain, special)]}
    (OUT / "hf_tokenizer_cases.json").write_text(json.dumps(cases, ensure_ascii=False) + "\n", encoding="utf-8")

    from transformers import AutoTokenizer
    chats = {"conversations": CONVERSATIONS, "folders": {}}
    for name in ("tok_qwen2", "tok_llama3", "tok_smollm"):
        tok = AutoTokenizer.from_pretrained(str(folders[name]))
        rendered = {"full": [], "prompt": [], "full_ids": [], "prompt_len": []}
        for messages in CONVERSATIONS:
            rendered["full"].append(tok.apply_chat_template(messages, tokenize=False))
            rendered["prompt"].append(tok.apply_chat_template(messages[:-1], tokenize=False,
                                                              add_generation_prompt=True))
            full, prompt = (ids_of(tok.apply_chat_template(m, tokenize=True, add_generation_prompt=g))
                            for m, g in ((messages, False), (messages[:-1], True)))
            rendered["full_ids"].append(full)
            # TRL's split: the completion starts where the prompt's ids and the whole's part
            rendered["prompt_len"].append(next((n for n, (a, b) in enumerate(zip(prompt, full)) if a != b),
                                               min(len(prompt), len(full))))
        chats["folders"][name] = rendered
    # the plain ChatML that minirlhf writes in Python, rendered by transformers from its Jinja form
    tok = AutoTokenizer.from_pretrained(str(folders["tok_gpt2"]))
    chats["chatml"] = {"full": [tok.apply_chat_template(m, tokenize=False, chat_template=CHATML_TEMPLATE)
                                for m in CONVERSATIONS],
                       "prompt": [tok.apply_chat_template(m[:-1], tokenize=False, add_generation_prompt=True,
                                                          chat_template=CHATML_TEMPLATE)
                                  for m in CONVERSATIONS]}
    (OUT / "chat_cases.json").write_text(json.dumps(chats, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
