"""The one place that knows NumPy from CuPy.

Every array op in minirlhf is written in the dialect NumPy and CuPy share, and picks its library from
the array it is given (per-array dispatch, as Chainer and DeZero do):

    xp = get_array_module(x)      # numpy for a numpy.ndarray, cupy for a cupy.ndarray
    y = xp.exp(x)

Only this file imports CuPy. The few things the two libraries spell differently live here too:
moving arrays between devices, scatter-add, sums over rows and columns (each library has its faster
spelling), and a host-side random generator (``cupy.random`` draws other numbers than NumPy, so
weights are drawn on the host and moved, and one seed gives the same model on both devices).
"""

import numpy as np

try:  # CuPy is optional: `pip install 'minirlhf[gpu]'`
    import cupy
    import cupyx
except ImportError:  # pragma: no cover - depends on the machine
    cupy = None
    cupyx = None

DEVICES = ("cpu", "cuda")


class DeviceError(RuntimeError):
    """Raised for a missing GPU, a missing CuPy, or arrays of two devices in one op."""


def cupy_available():
    """True when CuPy imports *and* sees at least one GPU."""
    if cupy is None:
        return False
    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # CUDA driver missing or broken
        return False


def get_array_module(*arrays):
    """The array library (``numpy`` or ``cupy``) of the given arrays: the ``xp`` of every op."""
    if cupy is not None:
        for a in arrays:
            if isinstance(a, cupy.ndarray):
                return cupy
    return np


def device_of(array):
    """``"cuda"`` for a CuPy array, ``"cpu"`` for anything else."""
    if cupy is not None and isinstance(array, cupy.ndarray):
        return "cuda"
    return "cpu"


def check_device(device):
    """Validate a device name and make sure it can be used on this machine."""
    if device not in DEVICES:
        raise DeviceError(f"unknown device {device!r}: expected 'cpu' or 'cuda'")
    if device == "cuda":
        if cupy is None:
            raise DeviceError("CuPy is not installed: pip install 'minirlhf[gpu]'")
        if not cupy_available():
            raise DeviceError("CuPy is installed but no CUDA GPU was found")
    return device


def to_device(array, device):
    """Copy ``array`` to ``device`` ("cpu" or "cuda"); no copy when it is already there."""
    check_device(device)
    if device == "cuda":
        return cupy.asarray(array)
    if cupy is not None and isinstance(array, cupy.ndarray):
        return cupy.asnumpy(array)
    return np.asarray(array)


def to_numpy(array):
    """A NumPy copy of any array (for printing, saving and comparing)."""
    return to_device(array, "cpu")


# Sums over rows and columns, each library in its faster spelling: on NumPy a product with a vector
# of ones (kept per length), which the BLAS computes in one pass where ``a.sum(axis)`` over short
# rows is slower; on CuPy the reduction, one kernel where a product of stacked matrices takes a slow
# batched path. The timings: benchmarks/README.md.

_FILLED = {}  # (length, dtype, value) -> a read-only NumPy vector of that value


def _filled(n, dtype, value):
    vector = _FILLED.get((n, dtype, value))
    if vector is None:
        vector = np.full(n, value, dtype)
        vector.flags.writeable = False
        _FILLED[(n, dtype, value)] = vector
    return vector


def sum_last(a):
    """Σ over the last axis, the sum of each row: ``a @ (1, ..., 1)`` on NumPy."""
    if isinstance(a, np.ndarray):
        return a @ _filled(a.shape[-1], a.dtype, 1)
    return a.sum(axis=-1)


def mean_last(a):
    """The mean over the last axis (C numbers), each row's: ``a @ (1/C, ..., 1/C)`` on NumPy."""
    if isinstance(a, np.ndarray):
        return a @ _filled(a.shape[-1], a.dtype, 1 / a.shape[-1])
    return a.mean(axis=-1)


def sum_first(a):
    """Σ over the first axis of a (N, C) array, each column's sum: ``(1, ..., 1) @ a`` on NumPy."""
    if isinstance(a, np.ndarray):
        return _filled(a.shape[0], a.dtype, 1) @ a
    return a.sum(axis=0)


def scatter_add(target, indices, values):
    """``target[indices] += values`` with repeated indices adding up (in place).

    Both libraries spell it ``add.at`` (CuPy from version 13; older CuPy only has
    ``cupyx.scatter_add``). Plain ``target[indices] += values`` would keep only one of the repeated
    writes, which is the classic wrong embedding gradient.
    """
    xp = get_array_module(target)
    if xp is np or hasattr(xp.add, "at"):
        xp.add.at(target, indices, values)
    else:  # pragma: no cover - CuPy < 13
        cupyx.scatter_add(target, indices, values)
    return target


def rows_scatter_add(num_rows, ids, values):
    """Sum the rows of ``values`` (N, C) into a (num_rows, C) array by their row ``ids`` (N,).

    This is the embedding backward. Sorting the ids and summing contiguous runs with
    ``add.reduceat`` is deterministic and, on NumPy, many times faster than ``np.add.at``.
    """
    xp = get_array_module(values)
    out = xp.zeros((num_rows, values.shape[1]), dtype=values.dtype)
    if ids.size == 0:
        return out
    if xp is np:
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
        out[sorted_ids[starts]] = np.add.reduceat(values[order], starts, axis=0)
        return out
    return scatter_add(out, ids, values)


def host_rng(seed=None):
    """A host-side ``numpy.random.Generator``: initial weights are drawn here on every device."""
    return np.random.default_rng(seed)
