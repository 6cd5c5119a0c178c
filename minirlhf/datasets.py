"""Data for every stage: the corpus, JSONL records, and padded batches with masks.

Three kinds of data flow through minirlhf, and this module turns each into
NumPy int64 arrays (the trainers move them to the device):

1. Pretraining reads plain text -- by default the ten Shakespeare plays
   shipped in ``minirlhf/data/shakespeare`` -- as one long array of byte
   tokens, and samples random windows from it (``get_batch``).
2. SFT, reward modelling, DPO and RL read JSONL files with the field names
   TRL uses: ``{"prompt", "completion"}``, ``{"prompt", "chosen",
   "rejected"}`` and ``{"prompt"}``; SFT and preferences also take TRL's
   conversational format, lists of messages (``{"messages": [...]}``), which
   the chat template renders (`minirlhf.chat`).
3. Those records become rows of ``[EOT] + prompt + completion + [EOT]``,
   padded on the right and described by masks (``collate``).

The conventions every stage relies on
-------------------------------------
* **A start token before every prompt.** The model predicts token t from the
  logits at position t-1, so the first completion token needs a position
  before it. Putting ``EOT`` in front of every prompt (as GPT-2 did between
  documents) makes that position exist even when the prompt is empty, and
  tells the model "a new text starts here". The start token counts as part
  of the prompt: ``n_prompt >= 1`` always.
* **The completion ends with EOT**, and that EOT is part of the completion:
  the model is trained to stop, and the log-prob of stopping counts.
* **Too long? Cut the prompt from the left.** The end of the prompt, next to
  the completion, is what matters most. The completion is never cut: a
  completion that cannot fit is an error, because a silently truncated
  chosen/rejected answer would change what the preference means.
* **Padding on the right** with ``PAD``, and ``completion_mask[b, t] = 1``
  exactly for the completion tokens (final EOT included). The log-prob of
  token t is read from the logits at position t-1, so a log-prob function
  uses ``logits[:, :-1]``, ``input_ids[:, 1:]`` and ``completion_mask[:, 1:]``.
  With right padding, positions before t never include padding, so causal
  attention needs no extra mask for the tokens we score.
"""

import json
from pathlib import Path

import numpy as np

from minirlhf import chat
from minirlhf.tokenizer import PAD, ByteTokenizer

SFT_FIELDS = ("prompt", "completion")
PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")
PROMPT_FIELDS = ("prompt",)


class DataError(ValueError):
    """A data file or record that cannot be used; the message says where and why."""


class Record(dict):
    """One JSONL record: a plain dict that also remembers its 1-based ``line`` in the file, so that
    a problem found later (a completion too long for the context) can still point at it."""

    def __init__(self, fields, line=None):
        super().__init__(fields)
        self.line = line


# --- the corpus ---------------------------------------------------------------

def builtin_corpus_path() -> Path:
    """The folder of the ten Shakespeare plays that ship with minirlhf."""
    return Path(__file__).resolve().parent / "data" / "shakespeare"


def load_text(path=None) -> str:
    """The text of a corpus: a ``.txt`` file, a folder of them, or the built-in plays.

    ``path=None`` means the built-in corpus. A folder contributes all its
    ``*.txt`` files (not subfolders) in sorted filename order, joined with a
    blank line, so the result never depends on the order the file system
    lists them in.
    """
    path = builtin_corpus_path() if path is None else Path(path)
    if not path.exists():
        raise FileNotFoundError(f"corpus not found: {path}")

    if path.is_dir():
        files = sorted(p for p in path.glob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"corpus folder has no .txt files: {path}")
    else:
        files = [path]

    texts = []
    for file in files:
        text = _read_utf8(file)
        if not text.strip():
            raise DataError(f"corpus file is empty (or only whitespace): {file}")
        texts.append(text)
    return "\n\n".join(texts)


