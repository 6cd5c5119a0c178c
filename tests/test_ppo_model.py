"""PPO's critic, `ValueModel`: a value under every token, read from the state before it, started
from the reward model (as InstructGPT did) or from the policy, saved and loaded like every model."""

import numpy as np
import pytest

import minirlhf as mr
from minirlhf.checkpoint import load_model, save_checkpoint
from minirlhf.model import GPT, GPTConfig, RewardModel, ValueModel

from test_model import TINY, swapped


def test_value_of_token_t_is_read_from_the_state_before_it(rng):
    vm = ValueModel(GPTConfig(**TINY, dtype="float64"), seed=2)
    ids = rng.integers(0, 11, (3, 6))
    v = vm(ids).data
    assert v.shape == (3, 6) and (v[:, 0] == 0).all()
    h = vm.transformer(ids).data                                         # (B, T, C)
    expected = (h[:, :-1] @ vm.head.weight.data)[..., 0] + vm.head.bias.data[0]
    np.testing.assert_allclose(v[:, 1:], expected, rtol=1e-12)
    changed = ids.copy()
    changed[:, 4] = (changed[:, 4] + 1) % 11                             # token 4 changes V of 5 only
    w = vm(changed).data
    np.testing.assert_array_equal(w[:, :5], v[:, :5])
    assert (w[:, 5] != v[:, 5]).all()


def test_value_model_gradients_check_directionally(rng):
    vm = ValueModel(GPTConfig(**TINY, dtype="float64"), seed=3)
    ids = rng.integers(0, 11, (2, 5))
    names = ["head.weight", "head.bias", "transformer.h.0.attn.c_attn.weight"]
    f, values = swapped(vm, names, lambda: vm(ids))
    assert mr.gradcheck(f, values, mode="directional")


def test_value_model_starts_as_a_copy_of_the_reward_model_or_of_the_policy_trunk(rng):
    rm = RewardModel(GPTConfig(**TINY, dtype="float64"), seed=4)
    vm = ValueModel.from_reward_model(rm)
    ids = rng.integers(0, 11, (2, 7))
    v = vm(ids).data
    for b, n in enumerate([6, 3]):                                       # V under token n = r(x_<n)
        assert v[b, n] == pytest.approx(rm(ids[b:b + 1, :n], [n]).data[0], rel=1e-12)
    gpt = GPT(GPTConfig(**TINY, dtype="float64"), seed=5)
    vm2 = ValueModel.from_gpt(gpt, seed=1)
    for name, value in gpt.state_dict().items():
        if name.startswith("transformer."):
            np.testing.assert_array_equal(vm2.state_dict()[name], value)


def test_value_model_checkpoints_round_trip(tmp_path, rng):
    vm = ValueModel(GPTConfig(**TINY, dtype="float64"), seed=6)
    save_checkpoint(tmp_path / "v.npz", vm, vm.config)
    back = load_model(tmp_path / "v.npz")
    assert isinstance(back, ValueModel)
    ids = rng.integers(0, 11, (2, 5))
    np.testing.assert_array_equal(back(ids).data, vm(ids).data)
