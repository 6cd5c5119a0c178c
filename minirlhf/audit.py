"""Which objective does each algorithm optimise? An exact audit on the enumerable toy problem.

The lecture gives one objective and its optimum (`minirlhf.closed_form`):

    J(p) = E_{y~p}[R(y|x)] - β·KL(p ‖ p_ref),        p* ∝ p_ref·exp(R/β),        J* - J(p) = β·KL(p ‖ p*)

Every completion of the toy problem can be listed, so expectations over y ~ p_θ are exact sums, and
autograd through them gives *expected* gradients with no sampling noise. Three questions:

1. **Where the KL goes** (`kl_gradients`, `kl_placement_table`). The expected gradient of each KL
   estimator used as a loss term (gradient through the estimator, the sample held fixed), and of
   k1 in the reward, against the exact gradients of the reverse KL(p_θ ‖ p_ref) and the forward
   KL(p_ref ‖ p_θ), for one token and for whole sequences. Per token, with r = p_ref/p_θ:
       E[∇k1] = E[∇log p_θ] = 0;
       E[∇k2] = E[log(p_θ/p_ref)·∇log p_θ] = ∇KL(p_θ ‖ p_ref);
       E[∇k3] = E[(1 - r)·∇log p_θ] = -Σ p_ref ∇log p_θ = ∇KL(p_ref ‖ p_θ);
       E[∇(ρ·k3)] (ρ = p_θ/p_old = 1 with gradient ∇log p_θ) = E[(k3 + 1 - r)∇log p_θ] = ∇KL(p_θ ‖ p_ref).
   Over a sequence each token's estimator only sees its own token: the expected gradient is that of
   Σ_t E_{y<t}[KL_t(·|y<t)] with the prefixes' distribution held fixed ("per-token" below), which
   drops how a token changes the KL of the tokens after it. Only k1 *in the reward*, R̂ = R - β·k1,
   multiplies the score ∇log p_θ(y) of the whole sequence and gives the exact ∇KL.
2. **Where each algorithm converges** (`convergence_table`). Each is trained to convergence and we
   report KL(p_θ ‖ p*) and the gap J* - J. Where it is not p*, the table names the objective whose
   optimum it reaches and the KL to that optimum, computed independently:
   `per_token_optimum` solves, prefix by prefix from the last token back (as dynamic programming),
   the fixed point of "reward in the score function, KL per token in the loss":
       p(·|u) = argmax_q  c·E_q[Q(u, a)] - β·D_t(q, p_ref(·|u)),  Q(u,a) = E_p[R | u, a]  (no KL in Q)
   with D_t the forward KL for k3 and the reverse KL for k3·ρ, and c = (G-1)/G the shrinkage of a
   baseline that includes the sample itself. GRPO with std scaling is that fixed point with R
   replaced by the expected standardised advantage E[A | y] at convergence (`grpo_expected_advantage`).
   The preference family beside DPO (KTO, SimPO, ORPO, DPO's other loss types) has its rows from
   `minirlhf.audit_preference`: each loss's own optimum solved from its formula by Newton's method.
3. **Bias and variance of the REINFORCE estimators** (`estimator_moments`): exact mean and variance of
   one group's gradient estimate, (1/n)·Σ_i A_i ∇log p_θ(y_i), over all n-tuples of samples, for the
   baselines none, mean (with the sample itself), leave-one-out, and GRPO's group normalisation.

`examples/which_objective.py` prints the three tables; the README quotes them.
"""

from itertools import product

import numpy as np

from . import functional as F
from .audit_preference import family_rows
from .closed_form import (TabularPolicy, TabularValue, bradley_terry_pairs, exact_logprobs,
                          exact_policy, exact_token_logprobs, flat_gradient, kl, make_problem,
                          make_sequences, optimal_policy, train_dpo, train_ppo, train_reinforce,
                          train_reward_table)
from .losses import group_advantages, kl_k1, kl_k2, kl_k3
from .optim import AdamW, lr_schedule
from .tensor import no_grad

# ===================================================================================================
# exact tables of a policy: per-token log-probs and the whole distribution at every position


