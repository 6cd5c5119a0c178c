"""CPU threads: every row is computed exactly once, split ops equal unsplit ones, gradients hold.

The thresholds in `minirlhf.kernels` keep small arrays in one block; the `split_everything` fixture
lowers them so that even the tiny arrays of a gradient check are cut into several blocks and run on
several threads.
"""

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import minirlhf as mr
import minirlhf.functional as F
from minirlhf import kernels
from minirlhf.tensor import Tensor


@pytest.fixture
def threads():
    """Set the thread count for one test; the previous count comes back after."""
    before = kernels.get_num_threads()
    yield kernels.set_num_threads
    kernels.set_num_threads(before)


@pytest.fixture
def split_everything(monkeypatch, threads):
    monkeypatch.setattr(kernels, "BLOCK_NUMBERS", 8)
    monkeypatch.setattr(kernels, "MIN_PARALLEL_NUMBERS", 1)
    monkeypatch.setattr(kernels, "MIN_PARALLEL_PRODUCTS", 1)
    monkeypatch.setattr(kernels, "MIN_ROWS_PER_WEIGHT", 1)
    monkeypatch.setattr(kernels, "ATTENTION_QUERY_BLOCK", 2)
    threads(3)


@pytest.mark.parametrize("n_threads", [1, 2, 3])
@pytest.mark.parametrize("blas", [False, True])
@pytest.mark.parametrize("n_rows", [2, 5, 64, 1000])
def test_for_rows_covers_each_row_once_and_returns_in_order(monkeypatch, threads, n_threads,
                                                            blas, n_rows):
    monkeypatch.setattr(kernels, "BLOCK_NUMBERS", 16)
    monkeypatch.setattr(kernels, "MIN_PARALLEL_NUMBERS", 1)
    monkeypatch.setattr(kernels, "MIN_PARALLEL_PRODUCTS", 1)
    threads(n_threads)
    hits = np.zeros(n_rows, dtype=int)

    def rows(lo, hi):
        hits[lo:hi] += 1
        return lo, hi

    blocks = kernels.for_rows(rows, n_rows, row_size=4, blas=blas)
    assert (hits == 1).all()
    assert blocks[0][0] == 0 and blocks[-1][1] == n_rows
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))        # contiguous, in order
    if n_threads > 1 and n_rows >= 64 and (not blas or kernels._openblas() is not None):
        assert len(blocks) > 1                                          # it did split


def test_small_work_is_one_call(threads):
    threads(2)
    calls = []
    kernels.for_rows(lambda lo, hi: calls.append((lo, hi)), 100, row_size=10)
    kernels.for_rows(lambda lo, hi: calls.append((lo, hi)), 100, row_size=10, blas=True)
    assert calls == [(0, 100), (0, 100)]


def test_a_gpu_array_module_is_one_call(split_everything):
    class FakeCupy:
        __name__ = "cupy"

    calls = []
    kernels.for_rows(lambda lo, hi: calls.append((lo, hi)), 1000, row_size=1000, xp=FakeCupy())
    assert calls == [(0, 1000)]


def test_a_few_rows_by_a_shared_weight_are_not_split(threads):
    threads(2)
    calls = []
    record = lambda lo, hi: calls.append((lo, hi))  # noqa: E731
    kernels.for_rows(record, 8, row_size=10**6, blas=True, shared_weight=True)    # sampling 8 rows
    assert calls == [(0, 8)]
    if kernels._openblas() is not None:
        kernels.for_rows(record, 2048, row_size=10**4, blas=True, shared_weight=True)   # training
        assert len(calls) == 1 + 2 * kernels.BLAS_BLOCKS_PER_THREAD


def test_work_runs_on_several_threads(split_everything):
    names = set()
    lock = threading.Lock()

    def rows(lo, hi):
        with lock:
            names.add(threading.current_thread().name)
        time.sleep(0.002)        # long enough blocks that the pool threads wake before all are taken

    kernels.for_rows(rows, 300, row_size=1)
    assert "MainThread" in names and len(names) >= 2


