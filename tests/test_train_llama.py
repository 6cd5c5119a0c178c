"""Every stage runs on a Llama-style model: pretrain with --arch llama, the others from a tiny Llama
folder (tests/fixtures/llama_lm: RMSNorm, rotary, SwiGLU, grouped k/v heads, untied head), and the
result exports to a Llama folder. Smoke runs of two steps: the numbers are checked elsewhere."""

import json
from pathlib import Path

import numpy as np
import pytest

from minirlhf import cli
from minirlhf.checkpoint import load_model
from minirlhf.model import GPT, RewardModel

from test_train import read_metrics, workdir  # noqa: F401  (workdir is a fixture)

pytest.importorskip("safetensors")
FIXTURES = Path(__file__).parent / "fixtures"
LLAMA, LLAMA_RM = str(FIXTURES / "llama_lm"), str(FIXTURES / "llama_rm")
QUICK = ["--max-steps", "2", "--quiet"]
SAMPLING = ["--prompts-per-step", "2", "--max-new-tokens", "4"]


def test_pretrain_builds_a_llama_style_model(tmp_path):
    (tmp_path / "corpus.txt").write_text("To be, or not to be, that is the question.\n" * 40)
    assert cli.main(["pretrain", "--data", str(tmp_path / "corpus.txt"), "--out-dir", str(tmp_path / "pre"),
                     "--arch", "llama", "--n-layer", "1", "--n-head", "4", "--n-kv-head", "2",
                     "--n-embd", "16", "--block-size", "32", "--batch-size", "2", "--eval-interval", "2",
                     "--sample-interval", "0", *QUICK]) == 0
    config = load_model(tmp_path / "pre" / "ckpt.npz").config
    assert (config.norm, config.pos, config.mlp, config.n_kv_head) == ("rms", "rope", "swiglu", 2)
    assert all(np.isfinite(r["loss"]) for r in read_metrics(tmp_path / "pre"))


def stage_args(workdir, tmp_path, gold):
    return {
        "sft": ["--data", workdir["sft"], "--batch-size", "2"],
        "reward": ["--data", workdir["prefs"], "--batch-size", "2"],
        "dpo": ["--data", workdir["prefs"], "--batch-size", "2"],
        "rl": ["--prompts", workdir["prompts"], "--reward-model", LLAMA_RM, "--samples-per-prompt", "2",
               *SAMPLING],
        "ppo": ["--prompts", workdir["prompts"], "--reward-model", LLAMA_RM, "--samples-per-prompt", "2",
                *SAMPLING],
        "grpo": ["--prompts", workdir["prompts"], "--reward-fn", gold, "--num-generations", "2", *SAMPLING],
    }


@pytest.mark.parametrize("stage", ["sft", "reward", "dpo", "rl", "ppo", "grpo"])
def test_a_stage_starts_from_a_llama_folder(workdir, tmp_path, stage):   # noqa: F811
    (tmp_path / "gold.py").write_text("def reward(prompt, completion):\n    return float(len(completion))\n")
    args = stage_args(workdir, tmp_path, f"{tmp_path / 'gold.py'}:reward")[stage]
    assert cli.main([stage, "--init", LLAMA, "--out-dir", str(tmp_path / stage), *args, *QUICK]) == 0
    model = load_model(tmp_path / stage / "ckpt.npz")
    assert isinstance(model, RewardModel if stage == "reward" else GPT)
    assert model.config.pos == "rope" and model.config.n_kv_head == 2
    assert all(np.isfinite(v) for r in read_metrics(tmp_path / stage) for v in r.values()
               if isinstance(v, float))

    out = tmp_path / "hf"
    assert cli.main(["export", "--ckpt", str(tmp_path / stage / "ckpt.npz"), "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"][0] == (
        "LlamaForSequenceClassification" if stage == "reward" else "LlamaForCausalLM")
    again = load_model(out).state_dict()
    assert all(np.array_equal(a, again[k]) for k, a in model.state_dict().items())
