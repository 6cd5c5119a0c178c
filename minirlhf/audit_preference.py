"""The audit's rows for the preference family beside DPO: where each loss converges, found twice.

Each loss is trained, through the library's own code (`minirlhf.preference`, `dpo_loss`), on the
same Bradley-Terry pairs from R as DPO's row of `minirlhf.audit.convergence_table` (full batch, the
exact gradient of the loss of all pairs; `TabularPolicy` can be every policy). Then, independently
of that training, the loss's own optimum over the simplex is solved from its formula in plain NumPy
(`fixed_point`): Newton's method on the per-prompt objective of the pair counts, with the gradient
by complex-step differentiation (exact to rounding) and the Hessian by differences of it. Its
residual (the largest |∂L/∂g|, g the policy's free logits) says how exact that optimum is.

Where the loss has no finite optimum, the row says what happens instead, with a number:

* APO-zero and KTO push down every completion that is rejected more often than chosen: its
  probability falls towards 0 without end, more and more slowly (σ saturates). On the completions
  that win more often than they lose, the limit is finite and solved on that support; KTO's
  reference point z0 goes to 0 there (the mismatched completions' log-ratio falls to -∞, and z0 is
  clamped at 0), so KTO's limit is APO-zero's. The row reports the probability left on the losers.
* rDPO (``robust``) is unbounded below once a completion is chosen in fewer than ε of its pairs
  (`robust_unbounded`): pushing its probability to 0 lowers the loss for ever; the row reports it
  and the largest implicit-reward margin after training.

A closed form is compared where a paper gives one: EXO's "reverse KL to p*" (Ji et al., 2024), which
holds for the target σ(R_w - R_l), not for the ε-smoothed hard labels TRL's exo_pair uses; SPPO's
p ∝ p_ref·exp((P(y ≻ p_ref) - ½)/β); SimPO at γ = 0, p ∝ exp(L·R/β) (no reference; L the length).
"""

import numpy as np

from .closed_form import kl, optimal_policy, train_on_table
from .losses import dpo_loss
from .preference import kto_loss, kto_mismatched_pairs, orpo_loss, simpo_loss

# ===================================================================================================
# the losses as functions of the log-probs, in plain NumPy (complex-capable: complex-step gradients)


def _softplus(u):
    """log(1 + e^u), stable for large |Re u|, analytic on each branch (complex steps pass through)."""
    big = u.real > 0
    return np.where(big, u + np.log1p(np.exp(-np.where(big, u, -u))), np.log1p(np.exp(np.where(big, -u, u))))


def _logsigmoid(z):
    return -_softplus(-z)


def _sigmoid(z):
    return np.exp(_logsigmoid(z))


def pair_objective(name, beta, eps=0.0, gamma=0.5, length=3, tau=None):
    """φ(ℓ_w, ℓ_l, r_w, r_l): the per-pair loss of ``name`` from its formula, on the policy's log-probs
    ℓ and log-ratios r = ℓ - log p_ref (arrays, complex allowed). ``tau``: hinge smoothed to
    τ·softplus((1 - z)/τ) (for Newton; τ → 0 is the hinge)."""
    def phi(lw, ll, rw, rl):
        z = beta * (rw - rl)
        if name == "hinge":
            return tau * _softplus((1 - z) / tau)
        if name == "robust":
            return (-(1 - eps) * _logsigmoid(z) + eps * _logsigmoid(-z)) / (1 - 2 * eps)
        if name == "exo_pair":
            q_w, q_l = _sigmoid(z), _sigmoid(-z)
            return q_w * (_logsigmoid(z) - np.log1p(-eps)) + q_l * (_logsigmoid(-z) - np.log(eps))
        if name == "nca_pair":
            return -_logsigmoid(beta * rw) - 0.5 * _logsigmoid(-beta * rw) - 0.5 * _logsigmoid(-beta * rl)
        if name == "bco_pair":
            return -_logsigmoid(beta * rw) - _logsigmoid(-beta * rl)
        if name == "sppo_hard":
            return (rw - 0.5 / beta) ** 2 + (rl + 0.5 / beta) ** 2
        if name == "apo_zero":
            return (1 - _sigmoid(beta * rw)) + _sigmoid(beta * rl)
        if name == "simpo":
            return -_logsigmoid(beta * (lw - ll) / length - gamma)
        if name == "orpo":                     # the odds-ratio term; the NLL is added per prompt
            a_w, a_l = lw / length, ll / length
            log_odds = (a_w - a_l) - (np.log(1 - np.exp(a_w)) - np.log(1 - np.exp(a_l)))
            return -beta * _logsigmoid(log_odds)
        raise ValueError(f"pair_objective: no formula for {name!r}")
    return phi


