"""GPT-2 and the reward model: gradients, causality, names, tying, init, the KV cache."""

import math

import numpy as np
import pytest

import minirlhf as mr
import minirlhf.functional as F
from minirlhf.model import GPT, GPTConfig, KVCache, RewardModel, generate
from minirlhf.optim import AdamW, param_groups

TINY = dict(n_layer=2, n_embd=16, n_head=2, block_size=8, vocab_size=11)


def tiny(dtype="float64", seed=0, **kw):
    return GPT(GPTConfig(**{**TINY, "dtype": dtype, **kw}), seed=seed)


def swapped(model, names, fn):
    """A function of the given parameters' values: ``fn()`` with those parameters replaced by the
    tensors it is called with (gradcheck perturbs them), the originals put back afterwards."""
    modules = dict(model.named_modules())
    slots = [(modules[n.rsplit(".", 1)[0]], n.rsplit(".", 1)[1]) for n in names]

    def f(*tensors):
        originals = [getattr(m, a) for m, a in slots]
        for (m, a), t in zip(slots, tensors):
            setattr(m, a, t)
        try:
            return fn()
        finally:
            for (m, a), o in zip(slots, originals):
                setattr(m, a, o)

    params = dict(model.named_parameters())
    return f, [params[n].data for n in names]


CHECKED = ["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight",
           "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.bias",
           "transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_proj.weight",
           "transformer.ln_f.bias"]


def test_the_whole_model_passes_a_directional_gradient_check_on_the_loss(rng):
    model = tiny()
    idx = rng.integers(0, 11, (2, 8))
    f, values = swapped(model, CHECKED, lambda: F.cross_entropy(model(idx[:, :-1]), idx[:, 1:]))
    assert mr.gradcheck(f, values, mode="directional")


def test_the_whole_model_passes_a_directional_gradient_check_on_the_logits(rng):
    model = tiny(seed=1)
    idx = rng.integers(0, 11, (2, 6))
    f, values = swapped(model, CHECKED[:4], lambda: model(idx))
    assert mr.gradcheck(f, values, mode="directional")


def test_a_wrong_gradient_is_caught_by_the_same_check(rng):
    """The check above has teeth: scaling one parameter's use without its gradient fails it."""
    model = tiny()
    idx = rng.integers(0, 11, (1, 5))
    block = model.transformer.h[0].mlp

    def loss():
        w = block.c_fc.weight
        block.c_fc.weight = mr.Tensor(w.data * 2)                # used doubled, gradient cut
        try:
            return F.cross_entropy(model(idx[:, :-1]), idx[:, 1:])
        finally:
            block.c_fc.weight = w

    f, values = swapped(model, ["transformer.h.0.mlp.c_fc.weight"], loss)
    with pytest.raises(mr.GradcheckError):
        mr.gradcheck(f, values, mode="directional")


def test_a_future_token_never_changes_earlier_logits(rng):
    model = tiny()
    idx = rng.integers(0, 11, (2, 8))
    base = model(idx).data
    for t in range(8):
        changed = idx.copy()
        changed[:, t] = (changed[:, t] + 1) % 11
        out = model(changed).data
        np.testing.assert_array_equal(out[:, :t], base[:, :t])
        assert not np.allclose(out[:, t], base[:, t])


@pytest.mark.parametrize("bias", [True, False])
def test_parameter_count_follows_the_formula(bias):
    cfg = GPTConfig(n_layer=3, n_embd=24, n_head=4, block_size=16, vocab_size=50, bias=bias)
    C, V, T, L = cfg.n_embd, cfg.vocab_size, cfg.block_size, cfg.n_layer
    per_block = 12 * C * C + (13 * C if bias else 2 * C)  # 4 matrices + biases and LayerNorms
    expected = V * C + T * C + L * per_block + (2 * C if bias else C)
    assert GPT(cfg).num_parameters() == expected


def test_parameter_names_are_gpt2s():
    names = [n for n, _ in tiny().named_parameters()]
    block = ["ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
             "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
             "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias"]
    expected = (["transformer.wte.weight", "transformer.wpe.weight"]
                + [f"transformer.h.{i}.{b}" for i in range(2) for b in block]
                + ["transformer.ln_f.weight", "transformer.ln_f.bias"])
    assert names == expected
    shapes = dict((n, p.shape) for n, p in tiny().named_parameters())
    assert shapes["transformer.h.0.attn.c_attn.weight"] == (16, 48)       # Conv1D's (in, out)
    assert shapes["transformer.h.0.mlp.c_proj.weight"] == (64, 16)


