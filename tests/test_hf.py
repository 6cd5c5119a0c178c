"""Hugging Face GPT-2 folders in and out: transformers' numbers, bit-exact round trips, one-line errors.

The fixtures (tests/fixtures/, made by scripts/make_hf_fixtures.py) are tiny GPT-2 folders with random
weights and what transformers computed from them. Only the last tests need transformers itself.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("safetensors")

from minirlhf import hf  # noqa: E402
from minirlhf.checkpoint import load_model, save_checkpoint, tokenizer_for  # noqa: E402
from minirlhf.hf import HFError, load_gpt2, save_gpt2  # noqa: E402
from minirlhf.model import GPT, GPTConfig, RewardModel, ValueModel  # noqa: E402
from minirlhf.tensor import no_grad  # noqa: E402
from minirlhf.tokenizer import BPETokenizer, ByteTokenizer  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
LM, RM = FIXTURES / "gpt2_lm", FIXTURES / "gpt2_rm"


@pytest.fixture(scope="module")
def recorded():
    with np.load(FIXTURES / "gpt2_logits.npz") as f:
        return dict(f)


def logits_of(model, ids):
    with no_grad():
        return model(ids).numpy()


def rewards_of(rm, ids, lengths):
    with no_grad():
        return rm(ids, lengths).numpy()


def copy_folder(src, dst):
    shutil.copytree(src, dst)
    return dst


def edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


# ----- loading gives transformers' numbers ---------------------------------------------------------

@pytest.mark.parametrize("dtype, tol", [("float32", 1e-5), ("float64", 1e-10)])
def test_loaded_lm_computes_transformers_logits(recorded, dtype, tol):
    model, tokenizer = load_gpt2(LM, dtype=dtype)
    assert isinstance(model, GPT) and isinstance(tokenizer, BPETokenizer)
    assert model.config.block_size == 16 and model.config.vocab_size == tokenizer.vocab_size == 400
    ours = logits_of(model, recorded["ids"])
    assert ours.dtype == np.dtype(dtype)
    np.testing.assert_allclose(ours, recorded["logits" + dtype[-2:]], atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-5), ("float64", 1e-10)])
def test_loaded_sequence_classifier_is_a_reward_model_with_transformers_rewards(recorded, dtype, tol):
    rm, _ = load_gpt2(RM, dtype=dtype)
    assert isinstance(rm, RewardModel)
    ours = rewards_of(rm, recorded["rm_ids"], recorded["rm_lengths"])
    np.testing.assert_allclose(ours, recorded["rewards" + dtype[-2:]], atol=tol, rtol=tol)


def test_weights_without_the_transformer_prefix_load_the_same(tmp_path, recorded):
    from safetensors.numpy import load_file, save_file

    folder = copy_folder(LM, tmp_path / "base")
    weights = load_file(str(folder / "model.safetensors"))
    save_file({k.removeprefix("transformer."): v for k, v in weights.items()},
              str(folder / "model.safetensors"))
    edit_config(folder, architectures=["GPT2Model"])
    model, _ = load_gpt2(folder)
    np.testing.assert_allclose(logits_of(model, recorded["ids"]), recorded["logits32"],
                               atol=1e-5, rtol=1e-5)


# ----- round trips -----------------------------------------------------------------------------------

@pytest.mark.parametrize("folder", [LM, RM], ids=["lm", "reward"])
def test_load_save_load_is_bit_identical(folder, tmp_path):
    first, tokenizer = load_gpt2(folder)
    save_gpt2(first, tmp_path / "out", tokenizer)
    second, tokenizer2 = load_gpt2(tmp_path / "out")
    assert type(second) is type(first) and tokenizer2 == tokenizer
    a, b = first.state_dict(), second.state_dict()
    assert list(a) == list(b)
    assert all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def test_byte_level_model_exports_with_a_tokenizer_that_is_the_byte_tokenizer(tmp_path):
    model = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=8), seed=3)
    save_gpt2(model, tmp_path / "out")
    again, tokenizer = load_gpt2(tmp_path / "out")
    assert isinstance(tokenizer, ByteTokenizer)
    ids = np.array([ByteTokenizer().encode("to be or not to b")[:16]])
    np.testing.assert_array_equal(logits_of(again, ids), logits_of(model, ids))


def test_a_reward_heads_bias_is_folded_into_the_last_layernorm(tmp_path):
    rm = RewardModel(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=8, dtype="float64"), seed=4)
    rm.head.bias.data[...] = 0.75
    save_gpt2(rm, tmp_path / "out")
    again, _ = load_gpt2(tmp_path / "out", dtype="float64")
    assert again.head.bias.data[0] == 0
    ids, lengths = np.array([[1, 2, 3, 4], [5, 6, 257, 257]]), np.array([4, 2])
    np.testing.assert_allclose(rewards_of(again, ids, lengths), rewards_of(rm, ids, lengths), atol=1e-12)


def test_load_model_and_tokenizer_for_read_a_folder_as_a_checkpoint(tmp_path):
    model = load_model(LM)
    assert isinstance(model, GPT) and tokenizer_for(LM) == load_gpt2(LM)[1]
    npz = tmp_path / "ft" / "ckpt.npz"
    npz.parent.mkdir()
    save_checkpoint(npz, model, model.config, extra={"stage": "sft", "init": str(LM)})
    assert tokenizer_for(npz) == tokenizer_for(LM)      # followed back to the folder it started from


# ----- bad input: one line each ------------------------------------------------------------------------

def test_a_folder_without_config_json(tmp_path):
    with pytest.raises(HFError, match="has no config.json"):
        load_gpt2(tmp_path)


def test_pytorch_bin_weights_say_how_to_convert(tmp_path):
    folder = copy_folder(LM, tmp_path / "bin")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(HFError, match="save_pretrained") as err:
        load_gpt2(folder)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("changes, named", [
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "GPT-2 only"),
    ({"activation_function": "relu"}, "activation_function"),
    ({"scale_attn_weights": False}, "scale_attn_weights"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ({"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn"),
    ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon"),
])
def test_an_unsupported_config_is_refused_by_name(tmp_path, changes, named):
    folder = copy_folder(LM, tmp_path / "other")
    edit_config(folder, **changes)
    with pytest.raises(HFError, match=named):
        load_gpt2(folder)


def test_a_shape_mismatch_names_the_tensor(tmp_path):
    folder = copy_folder(LM, tmp_path / "wide")
    edit_config(folder, n_positions=32, n_ctx=32)
    with pytest.raises(HFError, match=r"transformer\.wpe\.weight has shape \(16, 32\)"):
        load_gpt2(folder)


def test_a_tokenizer_of_another_size_is_refused(tmp_path):
    folder = copy_folder(LM, tmp_path / "tok")
    BPETokenizer.byte_level().save(folder)
    with pytest.raises(HFError, match="tokenizer has 258 tokens but the model's vocab_size is 400"):
        load_gpt2(folder)


def test_an_untied_lm_head_is_refused(tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = copy_folder(LM, tmp_path / "untied")
    weights = load_file(str(folder / "model.safetensors"))
    weights["lm_head.weight"] = weights["transformer.wte.weight"] + 1
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(HFError, match="not tied"):
        load_gpt2(folder)


def test_a_nan_weight_is_refused_by_name(tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = copy_folder(LM, tmp_path / "diverged")
    weights = load_file(str(folder / "model.safetensors"))
    weights["transformer.h.0.mlp.c_fc.weight"][0, 0] = np.nan
    save_file(weights, str(folder / "model.safetensors"))
    named = r"transformer\.h\.0\.mlp\.c_fc\.weight are NaN or infinite"
    with pytest.raises(HFError, match=named) as err:
        load_gpt2(folder)
    assert "\n" not in str(err.value)


def test_a_value_model_has_no_gpt2_form(tmp_path):
    value = ValueModel(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=8), seed=6)
    with pytest.raises(HFError, match="a ValueModel has no Hugging Face form: export the policy"):
        save_gpt2(value, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_missing_safetensors_package_names_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_safetensors(name, *args, **kwargs):
        if name.startswith("safetensors"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_safetensors)
    with pytest.raises(HFError, match=r"pip install 'minirlhf\[hf\]'"):
        load_gpt2(LM)


# ----- transformers loads what we save (optional) ------------------------------------------------------

def test_transformers_loads_a_saved_gpt_with_the_same_logits(tmp_path, recorded):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = GPT(GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=16, dtype="float64"), seed=5)
    save_gpt2(model, tmp_path / "out")
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out", dtype=torch.float64).eval()
    ids = np.random.default_rng(0).integers(0, 258, size=(2, 16))
    with torch.no_grad():
        their_logits = theirs(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(logits_of(model, ids), their_logits, atol=1e-10, rtol=1e-10)


def test_transformers_loads_a_saved_reward_model_as_sequence_classification(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    rm = RewardModel(GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=16, dtype="float64"), seed=6)
    rm.head.bias.data[...] = -0.5
    save_gpt2(rm, tmp_path / "out")
    theirs = transformers.GPT2ForSequenceClassification.from_pretrained(
        tmp_path / "out", dtype=torch.float64).eval()
    assert theirs.config.pad_token_id == ByteTokenizer.pad_id
    ids = np.random.default_rng(1).integers(0, 256, size=(3, 16))
    lengths = np.array([16, 5, 1])
    for row, n in enumerate(lengths):
        ids[row, n - 1] = ByteTokenizer.eot_id                 # rows end with EOT, then padding
        ids[row, n:] = ByteTokenizer.pad_id
    with torch.no_grad():
        their_rewards = theirs(torch.tensor(ids)).logits[:, 0].numpy()
    np.testing.assert_allclose(rewards_of(rm, ids, lengths), their_rewards, atol=1e-10, rtol=1e-10)
    assert hf.is_hf_folder(tmp_path / "out")


def test_a_gpt2_vocabulary_model_round_trips_through_transformers_with_its_tokenizer(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model, tokenizer = load_gpt2(LM, dtype="float64")
    save_gpt2(model, tmp_path / "out", tokenizer)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out", dtype=torch.float64).eval()
    their_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    text = "It's 12,\n\n  my 🎉"
    ids = tokenizer.encode(text)
    assert their_tokenizer(text)["input_ids"] == ids and len(ids) <= 16     # the context is 16
    with torch.no_grad():
        their_logits = theirs(torch.tensor([ids])).logits.numpy()
    np.testing.assert_allclose(logits_of(model, np.array([ids])), their_logits, atol=1e-10, rtol=1e-10)


# ----- the command line: every stage starts from a folder, export and import ------------------------

def test_stages_start_from_a_folder_and_export_the_result(tmp_path):
    from minirlhf import cli
    from minirlhf.datasets import encode_prompt_completion

    def jsonl(name, records):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in records))
        return str(tmp_path / name)

    prompts = [f"Ham. {w}" for w in ("love", "night", "sweet", "foul")]
    sft = jsonl("sft.jsonl", [{"prompt": p, "completion": " sweet love"} for p in prompts])
    prefs = jsonl("prefs.jsonl", [{"prompt": p, "chosen": " fair", "rejected": " foul"}
                                  for p in prompts])
    quick = ["--max-steps", "2", "--quiet"]
    pairs = ["--batch-size", "2", *quick]
    assert cli.main(["sft", "--init", str(LM), "--data", sft, "--out-dir", str(tmp_path / "sft"),
                     *pairs]) == 0
    sft_ckpt = str(tmp_path / "sft" / "ckpt.npz")
    assert cli.main(["reward", "--init", sft_ckpt, "--data", prefs, "--out-dir", str(tmp_path / "rm"),
                     *pairs]) == 0
    assert cli.main(["dpo", "--init", sft_ckpt, "--data", prefs, "--out-dir", str(tmp_path / "dpo"),
                     *pairs]) == 0
    assert cli.main(["rl", "--init", sft_ckpt, "--reward-model", str(RM), "--prompts", prefs,
                     "--max-new-tokens", "4", "--prompts-per-step", "2", "--samples-per-prompt", "2",
                     "--out-dir", str(tmp_path / "rl"), *quick]) == 0

    tokenizer = tokenizer_for(tmp_path / "dpo" / "ckpt.npz")       # dpo <- sft <- the folder
    assert tokenizer == load_gpt2(LM)[1]
    ids, _ = encode_prompt_completion(tokenizer, prompts[0], " sweet love", 16)
    assert ids[0] == ids[-1] == tokenizer.eot_id == 399               # GPT-2's EOT, not the byte one

    for stage in ("dpo", "rm"):
        out = tmp_path / f"hf_{stage}"
        assert cli.main(["export", "--ckpt", str(tmp_path / stage / "ckpt.npz"), "--out", str(out)]) == 0
        model, exported = load_gpt2(out)
        assert exported == tokenizer
        a, b = model.state_dict(), load_model(tmp_path / stage / "ckpt.npz").state_dict()
        assert all(np.array_equal(a[k], b[k]) for k in a)


def test_import_writes_one_file_that_keeps_the_tokenizer(tmp_path):
    from minirlhf import cli

    npz = tmp_path / "gpt2.npz"
    assert cli.main(["import", "--hf", str(LM), "--out", str(npz)]) == 0
    assert tokenizer_for(npz) == load_gpt2(LM)[1]
    a, b = load_model(npz).state_dict(), load_gpt2(LM)[0].state_dict()
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_cli_reports_a_bad_folder_in_one_line(tmp_path, capsys):
    from minirlhf import cli

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert cli.main(["import", "--hf", str(tmp_path), "--out", str(tmp_path / "x.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("minirlhf import: error:") and "GPT-2, Llama and Qwen2 only" in err and "\n" not in err


def test_cli_refuses_to_export_a_value_model_in_one_line(tmp_path, capsys):
    from minirlhf import cli

    value = ValueModel(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=8), seed=6)
    npz = save_checkpoint(tmp_path / "value.npz", value, value.config)
    assert cli.main(["export", "--ckpt", str(npz), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("minirlhf export: error:") and "ValueModel has no Hugging Face form" in err
    assert "\n" not in err and not (tmp_path / "hf").exists()
