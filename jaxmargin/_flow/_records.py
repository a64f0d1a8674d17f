"""Saved rows in the FlowSolution layout, from any stage's states."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .._margins import log_norm
from . import _solution as solution
from ._fields import SeedState, margins_summary, seed_velocity


def record(
    degree, unravel, s, tau, log_t, q, params_flat, theta, phase, log_abs_lhs, sign_lhs
) -> solution.FlowSolution:
    """One saved row: the clocks, the margins from the unit-norm margins q, the params and their
    unit direction theta."""
    log_loss, soft, hard = margins_summary(degree, s, q)
    return solution.FlowSolution(
        s=s,
        tau=tau,
        log_t=log_t,
        rho=jnp.exp(s),
        log_loss=log_loss,
        soft_margin=soft,
        hard_margin=hard,
        params=unravel(params_flat),
        direction=unravel(theta),
        # Unused save slots are padded with inf, so every saved leaf is a float.
        phase=jnp.asarray(phase, jnp.float64),
        log_half_drho2_dtau=log_abs_lhs,
        sign_half_drho2_dtau=sign_lhs,
        valid=jnp.asarray(1.0),
        status=None,
    )


def seed_recorder(margin_fn, velocity_fn, unravel, degree):
    """(tau, SeedState, args) -> the row of a phase-1 point (the seed's clock tau)."""

    def seed_record(tau, state: SeedState, args):
        del args
        velocity, _ = seed_velocity(velocity_fn, state.w)
        log_rho = log_norm(state.w)
        theta = state.w * jnp.exp(-log_rho)
        half_drho2 = state.w @ velocity
        return record(
            degree,
            unravel,
            log_rho,
            tau,
            jnp.log(state.t),
            margin_fn(theta),
            state.w,
            theta,
            1,
            jnp.log(jnp.abs(half_drho2)),
            jnp.sign(half_drho2),
        )

    return seed_record


def phase1_save_taus(saves_phase1, tau_end):
    """t0 is not known in advance: log-spaced saves over six decades below tau_end, plus the
    final point (t0 itself, or the end of the budget)."""
    return jnp.geomspace(1e-6, 1.0, saves_phase1 - 1) * tau_end


def concatenate(first, second):
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b]), first, second)


def blank_unsaved(rows, saved):
    """rows with the rows not saved set to inf (diffrax pads unused save slots so)."""
    return jax.tree.map(
        lambda leaf: jnp.where(saved.reshape((-1,) + (1,) * (leaf.ndim - 1)), leaf, jnp.inf), rows
    )
