"""Conversations as token rows: a folder's chat template, TRL's conversational format.

TRL's conversational records hold lists of messages, ``{"role": ..., "content": ...}``:

    SFT          {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
                 {"prompt": [...messages], "completion": [...messages]}
    preferences  {"prompt": [...messages], "chosen": [...messages], "rejected": [...messages]}
                 {"chosen": [...], "rejected": [...]}   (the prompt: the messages they share)

A chat template turns messages into the text a chat model was trained on, special tokens written
out: ``<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n`` (ChatML: Qwen2, SmolLM) or
``<|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\nHi<|eot_id|>`` (Llama-3).

Which template, and why. A Hugging Face folder ships its template as Jinja (tokenizer_config.json's
``chat_template`` or chat_template.jinja), and it is the only exact statement of the format its model
was tuned on: templates differ in default system prompts, trimming, dates, tool calls. So a folder's
template is rendered with `jinja2`, as transformers renders it (same environment: trim_blocks,
lstrip_blocks, ``raise_exception``, ``tojson``, ``strftime_now``); jinja2 is an optional dependency,
in the ``[hf]`` extra. Without a template (the byte tokenizer, GPT-2, a base model's folder) the
common ChatML format is written here in Python (`render_chatml`) and no jinja2 is needed. A folder
that has a template while jinja2 is missing is an error, not ChatML: training a Llama-3 model on
another model's turn markers would be silently wrong.

The rows, as TRL builds them. A conversation is split into a prompt (the messages before the last
assistant turn) and a completion (that turn). The prompt is rendered with ``add_generation_prompt``
(so it ends with the assistant's header), prompt + completion without, both are tokenized with
special tokens matched, and the completion is what follows their common prefix: TRL's
``common_prefix_length`` rule, which is what its SFT trainer does for conversational prompt-completion
records and its DPO trainer for preference records (TRL's DPO cuts both rows of a pair at the shorter
of their two prefixes; here each row is cut at its own, which differs only where a token spans the
end of the prompt). Only the completion is learned or scored; for a
``{"messages"}`` record that is the last assistant turn, and earlier assistant turns are context.
(TRL trains on the whole conversation by default, and on every assistant turn with
``assistant_only_loss=True``, which needs ``{% generation %}`` marks most templates lack; minirlhf's
rows have one prompt and one completion, and the last turn is what every template renders the same
way.) With a folder's template the row is exactly its tokens: the template writes the BOS token
where the model wants one, and its end-of-turn token ends the completion, as in TRL. With the ChatML
fallback the row follows minirlhf's own convention (`minirlhf.datasets`): the start token first and
EOT after the completion, so a model trained here learns to stop.
"""

import datetime
import json
import re

from .tokenizer import BPETokenizer

ROLES_HINT = 'each message is {"role": str, "content": str}'


class ChatTemplateError(ValueError):
    """A template that cannot be rendered (or that refused the conversation); one line."""


# ----- checking records ------------------------------------------------------------------------------

def is_conversational(value) -> bool:
    """True for a list (of messages): what TRL's ``is_conversational`` checks a field for."""
    return isinstance(value, list)


def check_messages(value, field, allow_empty=False):
    """``value`` as a list of messages, or a ValueError naming the field and the bad message."""
    if not isinstance(value, list):
        raise ValueError(f"field '{field}' must be a list of messages, got {type(value).__name__}")
    if not value and not allow_empty:
        raise ValueError(f"field '{field}' is an empty list of messages")
    for n, message in enumerate(value):
        if not isinstance(message, dict):
            raise ValueError(f"field '{field}', message {n}: {ROLES_HINT}, got {type(message).__name__}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                got = "nothing" if key not in message else type(message[key]).__name__
                raise ValueError(f"field '{field}', message {n}: '{key}' must be a string, got {got} "
                                 f"({ROLES_HINT})")
    return value


def split_last_turn(messages):
    """(prompt, completion) of a conversation: the messages before its last assistant message, and
    that message, which must end the conversation."""
    check_messages(messages, "messages")
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"field 'messages': the last message is the {messages[-1]['role']!r}'s; "
                         "a conversation to learn from ends with the assistant's")
    return messages[:-1], messages[-1:]


