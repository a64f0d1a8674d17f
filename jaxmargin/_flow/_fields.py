"""Vector fields of the gradient flow in two clocks (docs/background.md §2).

Phase 1, the seed's clock tau: dw/dtau = -grad ln L(w) = sum_i p_i grad m_i(w), p = softmax(-m),
and dt/dtau = 1/L for the exponential-loss time t.

Phase 2, the polar clock s = ln ||w||, valid once the soft margin is positive. With w = rho theta,
beta = rho^L, q_i = m_i(theta) and g = sum_i p_i grad q_i(theta), p = softmax(-beta q):

    dtheta/ds = (I - theta theta^T) g / (L p.q)
    dtau/ds   = rho^(2-L) / (L p.q)
    d ln(t L)/ds = (dtau/ds) / (t L) - beta ||g||^2 / (L p.q)

The last line keeps the exponential-loss time in the log domain as ln(t L) = ln t + ln L, which
stays O(ln ln t) (Lyu & Li: t L ~ 1/(ln t)^(2-2/L)) while ln t itself reaches 1e12 and more.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .._margins import log_exp_loss_from_scaled, soft_margin_from_scaled


def make_margin_fn(predictor, unravel, X, y):
    """Flat params -> margins (n,)."""

    def margins(flat):
        return y * jax.vmap(predictor.apply, in_axes=(None, 0))(unravel(flat), X)

    return margins


def softmax_of_scaled(log_beta, q):
    """softmax(-beta q) without forming beta q (shift by q_min, then scale the gaps)."""
    gap = q - jnp.min(q)
    beta_gap = jnp.where(gap > 0, jnp.exp(log_beta + jnp.log(jnp.where(gap > 0, gap, 1.0))), 0.0)
    return jax.nn.softmax(-beta_gap)


# --------------------------------------------------------------------------- phase 1 (tau)


class SeedState(NamedTuple):
    w: jax.Array  # flat params
    t: jax.Array  # exponential-loss time (t <= tau while the soft margin is <= 0)


def seed_velocity(velocity_fn, w):
    """(dw/dtau, ln L(w)): the seed's field in the tau clock."""
    v = velocity_fn(w, lambda m: jax.nn.softmax(-m))
    return v.g, jax.nn.logsumexp(-v.margins)


def seed_field(velocity_fn):
    def field(tau, state: SeedState, args):
        del tau, args
        velocity, log_loss = seed_velocity(velocity_fn, state.w)
        # dt/dtau = 1/L <= 1 before t0; the cap only keeps a dummy phase 1 of a run that
        # starts deep in the separated regime (1/L beyond float64) finite.
        return SeedState(velocity, jnp.exp(jnp.minimum(-log_loss, 700.0)))

    return field


# --------------------------------------------------------------------------- phase 2 (s)


class PolarState(NamedTuple):
    theta: jax.Array  # flat direction, ||theta|| = 1 up to drift (renormalised in the field)
    tau: jax.Array
    log_t_loss: jax.Array  # ln(t * L(w))


class PolarQuantities(NamedTuple):
    theta: jax.Array  # normalised direction
    q: jax.Array  # margins of theta
    p: jax.Array  # softmax(-beta q)
    g: jax.Array  # sum_i p_i grad q_i(theta)
    pq: jax.Array  # p . q  (> 0 after t0, by Lemma 4)
    dtheta_ds: jax.Array
    log_dtau_ds: jax.Array


def polar_quantities(velocity_fn, degree, s, theta) -> PolarQuantities:
    theta = theta / jnp.linalg.norm(theta)
    v = velocity_fn(theta, lambda q: softmax_of_scaled(degree * s, q))
    q, p, g = v.margins, v.p, v.g
    # p.q > 0 after t0 (Lemma 4); the guard only keeps padding runs that never separated finite.
    pq = p @ q
    pq = jnp.where(pq > 0, pq, 1.0)
    tangent = g - (theta @ g) * theta
    log_dtau_ds = -(degree - 2) * s - jnp.log(degree * pq)
    return PolarQuantities(theta, q, p, g, pq, tangent / (degree * pq), log_dtau_ds)


def polar_field(velocity_fn, degree):
    def field(s, state: PolarState, args):
        del args
        pol = polar_quantities(velocity_fn, degree, s, state.theta)
        # d(-ln L)/ds = beta ||g||^2 / (L p.q): the loss falls like exp(-beta gamma~).
        log_loss_rate = (
            degree * s + 2.0 * jnp.log(jnp.linalg.norm(pol.g)) - jnp.log(degree * pol.pq)
        )
        d_log_t_loss = jnp.exp(pol.log_dtau_ds - state.log_t_loss) - jnp.exp(log_loss_rate)
        return PolarState(pol.dtheta_ds, jnp.exp(pol.log_dtau_ds), d_log_t_loss)

    return field


def margins_summary(degree, log_rho, q):
    """(ln L, soft margin, hard margin) from ln ||w|| and unit-norm margins q."""
    log_beta = degree * log_rho
    return (
        log_exp_loss_from_scaled(log_beta, q),
        soft_margin_from_scaled(log_beta, q),
        jnp.min(q),
    )
