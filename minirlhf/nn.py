"""Modules: parameters organised into layers, the way PyTorch's ``torch.nn`` does it.

A `Module` is any object whose attributes are Parameters, other Modules, or lists of Modules
(`ModuleList`). Nothing is registered by hand: ``named_parameters()`` walks the attributes in the
order they were assigned, so the names are the attribute paths (``transformer.h.0.attn.c_attn.weight``)
and the order is the order of construction. A parameter reachable by two paths (a tied weight) is
listed once, under the first path.

    class MLP(Module):
        def __init__(self):
            super().__init__()
            self.fc = Linear(4, 8)
            self.out = Linear(8, 1)

        def forward(self, x):
            return self.out(F.gelu(self.fc(x)))

Initial weights are drawn on the host from a ``numpy.random.Generator`` (pass ``rng=``), then moved
with ``model.to("cuda")``: one seed gives the same model on every device.

``fused=False`` makes `Linear`, `Embedding`, `LayerNorm` and `RMSNorm` compute with the plain
functions of `reference.py` instead of the fused ones of `functional.py`: the same numbers, easier
to follow. Each layer picks its op module once (`op_module`) and calls ``self.fn.<op>``.
"""

import numpy as np

from . import backend
from . import functional
from . import reference as plain
from .tensor import Tensor


def op_module(fused):
    """The module whose functions a layer computes with: `functional` (fused, hand-written
    backward) or `reference` (plain, autograd's backward). Both spell every op alike."""
    return functional if fused else plain


def non_finite(state):
    """The names (comma-separated, or "") of the arrays of a state dict with a NaN or an infinity."""
    bad = [name for name, a in state.items()
           if hasattr(a, "dtype") and a.dtype.kind in "fc"
           and not bool(backend.get_array_module(a).isfinite(a).all())]
    return ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")


class Parameter(Tensor):
    """A Tensor that is a learnable weight of a Module: a leaf with ``requires_grad=True``.

    It is a Tensor in every other respect (ops on it make plain Tensors); the subclass only marks
    which attributes of a Module are its parameters.
    """

    __slots__ = ()

    def __init__(self, data, dtype=None):
        super().__init__(data, requires_grad=True, dtype=dtype)

    def __repr__(self):
        return "Parameter containing:\n" + super().__repr__()


