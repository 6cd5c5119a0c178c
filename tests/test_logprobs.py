"""sequence_logprobs and its parts: the convention (token t scored by the logits at t-1), the masks,
and the gradients of the fused token_logprobs and entropy ops."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minirlhf as mr
import minirlhf.functional as F
from minirlhf import backend
from minirlhf.logprobs import (logprobs_from_logits, sequence_logprobs, token_entropy,
                               token_logprobs)
from minirlhf.testing import int_targets, logits


def np_log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


class Bigram:
    """A stand-in causal model: the logits at position t are a row of W picked by token t."""

    def __init__(self, V, rng, dtype=np.float64):
        self.W = mr.tensor(rng.standard_normal((V, V)).astype(dtype), requires_grad=True)

    def __call__(self, ids):
        return F.embedding(ids, self.W)                                  # (B, T, V)


@st.composite
def batches(draw):
    """(input_ids, completion_mask, V): each row a prompt, a completion, then padding."""
    B, T, V = draw(st.integers(1, 3)), draw(st.integers(2, 6)), draw(st.integers(2, 5))
    ids = draw(int_targets((B, T), V))
    mask = np.zeros((B, T), dtype=np.float32)
    for b in range(B):
        start = draw(st.integers(1, T - 1))
        end = draw(st.integers(start, T))
        mask[b, start:end] = 1
    return ids, mask, V


def reference_per_token(logits, ids, mask):
    """The definition, written as a loop: logp[b, t] = mask · log_softmax(logits[b, t-1])[ids[b, t]]."""
    B, T = ids.shape
    out = np.zeros((B, T))
    for b in range(B):
        for t in range(1, T):
            if mask[b, t]:
                out[b, t] = np_log_softmax(logits[b, t - 1])[ids[b, t]]
    return out


@given(batches(), st.integers(0, 2**31))
def test_per_token_logprob_is_log_softmax_of_the_previous_position(batch, seed):
    ids, mask, V = batch
    model = Bigram(V, np.random.default_rng(seed))
    per_token, per_sequence = sequence_logprobs(model, ids, mask)
    expected = reference_per_token(model(ids).numpy(), ids, mask)
    np.testing.assert_allclose(per_token.numpy(), expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(per_sequence.numpy(), expected.sum(axis=1), rtol=1e-10, atol=1e-12)


def test_shapes_and_position_zero():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 4, (2, 5))
    mask = np.array([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])
    per_token, per_sequence = sequence_logprobs(Bigram(4, rng), ids, mask)
    assert per_token.shape == (2, 5) and per_sequence.shape == (2,)
    assert np.all(per_token.numpy()[:, 0] == 0)
    assert np.all(per_token.numpy()[mask == 0] == 0)


def test_padding_tokens_do_not_change_the_sequence_logprob():
    rng = np.random.default_rng(1)
    model = Bigram(5, rng)
    ids = rng.integers(0, 5, (3, 7))
    mask = np.zeros((3, 7))
    mask[:, 2:5] = 1                                                     # padding at 5 and 6
    other = ids.copy()
    other[:, 5:] = rng.integers(0, 5, (3, 2))
    _, a = sequence_logprobs(model, ids, mask)
    _, b = sequence_logprobs(model, other, mask)
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_prompt_tokens_are_context_not_targets():
    # logits that depend on the position only: then the prompt tokens matter solely as targets,
    # and a prompt target must not count
    rng = np.random.default_rng(2)
    table = mr.tensor(rng.standard_normal((6, 4)))

    def position_model(ids):
        B, T = np.asarray(ids).shape
        return F.embedding(np.broadcast_to(np.arange(T), (B, T)).copy(), table)

    ids = rng.integers(0, 4, (2, 6))
    mask = np.zeros((2, 6))
    mask[:, 3:] = 1
    other = ids.copy()
    other[:, :3] = (ids[:, :3] + 1) % 4
    _, a = sequence_logprobs(position_model, ids, mask)
    _, b = sequence_logprobs(position_model, other, mask)
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_mask_must_be_zero_at_position_zero():
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 3, (2, 4))
    mask = np.array([[1, 1, 1, 0], [0, 1, 1, 1]])
    with pytest.raises(ValueError, match=r"completion_mask\[:, 0\]"):
        sequence_logprobs(Bigram(3, rng), ids, mask)
    with pytest.raises(ValueError, match=r"completion_mask\[:, 0\]"):
        token_entropy(mr.tensor(rng.standard_normal((2, 4, 3))), mask)


def test_mask_shape_must_match():
    rng = np.random.default_rng(4)
    with pytest.raises(ValueError, match="does not match"):
        sequence_logprobs(Bigram(3, rng), rng.integers(0, 3, (2, 4)), np.zeros((2, 5)))


def test_masked_minus_infinity_does_not_make_nan():
    # a model that forbids token 0 everywhere: the padding (token 0) is masked out, so no -inf·0
    logits = np.zeros((1, 4, 3))
    logits[..., 0] = -np.inf
    ids = np.array([[1, 2, 0, 0]])
    mask = np.array([[0, 1, 0, 0]])
    z = mr.tensor(logits, requires_grad=True)
    _, per_sequence = logprobs_from_logits(z, ids, mask)
    per_sequence.sum().backward()
    assert per_sequence.item() == pytest.approx(-np.log(2))
    assert np.all(np.isfinite(z.grad))


def test_sequence_logprobs_gradient_reaches_the_model():
    rng = np.random.default_rng(5)
    model = Bigram(4, rng)
    ids = rng.integers(0, 4, (3, 5))
    mask = np.zeros((3, 5))
    mask[:, 2:] = 1

    def f(W):
        model.W = W
        return sequence_logprobs(model, ids, mask)[1]

    assert mr.gradcheck(f, [model.W.data])


def test_float32_logprobs_stay_float32():
    rng = np.random.default_rng(6)
    model = Bigram(4, rng, dtype=np.float32)
    per_token, per_sequence = sequence_logprobs(model, rng.integers(0, 4, (2, 3)),
                                                np.array([[0, 1, 1], [0, 0, 1]]))
    assert per_token.dtype == np.float32 and per_sequence.dtype == np.float32


# ----- the fused op ---------------------------------------------------------------------------------


@st.composite
def logits_and_targets(draw):
    z = draw(logits())
    return z, draw(int_targets(z.shape[:-1], z.shape[-1]))


@given(logits_and_targets())
def test_token_logprobs_is_log_softmax_gathered(zt):
    z, t = zt
    out = token_logprobs(mr.tensor(z), t).numpy()
    expected = np.take_along_axis(np_log_softmax(z), t[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


@given(logits_and_targets())
def test_token_logprobs_gradcheck(zt):
    z, t = zt
    assert mr.gradcheck(lambda z: token_logprobs(z, t), [z])


def test_token_logprobs_backward_is_onehot_minus_softmax():
    z = mr.tensor(np.array([[1.0, 2.0, 0.5]]), requires_grad=True)
    token_logprobs(z, np.array([1])).sum().backward()
    p = np.exp(np_log_softmax(z.numpy()))
    np.testing.assert_allclose(z.grad, np.array([[0.0, 1.0, 0.0]]) - p, rtol=1e-12)


def test_token_logprobs_equals_minus_cross_entropy():
    rng = np.random.default_rng(7)
    z = mr.tensor(rng.standard_normal((4, 6)))
    t = rng.integers(0, 6, 4)
    ce = F.cross_entropy(z, t, reduction="none")
    np.testing.assert_allclose(token_logprobs(z, t).numpy(), -ce.numpy(), rtol=1e-12)


def test_token_logprobs_refuses_bad_targets():
    z = mr.tensor(np.zeros((2, 3)))
    with pytest.raises(IndexError, match="out of range"):
        token_logprobs(z, np.array([0, 3]))
    with pytest.raises(TypeError, match="integers"):
        token_logprobs(z, np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="do not match"):
        token_logprobs(z, np.array([0, 1, 2]))


# ----- entropy --------------------------------------------------------------------------------------


@given(batches(), st.integers(0, 2**31))
def test_token_entropy_matches_numpy_and_is_masked(batch, seed):
    ids, mask, V = batch
    z = np.random.default_rng(seed).standard_normal(ids.shape + (V,)) * 3
    H = token_entropy(mr.tensor(z), mask).numpy()
    p = np.exp(np_log_softmax(z))
    h = -(p * np.log(p)).sum(axis=-1)                                   # entropy at each position
    expected = np.zeros(ids.shape)
    expected[:, 1:] = h[:, :-1] * mask[:, 1:]
    np.testing.assert_allclose(H, expected, rtol=1e-10, atol=1e-12)


def test_uniform_logits_have_entropy_log_v():
    H = token_entropy(mr.tensor(np.zeros((1, 3, 5))), np.array([[0, 1, 1]])).numpy()
    np.testing.assert_allclose(H, [[0.0, np.log(5), np.log(5)]], rtol=1e-12)


def test_entropy_of_forbidden_tokens_is_finite():
    z = np.array([[[0.0, 0.0, -np.inf], [0.0, 0.0, 0.0]]])
    H = token_entropy(mr.tensor(z), np.array([[0, 1]])).numpy()
    np.testing.assert_allclose(H, [[0.0, np.log(2)]], rtol=1e-12)


@given(logits(batch_shape=(2, 3)))
def test_token_entropy_gradcheck(z):
    mask = np.array([[0, 1, 1], [0, 0, 1]])
    assert mr.gradcheck(lambda z: token_entropy(z, mask), [z])


# ----- devices --------------------------------------------------------------------------------------


def test_logprobs_on_the_test_device(device):
    rng = np.random.default_rng(8)
    z = rng.standard_normal((2, 5, 4))
    ids = rng.integers(0, 4, (2, 5))
    mask = np.array([[0, 0, 1, 1, 1], [0, 1, 1, 1, 0]])
    zd = mr.tensor(z, requires_grad=True, device=device)
    _, seq = logprobs_from_logits(zd, backend.to_device(ids, device), mask)
    seq.sum().backward()
    zc = mr.tensor(z, requires_grad=True)
    _, seq_cpu = logprobs_from_logits(zc, ids, mask)
    seq_cpu.sum().backward()
    np.testing.assert_allclose(seq.numpy(), seq_cpu.numpy(), rtol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(zd.grad), zc.grad, rtol=1e-12)
