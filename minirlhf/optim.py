"""Optimisers (SGD, AdamW), gradient clipping and the learning-rate schedule.

Every update is written in place, so the parameters an optimizer holds stay the very tensors the
model uses, on whatever device they live. Each group's update runs on its parameters laid end to
end as one vector, and each parameter's array (``p.data``) becomes a view of its slice of that
vector at the first step (`Optimizer` says why). Parameters come in groups, as in PyTorch, each
group with its own hyperparameters:

    groups = param_groups(model, weight_decay=0.1)     # decay matrices, not biases/norms/embeddings
    opt = AdamW(groups, lr=3e-4)
    for step in range(steps):
        opt.lr = lr_schedule(step, 3e-4, warmup_steps=100, total_steps=steps, min_lr=3e-5)
        opt.zero_grad(); loss = ...; loss.backward()
        clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
"""

import math

import numpy as np

from . import backend, kernels
from .nn import Embedding, Module
from .tensor import no_grad


class Optimizer:
    """Holds the parameter groups and the per-parameter state; subclasses write the update rule.

    A subclass gives ``_new_state(p, group)``, the arrays it keeps per parameter (zeros shaped
    like ``p``), and ``_update(p, g, state, group, t)``, its formula on arrays, written in place,
    at step ``t`` = 1, 2, ... The rule is elementwise, so it gives the same numbers on a whole
    group at once.

    One vector per group, so that a step is a few large array operations rather than a few per
    parameter (each a kernel launch on a GPU): a group whose parameters all have gradients is
    updated as one vector, its gradients laid end to end. At the first step the parameters are laid
    end to end too and each ``p.data`` becomes a view of its slice, so the update writes straight
    into the model's arrays (code that kept an old ``p.data`` must read it again); a ``p.data``
    replaced later (by ``model.to(device)``, say) is noticed and the vector laid out again. Each
    parameter's state (``self.state[i]["m"]``) is its slice of the group's state vector, as in
    PyTorch's "foreach" and "fused" optimisers. A group where some parameter has no gradient this
    step is updated parameter by parameter (one without a gradient is left alone, as in PyTorch).
    `reference.adamw_step` is AdamW's rule on one parameter, plainly.
    """

    def __init__(self, params, **defaults):
        if isinstance(params, Module):
            raise TypeError("pass model.parameters() (or param groups), not the model itself")
        params = list(params)
        if not params:
            raise ValueError("optimizer got an empty parameter list")
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        self.param_groups = []
        seen = set()
        for group in groups:
            group = {**defaults, **group, "params": list(group["params"])}
            for p in group["params"]:
                if id(p) in seen:
                    raise ValueError("a parameter appears in more than one parameter group")
                if not p.requires_grad:
                    raise ValueError("optimizer got a tensor that does not require grad")
                seen.add(id(p))
            self.param_groups.append(group)
        self.state = {}  # parameter index (over all groups, in order) -> {"step": t, name: array}
        self._vectors = {}  # group number -> {name: the group's state as one vector}
        self._param_vectors = {}  # group number -> (its parameters as one vector, their views)

    def _indexed(self):
        """(index, group, parameter) for every parameter, the index being its key in ``state``."""
        i = 0
        for group in self.param_groups:
            for p in group["params"]:
                yield i, group, p
                i += 1

    @property
    def lr(self):
        return self.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value):
        """Set the learning rate of every group (call it each step with the schedule's value)."""
        for group in self.param_groups:
            group["lr"] = value

    def zero_grad(self):
        for _, _, p in self._indexed():
            p.grad = None

    def step(self):
        """Update every parameter that has a gradient: each group as one vector where it can."""
        with no_grad():
            first = 0  # index in ``state`` of the group's first parameter
            for number, group in enumerate(self.param_groups):
                indices = range(first, first + len(group["params"]))
                first += len(group["params"])
                if not self._step_as_one_vector(number, group, indices):
                    self._vectors.pop(number, None)  # steps may now differ: rebuilt when they agree
                    for i, p in zip(indices, group["params"]):
                        if p.grad is not None:
                            self._step_one(i, p, group)

    def _step_one(self, i, p, group):
        """Update one parameter on its own."""
        if i not in self.state:
            self.state[i] = {"step": 0, **self._new_state(p.data, group)}
        state = self.state[i]
        state["step"] += 1
        self._update(p.data, p.grad, state, group, state["step"])

    def _step_as_one_vector(self, number, group, indices):
        """Update the whole group as one vector; False (nothing done) where it cannot be."""
        params = group["params"]
        if not params:                 # an empty group (no biases to leave undecayed, say)
            return True
        if any(p.grad is None for p in params):
            return False
        vector = self._vectors.get(number)
        if vector is None:
            vector = self._group_vector(params, indices, group)
            if vector is None:
                return False
            self._vectors[number] = vector
        xp = backend.get_array_module(params[0].data)
        p = self._params_as_one_vector(number, params)            # (N,) the group's parameters
        g = xp.concatenate([q.grad.reshape(-1) for q in params])  # (N,) and their gradients
        t = self.state[indices[0]]["step"] + 1

        def rows(lo, hi):                          # written in place: p[lo:hi] is the parameters
            self._update(p[lo:hi], g[lo:hi], {k: a[lo:hi] for k, a in vector.items()}, group, t)
        kernels.for_rows(rows, p.size, 1, xp=xp)

        for i in indices:
            self.state[i]["step"] = t
        return True

    def _params_as_one_vector(self, number, params):
        """The group's parameters as one vector, each ``p.data`` a view of its slice. Laid out at
        the first step, and again when some ``p.data`` is no longer the view it was given."""
        vector, views = self._param_vectors.get(number, (None, []))
        if len(views) != len(params) or any(p.data is not view for p, view in zip(params, views)):
            xp = backend.get_array_module(params[0].data)
            vector = xp.concatenate([p.data.reshape(-1) for p in params])
            offset = 0
            for p in params:
                p.data = vector[offset:offset + p.size].reshape(p.shape)
                offset += p.size
            self._param_vectors[number] = vector, [p.data for p in params]
        return vector

    def _group_vector(self, params, indices, group):
        """The group's state as one vector, each parameter's state becoming its slice; None where
        the group cannot be one vector: parameters of different dtypes or devices, or states at
        different steps (after a step in which some parameter had no gradient)."""
        if len({(p.dtype, backend.device_of(p.data)) for p in params}) > 1:
            return None
        states = [self.state.get(i) for i in indices]
        if any(s is None for s in states):
            if any(s is not None for s in states):
                return None
            states = [{"step": 0, **self._new_state(p.data, group)} for p in params]
        if len({s["step"] for s in states}) > 1:
            return None
        xp = backend.get_array_module(params[0].data)
        vector = {k: xp.concatenate([s[k].reshape(-1) for s in states])
                  for k in states[0] if k != "step"}
        offset = 0
        for i, p, s in zip(indices, params, states):
            views = {k: a[offset:offset + p.size].reshape(p.shape) for k, a in vector.items()}
            self.state[i] = {"step": s["step"], **views}
            offset += p.size
        return vector

    def _new_state(self, p, group):
        """The arrays kept per parameter, at their values before the first step."""
        return {}

    def _update(self, p, g, state, group, t):
        raise NotImplementedError

    # ----- saving and resuming ------------------------------------------------------------------------
    def state_dict(self):
        """{"state": {index: {name: NumPy array or int}}, "param_groups": [hyperparameters + indices]}."""
        state = {i: {k: (np.array(backend.to_numpy(v), copy=True) if hasattr(v, "shape") else v)
                     for k, v in s.items()}
                 for i, s in self.state.items()}
        groups, i = [], 0
        for group in self.param_groups:
            n = len(group["params"])
            hyper = {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k != "params"}
            groups.append({**hyper, "params": list(range(i, i + n))})
            i += n
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict):
        """Restore what ``state_dict()`` returned; arrays go to each parameter's device and dtype."""
        groups = state_dict["param_groups"]
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("optimizer state does not match: different numbers of parameters per group")
        for group, saved in zip(self.param_groups, groups):
            for k, v in saved.items():
                if k != "params":
                    group[k] = tuple(v) if isinstance(group.get(k), tuple) else v
        params = {i: p for i, _, p in self._indexed()}
        self.state, self._vectors = {}, {}
        for key, s in state_dict["state"].items():
            p = params[int(key)]  # keys are ints, or strings after a trip through JSON
            restored = {}
            for k, v in s.items():
                if hasattr(v, "shape") and v.shape == p.shape:
                    v = backend.to_device(backend.to_numpy(v).astype(p.dtype), p.device)
                elif hasattr(v, "shape"):
                    raise ValueError(f"optimizer state {k!r} of parameter {key} has shape "
                                     f"{tuple(v.shape)}, the parameter {p.shape}")
                restored[k] = v
            restored.setdefault("step", 0)  # SGD's state had no step count before
            self.state[int(key)] = restored


