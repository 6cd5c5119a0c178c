"""Modules: the parameter tree, state dicts, modes, devices, and the four layers."""

import numpy as np
import pytest
from conftest import requires_gpu

import minirlhf as mr
import minirlhf.functional as F
from minirlhf import backend
from minirlhf.nn import Dropout, Embedding, LayerNorm, Linear, Module, ModuleList, Parameter


class TiedHead(Module):
    def __init__(self, weight):
        super().__init__()
        self.weight = weight                   # the embedding's own Parameter, not a copy


class Tiny(Module):
    """Two layers and a weight tied between an embedding and a head."""

    def __init__(self, seed=0, dtype="float32"):
        super().__init__()
        rng = backend.host_rng(seed)
        self.emb = Embedding(5, 4, rng=rng, dtype=dtype)
        self.layers = ModuleList([Linear(4, 3, rng=rng, dtype=dtype),
                                  Linear(3, 2, bias=False, rng=rng, dtype=dtype)])
        self.norm = LayerNorm(2, dtype=dtype)
        self.drop = Dropout(0.5, rng=rng)
        self.head = TiedHead(self.emb.weight)  # a second path to the same Parameter

    def forward(self, ids):
        x = self.drop(self.emb(ids))
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


# ----- Parameter ------------------------------------------------------------------------------------

def test_parameter_is_a_leaf_that_requires_grad_and_ops_on_it_give_tensors():
    p = Parameter(np.ones((2, 3), dtype=np.float32))
    assert p.requires_grad and p.is_leaf and isinstance(p, mr.Tensor)
    y = p * 2
    assert type(y) is mr.Tensor
    y.sum().backward()
    np.testing.assert_array_equal(p.grad, np.full((2, 3), 2, dtype=np.float32))


# ----- the parameter tree ---------------------------------------------------------------------------

def test_named_parameters_are_dotted_in_assignment_order_and_a_tied_weight_appears_once():
    m = Tiny()
    names = [n for n, _ in m.named_parameters()]
    assert names == ["emb.weight", "layers.0.weight", "layers.0.bias", "layers.1.weight",
                     "norm.weight", "norm.bias"]
    assert [id(p) for p in m.parameters()] == [id(p) for _, p in m.named_parameters()]
    assert m.num_parameters() == 5 * 4 + 4 * 3 + 3 + 3 * 2 + 2 + 2


def test_named_modules_lists_each_module_once_with_its_path():
    names = [n for n, _ in Tiny().named_modules()]
    assert names == ["", "emb", "layers", "layers.0", "layers.1", "norm", "drop", "head"]


def test_module_list_indexes_iterates_and_appends():
    ml = ModuleList([Linear(2, 2), Linear(2, 3)])
    assert len(ml) == 2 and ml[1].out_features == 3 and [m.out_features for m in ml] == [2, 3]
    ml.append(Linear(3, 1))
    assert [n for n, _ in ml.named_parameters()][-2:] == ["2.weight", "2.bias"]


def test_train_and_eval_set_the_flag_recursively():
    m = Tiny()
    assert all(x.training for x in m.modules())
    m.eval()
    assert not any(x.training for x in m.modules())
    m.train()
    assert all(x.training for x in m.modules())


def test_zero_grad_forgets_every_gradient():
    m = Tiny().eval()
    m(np.array([[0, 1, 2]])).sum().backward()
    assert all(p.grad is not None for p in m.parameters() if p is not m.norm.bias)
    m.zero_grad()
    assert all(p.grad is None for p in m.parameters())


def test_same_seed_gives_same_weights_and_float64_is_available():
    a, b, c = Tiny(seed=1), Tiny(seed=1), Tiny(seed=2)
    for (n, x), (_, y), (_, z) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        np.testing.assert_array_equal(x.data, y.data)
        assert x.dtype == np.float32
    assert not np.array_equal(a.emb.weight.data, c.emb.weight.data)
    assert all(p.dtype == np.float64 for p in Tiny(dtype="float64").parameters())


# ----- state dicts ----------------------------------------------------------------------------------

