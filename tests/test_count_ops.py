"""Kernel counts: what a GPU step launches, counted on the CPU by benchmarks/count_ops.py.

A medium GPT's step on a GPU is bound by the host launching kernels (benchmarks/README.md), so the
number of array operations an op makes is part of its speed there. These tests check the counter
and the properties the counts come from (no copy back, one copy, one id check, a cost that does not
grow with the parameters), with generous upper bounds; the exact counts are the benchmark's
(``python benchmarks/count_ops.py --check``), so a change made for readability does not fail here.
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import minirlhf.functional as F
from minirlhf.model import GPT, GPTConfig
from minirlhf.nn import Parameter
from minirlhf.optim import AdamW
from minirlhf.tensor import Tensor

_path = Path(__file__).resolve().parents[1] / "benchmarks" / "count_ops.py"
_spec = importlib.util.spec_from_file_location("count_ops", _path)
count_ops = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(count_ops)


def counted(*shape, seed=0):
    a = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return a.view(count_ops.Counted)


def total(kernels):
    return sum(kernels().values())


def test_each_array_operation_counts_once_and_views_not_at_all():
    a, b = counted(4, 3), counted(4, 3, seed=1)
    with count_ops.counting() as kernels:
        c = a + b                                      # one elementwise kernel
        c.sum(axis=0)                                  # one reduction
        a.reshape(3, 4).T                              # views: none
        a[np.array([0, 2])]                            # a gather
        c[1:3] = b[1:3]                                # a copy
        a.T.reshape(12)                                # a reshape that must copy
        assert sorted(what for _, what in kernels()) == ["add", "add.reduce", "gather",
                                                         "reshape (a copy)", "setitem"]
        assert total(kernels) == 5


def test_a_linear_layer_with_bias_is_two_kernels():
    x = Tensor(counted(2, 5, 8))
    w, b = Parameter(counted(8, 16, seed=1)), Parameter(counted(16, seed=2))
    with count_ops.counting() as kernels:
        F.linear(x, w, b)
        whats = [what for _, what in kernels()]
        assert "matmul" in whats and "setitem" not in whats   # y is written in place, not copied back
        assert total(kernels) <= 4


def test_layer_norm_forward_and_backward_kernels():
    x = Tensor(counted(6, 8), requires_grad=True)
    w, b = Parameter(counted(8, seed=1)), Parameter(counted(8, seed=2))
    with count_ops.counting() as kernels:
        y = F.layer_norm(x, w, b)
        assert total(kernels) <= 15    # μ, x-μ, (x-μ)², σ², +eps, ^-½, ·rstd, ·w, +b, and room
        kernels.clear()
        y.backward(counted(6, 8, seed=3))
        backward = {k: n for k, n in kernels().items() if k[0].startswith("LayerNorm")}
        assert sum(backward.values()) <= 18


def test_self_attention_backward_puts_q_k_v_gradients_back_in_one_copy():
    """gq, gk and gv are written into one (3, B, nh, T, hs) array, so undoing the head split is
    one copy, not one per gradient."""
    qkv = Tensor(counted(2, 5, 3 * 8), requires_grad=True)
    y = F.self_attention(qkv, n_head=2)
    with count_ops.counting() as kernels:
        y.backward(counted(2, 5, 8, seed=1))
        copies = sum(n for (where, what), n in kernels().items()
                     if where.startswith("SelfAttention") and ("copy" in what or what == "setitem"))
        assert copies == 1


def test_a_gpt_forward_checks_its_token_ids_once(monkeypatch):
    """The ids are checked once (a read back from a GPU), not again by the token and position
    embeddings."""
    model = GPT(GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=2, n_embd=8), seed=0)
    checked = []
    check_ids = F.check_ids
    monkeypatch.setattr(F, "check_ids", lambda ids, n, what, **kw: checked.append(what)
                        or check_ids(ids, n, what, **kw))
    model(np.array([[1, 2, 3], [4, 5, 10]]))
    assert checked == ["token id"]


@pytest.mark.parametrize("n_params", [4, 12])
def test_an_adamw_step_costs_the_same_kernels_for_any_number_of_parameters(n_params):
    """The group is updated as one vector that the parameters are views of: one more parameter adds
    no kernel."""
    def step_kernels(n):
        params = [Parameter(counted(3, 2, seed=i)) for i in range(n)]
        optimizer = AdamW(params, lr=0.1)
        with count_ops.counting() as kernels:
            for _ in range(2):                         # the first step builds the state
                kernels.clear()
                for i, p in enumerate(params):
                    p.grad = counted(3, 2, seed=100 + i)
                optimizer.step()
            return total(kernels)

    assert step_kernels(n_params + 1) == step_kernels(n_params) <= 20
