"""Optimisers (SGD, AdamW), gradient clipping and the learning-rate schedule.

Every update is written in place, so the parameters an optimizer holds stay the very tensors the
model uses, on whatever device they live. Each group's update runs on its parameters laid end to
end as one vector, and each parameter's array (``p.data``) becomes a view of its slice of that
vector at the first step (`Optimizer` says why). Parameters come in groups, as in PyTorch, each
group with its own hyperparameters:

    groups = param_groups(model, weight_decay=0.1)     # decay matrices, not biases/norms/embeddings
    optimizer = AdamW(groups, lr=3e-4)
    for step in range(steps):
        optimizer.lr = lr_schedule(step, 3e-4, warmup_steps=100, total_steps=steps, min_lr=3e-5)
        optimizer.zero_grad(); loss = ...; loss.backward()
        clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
"""

import math

import numpy as np

from . import backend, kernels
from .nn import Embedding, Module
from .tensor import no_grad


class Optimizer:
    """Holds the parameter groups and the per-parameter state; subclasses write the update rule.

    A subclass gives ``_state_names(group)``, the names of the arrays it keeps per parameter (each
    starts as zeros shaped like ``p``), and ``_update(p, g, state, group, t)``, its
    formula on arrays, written in place, at step ``t`` = 1, 2, ... The rule is elementwise, so it
    gives the same numbers on a whole group at once.

    The state is keyed by the parameter itself, as in PyTorch: ``optimizer.state[p]`` is
    ``{"step": t, "m": ..., "v": ...}``. So it follows its parameter when a group's list changes
    (a parameter removed, appended or moved, a group added with `add_param_group`), and a
    parameter new to the optimizer starts from fresh state at step 1.

    One vector per group, so that a step is a few large array operations rather than a few per
    parameter (each a kernel launch on a GPU): a group whose parameters all have gradients is
    updated as one vector, its gradients laid end to end. At the first step the parameters are laid
    end to end too and each ``p.data`` becomes a view of its slice, so the update writes straight
    into the model's arrays (code that kept an old ``p.data`` must read it again); a ``p.data``
    replaced later (by ``model.to(device)``, say) or a changed list of parameters is noticed and the
    vector laid out again. Each parameter's state (``self.state[p]["m"]``) is its slice of the
    group's state vector, laid out again from the parameters' own states when the list changes, as
    in PyTorch's "foreach" and "fused" optimisers. A group where some parameter has no gradient this
    step, or whose parameters are at different steps (one joined later), is updated parameter by
    parameter (one without a gradient is left alone, its state included, as in PyTorch).
    `reference.adamw_step` is AdamW's rule on one parameter, plainly.
    """

    def __init__(self, params, **defaults):
        if isinstance(params, Module):
            raise TypeError("pass model.parameters() (or param groups), not the model itself")
        params = list(params)
        if not params:
            raise ValueError("optimizer got an empty parameter list")
        self.defaults = defaults
        self.param_groups = []
        self.state = {}  # parameter -> {"step": t, name: array}
        self._state_vectors = {}  # group number -> (the states laid out, {name: one vector})
        self._param_vectors = {}  # group number -> (its parameters as one vector, their views)
        for group in params if isinstance(params[0], dict) else [{"params": params}]:
            self.add_param_group(group)

    def add_param_group(self, group):
        """Add a group of parameters (a dict with "params" and any hyperparameters that differ
        from the optimizer's), as PyTorch's: a layer unfrozen during training, say."""
        group = {**self.defaults, **group, "params": list(group["params"])}
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        for p in group["params"]:
            if id(p) in seen:
                raise ValueError("a parameter appears in more than one parameter group")
            if not p.requires_grad:
                raise ValueError("optimizer got a tensor that does not require grad")
            seen.add(id(p))
        self.param_groups.append(group)

    @property
    def lr(self):
        return self.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value):
        """Set the learning rate of every group (call it each step with the schedule's value)."""
        for group in self.param_groups:
            group["lr"] = value

    def zero_grad(self):
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def step(self):
        """Update every parameter that has a gradient: each group as one vector where it can."""
        with no_grad():
            for number, group in enumerate(self.param_groups):
                names = self._state_names(group)
                if not self._step_as_one_vector(number, group, names):
                    self._state_vectors.pop(number, None)  # steps may now differ: laid out anew
                    for p in group["params"]:
                        if p.grad is not None:
                            self._step_one(p, group, names)

    def _step_one(self, p, group, names):
        """Update one parameter on its own."""
        state = self._state_for(p, group, names)
        state["step"] += 1
        self._update(p.data, p.grad, state, group, state["step"])

    def _step_as_one_vector(self, number, group, names):
        """Update the whole group as one vector; False (nothing done) where it cannot be."""
        params = group["params"]
        if not params:                 # an empty group (no biases to leave undecayed, say)
            return True
        if any(p.grad is None for p in params):
            return False
        p = self._params_as_one_vector(number, params)            # (N,) the group's parameters
        vector = None if p is None else self._state_as_one_vector(number, params, group, names)
        if vector is None:
            return False
        xp = backend.get_array_module(p)
        g = xp.concatenate([q.grad.reshape(-1) for q in params])  # (N,) and their gradients
        t = self.state[params[0]]["step"] + 1

        def block(lo, hi):                          # written in place: p[lo:hi] is the parameters
            self._update(p[lo:hi], g[lo:hi], {k: a[lo:hi] for k, a in vector.items()}, group, t)
        kernels.for_rows(block, p.size, 1, xp=xp)

        for q in params:
            self.state[q]["step"] = t
        return True

    def _params_as_one_vector(self, number, params):
        """The group's parameters as one vector, each ``p.data`` a view of its slice. Laid out at
        the first step, and again when some ``p.data`` is no longer the view it was given there
        (an array replaced, or a parameter removed, added or moved). None where the parameters
        are of different dtypes or devices."""
        vector, views = self._param_vectors.get(number, (None, []))
        if len(views) != len(params) or any(p.data is not view for p, view in zip(params, views)):
            if len({(p.dtype, backend.device_of(p.data)) for p in params}) > 1:
                return None
            xp = backend.get_array_module(params[0].data)
            vector = xp.concatenate([p.data.reshape(-1) for p in params])
            offset = 0
            for p in params:
                p.data = vector[offset:offset + p.size].reshape(p.shape)
                offset += p.size
            self._param_vectors[number] = vector, [p.data for p in params]
        return vector

    def _state_as_one_vector(self, number, params, group, names):
        """The group's state as one vector {name: (N,)}, each parameter's state arrays becoming
        views of their slices. Laid out again from each parameter's own state when the group's
        list of parameters changed; None where the parameters are at different steps (one of them
        had no gradient at some step, or joined the group later)."""
        states, vector = self._state_vectors.get(number, ([], {}))
        if (len(states) == len(params) and all(k in vector for k in names)
                and all(self.state.get(p) is s for p, s in zip(params, states))):
            return vector
        if len({self.state[p]["step"] if p in self.state else None for p in params}) > 1:
            return None
        states = [self._state_for(p, group, names) for p in params]
        xp = backend.get_array_module(params[0].data)
        vector = {k: xp.concatenate([s[k].reshape(-1) for s in states]) for k in names}
        offset = 0
        for p, s in zip(params, states):
            s.update({k: a[offset:offset + p.size].reshape(p.shape) for k, a in vector.items()})
            self.state[p] = s
            offset += p.size
        self._state_vectors[number] = states, vector
        return vector

    def _state_for(self, p, group, names):
        """``self.state[p]``, new or given the arrays of ``names`` it lacks (zeros): a parameter
        that joined from a group without momentum, say, as PyTorch creates them lazily."""
        state = self.state.get(p)
        if state is None or any(k not in state for k in names):
            xp = backend.get_array_module(p.data)
            zeros = {name: xp.zeros_like(p.data) for name in self._state_names(group)}
            state = {"step": 0, **zeros, **(state or {})}
            self.state[p] = state
        return state

    def _state_names(self, group):
        """The names of the arrays the rule keeps per parameter in this group (zeros at first)."""
        return ()

    def _update(self, p, g, state, group, t):
        raise NotImplementedError

    # ----- saving and resuming ------------------------------------------------------------------------
    def state_dict(self):
        """{"state": {index: {name: NumPy array or int}}, "param_groups": [hyperparameters + indices]}.

        As in PyTorch, a parameter is named by its index over the groups' lists, in order, and the
        state of a parameter no longer in any group is left out."""
        state, groups, i = {}, [], 0
        for group in self.param_groups:
            for p in group["params"]:
                if p in self.state:
                    state[i] = {k: (np.array(backend.to_numpy(v), copy=True) if hasattr(v, "shape")
                                    else v) for k, v in self.state[p].items()}
                i += 1
            n = len(group["params"])
            hyper = {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k != "params"}
            groups.append({**hyper, "params": list(range(i - n, i))})
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
        params = [p for group in self.param_groups for p in group["params"]]
        self.state, self._state_vectors = {}, {}
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
            self.state[p] = restored


class SGD(Optimizer):
    """Stochastic gradient descent with momentum and (coupled, L2) weight decay, as PyTorch's:

        g ← g + wd·p,   b ← μ·b + g  (b = g at the first step),   p ← p - lr·b   (b = g if μ = 0)
    """

    def __init__(self, params, lr, momentum=0.0, weight_decay=0.0):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError("SGD: lr, momentum and weight_decay must be >= 0")
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay)

    def _state_names(self, group):
        return ("momentum_buffer",) if group["momentum"] else ()

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

    def _state_names(self, group):
        return ("m", "v")

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
