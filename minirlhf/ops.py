"""The primitive ops: each a `Function` with its forward and, right under it, its backward.

Notation in every backward: ``gy = dL/dy`` arrives from the output, ``gx = dL/dx`` leaves to an input.
Broadcasting in forward is undone in backward by `sum_to`: an input that was stretched along an axis
receives the sum of the gradients along it.
"""

import builtins

import numpy as np

from . import backend
from .tensor import Function, ShapeError, Tensor

# ===================================================================================================
# helpers


def as_tensor(x, like=None):
    """``x`` as a Tensor; Python and NumPy scalars take the dtype and device of ``like``."""
    if isinstance(x, Tensor):
        return x
    if like is not None:
        xp = backend.get_array_module(like.data)
        dtype = like.dtype
        if dtype.kind != "f" and isinstance(x, float):
            dtype = np.float32
        return Tensor.from_array(xp.asarray(x, dtype=dtype))
    return Tensor(x)


def sum_to(g, shape):
    """Sum ``g`` down to ``shape``: the backward of broadcasting ``shape`` up to ``g.shape``."""
    if g.shape == shape:
        return g
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, n in enumerate(shape) if n == 1 and g.shape[lead + i] != 1)
    return g.sum(axis=axes, keepdims=True).reshape(shape)


def _normalize_axis(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    axes = axis if isinstance(axis, tuple) else (axis,)
    return tuple(a % ndim if ndim else a for a in axes)


def _expand_reduced(g, shape, axis, keepdims):
    """Put back the reduced axes of ``g`` as size-1 axes, so it broadcasts against the input."""
    if keepdims or g.ndim == len(shape):
        return g
    return g.reshape([1 if i in _normalize_axis(axis, len(shape)) else n for i, n in enumerate(shape)])


def _binary(fn_cls, a, b):
    # an integer tensor meeting a Python float becomes float32 (PyTorch's rule), not float64
    if isinstance(a, float) and isinstance(b, Tensor) and b.dtype.kind in "iub":
        b = Tensor.from_array(b.data.astype(np.float32))
    if isinstance(b, float) and isinstance(a, Tensor) and a.dtype.kind in "iub":
        a = Tensor.from_array(a.data.astype(np.float32))
    if not isinstance(a, Tensor):
        a = as_tensor(a, like=b)
    if not isinstance(b, Tensor):
        b = as_tensor(b, like=a)
    return fn_cls()(a, b)


# ===================================================================================================
# elementwise arithmetic


class Add(Function):
    def forward(self, a, b):
        self.shapes = a.shape, b.shape
        return a + b

    def backward(self, gy):
        """y = a + b  ->  ga = gy, gb = gy (each summed back to its own shape)."""
        return sum_to(gy, self.shapes[0]), sum_to(gy, self.shapes[1])


class Sub(Function):
    def forward(self, a, b):
        self.shapes = a.shape, b.shape
        return a - b

    def backward(self, gy):
        """y = a - b  ->  ga = gy, gb = -gy."""
        return sum_to(gy, self.shapes[0]), -sum_to(gy, self.shapes[1])


class Mul(Function):
    def forward(self, a, b):
        self.a, self.b = a, b
        return a * b

    def backward(self, gy):
        """y = a * b  ->  ga = gy * b, gb = gy * a."""
        return sum_to(gy * self.b, self.a.shape), sum_to(gy * self.a, self.b.shape)


class Div(Function):
    def forward(self, a, b):
        self.a, self.b = a, b
        return a / b

    def backward(self, gy):
        """y = a / b  ->  ga = gy / b, gb = -gy * a / b²."""
        ga = gy / self.b
        return sum_to(ga, self.a.shape), sum_to(-ga * self.a / self.b, self.b.shape)


class Pow(Function):
    def forward(self, a, b):
        self.a, self.b = a, b
        self.y = a ** b
        return self.y

    def backward(self, gy):
        """y = a ** b  ->  ga = gy * b * a**(b-1), gb = gy * y * log(a) (defined for a > 0)."""
        xp = backend.get_array_module(gy)
        ga = gy * self.b * self.a ** (self.b - 1)
        gb = None
        if self.inputs[1].requires_grad:
            safe_log = xp.log(xp.where(self.a > 0, self.a, 1))
            gb = sum_to(gy * self.y * safe_log, self.b.shape)
        return sum_to(ga, self.a.shape), gb


class Neg(Function):
    def forward(self, x):
        return -x

    def backward(self, gy):
        """y = -x  ->  gx = -gy."""
        return (-gy,)


def add(a, b):
    return _binary(Add, a, b)


def sub(a, b):
    return _binary(Sub, a, b)


def mul(a, b):
    return _binary(Mul, a, b)


def div(a, b):
    # true division of integers gives float32 (PyTorch's rule), not float64
    if isinstance(a, Tensor) and a.dtype.kind in "iub":
        a = Tensor.from_array(a.data.astype(np.float32))
    return _binary(Div, a, b)


def pow(a, b):
    return _binary(Pow, a, b)


def neg(x):
    return Neg()(x)


# ===================================================================================================
# elementwise functions


class Exp(Function):
    def forward(self, x):
        self.y = backend.get_array_module(x).exp(x)
        return self.y

    def backward(self, gy):
        """y = exp(x)  ->  gx = gy * y."""
        return (gy * self.y,)


class Log(Function):
    def forward(self, x):
        self.x = x
        return backend.get_array_module(x).log(x)

    def backward(self, gy):
        """y = log(x)  ->  gx = gy / x."""
        return (gy / self.x,)


class Sqrt(Function):
    def forward(self, x):
        self.y = backend.get_array_module(x).sqrt(x)
        return self.y

    def backward(self, gy):
        """y = sqrt(x)  ->  gx = gy / (2 y)."""
        return (gy / (2 * self.y),)


class Tanh(Function):
    def forward(self, x):
        self.y = backend.get_array_module(x).tanh(x)
        return self.y

    def backward(self, gy):
        """y = tanh(x)  ->  gx = gy * (1 - y²)."""
        return (gy * (1 - self.y * self.y),)


def stable_sigmoid(x):
    """σ(x) = 1 / (1 + e^-x), computed from e^-|x| so that no exponential overflows."""
    xp = backend.get_array_module(x)
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1 / (1 + e), e / (1 + e))