class PromptObjective:
    """One prompt's loss as a function of its log-probs ℓ (N,):

        L(ℓ) = [Σ_ab C_ab·φ(ℓ_a, ℓ_b, r_a, r_b) + Σ_y e_y(ℓ_y, r_y)] / Σ C,     r = ℓ - log p_ref

    C_ab the pairs with chosen a and rejected b; φ a pair's loss and e a per-completion term (ORPO's
    NLL, APO-zero regrouped), both from the formulas. `derivatives` gives ∇L and ∇²L: first
    partials of φ and e by complex steps (exact to rounding), second ones by central differences
    of those."""

    def __init__(self, counts, log_ref, phi=None, elem=None, total=None):
        self.C, self.log_ref, self.phi, self.elem = counts, log_ref, phi, elem
        self.total = counts.sum() if total is None else total

    def _pair(self, u, v):                                              # φ on the grid (a, b)
        return self.phi(u[:, None], v[None, :], (u - self.log_ref)[:, None], (v - self.log_ref)[None, :])

    def value(self, ell):
        out = 0.0
        if self.phi is not None:
            out += float((np.where(self.C > 0, self._pair(ell, ell).real, 0.0) * self.C).sum())
        if self.elem is not None:
            out += float(self.elem(ell, ell - self.log_ref).real.sum())
        return out / self.total

    def derivatives(self, ell, h=1e-20, d=1e-6):
        """(∇L (N,), ∇²L (N, N)) at ℓ."""
        N = len(ell)
        grad, hess = np.zeros(N), np.zeros((N, N))
        if self.phi is not None:
            C = self.C

            def partials(u, v):                                          # ∂φ/∂ℓ_w, ∂φ/∂ℓ_l on the grid
                return (np.where(C > 0, self._pair(u + 1j * h, v).imag / h, 0.0),
                        np.where(C > 0, self._pair(u, v + 1j * h).imag / h, 0.0))
            pu, pv = partials(ell, ell)
            pu_up, pv_up = partials(ell + d, ell)
            pu_dn, pv_dn = partials(ell - d, ell)
            puv = (partials(ell, ell + d)[0] - partials(ell, ell - d)[0]) / (2 * d)
            pvv = (partials(ell, ell + d)[1] - partials(ell, ell - d)[1]) / (2 * d)
            puu = (pu_up - pu_dn) / (2 * d)
            grad += (C * pu).sum(1) + (C * pv).sum(0)
            hess += C * puv + (C * puv).T
            hess[np.diag_indices(N)] += (C * puu).sum(1) + (C * pvv).sum(0)
        if self.elem is not None:
            def de(x):
                return self.elem(x + 1j * h, x + 1j * h - self.log_ref).imag / h
            grad += de(ell)
            hess[np.diag_indices(N)] += (de(ell + d) - de(ell - d)) / (2 * d)
        return grad / self.total, hess / self.total


def pair_objective_terms(name, beta, eps=0.0, gamma=0.5, length=3, tau=None, chosen_n=None,
                         rejected_n=None):
    """(φ, e) of `PromptObjective` for ``name``: its pair loss, and the per-completion terms of
    ORPO (the NLL of the chosen, -D_y·ℓ_y/L) and of APO-zero regrouped by completion
    (D_y·(1 - σ(β·r_y)) + U_y·σ(β·r_y), D and U the times chosen and rejected: the same sum as its
    pair loss, and a support can leave some completions out)."""
    if name == "apo_zero":
        return None, lambda ell, r: chosen_n * (1 - _sigmoid(beta * r)) + rejected_n * _sigmoid(beta * r)
    phi = pair_objective(name, beta, eps, gamma, length, tau)
    if name == "orpo":
        return phi, lambda ell, r: -chosen_n * ell / length
    return phi, None


# ===================================================================================================
# the independent solve: Newton on the free logits of one prompt, over a support