def test_blocks_are_shared_out_so_a_late_thread_delays_nothing(threads, monkeypatch):
    # a pool thread that wakes late (here: never, it is kept busy) leaves its blocks to the caller
    monkeypatch.setattr(kernels, "BLOCK_NUMBERS", 10)
    monkeypatch.setattr(kernels, "MIN_PARALLEL_NUMBERS", 1)
    threads(2)
    release = threading.Event()
    blocker = kernels._Job(lambda lo, hi: release.wait(timeout=10), [(0, 1)])
    kernels._state["pool"].wake(blocker)                   # the only pool thread is now stuck
    try:
        done = []
        kernels.for_rows(lambda lo, hi: done.append(threading.current_thread().name), 100, row_size=1)
        assert done == ["MainThread"] * 10
    finally:
        release.set()
        blocker.all_done.acquire(timeout=10)


def test_an_error_in_a_block_reaches_the_caller(split_everything):
    def rows(lo, hi):
        if lo > 0:
            raise RuntimeError(f"block {lo}:{hi} failed")

    with pytest.raises(RuntimeError, match="failed"):
        kernels.for_rows(rows, 300, row_size=1)


@pytest.fixture
def openblas_threads(monkeypatch):
    """A stand-in for OpenBLAS's thread count, (get, set), so the region logic is tested on every
    machine; `test_numpys_openblas_is_found` checks the real library is found where there is one."""
    setting = {"threads": 4}

    def put(n):
        setting["threads"] = n

    monkeypatch.setitem(kernels._state, "blas", (lambda: setting["threads"], put))
    return lambda: setting["threads"]


def test_numpys_openblas_is_found():
    blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]["name"].lower()
    if "openblas" in blas and sys.platform.startswith("linux"):
        get, put = kernels._openblas()
        before = get()
        put(1)
        assert get() == 1
        put(before)
        assert get() == before
    else:
        assert kernels._openblas() is None      # then products are left to the BLAS, not split


def test_openblas_runs_on_one_thread_inside_and_is_restored_after(split_everything,
                                                                    openblas_threads):
    get = openblas_threads
    before = get()
    seen = []
    kernels.for_rows(lambda lo, hi: seen.append(get()), 300, row_size=1, blas=True)
    assert set(seen) == {1}
    assert get() == before


def test_layer_norm_keeps_openblas_on_one_thread(openblas_threads, monkeypatch):
    # LayerNorm's matrix-vector products would otherwise wake OpenBLAS's threads, which then spin
    get = openblas_threads
    before = get()
    with kernels.blas_on_one_thread():
        assert get() == 1
    assert get() == before
    with kernels.blas_on_one_thread(size=kernels.GEMV_ONE_THREAD_BELOW):
        assert get() == 1
    with kernels.blas_on_one_thread(size=kernels.GEMV_ONE_THREAD_BELOW - 1):
        assert get() == before                           # OpenBLAS keeps these on one thread itself
    assert get() == before

    seen = []
    real = kernels.blas_on_one_thread

    class Spy:
        def __init__(self, size=None):
            self.size = size

        def __enter__(self):
            self.region = real(self.size)
            self.region.__enter__()
            seen.append(get())

        def __exit__(self, *exc):
            self.region.__exit__(*exc)

    monkeypatch.setattr(kernels, "blas_on_one_thread", Spy)
    for rows, held in ((2048, 1), (8, before)):          # a training batch; a sampling step's rows
        seen.clear()
        x = Tensor(np.random.default_rng(0).normal(size=(rows, 8)), requires_grad=True)
        w, b = Tensor(np.ones(8), requires_grad=True), Tensor(np.zeros(8), requires_grad=True)
        F.layer_norm(x, w, b).sum().backward()
        assert seen == [held, held]                      # forward's products, then backward's
        assert get() == before


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_a_forked_child_gets_its_own_pool(split_everything):
    import multiprocessing
    kernels.for_rows(lambda lo, hi: None, 300, row_size=1)               # the parent's pool exists
    context = multiprocessing.get_context("fork")
    with context.Pool(1) as pool:                # the child's work must not wait on parent threads
        assert pool.apply_async(_sum_rows_in_threads).get(timeout=60) == 300


