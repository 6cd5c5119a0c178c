"""`Tensor`, the graph it records, and reverse-mode differentiation over it.

A `Tensor` wraps an array (``.data``, NumPy or CuPy) and, when it needs a gradient, remembers the
`Function` that made it (``._ctx``). Each Function keeps its input tensors, so the tensors and
functions form a directed acyclic graph from the leaves (parameters, inputs) to the loss.

``loss.backward()`` walks that graph once, in reverse topological order, applying the chain rule:
each Function turns ``gy = dL/dy`` into one ``gx = dL/dx`` per input, and gradients from every use of
a tensor add up. Only leaves keep ``.grad``; the graph is released as the walk goes, so a training
loop does not grow in memory.
"""

import contextlib

import numpy as np

from . import backend

# dtypes a Tensor may hold: floats can require grad; integers and booleans are indices and masks.
_FLOAT_KINDS = "f"
_ALLOWED_KINDS = "fiub"


class _GradMode:
    enabled = True


def is_grad_enabled():
    return _GradMode.enabled


@contextlib.contextmanager
def no_grad():
    """Inside ``with no_grad():`` ops record no graph: for evaluation, sampling and updates."""
    previous = _GradMode.enabled
    _GradMode.enabled = False
    try:
        yield
    finally:
        _GradMode.enabled = previous


class ShapeError(ValueError):
    """An op got inputs whose shapes do not fit together."""


class Function:
    """One node of the graph.

    Subclasses write ``forward(*arrays) -> array`` on raw NumPy/CuPy arrays, saving what backward
    needs on ``self``, and ``backward(gy) -> tuple of gx`` (one per input, ``None`` for no gradient).
    A backward may return ``gy`` itself or a view of it, but never writes into ``gy`` and never
    returns an array it keeps (the engine hands gradients to leaves without copying them).
    Calling a Function on Tensors runs forward and, when a gradient is wanted, links the output to it.
    """

    inputs = ()

    def __call__(self, *inputs):
        arrays = [t._data for t in inputs]
        if backend.cupy is not None and len(arrays) > 1:
            _check_same_device(self.name(), arrays)
        try:
            y = self.forward(*arrays)
        except ValueError as e:
            if isinstance(e, ShapeError) or not any(w in str(e) for w in ("shape", "broadcast",
                                                                           "dimension")):
                raise
            shapes = " and ".join(str(tuple(a.shape)) for a in arrays)
            raise ShapeError(f"{self.name()}: incompatible shapes {shapes}: {e}") from None
        out = Tensor.from_array(y)
        if _GradMode.enabled and any(t.requires_grad for t in inputs):
            self.inputs = inputs
            out.requires_grad = True
            out._ctx = self
        return out

    @classmethod
    def name(cls):
        return cls.__name__.lower()

    def forward(self, *arrays):
        raise NotImplementedError

    def backward(self, gy):
        raise NotImplementedError


def _check_same_device(op, arrays):
    devices = [backend.device_of(a) for a in arrays]
    if len(set(devices)) > 1:
        raise backend.DeviceError(
            f"{op}: inputs are on different devices ({', '.join(devices)}); "
            "move them with .to('cpu') or .to('cuda') first")


