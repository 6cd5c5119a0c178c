"""`decode.step`, a sampling step on raw arrays, gives the model's own logits to the last bit, at every
switch of `GPTConfig`, and `generate` uses it only where it is the model's code."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minirlhf import decode
from minirlhf.model import GPT, GPTConfig, generate
from minirlhf.tensor import no_grad

LLAMA = dict(norm="rms", pos="rope", mlp="swiglu", bias=False, tie_word_embeddings=False)
CONFIGS = {
    "gpt2": {},
    "no biases": dict(bias=False),
    "float64": dict(dtype="float64"),
    "rms norm": dict(norm="rms"),
    "rope": dict(pos="rope"),
    "swiglu": dict(mlp="swiglu", n_inner=40),
    "grouped kv heads": dict(n_head=4, n_kv_head=2),
    "own lm head": dict(tie_word_embeddings=False),
    "llama": dict(LLAMA, n_kv_head=2),
    "qwen2": dict(LLAMA, n_kv_head=1, attention_bias=True),
    "llama3 rope scaling": dict(LLAMA, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 8}),
}


def make(**switches):
    cfg = dict(block_size=24, vocab_size=37, n_layer=2, n_head=4, n_embd=32)
    cfg.update(switches)
    model = GPT(GPTConfig(**cfg), seed=2)
    model.eval()
    return model


def assert_steps_match(model, prompts, pads, steps, rng):
    """After the prompts, ``steps`` new tokens each way, on a cache of its own: `decode.step`'s
    logits and cache are the model's, bit for bit, every step."""
    B, L = prompts.shape
    with no_grad():
        ours, theirs = (model.new_kv_cache(B, pads, max_length=L + steps) for _ in range(2))
        model(prompts, kv_cache=ours)
        model(prompts, kv_cache=theirs)
        for _ in range(steps):
            new = rng.integers(0, model.config.vocab_size, (B, 1))
            fast = decode.step(model, new, ours)
            slow = model(new, kv_cache=theirs).data
            assert fast.shape == slow.shape == (B, 1, model.config.vocab_size)
            assert np.array_equal(fast, slow)
            assert ours.length == theirs.length
            for layer in range(model.config.n_layer):
                assert np.array_equal(ours.k[layer], theirs.k[layer])
                assert np.array_equal(ours.v[layer], theirs.v[layer])


@pytest.mark.parametrize("pad", [False, True], ids=["same lengths", "left padding"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_step_gives_the_models_logits_bit_for_bit(name, pad):
    rng = np.random.default_rng(0)
    pads = np.array([0, 2, 4]) if pad else None
    assert_steps_match(make(**CONFIGS[name]), rng.integers(0, 37, (3, 5)), pads, 6, rng)


def test_it_is_used_only_where_it_is_the_models_code():
    model = make()
    assert decode.supports(model)
    model.train()
    assert not decode.supports(model)                    # dropout would differ
    assert not decode.supports(make(fused=False))        # the plain ops: other kernels


def test_a_gpt_whose_forward_was_replaced_samples_from_its_own_forward():
    class AlwaysSeven(GPT):
        def forward(self, idx, kv_cache=None):
            logits = super().forward(idx, kv_cache)
            bias = np.zeros(logits.shape[-1], dtype=logits.data.dtype)
            bias[7] = 1e4                                # token 7, always
            return logits + bias

    model = AlwaysSeven(make().config, seed=2)
    out = generate(model, [[1, 2], [3]], 6, temperature=0)
    assert out.tokens == [[7] * 6, [7] * 6]


def test_a_gpt_with_a_replaced_layer_samples_from_that_layer(monkeypatch):
    """decode.step reads each layer's weights itself, so a model with a layer of the user's own
    goes the model's way: the tokens are those of its own forward."""
    from minirlhf.nn import Linear

    class Doubled(Linear):
        def forward(self, x):
            return super().forward(x) * 2.0

    model = make()
    old = model.transformer.h[0].mlp.c_fc
    new = Doubled(old.in_features, old.out_features, rng=np.random.default_rng(0))
    model.transformer.h[0].mlp.c_fc = new
    out = generate(model, [[1, 2], [3]], 8, temperature=1.0, seed=3)
    monkeypatch.setattr(decode, "step", lambda *a: pytest.fail("decode.step ran"))
    assert generate(model, [[1, 2], [3]], 8, temperature=1.0, seed=3).tokens == out.tokens


def test_generate_samples_what_the_model_samples_step_by_step(monkeypatch):
    """The same tokens and log-probs with the raw step as with the model's forward."""
    model = make(**CONFIGS["llama"])
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10]]
    steps, real_step = [], decode.step
    monkeypatch.setattr(decode, "step", lambda *a: steps.append(1) or real_step(*a))
    fast = generate(model, prompts, 10, temperature=1.0, seed=4)
    assert len(steps) == 9                               # every token after the prompt's first
    monkeypatch.setattr(decode, "supports", lambda model: False)
    slow = generate(model, prompts, 10, temperature=1.0, seed=4)
    assert fast.tokens == slow.tokens and fast.logprobs == slow.logprobs


@settings(max_examples=25)
@given(data=st.data())
def test_any_config_any_padding_gives_the_models_logits(data):
    """Random shapes and switches, random left padding, a few steps: bit for bit every step."""
    n_head = data.draw(st.sampled_from([1, 2, 4]), "n_head")
    switches = dict(
        n_layer=data.draw(st.integers(1, 2), "n_layer"), n_head=n_head,
        n_kv_head=data.draw(st.sampled_from([d for d in (1, 2, 4) if n_head % d == 0]), "n_kv_head"),
        n_embd=n_head * data.draw(st.sampled_from([2, 4, 8]), "head size"),
        norm=data.draw(st.sampled_from(["layer", "rms"]), "norm"),
        pos=data.draw(st.sampled_from(["learned", "rope"]), "pos"),
        mlp=data.draw(st.sampled_from(["gelu", "swiglu"]), "mlp"),
        bias=data.draw(st.booleans(), "bias"),
        tie_word_embeddings=data.draw(st.booleans(), "tied head"))
    model = make(**switches)
    B = data.draw(st.integers(1, 4), "batch")
    L = data.draw(st.integers(1, 6), "prompt length")
    pads = np.array([data.draw(st.integers(0, L - 1), f"pad {b}") for b in range(B)])
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), "seed"))
    assert_steps_match(model, rng.integers(0, 37, (B, L)), pads, 4, rng)
