"""The public gradient checker: analytic gradients against float64 central differences.

For a function ``y = f(x1, ..., xn)`` and a random cotangent ``v`` (one per output, drawn from a normal
distribution, so that a transposed or mis-summed backward cannot hide behind symmetry), define the
scalar ``φ(x) = Σ v ⊙ f(x)``. Backward gives ``∇φ`` analytically; central differences give it
numerically, element by element:

    ∂φ/∂x_j ≈ (φ(x + ε e_j) - φ(x - ε e_j)) / 2ε          (error O(ε²))

or, for large inputs (a whole model), along one random direction ``d``:

    ∇φ · d ≈ (φ(x + ε d) - φ(x - ε d)) / 2ε.

The two must agree within ``atol + rtol · |numeric|``. Everything runs in float64, where ε = 1e-6
leaves about 1e-10 of rounding error per difference.
"""

import numpy as np

from . import backend
from .tensor import Tensor, no_grad


class GradcheckError(AssertionError):
    """The analytic gradient disagrees with the numerical one; the message shows where and by how much."""


def gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-3, seed=0, mode="full"):
    """Check the backward of ``fn`` at ``inputs``; return True or raise `GradcheckError`.

    ``fn(*tensors)`` returns a Tensor or a tuple of Tensors. ``inputs`` is a Tensor, an array, or a
    sequence of them. Every floating-point input is checked (cast to float64) except Tensors with
    ``requires_grad=False``, which stay constants, as do integer inputs (indices, targets).
    ``mode="full"`` compares every element of every gradient; ``mode="directional"`` compares the
    derivative along one random direction per input, which costs two evaluations of ``fn`` instead of
    two per element (use it for a whole model).
    """
    if mode not in ("full", "directional"):
        raise ValueError(f"gradcheck: mode must be 'full' or 'directional', got {mode!r}")
    if isinstance(inputs, (Tensor, np.ndarray)) or hasattr(inputs, "__cuda_array_interface__"):
        inputs = [inputs]
    rng = np.random.default_rng(seed)
    args, checked = _prepare(inputs)
    if not checked:
        raise ValueError("gradcheck: no floating-point input to check")

    # analytic: backward of φ = Σ v ⊙ f(x), with a random cotangent v for each output
    outs = _outputs(fn(*args))
    cotangents = [_like(rng.standard_normal(o.shape), o.data) for o in outs]
    for i, (o, v) in enumerate(zip(outs, cotangents)):
        if o.requires_grad:
            o.backward(v, retain_graph=i < len(outs) - 1)
    analytic = [_grad_or_zeros(args[i]) for i in checked]

    def f():
        with no_grad():
            return [o.data.copy() for o in _outputs(fn(*args))]

    def diff(ys, zs):
        """φ(ys) - φ(zs) = Σ v ⊙ (ys - zs): subtracting before summing keeps large outputs from
        cancelling away the small difference (as it would in φ(ys) - φ(zs) summed first)."""
        return float(sum((v * (y - z)).sum() for v, y, z in zip(cotangents, ys, zs)))

    y0 = f()
    for i, ga in zip(checked, analytic):
        x = args[i].data
        if mode == "directional":
            d = _like(rng.standard_normal(x.shape), x)
            d /= max(float(np.sqrt((d * d).sum())), 1e-12)
            x += eps * d
            plus = f()
            x -= 2 * eps * d
            minus = f()
            x += eps * d
            numeric = diff(plus, minus) / (2 * eps)
            value = float((ga * d).sum())
            if abs(value - numeric) > atol + rtol * abs(numeric):
                raise GradcheckError(_report(i, "along a random direction", value, numeric,
                                             diff(y0, minus) / eps, diff(plus, y0) / eps,
                                             eps, atol, rtol))
            continue

        flat = x.reshape(-1)  # a view: writing it perturbs the input in place
        ga_flat = backend.to_numpy(ga).reshape(-1)
        worst = None
        for j in range(flat.size):
            old = flat[j].item()
            flat[j] = old + eps
            plus = f()
            flat[j] = old - eps
            minus = f()
            flat[j] = old
            numeric = diff(plus, minus) / (2 * eps)
            excess = abs(ga_flat[j] - numeric) - (atol + rtol * abs(numeric))
            if excess > 0 and (worst is None or excess > worst[0]):
                worst = (excess, j, ga_flat[j], numeric, diff(y0, minus) / eps, diff(plus, y0) / eps)
        if worst is not None:
            _, j, value, numeric, left, right = worst
            where = f"element {tuple(int(k) for k in np.unravel_index(j, x.shape))}"
            raise GradcheckError(_report(i, where, value, numeric, left, right, eps, atol, rtol))
    return True


def _prepare(inputs):
    """float64 leaf copies of the inputs to check; constants passed through unchanged."""
    args, checked = [], []
    for i, x in enumerate(inputs):
        constant = isinstance(x, Tensor) and not x.requires_grad
        data = x.data if isinstance(x, Tensor) else x
        if not hasattr(data, "dtype"):
            data = np.asarray(data)
        if data.dtype.kind == "f" and not constant:
            args.append(Tensor(data.astype(np.float64, copy=True), requires_grad=True))
            checked.append(i)
        else:
            args.append(x if isinstance(x, Tensor) else Tensor(data))
    return args, checked


def _outputs(result):
    outs = list(result) if isinstance(result, (tuple, list)) else [result]
    for o in outs:
        if not isinstance(o, Tensor):
            raise TypeError(f"gradcheck: fn must return Tensors, got {type(o).__name__}")
    return outs


def _like(host_array, ref):
    """A float64 array with the values of ``host_array`` on the device of ``ref``."""
    return backend.to_device(np.asarray(host_array, dtype=np.float64), backend.device_of(ref))


def _grad_or_zeros(t):
    if t.grad is None:  # the output does not depend on this input at all
        return backend.get_array_module(t.data).zeros_like(t.data)
    if t.grad.shape != t.data.shape:
        raise GradcheckError(f"gradient of shape {tuple(t.grad.shape)} for an input of shape {t.shape}")
    return t.grad


def _report(i, where, value, numeric, left, right, eps, atol, rtol):
    """``left``/``right``: the one-sided differences (φ(x) - φ(x-ε))/ε and (φ(x+ε) - φ(x))/ε."""
    kink = ""
    if abs(left - right) > 10 * (atol + rtol * abs(numeric)):
        kink = (f"\n  one-sided differences disagree (left {left:.6g}, right {right:.6g}): "
                "the input may sit on a kink where the function is not differentiable")
    return (f"gradient of input {i} is wrong at {where}:\n"
            f"  analytic {value:.10g}\n  numeric  {numeric:.10g}\n"
            f"  |difference| {abs(value - numeric):.3g} > atol + rtol*|numeric| = "
            f"{atol + rtol * abs(numeric):.3g}  (eps={eps:g}, atol={atol:g}, rtol={rtol:g}){kink}")