class Sigmoid(Function):
    def forward(self, x):
        self.y = stable_sigmoid(x)
        return self.y

    def backward(self, gy):
        """y = σ(x)  ->  gx = gy * y * (1 - y)."""
        return (gy * self.y * (1 - self.y),)


class ReLU(Function):
    def forward(self, x):
        self.mask = x > 0
        return x * self.mask

    def backward(self, gy):
        """y = max(x, 0)  ->  gx = gy * [x > 0]; at the kink x = 0 the gradient is 0 (as PyTorch)."""
        return (gy * self.mask,)


class Clip(Function):
    def __init__(self, lo, hi):
        self.lo, self.hi = lo, hi

    def forward(self, x):
        xp = backend.get_array_module(x)
        self.mask = xp.ones(x.shape, dtype=bool)
        if self.lo is not None:
            self.mask &= x >= self.lo
        if self.hi is not None:
            self.mask &= x <= self.hi
        return xp.clip(x, self.lo, self.hi)

    def backward(self, gy):
        """y = min(max(x, lo), hi)  ->  gx = gy where lo <= x <= hi, else 0 (bounds inclusive)."""
        return (gy * self.mask,)


def exp(x):
    return Exp()(x)


def log(x):
    return Log()(x)


def sqrt(x):
    return Sqrt()(x)


def tanh(x):
    return Tanh()(x)


def sigmoid(x):
    return Sigmoid()(x)


def relu(x):
    return ReLU()(x)


def clip(x, min=None, max=None):
    if min is None and max is None:
        raise ValueError("clip: give at least one of min and max")
    return Clip(min, max)(x)


# ===================================================================================================
# reductions


class Sum(Function):
    def __init__(self, axis, keepdims):
        self.axis, self.keepdims = axis, keepdims

    def forward(self, x):
        self.shape = x.shape
        return x.sum(axis=self.axis, keepdims=self.keepdims)

    def backward(self, gy):
        """y = Σ_axis x  ->  gx = gy broadcast back along the summed axes."""
        xp = backend.get_array_module(gy)
        g = _expand_reduced(gy, self.shape, self.axis, self.keepdims)
        return (xp.broadcast_to(g, self.shape),)


class Mean(Function):
    def __init__(self, axis, keepdims):
        self.axis, self.keepdims = axis, keepdims

    def forward(self, x):
        self.shape = x.shape
        return x.mean(axis=self.axis, keepdims=self.keepdims)

    def backward(self, gy):
        """y = (1/n) Σ_axis x  ->  gx = gy / n broadcast back, n = number of summed elements."""
        xp = backend.get_array_module(gy)
        n = 1
        for a in _normalize_axis(self.axis, len(self.shape)):
            n *= self.shape[a]
        g = _expand_reduced(gy, self.shape, self.axis, self.keepdims)
        return (xp.broadcast_to(g / builtins.max(n, 1), self.shape),)