def _sum_rows_in_threads():
    counts = kernels.for_rows(lambda lo, hi: hi - lo, 300, row_size=1)
    return sum(counts)


def test_overlapping_regions_from_user_threads_restore_openblas(split_everything,
                                                               openblas_threads):
    get = openblas_threads
    before = get()
    barrier = threading.Barrier(2)

    def user_thread():
        kernels.for_rows(lambda lo, hi: barrier.wait(timeout=10) if lo == 0 else None, 300,
                     row_size=1, blas=True)

    callers = [threading.Thread(target=user_thread) for _ in range(2)]   # both inside at once
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    assert get() == before


def test_set_num_threads_refuses_nonsense():
    for bad in (0, -1, 1.5, "2"):
        with pytest.raises(ValueError, match="positive int"):
            kernels.set_num_threads(bad)


def test_bad_thread_count_in_the_environment_is_named(monkeypatch):
    monkeypatch.setitem(kernels._state, "threads", None)
    monkeypatch.setenv("MINIRLHF_NUM_THREADS", "many")
    with pytest.raises(ValueError, match="MINIRLHF_NUM_THREADS.*'many'"):
        kernels.get_num_threads()


def test_keeping_freed_memory_can_be_turned_off(monkeypatch):
    monkeypatch.setitem(kernels._state, "memory_kept", None)
    monkeypatch.setenv("MINIRLHF_KEEP_MEMORY", "0")
    assert kernels.keep_freed_memory() is False
    monkeypatch.setitem(kernels._state, "memory_kept", None)
    monkeypatch.delenv("MINIRLHF_KEEP_MEMORY")
    assert kernels.keep_freed_memory() in (True, False)    # True on glibc, False on other C libraries