def _read_utf8(file: Path) -> str:
    """The file's text, or a DataError naming the file and the first bad byte."""
    data = file.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{file} is not UTF-8 text: byte 0x{data[err.start]:02x} at offset "
            f"{err.start} ({err.reason}); re-save it as UTF-8"
        ) from None


def encode_corpus(text: str, tokenizer=None) -> np.ndarray:
    """The whole text as one 1-D int64 array of token ids (no specials added)."""
    tokenizer = ByteTokenizer() if tokenizer is None else tokenizer
    return np.asarray(tokenizer.encode(text), dtype=np.int64)


def train_val_split(tokens, val_fraction: float = 0.1):
    """Split a token array into ``(train, val)``: the first part and the last part.

    The split is a cut, not a shuffle: the last ``round(len * val_fraction)``
    tokens are the validation set, the rest the training set. A cut is
    deterministic, keeps every training window out of the validation text
    (random windows would straddle a shuffled boundary) and, on the built-in
    corpus with the default fraction, holds out all of Twelfth Night and the
    end of The Tempest (the last plays in sorted order) -- whole scenes the
    model has never seen. Both parts are views of ``tokens``.

    Each part needs at least 2 tokens, one input and its next-token target.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be a 1-D array, got shape {tokens.shape}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be strictly between 0 and 1, got {val_fraction}")

    n = len(tokens)
    n_val = int(round(n * val_fraction))
    n_train = n - n_val
    if n_train < 2 or n_val < 2:
        raise ValueError(
            f"corpus of {n} tokens is too short to split with val_fraction={val_fraction}: "
            f"train would get {n_train} and validation {n_val} tokens, and each needs at least 2"
        )
    return tokens[:n_train], tokens[n_train:]


def get_batch(tokens, block_size: int, batch_size: int, rng: np.random.Generator):
    """``batch_size`` random windows of the corpus: inputs ``x`` and targets ``y``.

    Returns two int64 arrays of shape ``(batch_size, block_size)`` with
    ``y[b, t] == x[b, t + 1]`` inside a window: ``y`` is the next token at each
    position. Window starts are drawn uniformly from ``rng``, so the same seed
    gives the same batches.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be a 1-D array, got shape {tokens.shape}")
    if block_size < 1 or batch_size < 1:
        raise ValueError(
            f"block_size and batch_size must be >= 1, got {block_size} and {batch_size}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(
            f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), "
            f"got {type(rng).__name__}"
        )
    if len(tokens) < block_size + 1:
        raise ValueError(
            f"data has {len(tokens)} tokens, too few for block_size={block_size}: "
            f"a window needs block_size + 1 = {block_size + 1} tokens (inputs plus one target)"
        )

    # A start s is valid while s + block_size (the last target) is in range.
    starts = rng.integers(0, len(tokens) - block_size, size=batch_size)
    index = starts[:, None] + np.arange(block_size)                  # (B, T)
    x = tokens[index].astype(np.int64)
    y = tokens[index + 1].astype(np.int64)
    return x, y


