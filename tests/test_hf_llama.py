"""Llama and Qwen2 folders in and out: transformers' numbers without torch, round trips, one-line errors.

The fixtures (tests/fixtures/llama_lm, llama_rm, qwen2_lm, made by scripts/make_hf_fixtures.py) are
tiny random models with what transformers computed from them (llama_logits.npz): plain, through its
KV cache, and on left-padded rows. Only the last tests need torch and transformers themselves.
"""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("safetensors")

from minirlhf.checkpoint import load_model, tokenizer_for  # noqa: E402
from minirlhf.hf import HFError, load_hf, save_hf  # noqa: E402
from minirlhf.model import GPT, GPTConfig, RewardModel  # noqa: E402
from minirlhf.tensor import no_grad  # noqa: E402
from minirlhf.tokenizer import ByteTokenizer  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
LLAMA, LLAMA_RM, QWEN2 = FIXTURES / "llama_lm", FIXTURES / "llama_rm", FIXTURES / "qwen2_lm"
TOLERANCES = [("float64", 1e-10), ("float32", 1e-5)]
LMS = ["llama_lm", "qwen2_lm"]


@pytest.fixture(scope="module")
def recorded():
    with np.load(FIXTURES / "llama_logits.npz") as f:
        return dict(f)


def edited_copy(src, dst, **changes):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("name", LMS)
@pytest.mark.parametrize("dtype, tol", TOLERANCES)
def test_a_loaded_folder_computes_transformers_logits(recorded, name, dtype, tol):
    model, tokenizer = load_hf(FIXTURES / name, dtype=dtype)
    assert isinstance(model, GPT) and isinstance(tokenizer, ByteTokenizer)
    with no_grad():
        ours = model(recorded[name + "/ids"]).numpy()
    np.testing.assert_allclose(ours, recorded[f"{name}/logits{dtype[-2:]}"], rtol=tol, atol=tol)


def test_the_folders_are_what_they_claim(recorded):
    llama, qwen = load_hf(LLAMA)[0].config, load_hf(QWEN2)[0].config
    assert (llama.n_head, llama.n_kv_head, llama.tie_word_embeddings, llama.attention_bias) == (4, 2, False, False)
    assert (qwen.n_kv_head, qwen.tie_word_embeddings, qwen.attention_bias, qwen.rope_theta) == (1, True, True, 1e6)
    assert (QWEN2 / "model.safetensors.index.json").is_file()        # read from its shards


@pytest.mark.parametrize("name", LMS)
@pytest.mark.parametrize("dtype, tol", TOLERANCES)
def test_one_token_at_a_time_through_the_kv_cache_gives_transformers_logits(recorded, name, dtype, tol):
    model, _ = load_hf(FIXTURES / name, dtype=dtype)
    ids = recorded[name + "/ids"]
    cache = model.new_kv_cache(len(ids))
    with no_grad():
        model(ids[:, :7], kv_cache=cache)
        steps = [model(ids[:, t:t + 1], kv_cache=cache).numpy() for t in range(7, ids.shape[1])]
    np.testing.assert_allclose(np.concatenate(steps, axis=1), recorded[f"{name}/cached{dtype[-2:]}"],
                               rtol=tol, atol=tol)