class SGD(Optimizer):
    """Stochastic gradient descent with momentum and (coupled, L2) weight decay, as PyTorch's:

        g ← g + wd·p,   b ← μ·b + g  (b = g at the first step),   p ← p - lr·b   (b = g if μ = 0)
    """

    def __init__(self, params, lr, momentum=0.0, weight_decay=0.0):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError("SGD: lr, momentum and weight_decay must be >= 0")
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay)

    def _new_state(self, p, group):
        if not group["momentum"]:
            return {}
        return {"momentum_buffer": backend.get_array_module(p).zeros_like(p)}

    def _update(self, p, g, state, group, t):
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        if wd:
            g = g + wd * p
        if mu:
            buf = state["momentum_buffer"]  # zeros before the first step, so b = g then
            buf *= mu
            buf += g
            g = buf
        p -= lr * g


class AdamW(Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter), step t = 1, 2, ...:

        m ← β1·m + (1-β1)·g,          v ← β2·v + (1-β2)·g²
        p ← p - lr·wd·p                                  (decay: not through the gradient)
        p ← p - lr · m̂ / (√v̂ + eps),  m̂ = m / (1-β1ᵗ),  v̂ = v / (1-β2ᵗ)

    computed as PyTorch does, ``p -= (lr/(1-β1ᵗ)) · m / (√v/√(1-β2ᵗ) + eps)``, the same formula.
    Plain version, one parameter's arrays in and out: `reference.adamw_step`.
    """

    def __init__(self, params, lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"AdamW: need lr, eps, weight_decay >= 0 and betas in [0, 1), got "
                             f"lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        super().__init__(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)

    def _new_state(self, p, group):
        xp = backend.get_array_module(p)
        return {"m": xp.zeros_like(p), "v": xp.zeros_like(p)}

    def _update(self, p, g, state, group, t):
        xp = backend.get_array_module(p)
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        m, v = state["m"], state["v"]

        m *= beta1
        m += (1 - beta1) * g
        v *= beta2
        v += (1 - beta2) * (g * g)
        if wd:
            p *= 1 - lr * wd
        denom = xp.sqrt(v)
        denom /= math.sqrt(1 - beta2 ** t)
        denom += eps
        p -= (lr / (1 - beta1 ** t)) * m / denom


def param_groups(model, weight_decay=0.1):
    """Two groups: weight decay on the weight matrices, none on biases, norms and embeddings.

    The rule: decay a parameter when it has 2 or more dims and is not the weight of an `Embedding`.
    Biases and LayerNorm weights are 1-d (decaying them pulls the scales toward 0 for no benefit);
    embeddings are lookup tables whose rows rarely get a gradient, so decay would mostly shrink
    unused rows. GPT's LM head is the token embedding (tied), so it is not decayed either (nanoGPT,
    which decays every 2-d tensor, decays it; we follow the no-decay-on-embeddings rule).
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, Embedding)}
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        (decay if p.ndim >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def clip_grad_norm_(params, max_norm):
    """Scale all gradients together so that their global L2 norm is at most ``max_norm``.

    ‖g‖ = sqrt(Σ_p Σ g_p²);  if ‖g‖ > max_norm:  g ← g · max_norm / (‖g‖ + 1e-6).
    Returns ‖g‖ before clipping (a float), worth logging: spikes announce instabilities.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    xp = backend.get_array_module(grads[0])
    flat = xp.concatenate([g.reshape(-1) for g in grads])  # every gradient end to end
    total = math.sqrt(float(flat @ flat))                  # one device-to-host sync
    coef = max_norm / (total + 1e-6)
    if coef < 1:
        for g in grads:
            g *= coef
    return total


def lr_schedule(step, base_lr, warmup_steps, total_steps, min_lr=0.0):
    """Linear warm-up from 0 to ``base_lr`` over ``warmup_steps``, then cosine decay to ``min_lr``
    at ``total_steps`` (and ``min_lr`` after it):

        lr = base·step/warmup                                       step < warmup
        lr = min + ½(1 + cos(π·(step-warmup)/(total-warmup)))·(base - min)   warmup <= step < total
    """
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (base_lr - min_lr)