class Max(Function):
    def __init__(self, axis, keepdims):
        self.axis, self.keepdims = axis, keepdims

    def forward(self, x):
        if x.size == 0:
            raise ValueError("max of an empty tensor")
        self.x = x
        self.y = x.max(axis=self.axis, keepdims=True)
        return self.y if self.keepdims else self.y.reshape(
            [n for i, n in enumerate(x.shape) if i not in _normalize_axis(self.axis, x.ndim)])

    def backward(self, gy):
        """y = max_axis x  ->  gx = gy at the argmax; ties share it evenly (as torch.amax)."""
        is_max = self.x == self.y
        count = is_max.sum(axis=self.axis, keepdims=True).astype(gy.dtype)
        g = _expand_reduced(gy, self.x.shape, self.axis, self.keepdims)
        return (is_max * (g / count),)


def sum(x, axis=None, keepdims=False):
    return Sum(axis, keepdims)(x)


def mean(x, axis=None, keepdims=False):
    return Mean(axis, keepdims)(x)


def max(x, axis=None, keepdims=False):
    return Max(axis, keepdims)(x)


# ===================================================================================================
# movement


class Reshape(Function):
    def __init__(self, shape):
        self.shape = shape

    def forward(self, x):
        self.in_shape = x.shape
        return x.reshape(self.shape)

    def backward(self, gy):
        """y = reshape(x)  ->  gx = reshape(gy, x.shape)."""
        return (gy.reshape(self.in_shape),)


class Permute(Function):
    def __init__(self, axes):
        self.axes = axes

    def forward(self, x):
        return x.transpose(self.axes)

    def backward(self, gy):
        """y = x with axes permuted by p  ->  gx = gy permuted by the inverse of p."""
        return (gy.transpose(tuple(np.argsort(self.axes))),)


def reshape(x, *shape):
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    return Reshape(shape)(x)


def permute(x, *dims):
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    if sorted(d % builtins.max(x.ndim, 1) for d in dims) != list(range(x.ndim)):
        raise ValueError(f"permute: {dims} is not a permutation of the {x.ndim} axes of shape {x.shape}")
    return Permute(tuple(d % x.ndim for d in dims))(x)


def transpose(x, dim0=-2, dim1=-1):
    """Swap two axes (PyTorch's ``transpose``); ``permute`` reorders all of them."""
    dims = list(range(x.ndim))
    dims[dim0], dims[dim1] = dims[dim1], dims[dim0]
    return Permute(tuple(dims))(x)


class GetItem(Function):
    def __init__(self, index):
        self.index = index

    def forward(self, x):
        self.shape, self.dtype = x.shape, x.dtype
        return x[self.index]

    def backward(self, gy):
        """y = x[index]  ->  gx = zeros like x with gy added at index (repeated indices add up)."""
        xp = backend.get_array_module(gy)
        gx = xp.zeros(self.shape, dtype=gy.dtype)
        if _is_advanced(self.index):
            backend.scatter_add(gx, self.index, gy)
        else:
            gx[self.index] = gy
        return (gx,)


def _is_advanced(index):
    parts = index if isinstance(index, tuple) else (index,)
    return builtins.any(hasattr(p, "shape") or isinstance(p, list) for p in parts)


def _raw_index(index, xp):
    """Turn Tensor or list parts of an index into arrays of the data's library."""
    if isinstance(index, tuple):
        return tuple(_raw_index(p, xp) for p in index)
    if isinstance(index, Tensor):
        index = index.data
    if isinstance(index, list) or hasattr(index, "shape"):
        index = xp.asarray(index)
        if index.dtype.kind not in "iub":
            raise IndexError(f"index arrays must hold integers or booleans, got dtype {index.dtype}")
    return index


def getitem(x, index):
    """``x[index]``: basic slicing and integer-array indexing (gather), both differentiable."""
    return GetItem(_raw_index(index, backend.get_array_module(x.data)))(x)


class Concatenate(Function):
    def __init__(self, axis):
        self.axis = axis

    def forward(self, *xs):
        xp = backend.get_array_module(*xs)
        self.sizes = [x.shape[self.axis] for x in xs]
        return xp.concatenate(xs, axis=self.axis)

    def backward(self, gy):
        """y = [x1 | x2 | ...] along axis  ->  each gx is its own slice of gy."""
        xp = backend.get_array_module(gy)
        return tuple(xp.split(gy, np.cumsum(self.sizes)[:-1].tolist(), axis=self.axis))


class Stack(Function):
    def __init__(self, axis):
        self.axis = axis

    def forward(self, *xs):
        return backend.get_array_module(*xs).stack(xs, axis=self.axis)

    def backward(self, gy):
        """y = stack(x1, x2, ...) on a new axis  ->  gx_i = gy taken at position i of that axis."""
        xp = backend.get_array_module(gy)
        return tuple(xp.take(gy, i, axis=self.axis) for i in range(gy.shape[self.axis]))