def test_the_lm_head_is_the_token_embedding(rng):
    model = tiny()
    wte = model.transformer.wte.weight
    assert model.lm_head_weight is wte
    idx = rng.integers(0, 11, (2, 5))
    np.testing.assert_allclose(model(idx).data, model.hidden_states(idx).data @ wte.data.T,
                               rtol=1e-12, atol=1e-15)
    assert [n for n, p in model.named_parameters() if p.shape in ((11, 16), (16, 11))] == \
        ["transformer.wte.weight"]
    # the embedding's gradient has the head's part: rows of tokens never fed in still get one
    loss = F.cross_entropy(model(np.zeros((1, 4), dtype=np.int64)), np.array([[3, 3, 3, 3]]))
    loss.backward()
    assert np.abs(wte.grad[3]).sum() > 0


def test_initialisation_follows_gpt2():
    cfg = GPTConfig(n_layer=4, n_embd=128, n_head=4)
    model = GPT(cfg)
    p = dict(model.named_parameters())
    assert p["transformer.wte.weight"].data.std() == pytest.approx(0.02, rel=0.02)
    assert p["transformer.h.0.attn.c_attn.weight"].data.std() == pytest.approx(0.02, rel=0.03)
    assert p["transformer.h.0.mlp.c_fc.weight"].data.std() == pytest.approx(0.02, rel=0.03)
    small = 0.02 / math.sqrt(2 * cfg.n_layer)
    for name in ("attn.c_proj.weight", "mlp.c_proj.weight"):
        assert p[f"transformer.h.1.{name}"].data.std() == pytest.approx(small, rel=0.05)
    assert all(np.all(v.data == 0) for n, v in p.items() if n.endswith("bias"))
    assert all(np.all(v.data == 1) for n, v in p.items() if "ln" in n and n.endswith("weight"))
    assert all(v.dtype == np.float32 for v in p.values())
    same_seed = GPT(cfg, seed=0).transformer.wpe.weight.data
    np.testing.assert_array_equal(same_seed, p["transformer.wpe.weight"].data)


def test_a_training_step_keeps_every_parameter_and_gradient_float32(rng):
    model = tiny(dtype="float32", dropout=0.1)
    optimizer = AdamW(param_groups(model), lr=1e-3)
    idx = rng.integers(0, 11, (3, 9))
    loss = F.cross_entropy(model(idx[:, :-1]), idx[:, 1:])
    assert loss.dtype == np.float32
    loss.backward()
    assert all(p.grad.dtype == np.float32 for p in model.parameters())
    optimizer.step()
    assert all(p.dtype == np.float32 for p in model.parameters())


def test_dropout_acts_in_training_only(rng):
    model = tiny(dropout=0.5)
    idx = rng.integers(0, 11, (1, 6))
    assert not np.allclose(model(idx).data, model(idx).data)
    model.eval()
    np.testing.assert_array_equal(model(idx).data, model(idx).data)
    assert np.allclose(model(idx).data, tiny(dropout=0.0)(idx).data)


def test_assigning_dropout_rng_hands_it_to_every_dropout_layer():
    from minirlhf.nn import Dropout

    model = tiny(dropout=0.2)
    layers = [m for m in model.modules() if isinstance(m, Dropout)]
    assert len(layers) == 1 + 2 * 2 and all(m.rng is model.dropout_rng for m in layers)
    new = np.random.default_rng(9)
    model.dropout_rng = new
    assert all(m.rng is new for m in layers)


def test_logits_with_the_kv_cache_match_a_full_forward(device, rng):
    model = tiny(dtype="float32", vocab_size=30, block_size=16).eval().to(device)
    idx = rng.integers(0, 30, (3, 12))
    full = model(idx).numpy()
    cache = model.new_kv_cache(3)
    with mr.no_grad():
        parts = [model(idx[:, :5], kv_cache=cache).numpy()]              # prefill
        for t in range(5, 12):
            parts.append(model(idx[:, t:t + 1], kv_cache=cache).numpy())  # one token at a time
    assert cache.length == 12
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, atol=1e-5, rtol=0)


