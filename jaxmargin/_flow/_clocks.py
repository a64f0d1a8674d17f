"""The clocks of a run beside the direction: tau and ln(t L), by quadrature along each step.

In the polar clock s = ln ||w|| (docs/background.md §2), with beta = e^(L s) and
p = softmax(-beta q):

    dtau/ds = rho^(2-L) / (L p.q),  dt/ds = (dtau/ds) / L,  d(-ln L)/ds = beta ||g||^2 / (L p.q).

Neither clock feeds back into the direction theta, so the integrators control theta's error only
and integrate the clocks along each accepted step. ln(t L), not ln t, is carried: ln t ~ beta
gamma~ would lose its digits to rounding, while t L ~ 1/(ln t)^(2-2/L) (Lyu & Li 2020) stays O(1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .._margins import log_exp_loss_from_scaled
from ._fields import softmax_of_scaled


def log_dtau_ds(degree, s, pq):
    """ln dtau/ds = -(L - 2) s - ln(L p.q); p.q > 0 after t0 (Lemma 4), the guard only keeps
    padding runs that never separated finite."""
    return -(degree - 2) * s - jnp.log(degree * jnp.where(pq > 0, pq, 1.0))


def clock_exponents(degree, margins, s, theta):
    """(ln dtau/ds, -ln L) at (s, theta), from the margins alone."""
    m = margins(theta / jnp.linalg.norm(theta))
    pq = softmax_of_scaled(degree * s, m) @ m
    return log_dtau_ds(degree, s, pq), -log_exp_loss_from_scaled(degree * s, m)


# Gauss-Legendre on [0, 1], sixteen nodes per piece of log_exp_integral.
_NODES, _WEIGHTS = (
    0.5 * (v + 1.0) if i == 0 else 0.5 * v
    for i, v in enumerate(np.polynomial.legendre.leggauss(16))
)
_PIECES = 16
_LAYER = 32.0  # boundary-layer widths resolved by the pieces (exp(-32) ~ 1e-14 beyond)


def log_exp_integral(h, phi_a, phi_b, dphi_a, dphi_b):
    """ln of the integral over a step [0, h] of exp(phi), phi the cubic Hermite interpolant of
    (phi, phi') at both ends.

    phi is ln dt/ds, whose slope d(-ln L)/ds ~ beta makes exp(phi) a boundary layer of width
    ~1/phi' at the step's end when beta is large. With x measured back from the end, the
    first min(h, 32 / phi'_b) of the step is cut into 16 equal pieces, the rest (weight below
    e^-32) is one more; on each piece the substitution x = x_j - ln(1 - xi c) / kappa, kappa
    the local decay rate and c = 1 - exp(-kappa width), integrates the exponential part
    exactly and leaves Gauss-Legendre a smooth remainder (against mpmath: tests/test_clocks.py).
    """

    def psi(x):  # phi(h - x) - phi_b, the cubic in x with psi(0) = 0
        t = x / h
        return (
            (t**3 - 2.0 * t**2 + t) * h * -dphi_b
            + (3.0 * t**2 - 2.0 * t**3) * (phi_a - phi_b)
            + (t**3 - t**2) * h * -dphi_a
        )

    def dpsi(x):
        t = x / h
        return (
            (3.0 * t**2 - 4.0 * t + 1.0) * -dphi_b
            + (6.0 * t - 6.0 * t**2) * (phi_a - phi_b) / h
            + (3.0 * t**2 - 2.0 * t) * -dphi_a
        )

    layer = jnp.where(dphi_b * h > _LAYER, _LAYER / jnp.where(dphi_b > 0, dphi_b, 1.0), h)
    cuts = jnp.append(layer * jnp.arange(_PIECES + 1) / _PIECES, h)
    left, width = cuts[:-1, None], jnp.diff(cuts)[:, None]
    kappa = -dpsi(left)
    kw = jnp.clip(kappa * width, -700.0, 700.0)
    small = jnp.abs(kw) < 1e-8
    c = jnp.where(small, 1.0, -jnp.expm1(-kw))
    safe_kappa = jnp.where(small, 1.0, kappa)
    xi = jnp.asarray(_NODES)[None, :]
    u = jnp.where(small, xi * width, -jnp.log1p(-xi * c) / safe_kappa)
    # The last piece is empty when the layer fills the step: weight 0 (log -inf), not NaN.
    log_width = jnp.log(jnp.where(width > 0, width, 1.0))
    log_jacobian = jnp.where(small, log_width, jnp.log(c / safe_kappa) - jnp.log1p(-xi * c))
    log_jacobian = jnp.where(width > 0, log_jacobian, -jnp.inf)
    terms = jnp.log(jnp.asarray(_WEIGHTS))[None, :] + psi(left + u) + log_jacobian
    return phi_b + jax.nn.logsumexp(terms)


def advance_log_t_loss(h, log_t_loss_a, exponents_a, exponents_b, log_loss_rate_a, log_loss_rate_b):
    """ln(t L) at the end of a polar step from its start: t grows by the integral of
    dt/ds = exp(phi), phi = ln dtau/ds - ln L, by quadrature (log_exp_integral).

    ln(t L), not ln t, is carried: ln t ~ beta gamma~ would lose its digits to rounding. The
    slope of ln dtau/ds is taken from its secant (it is O(1) and smooth; the O(beta) slope of
    -ln L is exact from the field). Exact for any h: no stiffness, nothing to control.
    """
    (l_a, lam_a), (l_b, lam_b) = exponents_a, exponents_b
    secant = (l_b - l_a) / h
    increment = log_exp_integral(
        h,
        l_a + lam_a - lam_b,
        l_b,
        jnp.exp(log_loss_rate_a) + secant,
        jnp.exp(log_loss_rate_b) + secant,
    )
    return jnp.logaddexp(log_t_loss_a + lam_a - lam_b, increment)


def exp_trapezoid(h, a, b):
    """integral over a step of length h of exp(linear from a to b): exact for linear exponents."""
    d = b - a
    small = jnp.abs(d) < 1e-8
    ratio = jnp.where(small, 1.0 + 0.5 * d, jnp.expm1(d) / jnp.where(small, 1.0, d))
    return h * jnp.exp(a) * ratio


def tau_increment(degree, s, h, q_min_a, dtheta_a, q_min_b, dtheta_b):
    """tau's increment over a limit-flow step [s, s + h]: the integral of dtau/ds = exp(phi)
    with phi the cubic Hermite interpolant of its end values and slopes (log_exp_integral).
    phi' = -(L - 2) - L ||dtheta/ds||^2: q_min rises at the rate L q_min ||dtheta/ds||^2. Not
    the exponential trapezoid: its error grew with the steps (docs/decisions.md D37)."""

    def slope(dtheta):
        return -(degree - 2) - degree * (dtheta @ dtheta)

    log_increment = log_exp_integral(
        jnp.where(h > 0, h, 1.0),
        log_dtau_ds(degree, s, q_min_a),
        log_dtau_ds(degree, s + h, q_min_b),
        slope(dtheta_a),
        slope(dtheta_b),
    )
    return jnp.where(h > 0, jnp.exp(log_increment), 0.0)


def separated_start_log_t_loss(degree, margins_and_grads, s, theta):
    """ln(t L) for a run that starts separated at s: t := (dt/ds) / (d ln(dt/ds)/ds), i.e. t as
    if dt/ds had grown at its current exponential rate since s = -inf (the time origin is a
    convention; this one makes ln t smooth from the first point). It is floored at dt/ds x 1
    when that rate is below 1."""
    m, G = margins_and_grads(theta / jnp.linalg.norm(theta), None)
    p = softmax_of_scaled(degree * s, m)
    pq = p @ m
    g = G.T @ p
    rate = jnp.exp(degree * s) * (g @ g) / (degree * jnp.where(pq > 0, pq, 1.0)) - (degree - 2)
    return log_dtau_ds(degree, s, pq) - jnp.log(jnp.maximum(rate, 1.0))


def limit_log_t_loss(degree, s, q_min, dtheta):
    """ln(t L) on the limit flow, where the ln(t L) equation is at rest to O(1/beta): with
    R = d(-ln L)/ds = beta ||g||^2 / (L q_min) growing like beta, ln(t L) = ln dtau/ds -
    ln(R + 2 - 2L) (the asymptotic expansion of t = integral of dt/ds; R's growth gives the
    2 - 2L). ||g||^2 = ||P g||^2 + (L q_min)^2 by Euler's identity, and P g = L q_min dtheta/ds."""
    Lq = degree * q_min
    g2 = Lq**2 * (dtheta @ dtheta + 1.0)
    log_rate = degree * s + jnp.log(g2) - jnp.log(Lq)
    # R >= 1e8 wherever the limit flow runs (beta >= 1e8), so the correction is a log1p.
    correction = jnp.log1p((2.0 - 2.0 * degree) * jnp.exp(-log_rate))
    return log_dtau_ds(degree, s, q_min) - log_rate - correction