def position_logprobs(policy, problem):
    """log p(· | x, y_<t) at each position of every completion, a Tensor (P, N, L, n): the whole
    distribution the token y_t was drawn from."""
    P, (N, L) = len(problem.prompts), problem.completions.shape
    ids, _ = make_sequences(np.repeat(problem.prompts, N, axis=0), np.tile(problem.completions, (P, 1)))
    Tp = ids.shape[1] - L
    logits = policy(ids)[:, Tp - 1:Tp - 1 + L]                           # (P·N, L, n)
    return F.log_softmax(logits, axis=-1).reshape(P, N, L, problem.n_tokens)


def conditionals(p, n_tokens, length):
    """The joint table p (P, N) as its conditionals: a list over t of (P, n^t, n), p(y_t | y_<t).

    Completions are in lexicographic order, so the prefixes of length t are blocks of n^(L-t) rows.
    """
    P = p.shape[0]
    out = []
    for t in range(length):
        prefix = p.reshape(P, n_tokens ** (t + 1), n_tokens ** (length - t - 1)).sum(-1)
        prefix = prefix.reshape(P, n_tokens ** t, n_tokens)             # P(y_<t, y_t)
        out.append(prefix / prefix.sum(-1, keepdims=True))
    return out


def joint(conds):
    """The inverse of `conditionals`: Π_t p(y_t | y_<t) as a table (P, N)."""
    p = conds[0].reshape(conds[0].shape[0], -1)                          # (P, n)
    for c in conds[1:]:
        p = (p[:, :, None] * c).reshape(p.shape[0], -1)
    return p


def set_policy(policy, problem, p):
    """Write the table p (P, N) into a `TabularPolicy`: each prefix's row = log p(· | prefix)."""
    n, L = problem.n_tokens, problem.length
    w = policy.weight.data
    offset = 0
    for t, c in enumerate(conditionals(p, n, L)):
        for x in range(len(problem.prompts)):
            start = x * policy.n_prefixes + offset
            w[start:start + n ** t] = np.log(c[x])
        offset += n ** t
    return policy


# ===================================================================================================
# 1. where the KL goes


KL_PLACEMENTS = ("k1 in the loss", "k2 in the loss", "k3 in the loss",
                 "k3·ρ in the loss (TRL use_bias_correction_kl)",
                 "k1 in the reward (R̂ = R - β·k1)")
TARGETS = ("∇KL(p_θ‖p_ref)", "∇KL(p_ref‖p_θ)", "per-token ∇KL(p_θ‖p_ref)", "per-token ∇KL(p_ref‖p_θ)")


