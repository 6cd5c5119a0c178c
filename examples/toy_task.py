"""The toy task shared by the stage examples: say something about a topic, nicely.

    prompt:      "Tell me of love.\n"
    completion:  "Love is sweet.\n"   (or "Love is foul.\n")

SFT teaches the format from completions with adjectives of both kinds; the preferences (and the
reward function) favour the kind ones. Each example calls the stages before it through the public
trainers when their checkpoints are missing, so every example also runs on its own.
"""

import json
from pathlib import Path

import numpy as np

from minirlhf.train.pretrain import PretrainConfig, pretrain
from minirlhf.train.sft import SFTConfig, sft

TOPICS = ["love", "night", "the king", "the sea", "my lord", "this day", "her face", "the moon",
          "your heart", "the world", "honour", "music"]
KIND = ["sweet", "fair", "gentle", "noble", "merry", "good"]
UNKIND = ["foul", "cruel", "vile", "wretched", "false", "bitter"]
ROOT = Path("runs/examples")


def prompt_of(topic):
    return f"Tell me of {topic}.\n"


def completion_of(topic, adjective):
    return f"{topic[0].upper() + topic[1:]} is {adjective}.\n"


def reward(prompt, completion):
    """+1 for a kind word, -1 for an unkind one: the 'human' these examples align to."""
    words = completion.lower().replace(".", " ").split()
    return float(sum(w in KIND for w in words) - sum(w in UNKIND for w in words))


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def make_files(seed=0):
    """sft.jsonl (both kinds of answer), prefs.jsonl (kind preferred), prompts.jsonl."""
    rng = np.random.default_rng(seed)
    sft_rows, pref_rows = [], []
    for _ in range(8):
        for topic in TOPICS:
            adjective = rng.choice(KIND + UNKIND)
            sft_rows.append({"prompt": prompt_of(topic), "completion": completion_of(topic, adjective)})
            pref_rows.append({"prompt": prompt_of(topic),
                              "chosen": completion_of(topic, rng.choice(KIND)),
                              "rejected": completion_of(topic, rng.choice(UNKIND))})
    return {"sft": write_jsonl(ROOT / "sft.jsonl", sft_rows),
            "prefs": write_jsonl(ROOT / "prefs.jsonl", pref_rows),
            "prompts": write_jsonl(ROOT / "prompts.jsonl", [{"prompt": prompt_of(t)} for t in TOPICS])}


def ensure_pretrained(smoke=False):
    path = ROOT / ("pretrain-smoke" if smoke else "pretrain") / "ckpt.npz"
    if not path.exists():
        pretrain(PretrainConfig(out_dir=str(path.parent), n_layer=2, n_head=4, n_embd=64,
                                block_size=64, max_steps=3 if smoke else 400, sample_interval=0,
                                eval_interval=100, quiet=True))
    return str(path)


def ensure_sft(smoke=False):
    path = ROOT / ("sft-smoke" if smoke else "sft") / "ckpt.npz"
    if not path.exists():
        files = make_files()
        sft(SFTConfig(data=files["sft"], init=ensure_pretrained(smoke), out_dir=str(path.parent),
                      max_steps=3 if smoke else 400, lr=2e-3, quiet=True))
    return str(path)