def test_state_dict_is_a_copy_and_round_trips():
    a, b = Tiny(seed=1), Tiny(seed=2)
    sd = a.state_dict()
    assert list(sd) == [n for n, _ in a.named_parameters()]
    sd["emb.weight"][0, 0] = 123.0                       # the copy is not the model
    assert a.emb.weight.data[0, 0] != 123.0
    weight_object = b.emb.weight
    b.load_state_dict(a.state_dict())
    assert b.emb.weight is weight_object and b.head.weight is b.emb.weight   # loaded in place: tying kept
    for (_, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        np.testing.assert_array_equal(x.data, y.data)


def test_load_state_dict_casts_to_the_model_dtype():
    m = Tiny()
    sd = {k: v.astype(np.float64) + 1 for k, v in m.state_dict().items()}
    m.load_state_dict(sd)
    assert all(p.dtype == np.float32 for p in m.parameters())
    np.testing.assert_allclose(m.norm.weight.data, 2.0)


def test_load_state_dict_reports_missing_unexpected_and_shape_errors_at_once_and_changes_nothing():
    m = Tiny()
    before = m.state_dict()
    sd = dict(before)
    del sd["norm.bias"]
    sd["extra.weight"] = np.zeros(3)
    sd["layers.0.weight"] = np.zeros((3, 4))
    sd["emb.weight"] = sd["emb.weight"] + 1
    with pytest.raises(ValueError) as e:
        m.load_state_dict(sd)
    msg = str(e.value)
    assert "missing keys: norm.bias" in msg and "unexpected keys: extra.weight" in msg
    assert "layers.0.weight: checkpoint (3, 4) vs model (4, 3)" in msg
    np.testing.assert_array_equal(m.emb.weight.data, before["emb.weight"])  # nothing written


def test_non_strict_load_skips_missing_and_unexpected_keys_but_not_shape_errors():
    m = Tiny()
    m.load_state_dict({"norm.weight": np.full(2, 3.0), "other": np.zeros(1)}, strict=False)
    np.testing.assert_array_equal(m.norm.weight.data, [3.0, 3.0])
    with pytest.raises(ValueError, match="shape mismatch"):
        m.load_state_dict({"norm.weight": np.ones(3)}, strict=False)


def test_to_cpu_keeps_parameter_objects_and_tying():
    m = Tiny()
    params = m.parameters()
    m.to("cpu")
    assert m.parameters() == params and m.head.weight is m.emb.weight
    with pytest.raises(mr.DeviceError):
        m.to("tpu")


@requires_gpu
def test_to_cuda_moves_in_place_keeps_tying_and_loads_state_dicts():
    m = Tiny()
    sd = m.state_dict()
    m.to("cuda")
    assert all(p.device == "cuda" for p in m.parameters()) and m.head.weight is m.emb.weight
    m.load_state_dict({k: v * 2 for k, v in sd.items()})
    assert m.emb.weight.device == "cuda"
    np.testing.assert_allclose(m.emb.weight.numpy(), sd["emb.weight"] * 2)
    assert m.to("cpu").emb.weight.device == "cpu"


# ----- layers ---------------------------------------------------------------------------------------

def test_linear_is_x_at_w_plus_b_with_w_stored_in_out(rng):
    lin = Linear(4, 3, rng=rng)
    assert lin.weight.shape == (4, 3) and lin.bias.shape == (3,)
    lin.bias.data[:] = [1.0, 2.0, 3.0]
    x = rng.standard_normal((2, 5, 4)).astype(np.float32)
    np.testing.assert_allclose(lin(mr.tensor(x)).data, x @ lin.weight.data + lin.bias.data, rtol=1e-6)
    assert Linear(4, 3, bias=False).bias is None


def test_linear_and_layernorm_gradients_check(rng):
    lin = Linear(4, 3, rng=rng, dtype="float64")
    ln = LayerNorm(3, dtype="float64")
    ln.weight.data[:] = rng.standard_normal(3)
    x = rng.standard_normal((2, 4))

    def fn(x, w, b, g, beta):
        lin.weight, lin.bias, ln.weight, ln.bias = w, b, g, beta
        return ln(lin(x))

    mr.gradcheck(fn, [x, lin.weight.data, lin.bias.data, ln.weight.data, ln.bias.data])


def test_embedding_picks_rows_and_its_gradient_checks(rng):
    emb = Embedding(6, 3, rng=rng, dtype="float64")
    ids = np.array([[0, 5, 5], [2, 0, 1]])
    np.testing.assert_array_equal(emb(ids).data, emb.weight.data[ids])

    def fn(w):
        emb.weight = w
        return emb(ids)

    mr.gradcheck(fn, [emb.weight.data])


def test_layernorm_matches_numpy_and_bias_false_learns_no_bias(rng):
    x = rng.standard_normal((3, 5)).astype(np.float32)
    ln = LayerNorm(5)
    ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(ln(mr.tensor(x)).data, ref, rtol=1e-5, atol=1e-6)
    nb = LayerNorm(5, bias=False)
    assert [n for n, _ in nb.named_parameters()] == ["weight"]
    np.testing.assert_allclose(nb(mr.tensor(x)).data, ref, rtol=1e-5, atol=1e-6)


def test_dropout_is_the_identity_in_eval_mode_and_for_p_zero():
    x = mr.tensor(np.ones((4, 4), dtype=np.float32))
    assert Dropout(0.5).eval()(x) is x
    assert Dropout(0.0)(x) is x
    with pytest.raises(ValueError):
        Dropout(1.0)


def test_dropout_zeroes_a_fraction_p_scales_the_rest_and_passes_the_mask_as_gradient():
    x = mr.tensor(np.ones((200, 100), dtype=np.float32), requires_grad=True)
    y = Dropout(0.25, rng=backend.host_rng(0))(x)
    kept = y.data != 0
    assert y.dtype == np.float32
    assert abs(1 - kept.mean() - 0.25) < 0.01
    np.testing.assert_allclose(y.data[kept], 1 / 0.75, rtol=1e-6)
    y.sum().backward()
    np.testing.assert_array_equal(x.grad, y.data)      # d(x*mask)/dx = mask
    same = Dropout(0.25, rng=backend.host_rng(0))(x)
    np.testing.assert_array_equal(same.data, y.data)   # one seed, one mask


def test_dropout_mask_is_the_same_on_every_device(device):
    x = mr.tensor(np.ones((8, 8), dtype=np.float32), device=device)
    y = Dropout(0.5, rng=backend.host_rng(3))(x)
    ref = Dropout(0.5, rng=backend.host_rng(3))(mr.tensor(np.ones((8, 8), dtype=np.float32)))
    assert y.device == device
    np.testing.assert_array_equal(y.numpy(), ref.numpy())


def test_layers_work_inside_a_loss():
    m = Tiny().eval()
    loss = F.cross_entropy(m(np.array([[0, 1, 2, 3]])), np.array([[1, 0, 1, 1]]))
    loss.backward()
    assert m.emb.weight.grad.shape == (5, 4) and m.layers[1].weight.grad.dtype == np.float32
