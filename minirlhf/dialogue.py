"""The plays as dialogue: prompt/reply pairs for supervised fine-tuning.

A play in the built-in corpus is a title block and a cast list, then acts and scenes. Each speech is
the speaker's name on a line of its own, then the speech, then a blank line; stage directions are in
[brackets], on lines of their own or inside a speech:

    Ber.
    Who's there?

    Fran.
    Nay, answer me: stand, and unfold yourself.

    [Exit.]

A demonstration for SFT is one speech as the prompt and the reply that follows it, from a different
speaker in the same scene, as the completion; both keep the form ``"Name.\\ntext\\n"``:

    {"prompt": "Ber.\\nWho's there?\\n", "completion": "Fran.\\nNay, answer me: stand, ...\\n"}

The plays differ in small ways, and the parser takes them as they are:

* names are abbreviated (``Ham.``) or in capitals (``HAMLET.``), joint (``Mar. and Ber.``), numbered
  (``1 Clown.``); A Midsummer Night's Dream writes them without the final full stop (``THESEUS``),
  and we add it, so that every speech has the same form;
* a name line follows a blank line and comes before text; a name that occurs only once in a play is
  not trusted (a one-word line such as ``Farewell.`` after a stage direction is a speech going on);
* acts and scenes are ``ACT I.``, ``Act 1.``, ``ACT 1``, ``Scene II.``, ``SCENE 2``, even
  ``ACT III. SCENE I. ...`` on one line: each starts a new scene, and no pair crosses it;
* a few stage directions are not closed (a blank line ends them) or are closed twice (the text
  before a stray ``]`` belongs to the direction);
* everything before the first act (title, cast list) is not dialogue.
"""

import hashlib
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .datasets import builtin_corpus_path

_HEADING = re.compile(r"^(?:ACT|Act|SCENE|Scene)\s+(?:[IVXLC]+|\d+)\b")
_WORD = r"[A-Z0-9][A-Za-z0-9'&\-]*"
_NAME = re.compile(rf"^{_WORD}(?:[ .,]+(?:and|of|{_WORD}))*\.?$")
_INLINE_DIRECTION = re.compile(r"[\[{][^\]]*\]")
_MAX_NAME = 32


@dataclass(frozen=True)
class Speech:
    """One speech: who speaks and what, with the play and the scene (0, 1, ...) it is in."""
    speaker: str          # as written, with its final full stop: "Ham.", "SIR TOBY.", "THESEUS."
    text: str             # the speech's lines, stripped, joined by "\n"; no stage directions
    play: str = ""
    scene: int = 0

    def formatted(self):
        return format_speech(self.speaker, self.text)


def format_speech(speaker, text):
    """``"Name.\\ntext\\n"``: how a speech reads in the plays, and in every prompt and reply."""
    return f"{speaker}\n{text}\n"


# ----- reading a play -------------------------------------------------------------------------------

_BLANK, _DIRECTION = object(), object()


def _clean_lines(lines):
    """The lines with stage directions removed: text lines, ``_BLANK`` and ``_DIRECTION`` markers.

    A direction opened and not closed on a line goes on until a line with ``]`` or a blank line.
    A stray ``]`` (a direction closed twice) turns the text lines just before it, back to the last
    direction or blank line, into direction too.
    """
    out, in_direction = [], False
    for raw in lines:
        line = raw.rstrip()
        if not line.strip():
            out.append(_BLANK)
            in_direction = False
            continue
        if _HEADING.match(line):
            out.append(line)
            in_direction = False
            continue
        if in_direction:
            if "]" not in line:
                continue
            line = line.split("]", 1)[1]
            in_direction = False
            out.append(_DIRECTION)
        else:
            before = line.split("[", 1)[0]
            if "]" in before and "{" not in before:  # stray "]": the tail of a direction
                while out and isinstance(out[-1], str):
                    out.pop()
                line = line.split("]", 1)[1]
                out.append(_DIRECTION)
        had_direction = bool(_INLINE_DIRECTION.search(line))
        line = _INLINE_DIRECTION.sub("", line)
        if "[" in line:  # opened here, closed on a later line (or never)
            line, in_direction = line.split("[", 1)[0], True
            had_direction = True
        if line.strip():
            out.append(line)
        elif had_direction:
            out.append(_DIRECTION)
    return out


def _is_name(line):
    """Could this (unindented) line be a speaker's name?"""
    if line != line.lstrip() or len(line) > _MAX_NAME or not _NAME.match(line):
        return False
    if _HEADING.match(line) or line.rstrip(".") in ("THE END", "FINIS"):
        return False
    letters = [c for c in line if c.isalpha()]
    return line.endswith(".") or (len(letters) >= 2 and line.upper() == line)