class Tensor:
    """An array that can record how it was computed and receive a gradient.

    ``data``: the NumPy or CuPy array. ``grad``: an array of the same shape after ``backward()``
    (leaves only), else None. ``requires_grad``: whether gradients flow to this tensor.
    ``data`` is always an array and ``grad`` None or an array, 0-d ones included: NumPy gives a
    scalar (``np.float64``) for arithmetic on 0-d arrays, and a scalar cannot be updated in place,
    so one assigned to ``data`` or ``grad`` is stored as a 0-d array of its dtype.
    """

    __slots__ = ("_data", "_grad", "requires_grad", "_ctx", "__weakref__")
    __array_priority__ = 1000  # so `ndarray * Tensor` calls Tensor.__rmul__

    def __init__(self, data, requires_grad=False, dtype=None):
        if isinstance(data, Tensor):
            data = data.data
        xp = backend.get_array_module(data)
        if xp is np and not isinstance(data, (np.ndarray, np.generic)):
            data = np.asarray(data)
            if dtype is None and data.dtype == np.float64:
                data = data.astype(np.float32)  # Python floats become float32, as in PyTorch
        data = _as_array(data)                  # a NumPy scalar keeps its dtype, as in PyTorch
        if dtype is not None:
            data = data.astype(dtype, copy=False)
        if data.dtype.kind not in _ALLOWED_KINDS:
            raise TypeError(f"unsupported dtype {data.dtype}: a Tensor holds floats, integers or booleans")
        if requires_grad and data.dtype.kind not in _FLOAT_KINDS:
            raise TypeError(f"only floating-point tensors can require grad, got dtype {data.dtype}")
        self.data = data
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self._ctx = None

    @classmethod
    def from_array(cls, array):
        """A Tensor holding ``array`` itself: no copy, no dtype conversion, no checks, no gradient.

        What every op uses for its output (the array it computed is already valid), and what code
        outside the engine uses for a constant it built with ``xp`` (zeros, a mask). A NumPy scalar
        still becomes a 0-d array (see `_as_array`)."""
        t = cls.__new__(cls)
        t._data = _as_array(array)
        t._grad = None
        t.requires_grad = False
        t._ctx = None
        return t

    @property
    def data(self):
        return self._data

    @data.setter
    def data(self, array):
        self._data = _checked_array(array, "data")

    @property
    def grad(self):
        return self._grad

    @grad.setter
    def grad(self, array):
        self._grad = None if array is None else _checked_array(array, "grad")

    # ----- what it is -------------------------------------------------------------------------------
    @property
    def shape(self):
        return tuple(self._data.shape)

    @property
    def ndim(self):
        return self._data.ndim

    @property
    def size(self):
        return self._data.size

    @property
    def dtype(self):
        return self._data.dtype

    @property
    def device(self):
        return backend.device_of(self.data)

    @property
    def is_leaf(self):
        return self._ctx is None

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        grad = ", requires_grad=True" if self.requires_grad else ""
        dev = ", device='cuda'" if self.device == "cuda" else ""
        return f"tensor({backend.to_numpy(self.data)!r}{dev}{grad})"

    def numpy(self):
        """The values as a NumPy array (copied off the GPU if needed)."""
        return backend.to_numpy(self.data)

    def item(self):
        return self.data.item()

    def tolist(self):
        return self.numpy().tolist()

    # ----- graph ------------------------------------------------------------------------------------
    def detach(self):
        """The same values, cut from the graph: no gradient flows back through the result."""
        return Tensor.from_array(self.data)

    def requires_grad_(self, flag=True):
        if flag and self.data.dtype.kind not in _FLOAT_KINDS:
            raise TypeError(f"only floating-point tensors can require grad, got dtype {self.data.dtype}")
        self.requires_grad = bool(flag)
        return self

    def to(self, device):
        """This tensor on ``device`` ("cpu" or "cuda"); a leaf stays a leaf with the same flag."""
        if backend.device_of(self.data) == device:
            return self
        out = Tensor.from_array(backend.to_device(self.data, device))
        out.requires_grad = self.requires_grad
        return out

    def astype(self, dtype):
        """A copy cast to ``dtype``. Not differentiable: cast leaves, not intermediate results."""
        return Tensor(self.data.astype(dtype), requires_grad=self.requires_grad)

    def backward(self, grad=None, retain_graph=False):
        """Fill ``.grad`` of every leaf that requires grad with d(self)/d(leaf), by the chain rule.

        ``grad`` is the cotangent dL/d(self); it may be omitted only for a single-element tensor
        (then it is 1). Gradients add up in ``.grad`` across calls, as in PyTorch: zero them between
        steps. The graph is freed as it is walked unless ``retain_graph=True``.
        """
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad: "
                               "no input of the computation had requires_grad=True")
        xp = backend.get_array_module(self.data)
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError(
                    f"backward() without a gradient needs a single-element tensor, but this one has "
                    f"shape {self.shape}: reduce it (e.g. .sum()) or pass backward(grad)")
            grad = xp.ones_like(self.data)
        else:
            grad = grad.data if isinstance(grad, Tensor) else xp.asarray(grad, dtype=self.data.dtype)
            if grad.shape != self.data.shape:
                raise ShapeError(f"backward: gradient shape {tuple(grad.shape)} does not match "
                                 f"tensor shape {self.shape}")

        grads = {id(self): grad}
        kept = set()  # ids of the arrays now held as some leaf's .grad
        for t in reversed(_topological_order(self)):
            gy = grads.pop(id(t), None)
            if gy is None:
                continue
            fn = t._ctx
            if fn is None:  # a leaf: keep the gradient
                gy = _as_array(gy)
                # a leaf must own its .grad (optimisers and clipping update it in place): copy it
                # when it is a view, the caller's array, another leaf's, or of another dtype
                if (gy.dtype != t._data.dtype or gy.base is not None or gy is grad
                        or id(gy) in kept):
                    gy = gy.astype(t._data.dtype, copy=True)
                kept.add(id(gy))
                t._grad = gy if t._grad is None else _as_array(t._grad + gy)   # arrays, unchecked
                continue
            gxs = fn.backward(gy)
            for x, gx in zip(fn.inputs, gxs):
                if gx is None or not x.requires_grad:
                    continue
                key = id(x)
                grads[key] = gx if key not in grads else grads[key] + gx
            if not retain_graph:
                t._ctx = _FREED
                fn.inputs = ()

    # ----- arithmetic (the Functions live in ops.py) ------------------------------------------------
    def __add__(self, other):
        return ops.add(self, other)

    def __radd__(self, other):
        return ops.add(other, self)

    def __sub__(self, other):
        return ops.sub(self, other)

    def __rsub__(self, other):
        return ops.sub(other, self)

    def __mul__(self, other):
        return ops.mul(self, other)

    def __rmul__(self, other):
        return ops.mul(other, self)

    def __truediv__(self, other):
        return ops.div(self, other)

    def __rtruediv__(self, other):
        return ops.div(other, self)

    def __pow__(self, exponent):
        return ops.pow(self, exponent)

    def __rpow__(self, base):
        return ops.pow(base, self)

    def __neg__(self):
        return ops.neg(self)

    def __matmul__(self, other):
        return ops.matmul(self, other)

    def __rmatmul__(self, other):
        return ops.matmul(other, self)

    def __getitem__(self, index):
        return ops.getitem(self, index)

    # comparisons give boolean tensors (masks); they are not differentiable
    def __lt__(self, other):
        return Tensor.from_array(self.data < array_of(other))

    def __le__(self, other):
        return Tensor.from_array(self.data <= array_of(other))

    def __gt__(self, other):
        return Tensor.from_array(self.data > array_of(other))

    def __ge__(self, other):
        return Tensor.from_array(self.data >= array_of(other))

    # ----- reductions, shapes and elementwise functions ---------------------------------------------
    def sum(self, axis=None, keepdims=False):
        return ops.sum(self, axis, keepdims)

    def mean(self, axis=None, keepdims=False):
        return ops.mean(self, axis, keepdims)

    def max(self, axis=None, keepdims=False):
        return ops.max(self, axis, keepdims)

    def reshape(self, *shape):
        return ops.reshape(self, *shape)

    def transpose(self, dim0=-2, dim1=-1):
        return ops.transpose(self, dim0, dim1)

    def permute(self, *dims):
        return ops.permute(self, *dims)

    @property
    def T(self):
        return ops.permute(self, *reversed(range(self.ndim)))

    def exp(self):
        return ops.exp(self)

    def log(self):
        return ops.log(self)

    def sqrt(self):
        return ops.sqrt(self)

    def tanh(self):
        return ops.tanh(self)

    def sigmoid(self):
        return ops.sigmoid(self)

    def relu(self):
        return ops.relu(self)

    def clip(self, min=None, max=None):
        return ops.clip(self, min, max)

    def masked_fill(self, mask, value):
        return ops.masked_fill(self, mask, value)


