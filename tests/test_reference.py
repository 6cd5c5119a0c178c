"""Every fused op equals its plain reference (minirlhf/reference.py), in value and in gradient.

The references are built from primitive ops, so autograd derives their backward; the fused ops
have hand-written ones. Both get the same float64 inputs and the same random cotangent, and must
agree within 1e-10. AdamW's plain update equals the optimizer over a few steps.
"""

import dataclasses

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minirlhf as mr
import minirlhf.functional as F
import minirlhf.reference as R
import minirlhf.testing as mrt
from minirlhf.checkpoint import load_model, save_checkpoint
from minirlhf.model import GPT, GPTConfig, RewardModel, ValueModel, generate
from minirlhf.nn import Parameter
from minirlhf.optim import AdamW

TOL = 1e-10


def assert_same_value_and_gradients(fused, plain, arrays, seed=0):
    """``fused(*tensors)`` and ``plain(*tensors)`` agree, and so do the gradients they send to
    every array under one random cotangent."""
    results = []
    for fn in (fused, plain):
        xs = [mr.tensor(a, requires_grad=True) for a in arrays]
        y = fn(*xs)
        cotangent = np.random.default_rng(seed).standard_normal(y.shape)
        y.backward(cotangent)
        results.append((y.numpy(), [x.grad for x in xs]))
    (y_fused, g_fused), (y_plain, g_plain) = results
    np.testing.assert_allclose(y_fused, y_plain, rtol=TOL, atol=TOL)
    for a, b in zip(g_fused, g_plain):
        np.testing.assert_allclose(a, b, rtol=TOL, atol=TOL)


@given(mrt.logits(), st.sampled_from([0, -1]))
def test_softmax_equals_its_reference(z, axis):
    assert_same_value_and_gradients(lambda x: F.softmax(x, axis), lambda x: R.softmax(x, axis), [z])


@given(mrt.logits(), st.sampled_from([0, -1]))
def test_log_softmax_equals_its_reference(z, axis):
    assert_same_value_and_gradients(lambda x: F.log_softmax(x, axis),
                                    lambda x: R.log_softmax(x, axis), [z])


@given(st.data(), mrt.shapes(min_dims=1, max_dims=2), st.sampled_from(["mean", "sum", "none"]))
def test_cross_entropy_equals_its_reference(data, batch_shape, reduction):
    z = data.draw(mrt.logits(batch_shape=batch_shape))
    t = data.draw(mrt.int_targets(z.shape[:-1], z.shape[-1], ignore_index=-100))
    if reduction == "mean":
        t.reshape(-1)[0] = 0                    # at least one kept row: the mean of none is nan
    assert_same_value_and_gradients(lambda x: F.cross_entropy(x, t, reduction=reduction),
                                    lambda x: R.cross_entropy(x, t, reduction=reduction), [z])


@given(st.data(), st.integers(1, 4), st.integers(1, 5), st.booleans())
def test_linear_equals_its_reference(data, n_in, n_out, bias):
    x = data.draw(mrt.arrays(mrt.shapes(min_dims=0, max_dims=2).map(lambda s: s + (n_in,))))
    arrays = [x, data.draw(mrt.arrays((n_in, n_out)))]
    if bias:
        arrays.append(data.draw(mrt.arrays((n_out,))))
    assert_same_value_and_gradients(F.linear, R.linear, arrays)


@given(st.data(), st.integers(1, 4), st.integers(1, 3))
def test_embedding_equals_its_reference(data, V, C):
    ids = data.draw(mrt.int_targets(data.draw(mrt.shapes(max_dims=2)), V))
    assert_same_value_and_gradients(lambda w: F.embedding(ids, w), lambda w: R.embedding(ids, w),
                                    [data.draw(mrt.arrays((V, C)))])


@given(st.data(), mrt.shapes(min_dims=1))
def test_layer_norm_equals_its_reference(data, shape):
    C = shape[-1]
    arrays = [data.draw(mrt.arrays(shape)), data.draw(mrt.arrays((C,))), data.draw(mrt.arrays((C,)))]
    assert_same_value_and_gradients(F.layer_norm, R.layer_norm, arrays)


@given(mrt.arrays(min_value=-6.0, max_value=6.0))
def test_gelu_equals_its_reference(x):
    assert_same_value_and_gradients(F.gelu, R.gelu, [x])


@given(st.data(), mrt.shapes(min_dims=1))
def test_rms_norm_equals_its_reference(data, shape):
    arrays = [data.draw(mrt.arrays(shape, min_value=0.3)), data.draw(mrt.arrays((shape[-1],)))]
    assert_same_value_and_gradients(F.rms_norm, R.rms_norm, arrays)


@given(mrt.arrays(min_value=-8.0, max_value=8.0))
def test_silu_equals_its_reference(x):
    assert_same_value_and_gradients(F.silu, R.silu, [x])