@pytest.mark.parametrize("name", LMS)
@pytest.mark.parametrize("dtype, tol", TOLERANCES)
def test_left_padded_rows_give_transformers_logits_at_their_real_tokens(recorded, name, dtype, tol):
    """Rotary positions count real tokens only: transformers was given position ids that do so."""
    model, _ = load_hf(FIXTURES / name, dtype=dtype)
    ids, pad = recorded[name + "/ids"].copy(), recorded[name + "/pad"]
    for row, n in enumerate(pad):
        ids[row, :n] = 257
    with no_grad():
        ours = model(ids, kv_cache=model.new_kv_cache(len(ids), pad_lengths=pad)).numpy()
    theirs = recorded[f"{name}/padded{dtype[-2:]}"]
    for row, n in enumerate(pad):
        np.testing.assert_allclose(ours[row, n:], theirs[row, n:], rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype, tol", TOLERANCES)
def test_a_sequence_classification_folder_is_a_reward_model_with_transformers_rewards(recorded, dtype, tol):
    rm, _ = load_hf(LLAMA_RM, dtype=dtype)
    assert isinstance(rm, RewardModel)
    with no_grad():
        ours = rm(recorded["llama_rm/rm_ids"], recorded["llama_rm/rm_lengths"]).numpy()
    np.testing.assert_allclose(ours, recorded[f"llama_rm/rewards{dtype[-2:]}"], rtol=tol, atol=tol)


@pytest.mark.parametrize("folder", [LLAMA, QWEN2, LLAMA_RM])
def test_save_hf_then_load_hf_is_bit_exact(tmp_path, folder):
    model, tokenizer = load_hf(folder)
    out = save_hf(model, tmp_path / "out", tokenizer)
    again, tokenizer_again = load_hf(out)
    assert type(again) is type(model) and again.config == model.config
    assert type(tokenizer_again) is type(tokenizer)
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    if isinstance(model, RewardModel):
        assert json.loads((out / "config.json").read_text())["pad_token_id"] == ByteTokenizer.pad_id


def test_a_llama_style_model_made_here_round_trips_with_its_kind(tmp_path):
    for attention_bias, kind in ((False, "llama"), (True, "qwen2")):
        model = GPT(llama_style(attention_bias=attention_bias), seed=1)
        out = save_hf(model, tmp_path / kind)
        assert json.loads((out / "config.json").read_text())["model_type"] == kind
        with no_grad():
            ids = np.arange(10)[None] % 258
            np.testing.assert_array_equal(load_hf(out)[0](ids).numpy(), model(ids).numpy())


def llama_style(**changes):
    return GPTConfig(**{**dict(block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=16, n_inner=24,
                               norm="rms", pos="rope", mlp="swiglu", bias=False,
                               tie_word_embeddings=False), **changes})


def test_stages_read_a_llama_folder_as_a_checkpoint():
    assert isinstance(load_model(LLAMA), GPT) and isinstance(load_model(LLAMA_RM), RewardModel)
    assert isinstance(tokenizer_for(LLAMA), ByteTokenizer)


# ----- bad input: one line each ------------------------------------------------------------------------

@pytest.mark.parametrize("changes, named", [
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope_scaling type 'yarn'"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling type 'dynamic'"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"num_local_experts": 8}, "num_local_experts=8: mixtures of experts"),
    ({"model_type": "mixtral", "architectures": ["MixtralForCausalLM"]}, "GPT-2, Llama and Qwen2 only"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
    ({"head_dim": 8}, "head_dim=8"),
    ({"num_key_value_heads": 3}, "n_head=4 is not divisible by n_kv_head=3"),
])
def test_an_unsupported_config_is_refused_by_name(tmp_path, changes, named):
    folder = edited_copy(LLAMA, tmp_path / "other", **changes)
    with pytest.raises(HFError, match=named) as err:
        load_hf(folder)
    assert "\n" not in str(err.value)


def test_linear_and_llama3_rope_scaling_are_read():
    for scaling in ({"rope_type": "linear", "factor": 2.0},
                    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 16}):
        config = GPTConfig(**{**dataclasses.asdict(llama_style()), "rope_scaling": scaling})
        assert config.rope_scaling == scaling


def test_a_missing_tensor_is_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = edited_copy(LLAMA, tmp_path / "missing")
    weights = load_file(str(folder / "model.safetensors"))
    del weights["model.layers.1.mlp.gate_proj.weight"]
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(HFError, match=r"missing tensor model\.layers\.1\.mlp\.gate_proj\.weight"):
        load_hf(folder)


def test_a_config_that_does_not_match_the_weights_names_the_tensor(tmp_path):
    folder = edited_copy(LLAMA, tmp_path / "narrow", intermediate_size=20)
    with pytest.raises(HFError, match=r"mlp\.c_fc\.weight has shape \(16, 24\)") as err:
        load_hf(folder)
    assert "\n" not in str(err.value)


def test_bin_weights_say_safetensors_is_what_is_read_and_how_to_convert(tmp_path):
    folder = edited_copy(LLAMA, tmp_path / "bin")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(HFError, match="reads safetensors only") as err:
        load_hf(folder)
    assert "safe_serialization=True" in str(err.value) and "LlamaForCausalLM" in str(err.value)