class TextDataset:
    """A token array seen as every window of ``block_size + 1`` tokens.

    ``dataset[i]`` is the window starting at token i as ``(x, y)``; ``len``
    counts the windows; ``get_batch`` samples random ones.
    """

    def __init__(self, tokens, block_size: int):
        self.tokens = np.asarray(tokens, dtype=np.int64)
        self.block_size = block_size
        if self.tokens.ndim != 1:
            raise ValueError(f"tokens must be a 1-D array, got shape {self.tokens.shape}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if len(self.tokens) < block_size + 1:
            raise ValueError(
                f"data has {len(self.tokens)} tokens, too few for block_size={block_size}: "
                f"a window needs {block_size + 1}"
            )

    def __len__(self):
        return len(self.tokens) - self.block_size

    def __getitem__(self, i):
        if not -len(self) <= i < len(self):
            raise IndexError(f"window {i} out of range for {len(self)} windows")
        i = i % len(self)
        window = self.tokens[i:i + self.block_size + 1]
        return window[:-1], window[1:]

    def get_batch(self, batch_size: int, rng: np.random.Generator):
        return get_batch(self.tokens, self.block_size, batch_size, rng)


# --- JSONL records --------------------------------------------------------------

def load_jsonl(path, fields, check_fields=True) -> list[dict]:
    """The records of a JSONL file, each checked to have ``fields`` as strings.

    One JSON object per line; blank lines are skipped. Records are returned
    whole (extra fields are kept but not checked). Any problem raises a
    ``DataError`` naming the file and the 1-based line, so a bad line in a
    100k-line file takes seconds to find.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset not found: {path}")
    if path.is_dir():
        raise DataError(f"{path} is a folder; expected a .jsonl file")

    records = []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            where = f"{path}, line {line_no}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{where}: not UTF-8 text ({err.reason} at byte {err.start})") from None
            if line_no == 1:
                line = line.lstrip("\ufeff")       # editors on Windows add a byte-order mark
            if not line.strip():
                continue

            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                # err's own "line 1 column 5" would be a second line number: give the column only
                raise DataError(f"{where}: not valid JSON: {err.msg} at character {err.pos + 1}") from None
            if not isinstance(record, dict):
                raise DataError(
                    f"{where}: expected a JSON object with fields {', '.join(fields)}, "
                    f"got {_json_type(record)}"
                )
            for field in fields if check_fields else ():
                _check_field(record, field, where)
            records.append(Record(record, line=line_no))

    if not records:
        raise DataError(f"{path}: no records (the file is empty or has only blank lines)")
    return records


def _check_field(record: dict, field: str, where: str):
    if field not in record:
        present = ", ".join(record) or "no fields"
        raise DataError(f"{where}: missing field '{field}' (the record has: {present})")
    value = record[field]
    if not isinstance(value, str):
        hint = ""
        if isinstance(value, list):
            hint = (" (a list of messages: the conversational format needs every field as "
                    "messages, and RL prompts are text only)")
        raise DataError(
            f"{where}: field '{field}' must be a string, got {_json_type(value)}{hint}")


def _json_type(value) -> str:
    """The JSON name of a parsed value's type, as a user wrote it in the file."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean",
             int: "number", float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def load_sft(path) -> list[dict]:
    """SFT records: ``{"prompt": str, "completion": str}`` per line, or TRL's conversational forms
    ``{"messages": [...]}`` and ``{"prompt": [...], "completion": [...]}`` (`minirlhf.chat`).

    A ``messages`` record becomes ``prompt`` (the messages before the last, the assistant's) and
    ``completion`` (that last message), so every record has the same two fields afterwards.
    """
    records = load_jsonl(path, SFT_FIELDS, check_fields=False)
    for r in records:
        where = f"{path}, line {r.line}"
        if "messages" in r and "prompt" not in r:
            r["prompt"], r["completion"] = _conversational(where, chat.split_last_turn, r["messages"])
        else:
            _check_record(r, SFT_FIELDS, where)
    return records


def load_preferences(path) -> list[dict]:
    """Preference records: ``{"prompt": str, "chosen": str, "rejected": str}`` per line, or TRL's
    conversational ``{"prompt": [...], "chosen": [...], "rejected": [...]}`` (lists of messages), or
    ``{"chosen": [...], "rejected": [...]}``, whose shared leading messages are the prompt."""
    records = load_jsonl(path, PREFERENCE_FIELDS, check_fields=False)
    for r in records:
        where = f"{path}, line {r.line}"
        if "prompt" not in r and all(chat.is_conversational(r.get(f)) for f in ("chosen", "rejected")):
            for f in ("chosen", "rejected"):
                _conversational(where, chat.check_messages, r[f], f)
            r["prompt"], r["chosen"], r["rejected"] = chat.shared_prompt(r["chosen"], r["rejected"])
        else:
            _check_record(r, PREFERENCE_FIELDS, where)
    return records


def _check_record(record, fields, where):
    """Every field a string, or (TRL's conversational format) every field a list of messages."""
    if not chat.is_conversational(record.get(fields[0])):
        for field in fields:
            _check_field(record, field, where)
        return
    for field in fields:
        if field not in record:
            _check_field(record, field, where)
        if not chat.is_conversational(record[field]):
            raise DataError(f"{where}: field '{field}' is {_json_type(record[field])} but '{fields[0]}' is "
                            f"a list of messages; give every field as text or every one as messages")
        _conversational(where, chat.check_messages, record[field], field, field == fields[0])


def _conversational(where, check, *args):
    """``check(*args)`` (a `minirlhf.chat` check), its ValueError as a DataError at ``where``."""
    try:
        return check(*args)
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None


def load_prompts(path) -> list[dict]:
    """RL prompt records: ``{"prompt": str}`` per line."""
    return load_jsonl(path, PROMPT_FIELDS)


# --- unpaired preference data (KTO) ------------------------------------------------

UNPAIRED_FIELDS = ("prompt", "completion")


def load_unpaired(path) -> list[dict]:
    """KTO's examples: TRL's unpaired format ``{"prompt", "completion", "label"}`` per line, label a
    JSON boolean (true: desirable, thumbs up). A pairs file (``{"prompt", "chosen", "rejected"}``,
    told by its first record) is accepted too and split by `unpair_preferences`. Each example keeps
    the line it came from. A data set with no undesirable or no desirable example is refused: KTO
    weighs one kind against the other's reference point, and TRL's loss needs both to learn.
    """
    records = load_jsonl(path, ("prompt",))
    paired = "chosen" in records[0] or "rejected" in records[0]
    if paired:
        for r in records:
            for field in PREFERENCE_FIELDS:
                _check_field(r, field, f"{path}, line {r.line}")
        examples = unpair_preferences(records)
    else:
        for r in records:
            where = f"{path}, line {r.line}"
            for field in UNPAIRED_FIELDS:
                _check_field(r, field, where)
            if "label" not in r:
                raise DataError(f"{where}: missing field 'label' (true: desirable, false: undesirable)")
            if not isinstance(r["label"], bool):
                raise DataError(f"{where}: field 'label' must be a boolean (true: desirable, false: "
                                f"undesirable), got {_json_type(r['label'])} {json.dumps(r['label'])}")
        examples = records
    for kind, value in (("undesirable", False), ("desirable", True)):
        if not any(r["label"] is value for r in examples):
            raise DataError(f"{path}: no {kind} example (label {str(value).lower()}) among "
                            f"{len(examples)}; KTO needs both kinds")
    return examples


def unpair_preferences(records, chunk=1000) -> list[dict]:
    """Pairs ``{"prompt", "chosen", "rejected"}`` as unpaired examples, two per pair: the chosen
    with label True and the rejected with label False, in TRL's ``unpair_preference_dataset`` order
    (its batched map: in each run of ``chunk`` pairs, every chosen, then every rejected)."""
    out = []
    for start in range(0, len(records), chunk):
        block = records[start:start + chunk]
        for field, label in (("chosen", True), ("rejected", False)):
            out += [Record({"prompt": r["prompt"], "completion": r[field], "label": label},
                           line=getattr(r, "line", None)) for r in block]
    return out


# --- rows, padding and masks ----------------------------------------------------------

def encode_prompt_completion(tokenizer, prompt, completion, block_size: int, add_eot: bool = True):
    """One training row ``[EOT] + prompt + completion (+ [EOT])`` and its prompt length.

    ``[EOT]`` at the start is `start_id` (BOS where the tokenizer has one). A conversational
    ``prompt`` and ``completion`` (lists of messages) become the rendered conversation instead, split
    as TRL splits it (`minirlhf.chat.encode_chat`).

    Returns ``(ids, n_prompt)``: ``ids[:n_prompt]`` is the prompt part
    (leading start token included, so ``n_prompt >= 1``) and
    ``ids[n_prompt:]`` the completion part (final EOT included). If the row
    is longer than ``block_size``, the prompt part loses tokens from its
    left (the start token first) until it fits. If the completion part
    alone leaves no room for even one prompt token, that is an error.
    """
    if block_size < 2:
        raise ValueError(
            f"block_size must be >= 2 (one prompt token and one completion token), "
            f"got {block_size}")

    if chat.is_conversational(prompt):
        try:
            prompt_ids, completion_ids = chat.encode_chat(tokenizer, prompt, completion, start_id(tokenizer))
        except chat.ChatTemplateError as e:
            raise DataError(str(e)) from None
    else:
        prompt_ids = [start_id(tokenizer)] + tokenizer.encode(prompt)
        completion_ids = tokenizer.encode(completion) + ([tokenizer.eot_id] if add_eot else [])
    if not prompt_ids:
        raise DataError("the chat template renders the prompt and the whole conversation with "
                        "different first tokens: no prompt token comes before the completion")
    if not completion_ids:
        raise DataError(
            "empty completion (with add_eot=False, or a template that renders the answer as "
            "nothing): the row has no token to learn or score")
    if len(completion_ids) > block_size - 1:
        raise DataError(
            f"completion is {len(completion_ids)} tokens"
            f"{' (end-of-text included)' if add_eot else ''} "
            f"but the context is {block_size} tokens, "
            f"and at least one prompt token must come before it; "
            f"shorten the completion or raise block_size"
        )

    room = block_size - len(completion_ids)
    prompt_ids = prompt_ids[-room:]
    return prompt_ids + completion_ids, len(prompt_ids)


def encode_prompt(tokenizer, prompt: str, block_size: int, max_new_tokens: int) -> list[int]:
    """``[EOT] + prompt``, cut from the left to leave room for ``max_new_tokens``.

    Generation appends up to ``max_new_tokens`` tokens, and the model cannot
    look at more than ``block_size`` positions, so the prompt may keep at most
    ``block_size - max_new_tokens`` of its last tokens.
    """
    room = block_size - max_new_tokens
    if max_new_tokens < 0 or room < 1:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} leaves no room for the prompt in a context of "
            f"{block_size} tokens; it must be between 0 and {block_size - 1}"
        )
    return ([start_id(tokenizer)] + tokenizer.encode(prompt))[-room:]