class Module:
    """Base class of every layer and model. Subclasses call ``super().__init__()`` and write ``forward``."""

    def __init__(self):
        self.training = True

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    # ----- the tree of modules and parameters --------------------------------------------------------
    def _children(self):
        """(name, value) of the attributes that are Parameters or Modules, in assignment order."""
        for name, value in vars(self).items():
            if isinstance(value, (Parameter, Module)):
                yield name, value

    def named_modules(self, prefix=""):
        """Every module of the tree (this one first, named ``prefix``), each listed once."""
        seen, stack = set(), [(prefix, self)]
        while stack:
            name, module = stack.pop()
            if id(module) in seen:
                continue
            seen.add(id(module))
            yield name, module
            children = [(f"{name}.{n}" if name else n, m)
                        for n, m in module._children() if isinstance(m, Module)]
            stack.extend(reversed(children))  # depth first, in assignment order

    def modules(self):
        return [m for _, m in self.named_modules()]

    def named_parameters(self):
        """(dotted name, Parameter) pairs in a fixed order; a tied parameter appears once."""
        seen = set()
        for prefix, module in self.named_modules():
            for name, value in module._children():
                if isinstance(value, Parameter) and id(value) not in seen:
                    seen.add(id(value))
                    yield (f"{prefix}.{name}" if prefix else name), value

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def num_parameters(self):
        """How many numbers the model learns (a tied weight counted once)."""
        return sum(p.size for p in self.parameters())

    # ----- modes, devices, gradients -----------------------------------------------------------------
    def train(self, mode=True):
        """Set the ``training`` flag of this module and every submodule (Dropout reads it)."""
        for m in self.modules():
            m.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    def to(self, device):
        """Move every parameter (and its gradient) to ``device`` in place.

        The Parameter objects stay the same, only their ``.data`` moves, so tied weights stay tied and
        an optimizer built before the move keeps pointing at the right tensors.
        """
        backend.check_device(device)
        for p in self.parameters():
            p.data = backend.to_device(p.data, device)
            if p.grad is not None:
                p.grad = backend.to_device(p.grad, device)
        return self

    @property
    def device(self):
        params = self.parameters()
        return params[0].device if params else "cpu"

    @property
    def dtype(self):
        params = self.parameters()
        return params[0].dtype if params else np.dtype(np.float32)

    def zero_grad(self):
        """Forget the gradients (set them to None, as PyTorch's default ``set_to_none=True``)."""
        for p in self.parameters():
            p.grad = None

    # ----- saving and loading ------------------------------------------------------------------------
    def state_dict(self):
        """{dotted name: NumPy copy of the values}, in the order of ``named_parameters()``."""
        return {name: np.array(backend.to_numpy(p.data), copy=True)
                for name, p in self.named_parameters()}

    def load_state_dict(self, state_dict, strict=True):
        """Copy the arrays of ``state_dict`` into the parameters, in place (any device, any dtype).

        Values are cast to each parameter's dtype and copied onto its device. With ``strict=True``
        every parameter must be given and nothing else; either way a shape mismatch is an error.
        All problems are reported together in one ``KeyError``/``ValueError`` before anything is
        written, so a failed load leaves the model untouched.
        """
        own = dict(self.named_parameters())
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        mismatched = [f"{k}: checkpoint {tuple(np.shape(v))} vs model {own[k].shape}"
                      for k, v in state_dict.items() if k in own and tuple(np.shape(v)) != own[k].shape]
        problems = []
        if strict and missing:
            problems.append("missing keys: " + ", ".join(missing))
        if strict and unexpected:
            problems.append("unexpected keys: " + ", ".join(unexpected))
        if mismatched:
            problems.append("shape mismatch: " + "; ".join(mismatched))
        if problems:
            raise ValueError(f"load_state_dict into {type(self).__name__} failed:\n  "
                             + "\n  ".join(problems))
        for name, p in own.items():
            if name in state_dict:
                value = backend.to_numpy(state_dict[name]).astype(p.dtype, copy=False)
                p.data[...] = backend.to_device(value, p.device)
        return self

    def __repr__(self):
        lines = [f"  ({n}): " + repr(m).replace("\n", "\n  ")
                 for n, m in self._children() if isinstance(m, Module)]
        if not lines:
            return f"{type(self).__name__}({self.extra_repr()})"
        return f"{type(self).__name__}(\n" + "\n".join(lines) + "\n)"

    def extra_repr(self):
        return ""


class ModuleList(Module):
    """A list of Modules whose parameters belong to the parent: names ``h.0``, ``h.1``, ..."""

    def __init__(self, modules=()):
        super().__init__()
        self._list = list(modules)

    def _children(self):
        for i, m in enumerate(self._list):
            yield str(i), m

    def append(self, module):
        self._list.append(module)
        return self

    def __getitem__(self, i):
        return self._list[i]

    def __len__(self):
        return len(self._list)

    def __iter__(self):
        return iter(self._list)


def _normal(rng, shape, std, dtype):
    """N(0, std²) weights drawn on the host (the same numbers on every device)."""
    rng = backend.host_rng() if rng is None else rng
    return (rng.standard_normal(shape) * std).astype(dtype)


