"""Every stage runs on a Llama-style model: pretrain with --arch llama, the others from a tiny Llama
folder (tests/fixtures/llama_lm: RMSNorm, rotary, SwiGLU, grouped k/v heads, untied head), and the
result exports to a Llama folder. Smoke runs of two steps: the numbers are checked elsewhere."""

import json
from pathlib import Path

import numpy as np
import pytest

from minirlhf import cli
from minirlhf.checkpoint import load_model
from minirlhf.model import GPT, GPTConfig, RewardModel

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


def test_a_newcomers_pipeline_chat_sft_then_dpo_then_export_then_transformers(tmp_path):
    """A Llama folder with a tokenizer.json and a chat template (SmolLM's, tests/fixtures/tok_smollm):
    sft on {"messages": [...]} rows, dpo on conversational pairs, export, and the exported folder
    reads back with the same weights, tokenizer and template (and, optionally, in transformers)."""
    from minirlhf.hf import load_hf, save_hf
    from minirlhf.hf_tokenizer import HFTokenizer, load_hf_tokenizer

    tokenizer = load_hf_tokenizer(FIXTURES / "tok_smollm")
    base = GPT(GPTConfig(block_size=64, vocab_size=tokenizer.vocab_size, n_layer=1, n_head=4, n_kv_head=2,
                         n_embd=16, n_inner=24, norm="rms", pos="rope", mlp="swiglu", bias=False), seed=0)
    folder = save_hf(base, tmp_path / "smol", tokenizer)
    chats = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]}
             for w in ("love", "night", "sweet", "fair")]
    pairs = [{"chosen": c["messages"], "rejected": c["messages"][:1] + [{"role": "assistant", "content": "no"}]}
             for c in chats]
    for name, rows in (("chat.jsonl", chats), ("prefs.jsonl", pairs)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli.main(["sft", "--init", str(folder), "--data", str(tmp_path / "chat.jsonl"),
                     "--out-dir", str(tmp_path / "sft"), "--batch-size", "2", *QUICK]) == 0
    assert cli.main(["dpo", "--init", str(tmp_path / "sft" / "ckpt.npz"), "--data", str(tmp_path / "prefs.jsonl"),
                     "--out-dir", str(tmp_path / "dpo"), "--batch-size", "2", *QUICK]) == 0
    out = tmp_path / "smol-dpo"
    assert cli.main(["export", "--ckpt", str(tmp_path / "dpo" / "ckpt.npz"), "--out", str(out)]) == 0
    model, exported = load_hf(out)
    assert isinstance(exported, HFTokenizer) and exported.chat_template == tokenizer.chat_template
    trained = load_model(tmp_path / "dpo" / "ckpt.npz").state_dict()
    assert all(np.array_equal(a, trained[k]) for k, a in model.state_dict().items())

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = np.array([exported.encode("Say love.")])
    with torch.no_grad():
        their_logits = theirs(torch.tensor(ids)).logits.numpy()
    from minirlhf.tensor import no_grad
    with no_grad():
        np.testing.assert_allclose(model(ids).numpy(), their_logits, atol=1e-5, rtol=1e-5)