def test_a_shard_that_the_index_lists_but_is_missing_is_named(tmp_path):
    shutil.copytree(QWEN2, tmp_path / "q")
    (tmp_path / "q" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(HFError, match="model-00002-of-00002.safetensors"):
        load_hf(tmp_path / "q")


def test_n_head_not_divisible_by_n_kv_head_is_one_line_at_config_time():
    with pytest.raises(ValueError, match="n_head=4 is not divisible by n_kv_head=3"):
        llama_style(n_kv_head=3)


def test_a_mixed_architecture_has_no_hugging_face_form(tmp_path):
    model = GPT(GPTConfig(block_size=8, n_layer=1, n_head=2, n_embd=8, pos="rope"))
    with pytest.raises(HFError, match="no Hugging Face form"):
        save_hf(model, tmp_path / "out")


# ----- transformers loads what we save (optional) ------------------------------------------------------

@pytest.mark.parametrize("attention_bias", [False, True], ids=["llama", "qwen2"])
def test_transformers_loads_a_saved_llama_style_model_with_the_same_logits(tmp_path, attention_bias):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = GPT(llama_style(attention_bias=attention_bias, dtype="float64"), seed=2)
    for p in model.parameters():     # norms and biases away from 1 and 0, so a swap would show
        p.data += 0.1 * np.random.default_rng(p.size).standard_normal(p.shape)
    save_hf(model, tmp_path / "out")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = np.random.default_rng(0).integers(0, 258, size=(2, 20))
    with torch.no_grad():
        their_logits = theirs(torch.tensor(ids)).logits.numpy()
    with no_grad():
        ours = GPT(dataclasses.replace(model.config, dtype="float32")).load_state_dict(model.state_dict())(ids)
    np.testing.assert_allclose(ours.numpy(), their_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_transformers_scores_a_batch_of_4_of_different_lengths_with_an_exported_reward_model(tmp_path, kind):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = llama_style() if kind == "llama" else GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=16)
    rm = RewardModel(config, seed=3)
    rm.head.weight.data += 0.5
    save_hf(rm, tmp_path / "out")
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    lengths = np.array([12, 3, 7, 1])
    ids = np.random.default_rng(4).integers(0, 256, size=(4, 12))
    for row, n in enumerate(lengths):
        ids[row, n:] = ByteTokenizer.pad_id
    with torch.no_grad():
        their_rewards = theirs(torch.tensor(ids), attention_mask=torch.tensor(ids != ByteTokenizer.pad_id)
                               ).logits[:, 0].numpy()
    with no_grad():
        np.testing.assert_allclose(rm(ids, lengths).numpy(), their_rewards, atol=1e-5, rtol=1e-5)


def test_a_bfloat16_folder_is_read_as_float32_exactly(tmp_path):
    """SmolLM's upload is bfloat16: each value is a float32's upper 16 bits, written here by hand in
    the safetensors layout (header length, JSON header, bytes), and read back bit for bit."""
    from safetensors.numpy import load_file

    folder = edited_copy(LLAMA, tmp_path / "bf16")
    weights = load_file(str(folder / "model.safetensors"))
    halves = {k: (v.astype(np.float32).view(np.uint32) >> 16).astype("<u2") for k, v in weights.items()}
    header, offset = {}, 0
    for name, h in halves.items():
        header[name] = {"dtype": "BF16", "shape": list(h.shape), "data_offsets": [offset, offset + h.nbytes]}
        offset += h.nbytes
    text = json.dumps(header).encode()
    with open(folder / "model.safetensors", "wb") as f:
        f.write(np.array([len(text)], dtype="<u8").tobytes() + text)
        for h in halves.values():
            f.write(h.tobytes())
    model, _ = load_hf(folder)
    for name, h in halves.items():
        ours = {"model.embed_tokens.weight": "transformer.wte.weight", "lm_head.weight": "lm_head.weight"}.get(name)
        if ours:
            got = model.state_dict()[ours]
            expected = (h.astype(np.uint32) << 16).view(np.float32)
            np.testing.assert_array_equal(got, expected.T if ours == "lm_head.weight" else expected)