def shared_prompt(chosen, rejected):
    """(prompt, chosen, rejected) of TRL's implicit-prompt preferences: the leading messages the
    two share are the prompt."""
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]


# ----- rendering ---------------------------------------------------------------------------------------

def render_chatml(messages, add_generation_prompt=False) -> str:
    """ChatML: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, and with
    ``add_generation_prompt`` the header of the assistant's answer, ``<|im_start|>assistant\\n``."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def render_chat(messages, tokenizer=None, add_generation_prompt=False) -> str:
    """The text of ``messages`` by the tokenizer's chat template (``tokenizer.chat_template``), or by
    `render_chatml` when it has none."""
    template = getattr(tokenizer, "chat_template", None)
    if template is None:
        return render_chatml(messages, add_generation_prompt)
    names = getattr(tokenizer, "special_ids", {})
    tokens = {"bos_token": names.get(getattr(tokenizer, "bos_id", None)),
              "eos_token": names.get(getattr(tokenizer, "eot_id", None)),
              "pad_token": names.get(getattr(tokenizer, "pad_id", None))}
    try:
        # tools and documents are None, as transformers passes them when there are none
        return _compiled(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                          tools=None, documents=None,
                                          **{k: v for k, v in tokens.items() if v is not None})
    except ChatTemplateError:
        raise
    except Exception as e:   # jinja2's errors (undefined names, syntax) as one line
        raise ChatTemplateError(f"the chat template failed: {type(e).__name__}: {e}") from None


_TEMPLATES = {}


def _compiled(template):
    """``template`` compiled in the environment transformers renders chat templates in (cached)."""
    if template not in _TEMPLATES:
        try:
            import jinja2
            import jinja2.ext
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise ChatTemplateError("the tokenizer has a chat template, and rendering it needs jinja2: "
                                    "pip install 'minirlhf[hf]'") from None

        def raise_exception(message):
            raise ChatTemplateError(f"the chat template refused the conversation: {message}")

        def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        # {% generation %} marks the assistant's tokens for transformers' assistant masks; the
        # text is the block's own, so it renders as an always-true {% if %} (keeping its - marks)
        source = re.sub(r"(\{%-?\s*)endgeneration(\s*-?%\})", r"\1endif\2",
                        re.sub(r"(\{%-?\s*)generation(\s*-?%\})", r"\1if true\2", template))
        try:
            _TEMPLATES[template] = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"the chat template is not valid Jinja: {e} (line {e.lineno})") from None
    return _TEMPLATES[template]


# ----- token rows --------------------------------------------------------------------------------------

def encode_chat(tokenizer, prompt, completion, start_id=None):
    """(prompt ids, completion ids) of a conversation split into ``prompt`` and ``completion``
    messages, by TRL's rule (module docstring). ``start_id`` goes first and ``tokenizer.eot_id``
    last when the tokenizer has no template of its own (ChatML fallback)."""
    prompt_ids = _encode(tokenizer, render_chat(prompt, tokenizer, add_generation_prompt=True))
    full_ids = _encode(tokenizer, render_chat(prompt + completion, tokenizer))
    if getattr(tokenizer, "chat_template", None) is None:
        start = tokenizer.eot_id if start_id is None else start_id
        prompt_ids, full_ids = [start] + prompt_ids, [start] + full_ids + [tokenizer.eot_id]
    n = common_prefix_length(prompt_ids, full_ids)
    return full_ids[:n], full_ids[n:]


def common_prefix_length(a, b) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _encode(tokenizer, text):
    """Rendered text to ids, the template's special tokens matched (BPE tokenizers; the byte
    tokenizer has none and reads the markers as text)."""
    if isinstance(tokenizer, BPETokenizer):
        return tokenizer.encode(text, special=True)
    return tokenizer.encode(text)
