"""Checks usable on any FlowSolution: Theorem 5, the Lyu & Li identity, the sandwich bound.

Each check recomputes what it needs from the saved params (margins in the log domain), so it
tests the integrated clocks against quantities the integrator did not report itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ._flow._fields import softmax_of_scaled
from ._margins import log_exp_loss_from_scaled, polar
from ._validation import check_all


def _rows(solution, phase=None):
    keep = np.array(solution.valid, dtype=bool)
    if phase is not None:
        keep &= np.asarray(solution.phase) == phase
    return keep


def theorem5_max_decrease(solution) -> float:
    """Largest relative decrease of the soft margin between consecutive saved points after t0.

    Theorem 5 says the soft margin never decreases once positive, so this should be <= 0 up to
    integration error. Returns max_k (g_k - g_{k+1}) / max(|g_k|, |g_{k+1}|) over phase-2 points
    (-inf when fewer than two).
    """
    soft = np.asarray(solution.soft_margin)[_rows(solution, phase=2)]
    if soft.size < 2:
        return -np.inf
    scale = np.maximum(np.maximum(np.abs(soft[:-1]), np.abs(soft[1:])), 1e-300)
    return float(np.max((soft[:-1] - soft[1:]) / scale))


def sandwich_violation(solution, n: int, degree: int) -> float:
    """Largest relative violation of gamma - ln(n)/rho^L <= gamma~ <= gamma (0 when it holds)."""
    keep = _rows(solution)
    hard = np.asarray(solution.hard_margin)[keep]
    soft = np.asarray(solution.soft_margin)[keep]
    gap = np.exp(np.log(np.log(n)) - degree * np.asarray(solution.s)[keep])
    scale = np.abs(hard) + gap + 1e-300
    below = np.maximum(hard - gap - soft, 0.0)
    above = np.maximum(soft - hard, 0.0)
    return float(np.max((below + above) / scale)) if keep.any() else 0.0


def _five_point_derivative(values, step):
    return (values[:-4] - 8 * values[1:-3] + 8 * values[3:-1] - values[4:]) / (12 * step)


def lyu_li_identity_residual(solution, predictor, X, y) -> float:
    """Lyu & Li (2020): (1/2) d||w||^2/dt = L sum_n exp(-m_n) m_n, along the saved phase 2.

    On the uniform s grid of phase 2, with rho = e^s, the identity reads
        d ln t / ds = rho^2 / (t L sum_n e^{-m_n} m_n) = exp(2 s - ln t - ln L - ln L(w) - ln p.m),
    p = softmax(-m). The left side is a five-point finite difference of the saved ln t (error
    O((L ds)^4): save densely), the right side is recomputed from the saved params. Returns the
    largest relative residual over interior points (nan when fewer than five points).
    """
    predictor, _, X, y = check_all(predictor, jax.tree.map(lambda a: a[0], solution.params), X, y)
    keep = _rows(solution, phase=2)
    s = np.asarray(solution.s)[keep]
    if s.size < 5:
        return float("nan")
    step = float(np.mean(np.diff(s)))
    if not np.allclose(np.diff(s), step, rtol=1e-6, atol=1e-12):
        raise ValueError("lyu_li_identity_residual needs phase-2 points on a uniform s grid")
    params = jax.tree.map(lambda a: jnp.asarray(a)[keep], solution.params)

    def log_right_side(w, log_t):
        log_beta, theta = polar(predictor, w)
        q = y * jax.vmap(predictor.apply, in_axes=(None, 0))(theta, X)
        p = softmax_of_scaled(log_beta, q)
        log_pm = log_beta + jnp.log(p @ q)
        log_loss = log_exp_loss_from_scaled(log_beta, q)
        return (
            2.0 * log_beta / predictor.degree
            - log_t
            - jnp.log(predictor.degree)
            - (log_loss + log_pm)
        )

    log_t = np.asarray(solution.log_t)[keep]
    right = np.exp(np.asarray(jax.vmap(log_right_side)(params, jnp.asarray(log_t))))[2:-2]
    left = _five_point_derivative(log_t, step)
    return float(np.max(np.abs(left / right - 1.0)))