def _log_softmax(g):
    m = g.max()
    return g - (m + np.log(np.exp(g - m).sum()))


def newton(objective, g, iterations=100, tol=1e-14):
    """Minimise ``objective`` (a `PromptObjective`) over ℓ = log_softmax(g) from the free logits g:
    Newton steps on |eigenvalues| of the Hessian (L is flat along g + c; a negative curvature is
    stepped down, not up), halved until L falls. Returns (g, residual max|∂L/∂g|)."""
    def at(g):
        ell = _log_softmax(g)
        p = np.exp(ell)
        gl, Hl = objective.derivatives(ell)
        J = np.eye(len(g)) - p[None, :]                                 # ∂ℓ/∂g = I - 1·pᵀ
        grad = J.T @ gl
        H = J.T @ Hl @ J - gl.sum() * (np.diag(p) - np.outer(p, p))
        return grad, (H + H.T) / 2

    value = objective.value(_log_softmax(g))
    for _ in range(iterations):
        grad, H = at(g)
        if np.abs(grad).max() < tol:
            break
        w, V = np.linalg.eigh(H)
        w = np.abs(w)
        w = np.where(w > 1e-12 * max(w.max(), 1e-300), w, np.inf)
        step = -V @ ((V.T @ grad) / w)
        t = 1.0
        while t > 1e-10:
            candidate = g + t * step
            new = objective.value(_log_softmax(candidate))
            if new <= value:
                break
            t /= 2
        if t <= 1e-10:
            break
        g, value = candidate, new
    return g, float(np.abs(at(g)[0]).max())


def fixed_point(make_objective, p_ref, support=None, start=None):
    """The loss's optimum over the simplex, prompt by prompt: a table (P, N) (0 off ``support``,
    a bool (P, N)) and the largest residual |∂L/∂g| over the prompts. ``make_objective(x, s)``: the
    `PromptObjective` of prompt x on the completions s (a bool (N,))."""
    P, N = p_ref.shape
    support = np.ones((P, N), dtype=bool) if support is None else support
    out, residual = np.zeros((P, N)), 0.0
    for x in range(P):
        s = support[x]
        g0 = np.log(p_ref[x, s]) if start is None else np.log(start[x, s])
        g, res = newton(make_objective(x, s), g0 - g0.mean())
        out[x, s] = np.exp(_log_softmax(g))
        residual = max(residual, res)
    return out, residual


def pair_counts(pairs, P, N):
    """C (P, N, N): how many pairs of each prompt have chosen a and rejected b."""
    prompt, chosen, rejected = pairs
    C = np.zeros((P, N, N))
    np.add.at(C, (prompt, chosen, rejected), 1.0)
    return C


# ===================================================================================================
# training through the library's losses


def library_loss(name, beta, pairs, eps=0.0, gamma=0.5, length=3):
    """``loss(table, ref_table)`` -> (loss, metrics) of ``name`` on ``pairs`` through the library: `dpo_loss` for DPO's
    loss types, `simpo_loss`, `orpo_loss` (NLL: the mean over the chosen tokens), and `kto_loss` on
    the pairs unpaired (every chosen desirable, then every rejected undesirable), z0 from TRL's
    mismatched pairs over that whole list (`kto_mismatched_pairs`)."""
    prompt, chosen, rejected = pairs
    n = np.full(len(prompt), float(length))

    def loss(table, ref):
        pc, pr = table[prompt, chosen], table[prompt, rejected]
        if name == "simpo":
            return simpo_loss(pc, pr, n, n, beta=beta, gamma=gamma)
        if name == "orpo":
            return orpo_loss(pc / n, pr / n, -pc.sum() / float(n.sum()), beta=beta)
        if name == "kto":
            ys = np.concatenate([chosen, rejected])
            xs = np.concatenate([prompt, prompt])
            good = np.arange(len(ys)) < len(chosen)
            other = ys[kto_mismatched_pairs(len(ys))]
            kl_pairs = table.data[xs, other] - ref[xs, other]
            return kto_loss(table[xs, ys], ref[xs, ys], good, kl_pairs, beta=beta)
        return dpo_loss(pc, pr, ref[prompt, chosen], ref[prompt, rejected], beta=beta,
                        label_smoothing=eps, loss_type=name)
    return loss