def test_fused_self_attention_is_the_split_heads_attention_merged(rng):
    # F.self_attention: one node for split q, k, v -> heads -> causal attention -> heads merged
    B, T, nh, hs = 2, 5, 3, 4
    qkv = rng.standard_normal((B, T, 3 * nh * hs))
    cotangent = rng.standard_normal((B, T, nh * hs))

    def composed(qkv):
        heads = qkv.reshape(B, T, 3, nh, hs).permute(2, 0, 3, 1, 4)  # (3, B, nh, T, hs)
        y = F.causal_attention(heads[0], heads[1], heads[2])
        return y.transpose(1, 2).reshape(B, T, nh * hs)

    results = []
    for fn in (composed, lambda qkv: F.self_attention(qkv, nh)):
        x = mr.tensor(qkv, requires_grad=True)
        y = fn(x)
        (y * mr.tensor(cotangent)).sum().backward()
        results.append((y.numpy(), x.grad))
    (y_composed, g_composed), (y_fused, g_fused) = results
    np.testing.assert_allclose(y_fused, y_composed, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(g_fused, g_composed, rtol=1e-12, atol=1e-12)
    assert mr.gradcheck(lambda qkv: F.self_attention(qkv, nh), [qkv])
    with pytest.raises(ValueError, match="divisible by n_head"):
        F.self_attention(mr.tensor(qkv), 5)


def test_the_model_attends_the_same_with_and_without_the_fused_op(rng):
    # training (no cache) takes F.self_attention; the KV-cache path splits q, k, v itself
    model = GPT(GPTConfig(block_size=8, vocab_size=11, n_layer=2, n_head=2, n_embd=8,
                          dtype="float64"), seed=0)
    idx = rng.integers(0, 11, (2, 8))
    with mr.no_grad():
        fused = model(idx).numpy()
        cached = model(idx, kv_cache=model.new_kv_cache(2)).numpy()     # the whole prompt at once
    np.testing.assert_allclose(cached, fused, rtol=1e-12, atol=1e-12)
    attn, x = model.transformer.h[0].attn, mr.tensor(rng.standard_normal((2, 8, 8)))
    causal = np.tril(np.ones((8, 8), dtype=bool))
    np.testing.assert_allclose(attn(x, mask=causal).numpy(), attn(x).numpy(), rtol=1e-12, atol=1e-12)


def test_attention_with_a_causal_mask_is_causal_attention_and_any_mask_gradient_checks(rng):
    q, k, v = (rng.standard_normal((2, 2, 3, 4)) for _ in range(3))
    causal = np.tril(np.ones((3, 3), dtype=bool))[None, None]
    args = [mr.tensor(a) for a in (q, k, v)]
    np.testing.assert_allclose(F.causal_attention(*args, mask=causal).data,
                               F.causal_attention(*args).data, rtol=1e-12)
    mask = rng.random((2, 1, 3, 3)) < 0.5
    mask[..., 0] = True                                                # every row sees a key
    assert mr.gradcheck(lambda q, k, v: F.causal_attention(q, k, v, mask=mask), [q, k, v])


def test_left_padding_in_the_cache_changes_nothing_for_the_real_tokens(rng):
    model = tiny(dtype="float32", vocab_size=30, block_size=16).eval()
    a, b = rng.integers(0, 30, 7), rng.integers(0, 30, 4)
    batch = np.zeros((2, 7), dtype=np.int64)
    batch[0], batch[1, 3:] = a, b                                       # row 1 left-padded by 3
    cache = model.new_kv_cache(2, pad_lengths=[0, 3])
    with mr.no_grad():
        out = model(batch, kv_cache=cache).data
        step = model(np.array([[5], [6]]), kv_cache=cache).data
    np.testing.assert_allclose(out[0], model(a[None]).data[0], atol=1e-5)
    np.testing.assert_allclose(out[1, 3:], model(b[None]).data[0], atol=1e-5)
    alone = model(np.concatenate([b, [6]])[None]).data[0, -1]
    np.testing.assert_allclose(step[1, 0], alone, atol=1e-5)


def test_bad_inputs_are_refused_with_clear_errors():
    model = tiny()
    with pytest.raises(ValueError, match="block_size is 8"):
        model(np.zeros((1, 9), dtype=np.int64))
    cache = model.new_kv_cache(1)
    with mr.no_grad():
        model(np.zeros((1, 6), dtype=np.int64), kv_cache=cache)
        with pytest.raises(ValueError, match="after 6 cached positions"):
            model(np.zeros((1, 3), dtype=np.int64), kv_cache=cache)
        with pytest.raises(ValueError, match="batch size"):
            model(np.zeros((2, 1), dtype=np.int64), kv_cache=model.new_kv_cache(1))
    with pytest.raises(ValueError, match=r"\[0, 11\)"):
        model(np.array([[1, 11]]))
    with pytest.raises(TypeError, match="integers"):
        model(np.array([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="shape"):
        model(np.array([1, 2]))
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=10, n_head=3)
    assert isinstance(cache, KVCache)


# ----- the reward model -----------------------------------------------------------------------------

def test_reward_model_reads_the_last_non_padding_token(rng):
    rm = RewardModel(GPTConfig(**TINY, dtype="float64"))
    ids = rng.integers(0, 11, (3, 8))
    lengths = np.array([8, 3, 1])
    r = rm(ids, lengths).data
    assert r.shape == (3,)
    changed = ids.copy()
    changed[1, 3:] = (changed[1, 3:] + 1) % 11                         # padding of row 1
    changed[2, 1:] = 0                                                 # everything after row 2's token
    np.testing.assert_array_equal(rm(changed, lengths).data, r)
    # and it is the reward of the unpadded sequence
    np.testing.assert_allclose(rm(ids[1:2, :3], [3]).data, r[1:2], rtol=1e-12)
    changed[1, 2] = (changed[1, 2] + 1) % 11                           # the last real token matters
    assert rm(changed, lengths).data[1] != r[1]


def test_reward_model_gradients_check_directionally(rng):
    rm = RewardModel(GPTConfig(**TINY, dtype="float64"), seed=3)
    ids, lengths = rng.integers(0, 11, (3, 6)), np.array([6, 2, 4])
    names = ["head.weight", "head.bias", "transformer.wte.weight", "transformer.h.1.attn.c_attn.weight"]
    f, values = swapped(rm, names, lambda: rm(ids, lengths))
    assert mr.gradcheck(f, values, mode="directional")


def test_reward_model_starts_from_a_gpt_trunk_with_a_fresh_head(rng):
    gpt = tiny(seed=5)
    rm = RewardModel.from_gpt(gpt, seed=1)
    names = [n for n, _ in rm.named_parameters()]
    assert names[-2:] == ["head.weight", "head.bias"] and rm.head.weight.shape == (16, 1)
    gsd = gpt.state_dict()
    for name, value in rm.state_dict().items():
        if name.startswith("transformer."):
            np.testing.assert_array_equal(value, gsd[name])
    ids = rng.integers(0, 11, (2, 5))
    h = gpt.hidden_states(ids).data[:, -1]                             # (B, C)
    np.testing.assert_allclose(rm(ids, [5, 5]).data, (h @ rm.head.weight.data)[:, 0], rtol=1e-12)
    with pytest.raises(ValueError, match="lacks trunk weights"):
        rm.load_trunk({"transformer.wte.weight": gsd["transformer.wte.weight"]})


def test_reward_model_refuses_bad_lengths(rng):
    rm = RewardModel(GPTConfig(**TINY))
    ids = rng.integers(0, 11, (2, 5))
    with pytest.raises(ValueError, match=r"\[1, 5\]"):
        rm(ids, [0, 5])
    with pytest.raises(ValueError, match=r"\[1, 5\]"):
        rm(ids, [6, 5])
    with pytest.raises(ValueError, match="2 integers"):
        rm(ids, [1, 2, 3])


# ----- the Llama-style switches ----------------------------------------------------------------------

def llama_style(**changes):
    return GPTConfig(**{**dict(block_size=16, vocab_size=30, n_layer=2, n_head=4, n_kv_head=2, n_embd=16,
                               n_inner=24, norm="rms", pos="rope", mlp="swiglu", bias=False,
                               tie_word_embeddings=False), **changes})


def test_a_llama_style_row_computes_alone_what_it_computes_left_padded_in_a_batch(rng):
    """Rotary positions count real tokens only, so padding changes nothing for the real tokens,
    in the prompt and in the next step; and the cache holds n_kv_head heads."""
    model = GPT(llama_style(), seed=0).eval()
    a, b = rng.integers(0, 30, 7), rng.integers(0, 30, 4)
    batch = np.zeros((2, 7), dtype=np.int64)
    batch[0], batch[1, 3:] = a, b
    cache = model.new_kv_cache(2, pad_lengths=[0, 3])
    assert cache.k[0].shape == (2, 2, 16, 4)
    with mr.no_grad():
        out = model(batch, kv_cache=cache).data
        step = model(np.array([[5], [6]]), kv_cache=cache).data
        np.testing.assert_allclose(out[0], model(a[None]).data[0], atol=1e-5)
        np.testing.assert_allclose(out[1, 3:], model(b[None]).data[0], atol=1e-5)
        np.testing.assert_allclose(step[1, 0], model(np.concatenate([b, [6]])[None]).data[0, -1], atol=1e-5)


def test_a_llama_style_model_samples_the_same_with_and_without_the_cache():
    model = GPT(llama_style(dtype="float64"), seed=1)
    runs = [generate(model, [[1, 2, 3], [4]], 20, seed=0, use_cache=c) for c in (True, False)]
    assert runs[0].tokens == runs[1].tokens                   # 20 new tokens: past block_size too
    np.testing.assert_allclose(sum(runs[0].logprobs, []), sum(runs[1].logprobs, []), atol=1e-10)


def test_bad_llama_style_settings_are_one_line_each():
    for changes, message in (({"n_kv_head": 3}, "n_head=4 is not divisible by n_kv_head=3"),
                             ({"norm": "batch"}, "norm must be one of"),
                             ({"n_embd": 12, "n_head": 4, "n_kv_head": 4}, "even head size"),
                             ({"rope_scaling": {"rope_type": "yarn", "factor": 2}}, "'yarn' is not supported")):
        with pytest.raises(ValueError, match=message):
            llama_style(**changes)
