"""Sampling: determinism, greedy decoding, filters, log-probs, batching, EOT, cropping, errors."""

import warnings

import numpy as np
import pytest

import minirlhf as mr
import minirlhf.functional as F
from minirlhf.model import GPT, GPTConfig, generate

V = 13


def make_model(block_size=12, seed=0):
    """A tiny float32 model with sharper-than-init logits, so that greedy choices have no near-ties."""
    model = GPT(GPTConfig(n_layer=2, n_embd=16, n_head=2, block_size=block_size, vocab_size=V), seed=seed)
    for p in model.parameters():
        if p.ndim == 2:
            p.data *= 8
    return model


def full_logprobs(model, sequence):
    """log p(token t | tokens < t) for every t >= 1 of one sequence, from one full forward."""
    logits = model(np.array([sequence]))                                 # (1, T, V)
    logp = F.log_softmax(logits).data[0]                                 # (T, V)
    return np.array([logp[t - 1, sequence[t]] for t in range(1, len(sequence))])


PROMPTS = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10]]


def test_the_same_seed_gives_the_same_tokens_and_another_seed_others():
    model = make_model()
    a = generate(model, PROMPTS, 8, seed=7)
    b = generate(model, PROMPTS, 8, seed=np.random.default_rng(7))
    c = generate(model, PROMPTS, 8, seed=8)
    assert a.tokens == b.tokens and a.logprobs == b.logprobs
    assert a.tokens != c.tokens
    assert [len(t) for t in a.tokens] == [8, 8, 8]
    assert a.sequences == [p + t for p, t in zip(PROMPTS, a.tokens)]


def test_greedy_picks_the_argmax_of_a_full_forward_at_every_step():
    model = make_model()
    out = generate(model, [[1, 2, 3]], 6, temperature=0)
    seq = [1, 2, 3]
    for token in out.tokens[0]:
        assert token == int(model(np.array([seq])).data[0, -1].argmax())
        seq.append(token)


def test_top_k_1_and_a_tiny_top_p_are_greedy():
    model = make_model()
    greedy = generate(model, PROMPTS, 6, temperature=0).tokens
    assert generate(model, PROMPTS, 6, temperature=1.0, top_k=1, seed=3).tokens == greedy
    assert generate(model, PROMPTS, 6, temperature=1.0, top_p=1e-6, seed=3).tokens == greedy


def test_logprobs_are_the_untempered_model_logprobs_of_the_sampled_tokens():
    model = make_model()
    for kw in (dict(temperature=1.0), dict(temperature=0.7, top_k=4), dict(temperature=1.3, top_p=0.8),
               dict(temperature=0)):
        out = generate(model, PROMPTS, 6, seed=1, **kw)                # 6 + 6 = block_size
        for prompt, seq, lp in zip(PROMPTS, out.sequences, out.logprobs):
            expected = full_logprobs(model, seq)[len(prompt) - 1:]
            np.testing.assert_allclose(lp, expected, atol=1e-5)


def test_a_batch_of_prompts_of_different_lengths_gives_each_prompt_its_own_tokens():
    model = make_model()
    batched = generate(model, PROMPTS, 8, temperature=0)
    for i, prompt in enumerate(PROMPTS):
        alone = generate(model, [prompt], 8, temperature=0)
        assert batched.tokens[i] == alone.tokens[0]
        np.testing.assert_allclose(batched.logprobs[i], alone.logprobs[0], atol=1e-5)


def test_past_block_size_the_context_is_cropped_the_same_with_and_without_cache():
    model = make_model(block_size=8)
    prompts = [[1, 2, 3, 4, 5], [6, 7]]
    cached = generate(model, prompts, 10, temperature=0)
    uncached = generate(model, prompts, 10, temperature=0, use_cache=False)
    assert cached.tokens == uncached.tokens
    np.testing.assert_allclose(sum(cached.logprobs, []), sum(uncached.logprobs, []), atol=1e-5)
    for i, prompt in enumerate(prompts):
        assert generate(model, [prompt], 10, temperature=0).tokens[0] == cached.tokens[i]
    # the last step saw exactly the last block_size tokens, at positions 0..7
    seq = cached.sequences[0]
    last = model(np.array([seq[-9:-1]])).data[0, -1]
    assert seq[-1] == int(last.argmax())


def test_sampling_with_and_without_the_cache_draws_the_same_tokens():
    model = make_model()
    a = generate(model, PROMPTS, 9, seed=4, top_k=5)
    b = generate(model, PROMPTS, 9, seed=4, top_k=5, use_cache=False)
    assert a.tokens == b.tokens


def test_a_sequence_stops_at_eot_and_keeps_it_while_the_others_continue():
    model = make_model()
    free = generate(model, PROMPTS, 8, temperature=0)
    eot = free.tokens[0][2]                                            # row 0 meets it at step 3
    out = generate(model, PROMPTS, 8, temperature=0, eot_id=eot)
    for full, stopped in zip(free.tokens, out.tokens):
        expected = full[:full.index(eot) + 1] if eot in full else full
        assert stopped == expected
    assert out.tokens[0][-1] == eot and len(out.tokens[0]) <= 3
    assert max(len(t) for t in out.tokens) > len(out.tokens[0])       # someone went on
    assert [len(t) for t in out.logprobs] == [len(t) for t in out.tokens]


