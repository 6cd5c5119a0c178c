"""The backend: which library an array belongs to, moving between devices, host RNG, scatter-add, sums."""

import numpy as np
import pytest
from conftest import requires_gpu

import minirlhf as mr
from minirlhf import backend


def test_numpy_arrays_dispatch_to_numpy():
    assert backend.get_array_module(np.ones(3)) is np
    assert backend.get_array_module(np.ones(3), np.zeros(2)) is np
    assert backend.device_of(np.ones(3)) == "cpu"


def test_to_device_cpu_round_trip_keeps_values_and_dtype():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    y = backend.to_numpy(backend.to_device(x, "cpu"))
    assert y.dtype == np.float32 and (y == x).all()
    t = mr.tensor(x, requires_grad=True).to("cpu")
    assert t.device == "cpu" and t.requires_grad and (t.numpy() == x).all()


@pytest.mark.parametrize("name", ["gpu", "CUDA", "cuda:0", "tpu", ""])
def test_unknown_device_name_is_refused(name):
    with pytest.raises(mr.DeviceError, match="unknown device"):
        backend.to_device(np.ones(2), name)


def test_cuda_without_cupy_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(backend, "cupy", None)
    assert not mr.cupy_available()
    with pytest.raises(mr.DeviceError, match=r"pip install 'minirlhf\[gpu\]'"):
        backend.to_device(np.ones(2), "cuda")
    with pytest.raises(mr.DeviceError, match=r"pip install 'minirlhf\[gpu\]'"):
        mr.tensor([1.0, 2.0], device="cuda")


class _CupyWithoutGpu:
    """Stands in for a CuPy installed on a machine whose CUDA driver finds no GPU."""

    ndarray = type("ndarray", (), {})

    class cuda:
        class runtime:
            @staticmethod
            def getDeviceCount():
                raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")


def test_cuda_with_cupy_but_no_gpu_says_so(monkeypatch):
    monkeypatch.setattr(backend, "cupy", _CupyWithoutGpu)
    assert not mr.cupy_available()
    with pytest.raises(mr.DeviceError, match="no CUDA GPU"):
        backend.to_device(np.ones(2), "cuda")


@pytest.mark.skipif(mr.cupy_available(), reason="this machine has a GPU")
def test_asking_for_cuda_on_this_machine_explains_why_not():
    with pytest.raises(mr.DeviceError, match=r"pip install 'minirlhf\[gpu\]'|no CUDA GPU"):
        mr.tensor([1.0], device="cuda")


def test_host_rng_same_seed_same_numbers():
    a, b = backend.host_rng(7), backend.host_rng(7)
    assert (a.standard_normal(5) == b.standard_normal(5)).all()
    assert isinstance(a, np.random.Generator)
    assert (backend.host_rng(8).standard_normal(5) != backend.host_rng(7).standard_normal(5)).any()


def test_scatter_add_adds_repeated_indices(device):
    target = backend.to_device(np.zeros(4), device)
    idx = backend.to_device(np.array([1, 1, 3, 1]), device)
    backend.scatter_add(target, idx, backend.to_device(np.array([1.0, 2.0, 3.0, 4.0]), device))
    assert backend.to_numpy(target).tolist() == [0.0, 7.0, 0.0, 3.0]


@pytest.mark.parametrize("n", [0, 1, 7, 200])
def test_rows_scatter_add_matches_np_add_at(device, rng, n):
    V, C = 5, 3
    ids = rng.integers(0, V, n)                   # with V = 5 and n >= 7, ids repeat
    values = rng.standard_normal((n, C))
    expected = np.zeros((V, C))
    np.add.at(expected, ids, values)
    out = backend.rows_scatter_add(V, backend.to_device(ids, device), backend.to_device(values, device))
    assert out.shape == (V, C) and out.dtype == values.dtype
    np.testing.assert_allclose(backend.to_numpy(out), expected, rtol=1e-12, atol=1e-12)


def test_rows_scatter_add_keeps_float32(rng):
    out = backend.rows_scatter_add(4, np.array([0, 0, 3]), rng.standard_normal((3, 2)).astype(np.float32))
    assert out.dtype == np.float32


# ===================================================================================================
# on a GPU


@requires_gpu
def test_cupy_arrays_dispatch_to_cupy_and_round_trip():
    import cupy
    x = np.arange(6.0).reshape(2, 3)
    g = backend.to_device(x, "cuda")
    assert backend.get_array_module(g) is cupy and backend.device_of(g) == "cuda"
    assert backend.get_array_module(x, g) is cupy
    assert (backend.to_numpy(g) == x).all()


@requires_gpu
def test_mixing_devices_raises_naming_both():
    a = mr.tensor(np.ones(3), device="cpu")
    b = mr.tensor(np.ones(3), device="cuda")
    with pytest.raises(mr.DeviceError, match="cpu") as info:
        a + b
    assert "cuda" in str(info.value)


@requires_gpu
def test_same_seed_gives_same_initial_weights_on_both_devices():
    w_cpu = mr.tensor(backend.host_rng(0).standard_normal((4, 3)).astype(np.float32))
    w_gpu = mr.tensor(backend.host_rng(0).standard_normal((4, 3)).astype(np.float32), device="cuda")
    assert w_gpu.device == "cuda"
    assert (w_gpu.numpy() == w_cpu.numpy()).all()


@requires_gpu
def test_the_same_computation_gives_the_same_gradient_on_both_devices():
    rng = backend.host_rng(0)
    x, w = rng.standard_normal((5, 4)), rng.standard_normal((4, 3))
    grads = []
    for device in ("cpu", "cuda"):
        wt = mr.tensor(w, requires_grad=True, device=device)
        (mr.tensor(x, device=device) @ wt).tanh().sum().backward()
        grads.append(backend.to_numpy(wt.grad))
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-10)


@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 4, 6)])
def test_row_and_column_sums_equal_numpys_sum(device, shape):
    """Each library's spelling (a product with ones on NumPy, a reduction on CuPy) is the sum."""
    a = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    got = backend.to_numpy(backend.sum_last(backend.to_device(a, device)))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, a.sum(axis=-1), rtol=1e-5, atol=1e-5)
    if a.ndim == 2:
        got = backend.to_numpy(backend.sum_first(backend.to_device(a, device)))
        np.testing.assert_allclose(got, a.sum(axis=0), rtol=1e-5, atol=1e-5)