def concatenate(tensors, axis=0):
    tensors = [as_tensor(t) for t in tensors]
    if not tensors:
        raise ValueError("concatenate: need at least one tensor")
    return Concatenate(axis)(*tensors)


def stack(tensors, axis=0):
    tensors = [as_tensor(t) for t in tensors]
    if not tensors:
        raise ValueError("stack: need at least one tensor")
    return Stack(axis)(*tensors)


# ===================================================================================================
# selection


class Where(Function):
    def __init__(self, condition):
        self.condition = condition

    def forward(self, a, b):
        self.shapes = a.shape, b.shape
        return backend.get_array_module(a).where(self.condition, a, b)

    def backward(self, gy):
        """y = a where c else b  ->  ga = gy where c (else 0), gb = gy where not c (else 0)."""
        zero = gy.dtype.type(0)
        xp = backend.get_array_module(gy)
        return (sum_to(xp.where(self.condition, gy, zero), self.shapes[0]),
                sum_to(xp.where(self.condition, zero, gy), self.shapes[1]))


def where(condition, a, b):
    """Elementwise choice: ``a`` where ``condition`` is true, else ``b`` (gradient to both)."""
    ref = a if isinstance(a, Tensor) else b
    if not isinstance(ref, Tensor):
        ref = Tensor(a)
    a, b = as_tensor(a, like=ref), as_tensor(b, like=ref)
    cond = condition.data if isinstance(condition, Tensor) else condition
    cond = backend.get_array_module(ref.data).asarray(cond)
    if cond.dtype != bool:
        raise TypeError(f"where: the condition must be boolean, got dtype {cond.dtype}")
    return Where(cond)(a, b)


def masked_fill(x, mask, value):
    """``x`` with ``value`` wherever ``mask`` is true; no gradient flows to the filled places."""
    return where(mask, as_tensor(value, like=x), x)


# ===================================================================================================
# matrix product


class MatMul(Function):
    def forward(self, a, b):
        if a.ndim < 2 or b.ndim < 2:
            raise ValueError("MatMul works on arrays of 2 or more dims (matmul() promotes vectors)")
        self.a, self.b = a, b
        if b.ndim == 2 and a.ndim > 2:
            # x (..., K) @ W (K, N), as in every Linear layer: one big GEMM over all rows is
            # faster than a batch of small ones
            return (a.reshape(-1, a.shape[-1]) @ b).reshape(a.shape[:-1] + b.shape[-1:])
        return a @ b

    def backward(self, gy):
        """y = a @ b  ->  ga = gy @ bᵀ, gb = aᵀ @ gy (batch axes summed back where broadcast)."""
        a, b = self.a, self.b
        xp = backend.get_array_module(gy)
        if b.ndim == 2 and a.ndim > 2:
            # a weight shared by every row: fold the batch axes into the rows of 2-d GEMMs
            gy2 = gy.reshape(-1, gy.shape[-1])                            # (rows, N)
            ga = (gy2 @ b.T).reshape(a.shape)
            gb = a.reshape(-1, a.shape[-1]).T @ gy2                       # (K, N)
            return ga, gb
        ga = sum_to(gy @ xp.swapaxes(b, -1, -2), a.shape)
        gb = sum_to(xp.swapaxes(a, -1, -2) @ gy, b.shape)
        return ga, gb


def matmul(a, b):
    """``a @ b`` with NumPy's rules: batched, broadcasting, and 1-d vectors promoted then dropped."""
    if not isinstance(a, Tensor):
        a = as_tensor(a, like=b if isinstance(b, Tensor) else None)
    if not isinstance(b, Tensor):
        b = as_tensor(b, like=a)
    if a.ndim == 0 or b.ndim == 0:
        raise _shape_error("matmul", a.shape, b.shape, "matmul needs at least 1-d operands")
    inner_b = b.shape[0] if b.ndim == 1 else b.shape[-2]
    if a.shape[-1] != inner_b:
        raise _shape_error("matmul", a.shape, b.shape,
                           f"inner dimensions {a.shape[-1]} and {inner_b} differ")
    squeeze_front, squeeze_back = a.ndim == 1, b.ndim == 1
    if squeeze_front:
        a = a.reshape(1, a.shape[0])
    if squeeze_back:
        b = b.reshape(b.shape[0], 1)
    y = MatMul()(a, b)
    if squeeze_front and squeeze_back:
        return y.reshape(y.shape[:-2])
    if squeeze_front:
        return y.reshape(y.shape[:-2] + y.shape[-1:])
    if squeeze_back:
        return y.reshape(y.shape[:-1])
    return y


def _shape_error(op, shape_a, shape_b, why):
    return ShapeError(f"{op}: incompatible shapes {tuple(shape_a)} and {tuple(shape_b)}: {why}")