class _Freed(Function):
    """Stands where a Function was once ``backward()`` has released it."""

    def backward(self, gy):
        raise RuntimeError("backward() through a graph that was already freed by an earlier "
                           "backward(): pass backward(retain_graph=True) the first time to go "
                           "through it twice")


_FREED = _Freed()


def _as_array(a):
    """``a`` as an array: a NumPy scalar (what NumPy returns for 0-d arithmetic) becomes a 0-d array
    of its dtype, so that ``.data`` and ``.grad`` can always be updated in place."""
    return np.asarray(a) if isinstance(a, np.generic) else a


def _checked_array(a, name):
    if not hasattr(a, "shape"):
        raise TypeError(f"Tensor.{name} must be an array, got {type(a).__name__}: "
                        f"wrap it in np.asarray(...) with the dtype you mean")
    return _as_array(a)


def array_of(x, xp=None):
    """The raw array of a Tensor; anything else as an array of the library ``xp`` (on its device),
    or as it is when no ``xp`` is given (a Python number stays a number)."""
    if isinstance(x, Tensor):
        return x.data
    return x if xp is None else xp.asarray(x)


def _topological_order(root):
    """Tensors that need a gradient, each after all of its inputs (iterative DFS, no recursion)."""
    order, visited = [], set()
    stack = [(root, False)]
    while stack:
        t, inputs_done = stack.pop()
        if inputs_done:
            order.append(t)
            continue
        if id(t) in visited:
            continue
        visited.add(id(t))
        stack.append((t, True))
        if t._ctx is not None:
            for x in t._ctx.inputs:
                if x.requires_grad and id(x) not in visited:
                    stack.append((x, False))
    return order


def tensor(data, requires_grad=False, dtype=None, device=None):
    """Make a Tensor: ``mr.tensor([[1., 2.]], requires_grad=True, device="cuda")``.

    Python floats become float32 (as in PyTorch); NumPy scalars and NumPy/CuPy arrays keep their
    dtype (``mr.tensor(np.float64(2.0))`` is a 0-d float64 tensor).
    """
    t = Tensor(data, requires_grad=requires_grad, dtype=dtype)
    if device is not None:
        t.data = backend.to_device(t.data, device)
    return t


from . import ops  # noqa: E402  (ops needs Tensor and Function, defined above)