@given(st.data(), st.booleans())
def test_rope_equals_its_reference(data, padded):
    B, nh, T, hs = 2, data.draw(st.integers(1, 2)), data.draw(st.integers(1, 4)), 2 * data.draw(st.integers(1, 3))
    q, k = (data.draw(mrt.arrays((B, nh, T, hs))) for _ in range(2))
    positions = np.maximum(np.arange(T)[None] - np.array([[0], [1]]), 0) if padded else np.arange(T) + 3
    assert_same_value_and_gradients(lambda q, k: mr.stack(F.rope(q, k, positions)),
                                    lambda q, k: mr.stack(R.rope(q, k, positions)), [q, k])


@given(st.data(), st.integers(1, 3))
def test_repeat_kv_equals_its_reference(data, n_rep):
    x = data.draw(mrt.arrays((2, data.draw(st.integers(1, 2)), 3, 2)))
    assert_same_value_and_gradients(lambda x: F.repeat_kv(x, n_rep), lambda x: R.repeat_kv(x, n_rep), [x])


@given(mrt.arrays(min_value=-6.0, max_value=-0.05))
def test_log1mexp_equals_its_reference(a):
    assert_same_value_and_gradients(F.log1mexp, R.log1mexp, [a])


@given(st.data(), mrt.shapes(min_dims=1, max_dims=1))
def test_logsigmoid_odds_ratio_equals_its_reference(data, shape):
    arrays = [data.draw(mrt.arrays(shape, min_value=-4.0, max_value=-0.05)) for _ in range(2)]
    assert_same_value_and_gradients(F.logsigmoid_odds_ratio, R.logsigmoid_odds_ratio, arrays)


@given(st.data(), st.booleans())
def test_causal_attention_equals_its_reference(data, kv_cache):
    """Tq == Tk, or Tq < Tk as when new queries meet a KV cache."""
    B, nh, hs = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2)), data.draw(st.integers(1, 4))
    Tk = data.draw(st.integers(2 if kv_cache else 1, 4))
    Tq = data.draw(st.integers(1, Tk - 1)) if kv_cache else Tk
    q = data.draw(mrt.arrays((B, nh, Tq, hs)))
    k, v = (data.draw(mrt.arrays((B, nh, Tk, hs))) for _ in range(2))
    assert_same_value_and_gradients(F.causal_attention, R.causal_attention, [q, k, v])


def test_causal_attention_with_a_mask_equals_its_reference(rng):
    """A padding mask (B, 1, Tq, Tk) as generation makes it: row 1 has one column of left padding."""
    q, k, v = (rng.standard_normal((2, 2, 3, 4)) for _ in range(3))
    causal = np.tril(np.ones((3, 3), dtype=bool))
    mask = np.stack([causal, causal & ~((np.arange(3)[None, :] < 1) & (np.arange(3)[:, None] >= 1))])
    mask = mask[:, None]                                       # (B, 1, Tq, Tk)
    assert_same_value_and_gradients(lambda q, k, v: F.causal_attention(q, k, v, mask),
                                    lambda q, k, v: R.causal_attention(q, k, v, mask), [q, k, v])