def kl_gradients(policy, ref, problem):
    """Expected gradients of each KL placement (`KL_PLACEMENTS`) and the exact targets (`TARGETS`),
    flattened over the policy's parameters, averaged over prompts: two dicts name -> vector.

    "as a loss": Σ_y p_θ(y)·Σ_t k(y_t), p_θ(y) held fixed (the sample is not differentiated).
    "in the reward": Σ_y p_θ(y)·k1(y)·log p_θ(y), p_θ(y) and k1 held fixed (REINFORCE's surrogate).
    The per-token targets are Σ_y p_θ(y)·Σ_t KL_t(y_<t), differentiated through each position's
    whole distribution only.
    """
    params = policy.parameters()
    prompts, ys = problem.prompts, problem.completions
    with no_grad():
        ref_tok = exact_token_logprobs(ref, prompts, ys).numpy()        # (P, N, L)
        ref_pos = position_logprobs(ref, problem).numpy()                # (P, N, L, n)
        logp = exact_token_logprobs(policy, prompts, ys).numpy().sum(-1)   # (P, N) log p_θ(y)
    w = np.exp(logp)                                                     # (P, N) p_θ(y), a constant
    k1_seq = logp - ref_tok.sum(-1)
    P = len(prompts)
    p_ref = np.exp(ref_tok.sum(-1))

    def expected(per_token):                                             # Σ_y w(y) Σ_t k_t(y)
        return lambda: (w * per_token().sum(axis=2)).sum() / P

    def tok():
        return exact_token_logprobs(policy, prompts, ys)                 # (P, N, L)

    def k3_rho():                                                        # ρ = 1, ∇ρ = ∇log p
        lp = tok()
        return kl_k3(lp, ref_tok) * (lp - lp.data).exp()

    estimators = {
        KL_PLACEMENTS[0]: expected(lambda: kl_k1(tok(), ref_tok)),
        KL_PLACEMENTS[1]: expected(lambda: kl_k2(tok(), ref_tok)),
        KL_PLACEMENTS[2]: expected(lambda: kl_k3(tok(), ref_tok)),
        KL_PLACEMENTS[3]: expected(k3_rho),
        KL_PLACEMENTS[4]: lambda: (w * k1_seq * tok().sum(axis=2)).sum() / P,
    }

    def per_position(forward):                                           # Σ_y w Σ_t KL_t
        def loss():
            lp = position_logprobs(policy, problem)                      # (P, N, L, n)
            if forward:
                terms = (np.exp(ref_pos) * (ref_pos - lp)).sum(axis=3)
            else:
                terms = (lp.exp() * (lp - ref_pos)).sum(axis=3)
            return (w * terms.sum(axis=2)).sum() / P
        return loss

    def sequence_kl(forward):
        def loss():
            logp = tok().sum(axis=2)                                     # (P, N)
            if forward:
                return (p_ref * (np.log(p_ref) - logp)).sum() / P
            return (logp.exp() * (logp - np.log(p_ref))).sum() / P
        return loss

    targets = {TARGETS[0]: sequence_kl(False), TARGETS[1]: sequence_kl(True),
               TARGETS[2]: per_position(False), TARGETS[3]: per_position(True)}
    return ({k: flat_gradient(params, f) for k, f in estimators.items()},
            {k: flat_gradient(params, f) for k, f in targets.items()})


def relative_error(g, target):
    """‖g - target‖ / ‖target‖."""
    return float(np.linalg.norm(g - target) / np.linalg.norm(target))


def kl_problems(seed=0):
    """One token (4 choices) and whole sequences (3 tokens, length 3): each with a policy and a
    reference that differ, so that every KL and gradient is far from 0."""
    out = {}
    for name, (n, L) in {"one token": (4, 1), "sequence": (3, 3)}.items():
        problem = make_problem(n_prompts=2, n_tokens=n, length=L, seed=seed)
        policy = TabularPolicy(problem.prompts, n, L, init_std=1.0, seed=seed + 1)
        ref = TabularPolicy(problem.prompts, n, L, init_std=1.0, seed=seed + 2)
        out[name] = (policy, ref, problem)
    return out


def kl_placement_table(seed=0):
    """Rows (setting, estimator, ‖g‖/‖∇KL(p_θ‖p_ref)‖, {target: relative error}), `kl_problems`."""
    rows = []
    for setting, (policy, ref, problem) in kl_problems(seed).items():
        estimates, targets = kl_gradients(policy, ref, problem)
        for name, g in estimates.items():
            errors = {t: relative_error(g, v) for t, v in targets.items()}
            rows.append((setting, name, np.linalg.norm(g) / np.linalg.norm(targets[TARGETS[0]]), errors))
    return rows


# ===================================================================================================
# 2. where each algorithm converges


def audit_problem(beta=0.5, seed=0):
    """The problem of table 2: 2 prompts, 3 tokens, length 3 (27 completions), R ~ N(0, 1), β = 0.5;
    the reference as in tests/test_closed_form.py."""
    problem = make_problem(n_prompts=2, n_tokens=3, length=3, beta=beta, reward_scale=1.0, seed=seed)
    ref = TabularPolicy(problem.prompts, problem.n_tokens, problem.length, init_std=0.5, seed=1)
    return problem, ref


def _new_policy(problem):
    return TabularPolicy(problem.prompts, problem.n_tokens, problem.length, init_std=0.5, seed=1)