HINGE_TAUS = (1e-1, 1e-2, 1e-3, 1e-4)

# name, loss, label smoothing, β (None: the problem's), what the table says it optimises
FAMILY_ROWS = (
    ("DPO hinge (SLiC)", "hinge", 0.0, None, "its pairs' hinge loss (an LP), smoothed, τ = 1e-4"),
    ("DPO robust (rDPO), ε = 0.1", "robust", 0.1, None, "unbounded below: no finite optimum"),
    ("DPO exo_pair (EXO), ε = 1e-3", "exo_pair", 1e-3, None, "Σ pairs KL(σ(β·h) ‖ (1-ε, ε)): its own fixed point"),
    ("DPO nca_pair (NCA)", "nca_pair", 0.0, None, "its own fixed point (absolute rewards)"),
    ("DPO bco_pair (BCO, no δ)", "bco_pair", 0.0, None, "its own fixed point (absolute rewards)"),
    ("DPO sppo_hard (SPPO)", "sppo_hard", 0.0, None, "its own fixed point (rewards pinned at ±1/(2β))"),
    ("DPO apo_zero (APO-zero)", "apo_zero", 0.0, None, "losers → 0; the limit on the winners"),
    ("KTO (the pairs unpaired)", "kto", 0.0, None, "= APO-zero's limit (z0 → 0)"),
    ("SimPO, β = 2, γ = 0.5 (no reference)", "simpo", 0.0, 2.0, "its own fixed point (no reference)"),
    ("ORPO, β = 0.1 (no reference)", "orpo", 0.0, 0.1, "NLL(y_w) + odds ratio: its own fixed point"),
)


def robust_unbounded(chosen_n, rejected_n, eps):
    """The completions along which rDPO's loss falls without end: (P, N) bool.

    Lowering log p_y by t moves the margin of each pair y is in by β·t, and for a large margin
    ℓ(z) = (-(1-ε) log σ(z) + ε log σ(-z))/(1-2ε) is linear on each side: ℓ ≈ -ε·z/(1-2ε) as
    z → +∞, (1-ε)·|z|/(1-2ε) as z → -∞. So the loss changes at the rate ∝ (1-ε)·U_y - ε·D_y, U_y
    the pairs y wins and D_y those it loses: below 0 for ever when y is chosen in fewer than ε of
    its pairs. (Raising a completion instead is bounded: a probability is at most 1.)"""
    return ((1 - eps) * chosen_n < eps * rejected_n) & (rejected_n > 0)


def win_counts(counts):
    """(times chosen, times rejected) of each completion, (P, N) each."""
    return counts.sum(2), counts.sum(1)


