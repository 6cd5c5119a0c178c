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
from . import functional as F
from .tensor import Tensor, array_of

# ===================================================================================================
# log-probs of chosen tokens


def token_logprobs(logits, targets):
    """log p(target) under ``softmax(logits)``: logits (..., V), integer targets (...) -> (...).

    One node (`functional.TokenLogprobs`) for log_softmax and the gather, so backward never
    materialises a one-hot: its gradient is ``onehot(t) - softmax(z)`` per row.
    """
    t = F.check_targets(logits, targets, "token_logprobs")
    F.check_ids(t, logits.shape[-1], "token id")
    return F.TokenLogprobs(t)(logits)


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
    ids = array_of(input_ids, xp)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must have shape (B, T), got {tuple(ids.shape)}")
    keep = completion_positions(completion_mask, ids.shape, xp, "input_ids")   # (B, T) bool
    B, T = ids.shape
    if logits.ndim != 3 or logits.shape[:2] != (B, T):
        raise ValueError(f"logits of shape {logits.shape} do not match input_ids of shape {(B, T)}: "
                         "expected (B, T, vocab)")

    lp = token_logprobs(logits[:, :-1], ids[:, 1:])                       # (B, T-1): token t from t-1
    lp = ops.where(keep[:, 1:], lp, 0.0)                                  # where, not *: -inf·0 is nan
    first = Tensor.from_array(xp.zeros((B, 1), dtype=lp.dtype))                # nothing predicts token 0
    per_token = ops.concatenate([first, lp], axis=1)                      # (B, T)
    return per_token, per_token.sum(axis=1)                               # (B, T), (B,)


def sequence_logprobs(model, input_ids, completion_mask):
    """``(per_token, per_sequence)`` log-probs of the completions in ``input_ids`` under ``model``.

    ``model`` is any callable mapping input_ids (B, T) to a Tensor of logits (B, T, V). See the
    module docstring for the conventions; per_sequence (B,) is log p(y|x), the sum over the
    completion tokens (EOT included) of log p(y_t | x, y_<t).
    """
    return logprobs_from_logits(model(input_ids), input_ids, completion_mask)


def completion_positions(completion_mask, shape, xp, what):
    """The mask as booleans on ``xp``'s device, after checking it has ``shape`` (B, T), that of
    ``what``, and a first column of zeros (token 0 has nothing before it to be scored from)."""
    mask = array_of(completion_mask, xp)
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"completion_mask of shape {tuple(mask.shape)} does not match "
                         f"{what} of shape {tuple(shape)}")
    keep = mask != 0
    if bool(keep[:, 0].any()):
        raise ValueError("completion_mask[:, 0] must be 0: token 0 has no logits before it to be "
                         "scored from (a prompt needs at least one token)")
    return keep


# ===================================================================================================
# entropy


def token_entropy(logits, completion_mask):
    """Entropy (nats) of the distribution each completion token was drawn from: (B, T), 0 off-mask.

    ``H[:, t] = mask[:, t] · H(softmax(logits[:, t-1]))``, aligned like `logprobs_from_logits`.
    RL logs its mean over completion tokens as the ``entropy`` metric:
    ``(H.sum() / mask.sum())``. Differentiable; wrap it in ``no_grad()`` when it is only a metric.
    """
    xp = backend.get_array_module(logits.data)
    if logits.ndim != 3:
        raise ValueError(f"logits of shape {logits.shape} must be (B, T, vocab)")
    keep = completion_positions(completion_mask, logits.shape[:2], xp, "logits' (B, T)")
    B = keep.shape[0]
    h = ops.where(keep[:, 1:], F.Entropy()(logits[:, :-1]), 0.0)            # (B, T-1)
    first = Tensor.from_array(xp.zeros((B, 1), dtype=h.dtype))
    return ops.concatenate([first, h], axis=1)                            # (B, T)