def _forward_kl_argmax(ref, s):
    """argmax_q Σ_a q_a·s_a + Σ_a ref_a·log q_a on the simplex, along the last axis.

    Stationarity: s_a + ref_a/q_a = λ, so q_a = ref_a/(λ - s_a) with λ > max s chosen so that
    Σ q = 1; Σ ref_a/(λ - s_a) falls from ∞ to <= 1 on (max s, max s + 1]: bisection.
    """
    lo = s.max(-1, keepdims=True)
    hi = lo + 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        too_big = (ref / (mid - s)).sum(-1, keepdims=True) > 1
        lo, hi = np.where(too_big, mid, lo), np.where(too_big, hi, mid)
    q = ref / (hi - s)
    return q / q.sum(-1, keepdims=True)


def per_token_optimum(p_ref, R, beta, n_tokens, length, divergence="forward", c=1.0):
    """The fixed point of REINFORCE on R (times c) with a per-token KL penalty in the loss.

    From the last token back: Q(u, a) is the expected R after prefix u and token a under the policy
    already solved for the later tokens; then p(·|u) = argmax_q c·E_q[Q] - β·D(q, p_ref(·|u)), where
    D is KL(p_ref ‖ q) for ``"forward"`` (k3 in the loss) and KL(q ‖ p_ref) for ``"reverse"`` (k2,
    or k3·ρ), whose argmax is p_ref·exp(c·Q/β)/Z. No KL of later tokens enters Q: the per-token
    estimators never see it. Returns the table (P, N).
    """
    ref_conds = conditionals(p_ref, n_tokens, length)
    P = p_ref.shape[0]
    value = np.asarray(R, dtype=np.float64)                              # (P, n^L): Q after the end
    conds = [None] * length
    for t in reversed(range(length)):
        Q = value.reshape(P, n_tokens ** t, n_tokens)                    # Q(u, a)
        if divergence == "forward":
            q = _forward_kl_argmax(ref_conds[t], c * Q / beta)
        elif divergence == "reverse":
            logits = np.log(ref_conds[t]) + c * Q / beta
            q = np.exp(logits - logits.max(-1, keepdims=True))
            q /= q.sum(-1, keepdims=True)
        else:
            raise ValueError(f"divergence must be 'forward' or 'reverse', got {divergence!r}")
        conds[t] = q
        value = (q * Q).sum(-1)                                          # (P, n^t)
    return joint(conds)


def grpo_advantage_table(R, G, scale):
    """GRPO's advantage A_1 of a sample y in every possible group: (P, N, N^(G-1)) for y and the
    G-1 others (listed by ``itertools.product``), from `group_advantages`. It depends on R only."""
    P, N = R.shape
    others = np.array(list(product(range(N), repeat=G - 1))).reshape(-1, G - 1)   # (M, G-1)
    groups = np.concatenate([np.repeat(np.arange(N), len(others))[:, None],
                             np.tile(others, (N, 1))], axis=1)           # (N·M, G), y first
    A = np.stack([group_advantages(R[x][groups].reshape(-1), G, scale).reshape(N, -1, G)[..., 0]
                  for x in range(P)])
    return A, others


def grpo_expected_advantage(p, R, G, scale, table=None):
    """E[A_1 | y_1 = y] (P, N): GRPO's advantage of a sample y, averaged exactly over the G-1 other
    samples of its group drawn from p (``table``: `grpo_advantage_table`, to reuse)."""
    A, others = grpo_advantage_table(R, G, scale) if table is None else table
    weight = np.prod(p[:, others], axis=2)                               # (P, M) P(the others)
    return np.einsum("xnm,xm->xn", A, weight)


def grpo_group_fixed_point(p_ref, R, beta, G, n_tokens, length, iterations=100):
    """Where GRPO with std scaling converges, found without training: the policy p with
    p = per_token_optimum(R' = E_p[A | y]), by iterating that map from p_ref until one step moves p
    by less than 1e-15 nats (KL); RuntimeError if ``iterations`` steps do not get there (the map
    need not contract on every problem)."""
    p, table = p_ref, grpo_advantage_table(R, G, "group")
    for _ in range(iterations):
        R_scaled = grpo_expected_advantage(p, R, G, "group", table)
        q = per_token_optimum(p_ref, R_scaled, beta, n_tokens, length)
        step = kl(q, p).max()
        p = q
        if step < 1e-15:
            return p
    raise RuntimeError(f"grpo_group_fixed_point: no fixed point after {iterations} iterations "
                       f"(the last step moved p by {step:.3g} nats)")