def test_samples_follow_the_model_distribution_and_the_filters():
    model = make_model()
    prompt = [3, 1, 4]
    logits = model(np.array([prompt])).data[0, -1].astype(np.float64)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    n = 4000
    tokens = np.array(generate(model, [prompt] * n, 1, seed=0).tokens)[:, 0]
    freq = np.bincount(tokens, minlength=V) / n
    assert np.abs(freq - p).max() < 4 * np.sqrt(p.max() / n) + 1e-3

    top3 = set(np.argsort(-logits)[:3].tolist())
    assert set(np.array(generate(model, [prompt] * 500, 1, seed=0, top_k=3).tokens)[:, 0]) <= top3
    order = np.argsort(-p)
    nucleus = set(order[:np.searchsorted(np.cumsum(p[order]), 0.6) + 1].tolist())
    assert set(np.array(generate(model, [prompt] * 500, 1, seed=0, top_p=0.6).tokens)[:, 0]) <= nucleus


def test_a_prompt_longer_than_block_size_keeps_its_end_with_one_warning():
    model = make_model(block_size=8)
    long_a, long_b = list(range(12)), [1] * 10
    with pytest.warns(UserWarning, match="longer than block_size") as record:
        out = generate(model, [long_a, long_b, [2]], 4, temperature=0)
    assert len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cropped = generate(model, [long_a[-8:]], 4, temperature=0)
    assert out.tokens[0] == cropped.tokens[0]
    assert out.sequences[0] == long_a + out.tokens[0]


def test_generation_records_no_graph_and_restores_the_training_mode():
    model = make_model()
    model.train()
    generate(model, PROMPTS, 3, seed=0)
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert mr.is_grad_enabled()
    out = generate(model.eval(), PROMPTS, 0)
    assert out.tokens == [[], [], []] and not model.training


def test_the_same_seed_gives_the_same_tokens_on_every_device(device):
    model = make_model()
    ref = generate(model, PROMPTS, 6, seed=2, top_p=0.9)
    out = generate(model.to(device), PROMPTS, 6, seed=2, top_p=0.9)
    assert out.tokens == ref.tokens
    np.testing.assert_allclose(sum(out.logprobs, []), sum(ref.logprobs, []), atol=1e-4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(temperature=float("nan")), "temperature must be >= 0"),
    (dict(top_k=0), "top_k must be an integer >= 1"),
    (dict(top_k=2.5), "top_k must be an integer >= 1"),
    (dict(top_p=0.0), r"top_p must lie in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must lie in \(0, 1\]"),
    (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0"),
    (dict(prompts=[]), "non-empty list"),
    (dict(prompts=[[1], []]), "prompt 1 is empty"),
    (dict(prompts=[[1, V]]), r"prompt 0 has token ids outside \[0, 13\)"),
])
def test_bad_arguments_raise_value_errors_that_say_what_is_wrong(kwargs, match):
    args = dict(prompts=[[1, 2]], max_new_tokens=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        generate(make_model(), **args)


def test_sampled_tokens_are_pinned_for_a_seed():
    """The same seed gives the same tokens as the code before the CPU kernels were retuned
    (issue 23: OpenBLAS held to one thread for small products, attention in blocks of queries):
    speed work must not change what a seed samples. Ragged prompts take the padding-mask path."""
    model = GPT(GPTConfig(block_size=32, vocab_size=50, n_layer=2, n_head=2, n_embd=16), seed=3)
    g = generate(model, [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10]], 20, temperature=1.0, seed=7)
    assert g.tokens == [
        [31, 11, 0, 23, 12, 27, 30, 8, 1, 45, 25, 9, 18, 8, 25, 36, 25, 29, 16, 19],
        [44, 15, 41, 15, 22, 49, 49, 30, 25, 31, 12, 34, 0, 13, 42, 4, 43, 2, 7, 48],
        [39, 43, 40, 14, 24, 39, 10, 2, 23, 25, 0, 10, 41, 44, 31, 27, 18, 19, 41, 29]]


@pytest.mark.parametrize("way", [0, 1])
def test_a_seed_samples_the_same_tokens_at_one_and_two_threads(monkeypatch, way):
    """Wide enough that the sampling steps' products go to `kernels.FasterWay` (4 rows by a
    (256, 768) weight), held to either of its ways: the tokens are those of one thread."""
    from minirlhf import kernels

    model = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=1, n_head=4, n_embd=256), seed=1)
    prompts = [[1, 2, 3], [4], [5, 6], [7, 8, 9, 10]]
    previous = kernels.get_num_threads()
    try:
        kernels.set_num_threads(1)
        alone = generate(model, prompts, 12, temperature=1.0, seed=5)
        chooser = kernels.FasterWay()
        chooser.way, chooser.wait = way, 10**9
        monkeypatch.setattr(kernels, "_few_row_way", chooser)
        kernels.set_num_threads(2)
        both = generate(model, prompts, 12, temperature=1.0, seed=5)
    finally:
        kernels.set_num_threads(previous)
    assert both.tokens == alone.tokens and both.logprobs == alone.logprobs
    if kernels._openblas() is not None:
        assert chooser.same_bits                         # the products went through the chooser
