"""Log-probabilities of completions: the one computation every RLHF algorithm shares.

SFT maximises them, the reward-model and DPO losses compare them, REINFORCE weighs them by a reward.
All of them read the log-probs through `sequence_logprobs`, so there is one convention to learn:

* A sequence is ``input_ids`` (B, T): the prompt, then the completion (ending with its EOT token),
  then padding on the right. ``completion_mask`` (B, T) is 1 on the completion tokens, EOT
  included, and 0 on the prompt and the padding.
* A causal model predicts token t from the tokens before it, so the log-prob of token t is read from
  the logits at position t-1:

      logp[:, t] = log_softmax(logits[:, t-1])[input_ids[:, t]]        for t >= 1

  Position 0 has no logits before it; a prompt has at least one token, so
  ``completion_mask[:, 0]`` must be 0 (we raise otherwise).
* The log-prob of a completion y given its prompt x is the **sum** over its tokens,

      log p(y|x) = Σ_t completion_mask[:, t] · log p(y_t | x, y_<t),

  never a mean: it is the log of a probability, the quantity the closed form p* ∝ p_ref·exp(R/β)
  and the DPO derivation speak about.

``per_token`` has the shape of ``input_ids`` (B, T) and is 0 wherever the mask is 0 (t = 0
included), so ``per_token[:, t]`` sits under the token it scores.
"""

from . import backend, ops
from .tensor import Function, Tensor

# ===================================================================================================
# fused log_softmax + gather


class TokenLogprobs(Function):
    """``log softmax(z)[t]`` for each row of logits ``z`` (..., V) and integer target ``t`` (...)."""

    def __init__(self, targets):
        self.targets = targets

    def forward(self, logits):
        xp = backend.get_array_module(logits)
        V = logits.shape[-1]
        z = logits.reshape(-1, V)                                          # (N, V)
        t = self.targets.reshape(-1)                                       # (N,)
        rows = xp.arange(t.shape[0])
        shifted = z - z.max(axis=-1, keepdims=True)
        log_z = xp.log(xp.exp(shifted).sum(axis=-1, keepdims=True))       # (N, 1) log-sum-exp
        self.logp = shifted - log_z                                        # (N, V) log_softmax
        self.rows, self.t, self.shape = rows, t, logits.shape
        return self.logp[rows, t].reshape(self.targets.shape)              # (...)

    def backward(self, gy):
        """y = z_t - logsumexp(z)  ->  ∂y/∂z = onehot(t) - softmax(z),
        gx = gy · (onehot(t) - softmax(z)).

        No one-hot is built: gx starts as -gy · softmax(z) and gy is added at column t of each row.
        """
        xp = backend.get_array_module(gy)
        g = gy.reshape(-1, 1)                                              # (N, 1)
        gx = xp.exp(self.logp) * (-g)                                      # (N, V)
        gx[self.rows, self.t] += g[:, 0]
        return (gx.reshape(self.shape),)


def token_logprobs(logits, targets):
    """log p(target) under ``softmax(logits)``: logits (..., V), integer targets (...) -> (...).

    One node for log_softmax and the gather, so backward never materialises a one-hot: its
    gradient is ``onehot(t) - softmax(z)`` per row.
    """
    xp = backend.get_array_module(logits.data)
    t = targets.data if isinstance(targets, Tensor) else xp.asarray(targets)
    if t.dtype.kind not in "iu":
        raise TypeError(f"token_logprobs: targets must be integers, got dtype {t.dtype}")
    if tuple(t.shape) != logits.shape[:-1]:
        raise ValueError(f"token_logprobs: targets of shape {tuple(t.shape)} do not match logits of "
                         f"shape {logits.shape} (expected {logits.shape[:-1]})")
    _check_ids(t, logits.shape[-1])
    return TokenLogprobs(t)(logits)


def _check_ids(ids, n):
    """Refuse ids outside [0, n): CuPy would wrap them around silently instead of failing."""
    if ids.size and bool(((ids < 0) | (ids >= n)).any()):
        bad = ids[(ids < 0) | (ids >= n)].reshape(-1)[0]
        raise IndexError(f"token id {int(bad)} is out of range for a vocabulary of {n}")


# ===================================================================================================
# per-token and per-sequence log-probs