def grpo_expected_loss(policy, problem, ref_tok, G=4, scale="none", bias_correction=False,
                       table=None):
    """GRPO's loss on-policy (μ = 1: ρ = 1, no clip) with β·k3 in the loss, in expectation over
    y ~ p_θ: Σ_y p(y)·[-E[A | y]·log p_θ(y) + β·Σ_t k3_t(y)] / L, mean over prompts, with p(y) and
    E[A | y] (`grpo_expected_advantage`) held fixed, so its gradient is GRPO's expected gradient.
    Every completion has L tokens, so grpo, bnpo, dapo and dr_grpo all divide by L here: on this
    problem Dr. GRPO is GRPO with ``scale="none"``. ``ref_tok``: `exact_token_logprobs` of the
    reference."""
    P, L = len(problem.prompts), problem.length
    tok = exact_token_logprobs(policy, problem.prompts, problem.completions)   # (P, N, L)
    p = np.exp(tok.data.sum(-1))                                         # (P, N), a constant
    A = grpo_expected_advantage(p, problem.R, G, scale, table)
    k3 = kl_k3(tok, ref_tok)
    if bias_correction:
        k3 = k3 * (tok - tok.data).exp()                                 # k3·ρ
    return (p * (-A * tok.sum(axis=2) + problem.beta * k3.sum(axis=2))).sum() / (P * L)