@given(st.data(), st.integers(1, 3), st.integers(1, 2))
def test_self_attention_equals_its_reference(data, T, n_head):
    hs = data.draw(st.integers(1, 3))
    qkv = data.draw(mrt.arrays((data.draw(st.integers(1, 2)), T, 3 * n_head * hs)))
    assert_same_value_and_gradients(lambda a: F.self_attention(a, n_head),
                                    lambda a: R.self_attention(a, n_head), [qkv])


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_plain_adamw_step_equals_the_optimizer(rng, weight_decay):
    """Three steps of `AdamW` on two parameters (one vector per group inside) equal three
    applications of `reference.adamw_step` to each parameter's arrays."""
    shapes = [(3, 4), (5,)]
    params = [Parameter(rng.standard_normal(s)) for s in shapes]
    plain = [(p.data.copy(), np.zeros(s), np.zeros(s)) for p, s in zip(params, shapes)]
    hyper = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay)
    optimizer = AdamW(params, **hyper)
    for t in range(1, 4):
        grads = [rng.standard_normal(s) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g
        optimizer.step()
        plain = [R.adamw_step(p, g, m, v, t, **hyper) for (p, m, v), g in zip(plain, grads)]
        for p, (p_plain, _, _) in zip(params, plain):
            np.testing.assert_allclose(p.data, p_plain, rtol=TOL, atol=TOL)


# ===================================================================================================
# the whole model: GPT(GPTConfig(fused=False)) is built from the references


# a Llama-style block (RMSNorm, rotary, SwiGLU, 2 query heads per k/v head, untied head, q/k/v biases)
LLAMA_STYLE = dict(norm="rms", pos="rope", mlp="swiglu", n_head=4, n_kv_head=2, n_inner=12,
                   bias=False, attention_bias=True, tie_word_embeddings=False)
STYLES = {"gpt2": {}, "llama": LLAMA_STYLE}


def tiny_config(fused, dtype, style="gpt2"):
    return GPTConfig(**{**dict(block_size=8, vocab_size=11, n_layer=2, n_head=2, n_embd=8, dtype=dtype,
                               fused=fused), **STYLES[style]})


def assert_models_agree(run, model_class, dtype, tol, style="gpt2"):
    """``run(model)`` gives the same value on the fused and the plain model (same seed, so the
    same weights), and backward through it gives every parameter the same gradient."""
    results = []
    for fused in (True, False):
        model = model_class(tiny_config(fused, dtype, style), seed=0)
        y = run(model)
        y.backward(np.random.default_rng(1).standard_normal(y.shape).astype(dtype))
        results.append((y.numpy(), {name: p.grad for name, p in model.named_parameters()}))
    (y_fused, g_fused), (y_plain, g_plain) = results
    np.testing.assert_allclose(y_plain, y_fused, rtol=tol, atol=tol)
    assert g_plain.keys() == g_fused.keys()
    for name in g_fused:
        np.testing.assert_allclose(g_plain[name], g_fused[name], rtol=tol, atol=tol, err_msg=name)


TOLERANCES = [("float64", 1e-10), ("float32", 1e-5)]


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("dtype, tol", TOLERANCES)
def test_plain_gpt_gives_the_fused_gpts_logits_and_gradients(dtype, tol, style):
    idx = np.random.default_rng(0).integers(0, 11, (2, 8))
    assert_models_agree(lambda model: model(idx), GPT, dtype, tol, style)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("dtype, tol", TOLERANCES)
def test_plain_reward_model_gives_the_fused_rewards_and_gradients(dtype, tol, style):
    ids, lengths = np.random.default_rng(0).integers(0, 11, (3, 6)), np.array([6, 2, 4])
    assert_models_agree(lambda rm: rm(ids, lengths), RewardModel, dtype, tol, style)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("dtype, tol", TOLERANCES)
def test_plain_value_model_gives_the_fused_values_and_gradients(dtype, tol, style):
    ids = np.random.default_rng(0).integers(0, 11, (3, 6))
    assert_models_agree(lambda vm: vm(ids), ValueModel, dtype, tol, style)


@pytest.mark.parametrize("style", STYLES)
def test_plain_gpt_with_a_kv_cache_and_left_padding_gives_the_fused_logits(style):
    """A prompt run into a padded cache, then one new token: the plain attention takes the cache
    and the padding mask as the fused one does."""
    logits = []
    for fused in (True, False):
        model = GPT(tiny_config(fused, "float64", style), seed=0)
        with mr.no_grad():
            cache = model.new_kv_cache(2, pad_lengths=[0, 2])
            first = model(np.array([[1, 2, 3, 4], [0, 0, 5, 6]]), kv_cache=cache)   # (2, 4, V)
            second = model(np.array([[7], [8]]), kv_cache=cache)                   # (2, 1, V)
        logits.append(np.concatenate([first.numpy(), second.numpy()], axis=1))
    np.testing.assert_allclose(logits[1], logits[0], rtol=TOL, atol=TOL)


@pytest.mark.parametrize("style", STYLES)
def test_plain_gpt_samples_what_the_fused_gpt_samples(style):
    prompts = [[1, 2, 3], [4]]
    runs = [generate(GPT(tiny_config(fused, "float64", style), seed=0), prompts, 6, seed=3)
            for fused in (True, False)]
    assert runs[1].tokens == runs[0].tokens
    np.testing.assert_allclose(sum(runs[1].logprobs, []), sum(runs[0].logprobs, []), atol=TOL)


def test_a_checkpoint_whose_config_has_no_fused_loads_as_the_fused_model(tmp_path):
    """Checkpoints written before the switch existed hold no ``fused`` in their config."""
    model = GPT(tiny_config(True, "float32"), seed=0)
    old_config = {k: v for k, v in dataclasses.asdict(model.config).items() if k != "fused"}
    save_checkpoint(tmp_path / "old.npz", model, old_config)
    loaded = load_model(tmp_path / "old.npz")
    assert loaded.config.fused is True
    np.testing.assert_array_equal(loaded.lm_head_weight.data, model.lm_head_weight.data)


def test_attention_without_a_batch_axis_equals_its_reference():
    """q, k, v of shape (T, hs): one head, no leading axes (one block, no threads)."""
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((5, 4)) for _ in range(3))
    assert_same_value_and_gradients(F.causal_attention, R.causal_attention, [q, k, v])