def start_id(tokenizer) -> int:
    """The start token put before every prompt: the tokenizer's BOS where it has one (Llama-3's
    ``<|begin_of_text|>``, as Hugging Face's tokenizer puts it first), else EOT."""
    bos = getattr(tokenizer, "bos_id", None)
    return tokenizer.eot_id if bos is None else bos


def collate(batch, pad_id: int = PAD, pad_to: int | None = None) -> dict:
    """Pad rows of ``(ids, n_prompt)`` on the right into NumPy arrays with masks.

    Returns a dict of arrays, with ``T`` the longest row (or ``pad_to``):

    * ``input_ids``       (B, T) int64: the rows, padded with ``pad_id``
    * ``completion_mask`` (B, T) float32: 1 where ``n_prompt <= t < length``,
      i.e. exactly the completion tokens, final EOT included
    * ``attention_mask``  (B, T) float32: 1 for real tokens, 0 for padding
    * ``lengths``         (B,) int64: tokens in each row before padding
    * ``prompt_lengths``  (B,) int64: ``n_prompt`` of each row

    The log-prob of token t comes from the logits at position t-1: use
    ``logits[:, :-1]`` against ``input_ids[:, 1:]`` weighted by
    ``completion_mask[:, 1:]``. ``completion_mask[:, 0]`` is always 0 because
    every row has at least one prompt token, so nothing is lost by the shift.
    A reward model reads its score at position ``lengths - 1``, the last real
    token.
    """
    batch = list(batch)
    if not batch:
        raise ValueError("collate needs at least one row, got an empty batch")

    lengths = np.array([len(ids) for ids, _ in batch], dtype=np.int64)
    prompt_lengths = np.array([n_prompt for _, n_prompt in batch], dtype=np.int64)
    for b, (length, n_prompt) in enumerate(zip(lengths, prompt_lengths)):
        if not 1 <= n_prompt <= length:
            raise ValueError(
                f"row {b}: n_prompt={n_prompt} must be between 1 and the row length {length} "
                f"(the first completion token needs a position before it)"
            )

    width = int(lengths.max()) if pad_to is None else pad_to
    if width < lengths.max():
        raise ValueError(
            f"pad_to={pad_to} is shorter than the longest row ({lengths.max()} tokens)")

    input_ids = np.full((len(batch), width), pad_id, dtype=np.int64)
    for b, (ids, _) in enumerate(batch):
        input_ids[b, :len(ids)] = ids

    positions = np.arange(width)[None, :]                           # (1, T)
    attention_mask = (positions < lengths[:, None]).astype(np.float32)
    completion_mask = ((positions >= prompt_lengths[:, None])
                       & (positions < lengths[:, None])).astype(np.float32)
    return {
        "input_ids": input_ids,
        "completion_mask": completion_mask,
        "attention_mask": attention_mask,
        "lengths": lengths,
        "prompt_lengths": prompt_lengths,
    }


