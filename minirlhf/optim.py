"""Optimisers (SGD, AdamW), gradient clipping and the learning-rate schedule.

Every update is written in place on the parameter arrays (``p.data``), so the parameters an optimizer
holds stay the very tensors the model uses, on whatever device they live. Parameters come in groups,
as in PyTorch, each group with its own hyperparameters:

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

from . import backend
from .nn import Embedding, Module
from .tensor import no_grad


class Optimizer:
    """Holds the parameter groups and the per-parameter state; subclasses write ``_update``."""

    defaults = {}

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
        self.state = {}  # parameter index (over all groups, in order) -> dict of arrays and counters

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
        with no_grad():
            for i, group, p in self._indexed():
                if p.grad is not None:
                    self._update(p.data, p.grad, self.state.setdefault(i, {}), group)

    def _update(self, p, g, state, group):
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
        self.state = {}
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
            self.state[int(key)] = restored


class SGD(Optimizer):
    """Stochastic gradient descent with momentum and (coupled, L2) weight decay, as PyTorch's:

        g ← g + wd·p,   b ← μ·b + g  (b = g at the first step),   p ← p - lr·b   (b = g if μ = 0)
    """

    def __init__(self, params, lr, momentum=0.0, weight_decay=0.0):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError("SGD: lr, momentum and weight_decay must be >= 0")
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay)

    def _update(self, p, g, state, group):
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        if wd:
            g = g + wd * p
        if mu:
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = g.copy()
            else:
                buf = state["momentum_buffer"]
                buf *= mu
                buf += g
            g = state["momentum_buffer"]
        p -= lr * g


class AdamW(Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter), step t = 1, 2, ...:

        m ← β1·m + (1-β1)·g,          v ← β2·v + (1-β2)·g²
        p ← p - lr·wd·p                                  (decay: not through the gradient)
        p ← p - lr · m̂ / (√v̂ + eps),  m̂ = m / (1-β1ᵗ),  v̂ = v / (1-β2ᵗ)

    computed as PyTorch does, ``p -= (lr/(1-β1ᵗ)) · m / (√v/√(1-β2ᵗ) + eps)``, the same formula.
    """

    def __init__(self, params, lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"AdamW: need lr, eps, weight_decay >= 0 and betas in [0, 1), got "
                             f"lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        super().__init__(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)

    def _update(self, p, g, state, group):
        xp = backend.get_array_module(p)
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        if "m" not in state:
            state["step"], state["m"], state["v"] = 0, xp.zeros_like(p), xp.zeros_like(p)
        state["step"] += 1
        t, m, v = state["step"], state["m"], state["v"]

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
    total = math.sqrt(float(sum((g * g).sum() for g in grads)))  # one device-to-host sync
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