class Linear(Module):
    """y = x @ W + b, with W of shape (in_features, out_features).

    W is stored (in, out), the transpose of PyTorch's ``nn.Linear`` and exactly how GPT-2's ``Conv1D``
    stores it, so the tensors of a GPT-2 checkpoint map one to one onto ours (no transposes).
    W ~ N(0, init_std²) (GPT-2's initialisation, std 0.02), b = 0.
    """

    def __init__(self, in_features, out_features, bias=True, *, rng=None, init_std=0.02,
                 dtype="float32", fused=True):
        super().__init__()
        self.in_features, self.out_features, self.fn = in_features, out_features, op_module(fused)
        self.weight = Parameter(_normal(rng, (in_features, out_features), init_std, dtype))
        self.bias = Parameter(np.zeros(out_features, dtype=dtype)) if bias else None

    def forward(self, x):
        return self.fn.linear(x, self.weight, self.bias)    # (..., in) @ (in, out) + (out,)

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}"


class Embedding(Module):
    """A lookup table: row ``i`` of ``weight`` (num_embeddings, dim) is the vector of id ``i``.

    weight ~ N(0, init_std²), GPT-2's initialisation. With ``fused=False`` the lookup is the plain
    `reference.embedding`, which leaves the ids unchecked.
    """

    def __init__(self, num_embeddings, embedding_dim, *, rng=None, init_std=0.02, dtype="float32",
                 fused=True):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.fused = num_embeddings, embedding_dim, fused
        self.weight = Parameter(_normal(rng, (num_embeddings, embedding_dim), init_std, dtype))

    def forward(self, ids, *, check=True):
        if self.fused:                                           # only the fused op checks ids
            return functional.embedding(ids, self.weight, check=check)   # (...) -> (..., dim)
        return plain.embedding(ids, self.weight)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}"


class LayerNorm(Module):
    """y = (x - mean) / sqrt(var + eps) * weight + bias over the last axis (weight 1, bias 0).

    ``bias=False`` (GPT-2 variants without biases) keeps the bias fixed at zero, not learned.
    """

    def __init__(self, dim, eps=1e-5, bias=True, *, dtype="float32", fused=True):
        super().__init__()
        self.dim, self.eps, self.fn = dim, eps, op_module(fused)
        self.weight = Parameter(np.ones(dim, dtype=dtype))
        self.bias = Parameter(np.zeros(dim, dtype=dtype)) if bias else None

    def forward(self, x):
        bias = self.bias
        if bias is None:
            xp = backend.get_array_module(self.weight.data)
            bias = Tensor.from_array(xp.zeros_like(self.weight.data))
        return self.fn.layer_norm(x, self.weight, bias, self.eps)

    def extra_repr(self):
        return f"{self.dim}, eps={self.eps}"


class RMSNorm(Module):
    """y = x / sqrt(mean(x²) + eps) * weight over the last axis (weight 1): Llama's norm, a
    LayerNorm that subtracts no mean and adds no bias."""

    def __init__(self, dim, eps=1e-6, *, dtype="float32", fused=True):
        super().__init__()
        self.dim, self.eps, self.fn = dim, eps, op_module(fused)
        self.weight = Parameter(np.ones(dim, dtype=dtype))

    def forward(self, x):
        return self.fn.rms_norm(x, self.weight, self.eps)

    def extra_repr(self):
        return f"{self.dim}, eps={self.eps}"


class Dropout(Module):
    """Inverted dropout: in training, zero each element with probability p and scale the rest by
    1/(1-p), so the expected value is unchanged and evaluation needs no rescaling. The identity in
    ``eval()`` mode or when p = 0.

    The mask is drawn on the host from ``rng`` (a ``numpy.random.Generator``) and moved to the data's
    device, so one seed drops the same elements on CPU and GPU; that costs a host-to-device copy per
    call on a GPU (``cupy.random`` would avoid it but draws other numbers). The output is
    ``x * mask``, a product with a constant, so its gradient is ``gy * mask``.
    """

    def __init__(self, p=0.0, *, rng=None):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1), got {p}")
        self.p = p
        self.rng = backend.host_rng() if rng is None else rng

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = self.rng.random(x.shape) >= self.p
        mask = (keep / (1.0 - self.p)).astype(x.dtype)       # 0 or 1/(1-p)
        return x * Tensor.from_array(backend.to_device(mask, x.device))

    def extra_repr(self):
        return f"p={self.p}"