def _blocks(lines):
    """Scenes of blocks: each block is the text lines between blank lines (directions skipped)."""
    scenes, blocks, block = [], [], []
    for line in lines:
        if line is _BLANK:
            if block:
                blocks.append(block)
            block = []
        elif line is _DIRECTION:
            continue
        elif _HEADING.match(line):
            if block:
                blocks.append(block)
            if blocks:
                scenes.append(blocks)
            blocks, block = [], []
        else:
            block.append(line)
    if block:
        blocks.append(block)
    if blocks:
        scenes.append(blocks)
    return scenes


def parse_play(text, play=""):
    """The speeches of a play, scene by scene: a list of scenes, each a list of `Speech`.

    A block (lines between blank lines) that starts with a name line and has text after it starts a
    speech; any other block goes on with the speech before it (a speech interrupted by a stage
    direction). Text before the first act, and before a scene's first speech, is dropped.
    """
    lines = text.replace("\r\n", "\n").split("\n")
    start = next((i for i, line in enumerate(lines) if re.match(r"^(?:ACT|Act)\s", line)
                  and _HEADING.match(line)), 0)
    end = next((i for i, line in enumerate(lines) if line.strip() in ("THE END", "FINIS")), len(lines))
    scenes = _blocks(_clean_lines(lines[start:end]))

    def candidate(block):
        return len(block) >= 2 and _is_name(block[0])

    counts = Counter(block[0].rstrip() for blocks in scenes for block in blocks if candidate(block))
    result = []
    for index, blocks in enumerate(scenes):
        speeches = []   # [speaker, [lines]]
        for block in blocks:
            if candidate(block) and counts[block[0].rstrip()] >= 2:
                name = block[0].rstrip()
                speeches.append([name if name.endswith(".") else name + ".", block[1:]])
            elif speeches:
                speeches[-1][1].extend(block)
        scene = [Speech(name, "\n".join(line.strip() for line in body), play, index)
                 for name, body in speeches]
        if scene:
            result.append(scene)
    return result


# ----- prompt/reply pairs ----------------------------------------------------------------------------

def dialogue_pairs(text, play="", max_reply_bytes=80, max_prompt_bytes=None):
    """SFT records from one play: a speech and the reply to it by another speaker, same scene.

    Returns dicts ``{"prompt", "completion", "play", "scene"}`` in the order of the play. Replies
    longer than ``max_reply_bytes`` (UTF-8 bytes of ``"Name.\\ntext\\n"``) are left out, so that a
    reply fits the tokens a policy may generate; so are prompts over ``max_prompt_bytes`` if given.
    """
    pairs = []
    for scene in parse_play(text, play):
        for speech, reply in zip(scene, scene[1:]):
            if speech.speaker == reply.speaker:
                continue
            prompt, completion = speech.formatted(), reply.formatted()
            if len(completion.encode("utf-8")) > max_reply_bytes:
                continue
            if max_prompt_bytes is not None and len(prompt.encode("utf-8")) > max_prompt_bytes:
                continue
            pairs.append({"prompt": prompt, "completion": completion, "play": play,
                          "scene": speech.scene})
    return pairs


def corpus_pairs(path=None, max_reply_bytes=80, max_prompt_bytes=None):
    """`dialogue_pairs` of every play (``*.txt``) in a folder; default: the built-in corpus."""
    folder = builtin_corpus_path() if path is None else Path(path)
    files = sorted(folder.glob("*.txt")) if folder.is_dir() else [folder]
    if not files:
        raise FileNotFoundError(f"no plays (*.txt) in {folder}")
    pairs = []
    for file in files:
        pairs += dialogue_pairs(file.read_text(encoding="utf-8"), file.stem, max_reply_bytes,
                                max_prompt_bytes)
    return pairs


def is_held_out(record, fraction=0.1):
    """A deterministic split by hash of the prompt: the same records are held out on every machine
    and in every run (unlike Python's ``hash``, which is salted per process)."""
    digest = hashlib.sha256(record["prompt"].encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_pairs(pairs, fraction=0.1):
    """``(train, held_out)``: split by `is_held_out`, so one prompt never lands on both sides."""
    train = [p for p in pairs if not is_held_out(p, fraction)]
    held = [p for p in pairs if is_held_out(p, fraction)]
    return train, held


def write_jsonl(path, records, fields=None):
    """Write records as JSON lines, atomically (a temporary file, then ``os.replace``).

    ``fields`` keeps only those keys, in that order (e.g. ``("prompt", "completion")``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            row = r if fields is None else {k: r[k] for k in fields}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return str(path)