def logprobs_from_logits(logits, input_ids, completion_mask):
    """``(per_token, per_sequence)`` log-probs of the completions, from logits already computed.

    logits (B, T, V), input_ids (B, T), completion_mask (B, T) ->
    per_token (B, T) with ``per_token[:, t] = mask[:, t] · log_softmax(logits[:, t-1])[ids[:, t]]``
    (0 at t = 0), per_sequence (B,) its sum over t. Use it when the same logits also feed
    `token_entropy`; otherwise call `sequence_logprobs`.
    """
    xp = backend.get_array_module(logits.data)
    ids = _raw(input_ids, xp)
    keep = _completion_positions(completion_mask, ids, xp)                # (B, T) bool
    B, T = ids.shape
    if logits.ndim != 3 or logits.shape[:2] != (B, T):
        raise ValueError(f"logits of shape {logits.shape} do not match input_ids of shape {(B, T)}: "
                         "expected (B, T, vocab)")

    lp = token_logprobs(logits[:, :-1], ids[:, 1:])                       # (B, T-1): token t from t-1
    lp = ops.where(keep[:, 1:], lp, 0.0)                                  # where, not *: -inf·0 is nan
    first = Tensor._wrap(xp.zeros((B, 1), dtype=lp.dtype))                # nothing predicts token 0
    per_token = ops.concatenate([first, lp], axis=1)                      # (B, T)
    return per_token, per_token.sum(axis=1)                               # (B, T), (B,)


def sequence_logprobs(model, input_ids, completion_mask):
    """``(per_token, per_sequence)`` log-probs of the completions in ``input_ids`` under ``model``.

    ``model`` is any callable mapping input_ids (B, T) to a Tensor of logits (B, T, V). See the
    module docstring for the conventions; per_sequence (B,) is log p(y|x), the sum over the
    completion tokens (EOT included) of log p(y_t | x, y_<t).
    """
    return logprobs_from_logits(model(input_ids), input_ids, completion_mask)


def _raw(x, xp):
    return x.data if isinstance(x, Tensor) else xp.asarray(x)


def _completion_positions(completion_mask, ids, xp):
    """The mask as booleans on the logits' device, after checking its shape and first column."""
    mask = _raw(completion_mask, xp)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must have shape (B, T), got {tuple(ids.shape)}")
    if tuple(mask.shape) != tuple(ids.shape):
        raise ValueError(f"completion_mask of shape {tuple(mask.shape)} does not match input_ids of "
                         f"shape {tuple(ids.shape)}")
    keep = mask != 0
    if bool(keep[:, 0].any()):
        raise ValueError("completion_mask[:, 0] must be 0: token 0 has no logits before it to be "
                         "scored from (a prompt needs at least one token)")
    return keep


# ===================================================================================================
# entropy


class Entropy(Function):
    """H = -Σ_j p_j log p_j with p = softmax(z), over the last axis of logits z (..., V)."""

    def forward(self, logits):
        xp = backend.get_array_module(logits)
        shifted = logits - logits.max(axis=-1, keepdims=True)
        logp = shifted - xp.log(xp.exp(shifted).sum(axis=-1, keepdims=True))
        p = xp.exp(logp)
        logp = xp.where(p > 0, logp, 0)                                    # 0·log 0 = 0 (z = -inf)
        self.p, self.logp = p, logp
        self.H = -(p * logp).sum(axis=-1)                                  # (...)
        return self.H

    def backward(self, gy):
        """H = -Σ_i p_i log p_i,  ∂p_i/∂z_j = p_i (δ_ij - p_j)  ->  ∂H/∂z_j = -p_j (log p_j + H).

        (Differentiate: -Σ_i (log p_i + 1) p_i (δ_ij - p_j) = -p_j log p_j - p_j + p_j (1 - H).)
        """
        gz = -self.p * (self.logp + self.H[..., None])
        return (gy[..., None] * gz,)


def token_entropy(logits, completion_mask):
    """Entropy (nats) of the distribution each completion token was drawn from: (B, T), 0 off-mask.

    ``H[:, t] = mask[:, t] · H(softmax(logits[:, t-1]))``, aligned like `logprobs_from_logits`.
    RL logs its mean over completion tokens as the ``entropy`` metric:
    ``(H.sum() / mask.sum())``. Differentiable; wrap it in ``no_grad()`` when it is only a metric.
    """
    xp = backend.get_array_module(logits.data)
    mask = _raw(completion_mask, xp)
    if logits.ndim != 3 or logits.shape[:2] != tuple(mask.shape):
        raise ValueError(f"logits of shape {logits.shape} do not match completion_mask of shape "
                         f"{tuple(mask.shape)}: expected (B, T, vocab)")
    keep = mask != 0
    if bool(keep[:, 0].any()):
        raise ValueError("completion_mask[:, 0] must be 0: token 0 has no logits before it")
    B = mask.shape[0]
    h = ops.where(keep[:, 1:], Entropy()(logits[:, :-1]), 0.0)            # (B, T-1)
    first = Tensor._wrap(xp.zeros((B, 1), dtype=h.dtype))
    return ops.concatenate([first, h], axis=1)                            # (B, T)