def family_rows(problem, ref, pairs, p_ref, new_policy, exact_policy, steps=1000, lr=0.05):
    """The audit's rows for `FAMILY_ROWS`: dicts as `minirlhf.audit.convergence_table`'s, plus
    ``residual`` (of the independent solve), ``closed_form`` (name, KL(solve ‖ it)) where a paper
    gives one, and ``note`` (a number where there is no finite optimum)."""
    P, N = p_ref.shape
    L = problem.length
    counts = pair_counts(pairs, P, N)
    chosen_n, rejected_n = win_counts(counts)
    p_star = optimal_policy(p_ref, problem.R, problem.beta)
    rows = []
    for label, name, eps, beta, optimises in FAMILY_ROWS:
        beta = problem.beta if beta is None else beta
        z0 = []                                                          # KTO's reference point
        policy = train_on_table(new_policy(), ref, problem, library_loss(name, beta, pairs, eps, length=L),
                                steps=steps, lr=lr, log=lambda step, m: z0.append(m.get("kl", 0.0)))
        p = exact_policy(policy)
        row = {"name": label, "how": f"exact, {len(pairs[0]) // P} pairs per prompt",
               "kl_to_optimum": float(kl(p, p_star).mean()), "gap": float(problem.beta * kl(p, p_star).mean()),
               "reward": float((p * problem.R).sum(1).mean()), "kl_to_ref": float(kl(p, p_ref).mean()),
               "optimises": optimises, "residual": None, "closed_form": None, "note": None}
        loss = "apo_zero" if name == "kto" else name
        support = (chosen_n > rejected_n) if loss == "apo_zero" else None
        if name == "robust":
            rewards = beta * (np.log(p) - np.log(p_ref))
            row["kl_to_claim"] = float("nan")
            sink = robust_unbounded(chosen_n, rejected_n, eps)            # (P, N) bool
            win = chosen_n / np.maximum(chosen_n + rejected_n, 1)
            row["note"] = (f"{int(sink.sum())} completion(s) chosen in fewer than ε of their pairs (the "
                           f"fewest: {float(win[rejected_n > 0].min()):.3f}): pushing such a one's "
                           f"probability to 0 lowers the loss without end; after {steps} steps it holds "
                           f"{float(p[sink].min()) if sink.any() else float('nan'):.1e}, and the largest "
                           f"implicit-reward margin is {float((rewards.max(1) - rewards.min(1)).max()):.1f}")
            rows.append(row)
            continue
        def objective(tau=None):
            def make(x, s):
                phi, elem = pair_objective_terms(loss, beta, eps, length=L, tau=tau,
                                                 chosen_n=chosen_n[x, s], rejected_n=rejected_n[x, s])
                return PromptObjective(counts[x][np.ix_(s, s)], np.log(p_ref[x, s]), phi, elem,
                                       total=counts[x].sum())
            return make

        if name == "hinge":
            q = None
            for tau in HINGE_TAUS:                                       # the smoothed hinge, warm-started
                q, res = fixed_point(objective(tau), p_ref, start=q)
        else:
            q, res = fixed_point(objective(), p_ref, support)
        row["residual"] = res
        if support is not None:
            row["kl_to_claim"] = float(kl(p * support / (p * support).sum(1, keepdims=True), q).mean())
            row["note"] = (f"probability left on the completions rejected more often than chosen "
                           f"after {steps} steps: {float((p * ~support).sum(1).mean()):.2g}"
                           + (f"; z0 at most {max(z0):.2g} in training" if name == "kto" else ""))
        else:
            row["kl_to_claim"] = float(kl(p, q).mean())
        if name == "simpo":
            row["note"] = simpo_without_noise(problem, ref, pairs, new_policy, exact_policy, beta,
                                              L, steps, lr)
        claim = _closed_form(name, problem, p_ref, chosen_n, rejected_n, beta, L)
        if claim is not None:
            row["closed_form"] = (claim[0], float(kl(q, claim[1]).mean()))
        rows.append(row)
    return rows


def simpo_without_noise(problem, ref, pairs, new_policy, exact_policy, beta, length, steps, lr):
    """SimPO on the same pairs labelled by R without noise (the larger R chosen): every margin then
    wants to grow for ever, and the entropy of p_θ keeps falling; the note gives it at steps/2 and
    at the end of one run."""
    prompt, chosen, rejected = pairs
    better = problem.R[prompt, chosen] >= problem.R[prompt, rejected]
    clean = (prompt, np.where(better, chosen, rejected), np.where(better, rejected, chosen))
    policy, entropy = new_policy(), []

    def measure(step=None, metrics=None):                               # half-way, and at the end
        if step is None or step + 1 == steps // 2:
            p = exact_policy(policy)
            entropy.append(float(-(p * np.log(np.maximum(p, 1e-300))).sum(1).mean()))
    train_on_table(policy, ref, problem, library_loss("simpo", beta, clean, length=length), steps=steps,
                   lr=lr, log=measure)
    measure()
    return (f"on the same pairs labelled by R without noise, the entropy of p_θ keeps falling: "
            f"{entropy[0]:.3g} nats after {steps // 2} steps, {entropy[1]:.3g} after {steps}")


def _closed_form(name, problem, p_ref, chosen_n, rejected_n, beta, length):
    """(what the paper says it reaches, that table) for exo_pair, sppo_hard and simpo, else None."""
    if name == "exo_pair":
        return "p* (the reverse KL to p*)", optimal_policy(p_ref, problem.R, problem.beta)
    if name == "sppo_hard":
        win = chosen_n / np.maximum(chosen_n + rejected_n, 1)
        return "p_ref·exp((P(y ≻ p_ref) - ½)/β)", optimal_policy(p_ref, win - 0.5, beta)
    if name == "simpo":
        return "exp(L·R/β) (its γ = 0 optimum)", optimal_policy(np.ones_like(p_ref), problem.R, beta / length)
    return None