class Minibatches:
    """An endless, epoch-by-epoch shuffled order of minibatches whose ``k``-th batch is known directly.

    ``batches[k]`` (k = 0, 1, ...) is batch ``k % n`` of epoch ``k // n`` (n = ``len(batches)``, the
    batches per epoch; the last one of an epoch may be smaller). Epoch e's order is the permutation
    drawn by ``numpy.random.default_rng((seed, e))``: it depends on nothing but the seed and e, so a
    resumed run finds its place in the data from the step alone, with no RNG state to carry.

        batches = Minibatches(rows, batch_size=16, seed=0)
        for step in range(start + 1, max_steps + 1):
            batch = batches[step - 1]
    """

    def __init__(self, items, batch_size: int, seed: int):
        self.items = list(items)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not self.items:
            raise ValueError("cannot make minibatches from an empty list")
        self.batch_size, self.seed = batch_size, seed
        self._epoch, self._order = None, None

    def __len__(self):
        return -(-len(self.items) // self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        """The permutation of the items in ``epoch``."""
        if epoch != self._epoch:  # consecutive steps mostly share an epoch: keep its order
            self._epoch = epoch
            self._order = np.random.default_rng((self.seed, epoch)).permutation(len(self.items))
        return self._order

    def __getitem__(self, k: int) -> list:
        if k < 0:
            raise IndexError(f"batch index must be >= 0, got {k}")
        epoch, i = divmod(k, len(self))
        chunk = self.order(epoch)[i * self.batch_size:(i + 1) * self.batch_size]
        return [self.items[j] for j in chunk]


def iterate_minibatches(items, batch_size: int, rng: np.random.Generator,
                        epochs: int | None = 1, shuffle: bool = True, drop_last: bool = False):
    """Yield lists of ``batch_size`` items, reshuffled with ``rng`` at each epoch.

    ``epochs=None`` goes on forever, which suits trainers that count steps:
    ``batches = iterate_minibatches(records, 8, rng, epochs=None)`` then
    ``next(batches)`` at each step. The last batch of an epoch may be smaller
    unless ``drop_last`` is set.
    """
    items = list(items)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not items:
        raise ValueError("cannot make minibatches from an empty list")
    if drop_last and len(items) < batch_size:
        raise ValueError(
            f"drop_last with {len(items)} items and batch_size={batch_size} yields nothing")

    epoch = 0
    while epochs is None or epoch < epochs:
        order = rng.permutation(len(items)) if shuffle else np.arange(len(items))
        for start in range(0, len(items), batch_size):
            chunk = order[start:start + batch_size]
            if drop_last and len(chunk) < batch_size:
                break
            yield [items[i] for i in chunk]
        epoch += 1