def train_grpo_expected(policy, ref, problem, G=4, scale="none", bias_correction=False,
                        steps=1000, lr=0.05):
    """GRPO by its exact expected gradient (`grpo_expected_loss`): AdamW, the learning rate
    decaying by a cosine to lr/100."""
    with no_grad():
        ref_tok = exact_token_logprobs(ref, problem.prompts, problem.completions).numpy()
    table = grpo_advantage_table(problem.R, G, scale)
    optimizer = AdamW(policy.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    for step in range(steps):
        loss = grpo_expected_loss(policy, problem, ref_tok, G, scale, bias_correction, table)
        optimizer.lr = lr_schedule(step, lr, 0, steps, min_lr=lr / 100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return policy


def ipo_least_squares(problem, p_ref, pairs, beta):
    """The exact minimiser of IPO on these pairs, as a policy table: log(p/p_ref) = g with g the
    least-squares solution of g(y_w) - g(y_l) = 1/(2β) over the pairs of each prompt."""
    prompt, chosen, rejected = pairs
    P, N = p_ref.shape
    g = np.zeros((P, N))
    for x in range(P):
        sel = prompt == x
        design = np.zeros((int(sel.sum()), N))
        design[np.arange(len(design)), chosen[sel]] += 1
        design[np.arange(len(design)), rejected[sel]] -= 1
        g[x] = np.linalg.lstsq(design, np.full(len(design), 1 / (2 * beta)), rcond=None)[0]
    return optimal_policy(p_ref, g, 1.0)


def preference_win_rate(p_ref, R):
    """P(y ≻ y'), y' ~ p_ref, under Bradley-Terry: Σ_y' p_ref(y')·σ(R(y) - R(y')), (P, N)."""
    s = 1 / (1 + np.exp(-(R[:, :, None] - R[:, None, :])))               # (P, N, N)
    return (s * p_ref[:, None, :]).sum(-1)


def convergence_table(G=4, n_pairs=10_000, seed=0, steps=300, grpo_steps=1000, ipo_steps=1000,
                      family_steps=1000):
    """Table 2: for each algorithm, trained to convergence on `audit_problem` (``steps`` for the
    sampled trainers and DPO, each with its own step counts for GRPO, IPO and the preference family
    of `minirlhf.audit_preference`, whose rows add ``residual``, ``closed_form`` and ``note``), a dict with
    ``name``, ``how``, ``kl_to_optimum`` (mean over prompts of KL(p_θ ‖ p*)), ``gap`` (J* - J,
    = β·KL), ``reward`` (E[R]), ``kl_to_ref``, ``optimises`` (the objective whose optimum it
    reaches) and ``kl_to_claim`` (KL(p_θ ‖ that optimum))."""
    problem, ref = audit_problem(seed=seed)
    prompts, ys, beta, n, L = problem.prompts, problem.completions, problem.beta, problem.n_tokens, problem.length
    p_ref = exact_policy(ref, prompts, ys)
    p_star = optimal_policy(p_ref, problem.R, beta)
    c = (G - 1) / G
    rows = []

    def row(name, how, p, optimises, claim):
        rows.append({"name": name, "how": how, "kl_to_optimum": float(kl(p, p_star).mean()),
                     "gap": float(beta * kl(p, p_star).mean()),
                     "reward": float((p * problem.R).sum(1).mean()),
                     "kl_to_ref": float(kl(p, p_ref).mean()), "optimises": optimises,
                     "kl_to_claim": float(kl(p, claim).mean())})

    lecture = "E[R] - β·KL(p‖p_ref)"
    for baseline in ("none", "mean", "loo"):
        policy = train_reinforce(_new_policy(problem), ref, problem, steps=steps, baseline=baseline,
                                 seed=seed)
        row(f"REINFORCE, k1 in the reward, baseline {baseline}", "sampled, 32 per prompt",
            exact_policy(policy, prompts, ys), lecture, p_star)
    policy = train_ppo(_new_policy(problem), ref, TabularValue(prompts, n, L), problem, steps=steps,
                       seed=seed)
    row("PPO (k1 per-token reward, GAE, clip)", "sampled, 32 per prompt",
        exact_policy(policy, prompts, ys), lecture, p_star)

    grpo_rows = [("GRPO, k3 in the loss, scale none (= Dr. GRPO here)", "none", False, "forward",
                  f"E[R] - β'·Σ_t KL_t(p_ref‖p), β' = β·G/(G-1)"),
                 ("GRPO, k3·ρ in the loss (TRL default), scale none", "none", True, "reverse",
                  f"E[R] - β'·Σ_t KL_t(p‖p_ref), β' = β·G/(G-1)")]
    for name, scale, corrected, divergence, optimises in grpo_rows:
        policy = train_grpo_expected(_new_policy(problem), ref, problem, G, scale, corrected,
                                     steps=grpo_steps)
        p = exact_policy(policy, prompts, ys)
        row(name, f"expected gradient, G = {G}", p, optimises,
            per_token_optimum(p_ref, problem.R, beta, n, L, divergence, c))
    policy = train_grpo_expected(_new_policy(problem), ref, problem, G, "group", steps=grpo_steps)
    row("GRPO, k3 in the loss, scale group", f"expected gradient, G = {G}",
        exact_policy(policy, prompts, ys), "E[R'] - β·Σ_t KL_t(p_ref‖p), R' = E[A|y] at that point",
        grpo_group_fixed_point(p_ref, problem.R, beta, G, n, L))

    pairs = bradley_terry_pairs(p_ref, problem.R, n_pairs, np.random.default_rng(seed))
    policy = train_dpo(_new_policy(problem), ref, problem, pairs, steps=steps)
    r_hat = train_reward_table(problem, pairs, steps=steps)              # Bradley-Terry MLE of R
    row("DPO on Bradley-Terry pairs", f"exact, {n_pairs} pairs per prompt",
        exact_policy(policy, prompts, ys), "E[r̂] - β·KL(p‖p_ref), r̂ = BT fit of the pairs",
        optimal_policy(p_ref, r_hat, beta))
    policy = train_dpo(_new_policy(problem), ref, problem, pairs, steps=ipo_steps, loss_type="ipo")
    p = exact_policy(policy, prompts, ys)
    row("IPO on Bradley-Terry pairs", f"exact, {n_pairs} pairs per prompt", p,
        "E[P(y ≻ p_ref)] - β·KL(p‖p_ref) (its pairs' least squares)",
        ipo_least_squares(problem, p_ref, pairs, beta))
    rows[-1]["kl_to_population_claim"] = float(
        kl(p, optimal_policy(p_ref, preference_win_rate(p_ref, problem.R), beta)).mean())
    rows += family_rows(problem, ref, pairs, p_ref, lambda: _new_policy(problem),
                        lambda policy: exact_policy(policy, prompts, ys), steps=family_steps)
    return rows


# ===================================================================================================
# 3. bias and variance of the REINFORCE estimators


BASELINES = ("none", "mean", "loo", "group-normalised")


def estimator_problem(beta=0.5, seed=0):
    """One prompt, 3 tokens, length 2 (9 completions): small enough to list every group of 6."""
    problem = make_problem(n_prompts=1, n_tokens=3, length=2, beta=beta, seed=seed)
    policy = TabularPolicy(problem.prompts, 3, 2, init_std=1.0, seed=seed + 1)
    ref = TabularPolicy(problem.prompts, 3, 2, init_std=1.0, seed=seed + 2)
    return problem, policy, ref


def group_estimates(shaped, scores, groups, baseline):
    """One gradient estimate per group: (1/n)·Σ_i A_i·∇log p_θ(y_i), (M, d).

    ``shaped`` (N,) R̂ of each completion, ``scores`` (N, d) ∇log p_θ(y), ``groups`` (M, n) indices.
    A_i = R̂_i - b_i with b_i = 0, the group's mean (with i), or the mean of the others (loo); or
    GRPO's (R̂_i - mean)/(std + 1e-4) by `group_advantages`.
    """
    M, n = groups.shape
    r = shaped[groups]                                                   # (M, n)
    if baseline == "none":
        A = r
    elif baseline == "mean":
        A = r - r.mean(1, keepdims=True)
    elif baseline == "loo":
        A = r - (r.sum(1, keepdims=True) - r) / (n - 1)
    else:
        A = group_advantages(r.reshape(-1), n, "group").reshape(M, n)
    return np.einsum("mi,mid->md", A, scores[groups]) / n


def estimator_moments(group_sizes=(2, 3, 4, 6), seed=0, reward_offset=2.0):
    """Rows (n, baseline, relative bias ‖E ĝ - ∇J‖/‖∇J‖, cosine(E ĝ, ∇J), variance tr Cov ĝ), exact
    over all N^n groups of ``estimator_problem``; also returns ∇J. ``reward_offset`` is added to R
    (∇J does not change): rewards whose mean is far from 0 are where a baseline pays; with R
    centred near 0 the baseline-free estimator can have the least variance."""
    problem, policy, ref = estimator_problem(seed=seed)
    params = policy.parameters()
    with no_grad():
        logp = exact_logprobs(policy, problem.prompts, problem.completions).numpy()[0]   # (N,)
        ref_logp = exact_logprobs(ref, problem.prompts, problem.completions).numpy()[0]
    p = np.exp(logp)
    shaped = problem.R[0] + reward_offset - problem.beta * (logp - ref_logp)   # R̂ (N,)

    def score(j):                                                        # ∇log p_θ(y_j)
        return flat_gradient(params, lambda: exact_logprobs(policy, problem.prompts,
                                                            problem.completions)[0, j])

    scores = np.stack([score(j) for j in range(len(p))])                 # (N, d)
    grad_J = (p * shaped) @ scores                                       # ∇J = E[R̂ ∇log p_θ]
    rows = []
    for n in group_sizes:
        groups = np.array(list(product(range(len(p)), repeat=n)))        # (N^n, n)
        weight = np.prod(p[groups], axis=1)                              # (N^n,)
        for baseline in BASELINES:
            g = group_estimates(shaped, scores, groups, baseline)        # (N^n, d)
            mean = weight @ g
            var = float(weight @ ((g - mean) ** 2).sum(1))
            cos = float(mean @ grad_J / (np.linalg.norm(mean) * np.linalg.norm(grad_J)))
            rows.append((n, baseline, relative_error(mean, grad_J), cos, var))
    return rows, grad_J