def test_set_num_threads_called_first_still_keeps_freed_memory():
    """`mr.set_num_threads(n)` before any op used to skip glibc's settings, which `get_num_threads`
    makes on first use: every step then gave its arrays back to the OS and faulted them in again
    (the tiny GPT's step took 1.4x as long). A fresh process, so that nothing ran before."""
    code = ("import minirlhf as mr; from minirlhf import kernels; mr.set_num_threads(2); "
            "print(kernels._state['memory_kept'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "MINIRLHF_KEEP_MEMORY": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() in ("True", "False")            # asked (False on other C libraries)


# ----- the linear layer's backward: gW whole on two threads ------------------------------------------

def _linear_grads_and_blocks(monkeypatch, x, w, gy):
    """affine_rows_grads' (gx, gW, gb), and the kind and rows of each block it shared out."""
    blocks = []

    def recording(fn, shared, blas=False):
        blocks.extend((part.__name__, lo, hi) for part, lo, hi in shared)
        return for_blocks(fn, shared, blas)

    for_blocks = kernels.for_blocks
    monkeypatch.setattr(kernels, "for_blocks", recording)
    return kernels.affine_rows_grads(x, w, gy, True), blocks


@pytest.mark.skipif(kernels._openblas() is None, reason="products are split only where OpenBLAS is")
def test_linear_backward_on_two_threads_has_one_threads_weight_gradient(monkeypatch, threads):
    """Two threads: gW and gb are the one product a single thread computes, to the bit, while the
    other thread takes gx's rows; more threads share gW out in half as many sums as threads."""
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((512, 48), np.float32), rng.standard_normal((48, 96), np.float32)
    gy = rng.standard_normal((512, 96), np.float32)
    monkeypatch.setattr(kernels, "MIN_PARALLEL_PRODUCTS", 1)
    threads(1)
    one, blocks = _linear_grads_and_blocks(monkeypatch, x, w, gy)
    assert blocks == []                                          # one thread: nothing shared out
    threads(2)
    two, blocks = _linear_grads_and_blocks(monkeypatch, x, w, gy)
    assert blocks == [("gw_share", 0, 512), ("gx_rows", 0, 256), ("gx_rows", 256, 512)]
    np.testing.assert_array_equal(two[1], one[1])
    np.testing.assert_array_equal(two[2], one[2])
    np.testing.assert_allclose(two[0], one[0], rtol=1e-6, atol=1e-6)
    threads(4)
    four, blocks = _linear_grads_and_blocks(monkeypatch, x, w, gy)
    assert [b[0] for b in blocks] == ["gw_share"] * 2 + ["gx_rows"] * 4
    for g_four, g_one in zip(four, one):
        np.testing.assert_allclose(g_four, g_one, rtol=1e-5, atol=1e-4)


def _row_blocks_are_the_whole_products_bits(model, rows):
    """Whether this BLAS computes a block of rows of each product of ``model``'s linear layers (the
    forward's x W and the backward's gy Wᵀ) to the bits of the whole product."""
    rng = np.random.default_rng(0)
    for p in model.parameters():
        if p.data.ndim != 2:
            continue
        for w in (p.data, p.data.T):
            a = rng.standard_normal((rows, w.shape[0]), np.float32)
            with kernels.blas_on_one_thread():
                whole, part = a @ w, a[rows // 4: rows // 2] @ w
            if not np.array_equal(whole[rows // 4: rows // 2], part):
                return False
    return True


def test_training_on_two_threads_gives_one_threads_numbers_bit_for_bit(threads):
    """Three AdamW steps of a GPT big enough that its products, attention and GELU are split: the
    same parameters at one and at two threads, to the bit. Where the BLAS computes a block of rows
    of a product to other bits than the whole (OpenBLAS's Haswell kernels do not), only rounding
    can differ, and the parameters must agree to float32's rounding instead."""
    from minirlhf.model import GPT, GPTConfig
    from minirlhf.optim import AdamW, param_groups

    config = GPTConfig(block_size=64, vocab_size=256, n_layer=2, n_head=4, n_embd=64)
    ids = np.random.default_rng(0).integers(0, 256, (16, 65))
    exact = _row_blocks_are_the_whole_products_bits(GPT(config, seed=0), rows=16 * 64)
    trained = []
    for n in (1, 2):
        threads(n)
        model = GPT(config, seed=0)
        optimizer = AdamW(param_groups(model, 0.1), lr=1e-3)
        for _ in range(3):
            loss = F.cross_entropy(model(Tensor(ids[:, :-1])), Tensor(ids[:, 1:]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        trained.append([p.data.copy() for p in model.parameters()])
    for one, two in zip(*trained):
        if exact:
            np.testing.assert_array_equal(two, one)
        else:
            np.testing.assert_allclose(two, one, rtol=1e-4, atol=1e-6)


def test_add_up_sums_each_position():
    parts = [(np.ones(2), np.full(3, 2.0)), (np.ones(2), np.full(3, 5.0))]
    total = kernels.add_up(parts)
    assert np.array_equal(total[0], [2, 2]) and np.array_equal(total[1], [7, 7, 7])


# ----- the split ops: same values as unsplit, and gradients that check -----------------------------

def _ops(rng):
    """(name, function of Tensors, float64 inputs) for each op that splits its rows."""
    x = rng.standard_normal((4, 6, 5))
    w, b = rng.standard_normal((5, 7)), rng.standard_normal(7)
    q, k, v = (rng.standard_normal((3, 2, 6, 4)) for _ in range(3))
    allowed = rng.random((3, 1, 6, 6)) < 0.7
    allowed[..., 0] = True                                        # every query sees a key
    targets = rng.integers(0, 7, (4, 6))
    targets[0, 0] = -100
    return [
        ("linear", lambda x, w, b: F.linear(x, w, b), [x, w, b]),
        ("linear no bias", lambda x, w: F.linear(x, w), [x, w]),
        ("gelu", F.gelu, [x]),
        ("attention", F.causal_attention, [q, k, v]),
        ("attention with mask", lambda q, k, v: F.causal_attention(q, k, v, mask=allowed), [q, k, v]),
        ("cross entropy", lambda z: F.cross_entropy(z, targets), [rng.standard_normal((4, 6, 7))]),
        ("self attention", lambda qkv: F.self_attention(qkv, 2), [rng.standard_normal((3, 6, 12))]),
    ]


def _value_and_grads(fn, arrays, seed=0):
    inputs = [Tensor(a.copy(), requires_grad=True) for a in arrays]
    out = fn(*inputs)
    cotangent = np.random.default_rng(seed).standard_normal(out.shape)
    (out * Tensor(cotangent)).sum().backward()
    return out.numpy(), [t.grad for t in inputs]


@pytest.mark.parametrize("index", range(7))
def test_split_ops_equal_unsplit_ones(index, monkeypatch, threads):
    name, fn, arrays = _ops(np.random.default_rng(index))[index]
    threads(1)
    whole, whole_grads = _value_and_grads(fn, arrays)
    monkeypatch.setattr(kernels, "BLOCK_NUMBERS", 8)
    monkeypatch.setattr(kernels, "MIN_PARALLEL_NUMBERS", 1)
    monkeypatch.setattr(kernels, "MIN_PARALLEL_PRODUCTS", 1)
    monkeypatch.setattr(kernels, "MIN_ROWS_PER_WEIGHT", 1)
    monkeypatch.setattr(kernels, "ATTENTION_QUERY_BLOCK", 2)
    monkeypatch.setattr(kernels, "for_rows", _counting(kernels.for_rows))
    threads(3)
    split, split_grads = _value_and_grads(fn, arrays)
    assert kernels.for_rows.split_calls > 0, f"{name} never split its rows"
    np.testing.assert_allclose(split, whole, rtol=1e-12, atol=1e-12)
    for g_split, g_whole in zip(split_grads, whole_grads):
        np.testing.assert_allclose(g_split, g_whole, rtol=1e-12, atol=1e-12)


def _counting(for_rows):
    def wrapper(fn, n_rows, row_size, **kwargs):
        calls = []
        result = for_rows(lambda lo, hi: calls.append((lo, hi)) or fn(lo, hi), n_rows, row_size,
                          **kwargs)
        wrapper.split_calls += len(calls) > 1
        return result

    wrapper.split_calls = 0
    return wrapper


@pytest.mark.parametrize("index", range(7))
def test_split_ops_pass_gradcheck(index, split_everything):
    name, fn, arrays = _ops(np.random.default_rng(10 + index))[index]
    mr.gradcheck(fn, arrays)


def test_float32_stays_float32_when_split(split_everything):
    rng = np.random.default_rng(0)
    x = Tensor(rng.standard_normal((4, 6, 5)).astype(np.float32), requires_grad=True)
    w = Tensor(rng.standard_normal((5, 7)).astype(np.float32), requires_grad=True)
    y = F.gelu(F.linear(x, w))
    y.sum().backward()
    assert y.dtype == np.float32 and x.grad.dtype == np.float32 and w.grad.dtype == np.float32


# ----- causal attention in blocks of queries --------------------------------------------------------

@pytest.mark.parametrize("Tq, Tk", [(7, 7), (4, 4), (5, 8), (1, 6)])
def test_query_blocks_cover_every_query_and_every_key_it_may_see(monkeypatch, Tq, Tk):
    monkeypatch.setattr(kernels, "ATTENTION_QUERY_BLOCK", 2)
    blocks = kernels.query_blocks(Tq, Tk, causal=True)
    assert [q for lo, hi, _ in blocks for q in range(lo, hi)] == list(range(Tq))
    for lo, hi, keys in blocks:                 # query i sees keys 0 .. Tk - Tq + i, no fewer
        assert keys == Tk - Tq + hi
    assert blocks[-1][2] == Tk
    assert kernels.query_blocks(Tq, Tk, causal=False) == [(0, Tq, Tk)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mask, block", [(False, 64), (True, 64), (False, 2)])
def test_attention_backward_remakes_the_forwards_probabilities_bit_for_bit(monkeypatch, dtype, mask,
                                                                          block):
    """Blocked attention lets P go and its backward computes it again: the gradients must be the
    very ones the kept P gives (the same operations on the same numbers), float32 included."""
    monkeypatch.setattr(kernels, "ATTENTION_QUERY_BLOCK", block)    # 2: five blocks of queries
    rng = np.random.default_rng(3)
    q, k, v, gy = (rng.standard_normal((3, 2, 9, 4)).astype(dtype) for _ in range(4))
    allowed = np.tril(np.ones((9, 9), dtype=bool)) & (rng.random((3, 1, 9, 9)) < 0.7) if mask else None
    if mask:
        allowed[..., 0] = True                                      # every query sees a key
    scale = dtype(0.5)
    y, P = kernels.attention(q, k, v, scale, allowed)
    assert P is not None                                            # 9 queries: P kept
    kept = kernels.attention_grads(q, k, v, y, gy, scale, allowed, P=P)
    remade = kernels.attention_grads(q, k, v, y, gy, scale, allowed, P=None)
    for a, b in zip(kept, remade):
        assert a.dtype == dtype and np.array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gelu_backward_remakes_sigma_bit_for_bit(monkeypatch, dtype):
    """Above GELU_KEEP_SIGMA_BELOW numbers GELU keeps only x and its backward computes σ(2u) again:
    the gradient must be the one the kept σ gives, to the last bit."""
    x = (np.random.default_rng(1).standard_normal(5000) * 4).astype(dtype)
    gy = np.random.default_rng(2).standard_normal(5000).astype(dtype)
    y_kept, s = kernels.gelu_tanh(x)
    monkeypatch.setattr(kernels, "GELU_KEEP_SIGMA_BELOW", 0)
    y_again, none = kernels.gelu_tanh(x)
    assert s is not None and none is None and np.array_equal(y_kept, y_again)
    assert np.array_equal(kernels.gelu_tanh_grad(x, gy, s), kernels.gelu_tanh_grad(x, gy))
    mr.gradcheck(F.gelu, [x.astype(np.float64)])                   # the remaking path, checked


def test_attention_keeps_probabilities_only_up_to_its_length_limit(monkeypatch):
    monkeypatch.setattr(kernels, "ATTENTION_QUERY_BLOCK", 2)
    q = np.random.default_rng(0).standard_normal((1, 1, 8, 4))
    monkeypatch.setattr(kernels, "ATTENTION_KEEP_P_QUERIES", 4)
    assert kernels.attention(q, q, q, 0.5)[1] is None                # 8 queries: remade
    monkeypatch.setattr(kernels, "ATTENTION_KEEP_P_QUERIES", 8)
    assert len(kernels.attention(q, q, q, 0.5)[1]) == 4              # kept, one array a block


@pytest.mark.parametrize("Tq, Tk", [(7, 7), (5, 8)])
def test_attention_in_query_blocks_equals_its_reference_and_passes_gradcheck(monkeypatch, Tq, Tk):
    """Blocks of 2 queries (3 or 4 blocks), each seeing only the keys up to its last query: the
    same values and gradients as the plain attention, and float64 central differences agree."""
    from minirlhf import reference as R
    monkeypatch.setattr(kernels, "ATTENTION_QUERY_BLOCK", 2)
    rng = np.random.default_rng(Tq)
    q = rng.standard_normal((2, 3, Tq, 4))
    k, v = rng.standard_normal((2, 2, 3, Tk, 4))
    assert len(kernels.query_blocks(Tq, Tk, causal=True)) > 2
    fused, fused_grads = _value_and_grads(F.causal_attention, [q, k, v])
    plain, plain_grads = _value_and_grads(R.causal_attention, [q, k, v])
    np.testing.assert_allclose(fused, plain, rtol=1e-12, atol=1e-12)
    for a, b in zip(fused_grads, plain_grads):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    mr.gradcheck(F.causal_attention, [q, k, v])
    qkv = rng.standard_normal((2, Tq, 3 * 6))
    mr.gradcheck(lambda a: F.self_attention(a, 3), [qkv])
    fused, fused_grads = _value_and_grads(lambda a: F.self_attention(a, 3), [qkv])
    plain, plain_grads = _value_and_grads(lambda a: R.self_attention(a, 3), [qkv])
    np.testing.assert_allclose(fused, plain, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(fused_grads[0], plain_grads[0], rtol=1e-10, atol=1e-12)
