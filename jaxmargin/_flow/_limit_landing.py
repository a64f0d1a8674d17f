"""The limit flow's kink landings: where a step ends with respect to the kinks of E's pairs.

A pair of an example in E that crosses its kink during a step is landed on (the step ends
within kink_landing past it: on the dense output, or redone shorter) and put on it; the next
step's start decides whether it slides or goes through. Pairs of the other examples cross
freely (lambda_i = 0: they do not enter the velocity).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ._dormand_prince import first_root_of_any
from ._kink_geometry import unit_scale
from ._kink_landing import kink_crossings
from ._limit_field import StepKinks, held_pairs
from ._stepping import StepCarry


class KinkLanding(NamedTuple):
    """Where a step ends with respect to E's kinks."""

    theta: jax.Array  # the end (cut at a kink on the dense output where `truncated`)
    h_done: jax.Array  # the step size taken
    truncated: jax.Array
    landed: jax.Array  # no pair of E ended beyond its band
    h_kink: jax.Array  # the step size that lands on the first kink passed too far
    held: jax.Array | None  # (P,) the pairs held on their kinks at the end


def land_on_kinks(problem, c: StepCarry, F1, kinks: StepKinks, active, h, step, entering):
    """A pair of an example in E that crosses its kink during the step is landed on (the step
    ends within kink_landing past it: on the dense output, or redone shorter) and put on it; the
    next step's start decides whether it slides or goes through. Pairs of the other examples
    cross freely (lambda_i = 0: they do not enter the velocity)."""
    geometry, options = problem.geometry, problem.options
    if geometry is None:
        false = jnp.asarray(False)
        return KinkLanding(step.theta, h, false, jnp.asarray(True), jnp.inf, None)
    pairs_per_example = geometry.num_pairs // active.shape[0]
    # z and dz/ds at the start (a JVP: the quadratic guess of kink_crossings).
    z0, rate0 = jax.jvp(
        lambda t: geometry.preactivations(t / jnp.linalg.norm(t)), (c.y,), (F1.dtheta,)
    )
    in_e = jnp.repeat(active, pairs_per_example)
    side = jnp.zeros_like(z0).at[kinks.slots].set(jnp.where(kinks.alpha > 0.5, 1.0, -1.0))
    leaving = in_e & kinks.on_kink & ~held_pairs(geometry, kinks)

    def bands(z1):
        """(crossings' landing tolerance, leaving pairs' band) at pre-activations z1. The band
        is floored at the crossings' tolerance: units that no example uses decay, and a band
        relative to their own scale alone asks for landings below rounding."""
        scale = jnp.maximum(jnp.mean(jnp.abs(z1)), 1e-300)
        return options.kink_landing * scale, jnp.maximum(
            options.on_kink * unit_scale(z0, active.shape[0]), options.kink_landing * scale
        )

    def kinks_at(z1, h):
        """(crossed, landed, h_kink) for a step of size h ending at pre-activations z1. Off their
        kinks: a change of sign is a crossing. On them and not held: the pair leaves to the side
        of its alpha in {0, 1}; the side test is instantaneous, and one that ends on the other
        side, beyond half the on-kink band, is landed within the band and held (a landing at
        kink_landing past z = 0 made pairs with a near-zero rate chatter: docs/decisions.md D36)."""
        landing, band = bands(z1)
        crossed, too_far, h_cross = kink_crossings(z0, z1, in_e & ~kinks.on_kink, landing, h, rate0)
        back = leaving & (side * z1 < -0.5 * band)
        back_too_far = leaving & (side * z1 < -band)
        # A linear guess that ends 3/4 of the band past the kink, on the wrong side.
        h_back = (
            h
            * jnp.maximum(side * z0 + 0.75 * band, 1e-3 * band)
            / jnp.maximum(side * (z0 - z1), 1e-300)
        )
        h_kink = jnp.minimum(h_cross, jnp.min(jnp.where(back_too_far, h_back, jnp.inf)))
        return crossed | back, ~jnp.any(too_far | back_too_far), h_kink

    z1 = geometry.preactivations(step.theta / jnp.linalg.norm(step.theta))
    crossed, landed, h_kink = kinks_at(z1, h)
    # Entering, the held pairs are the sliding ones only.
    crossed, landed = crossed & ~entering, landed | entering

    # A step that passed its error test but went past a kink ends at the kink instead: the first
    # root on the dense output (4th order, as the error estimate), where diffrax's events end a
    # step (a redo from the start often missed the band again: docs/decisions.md D35).
    def at_kink(_):
        def z_at(u):
            theta_u = step.dense(u)
            return geometry.preactivations(theta_u / jnp.linalg.norm(theta_u))

        # Aimed at the middle of the landing bands: g = 0 half the crossing band past the kink
        # (crossings), or 3/4 of the band on the wrong side (leaving pairs).
        landing, band = bands(z1)
        free = in_e & ~kinks.on_kink & (z0 != 0)
        sign = jnp.where(free, jnp.sign(z0), side)
        offset = jnp.where(free, 0.5 * landing, 0.75 * band)

        def g_at(u):
            return sign * z_at(u) + offset

        g0 = sign * z0 + offset
        u = first_root_of_any(g_at, g0, (free | leaving) & (g0 > 0), h_kink / h)
        crossed_u, landed_u, _ = kinks_at(z_at(u), u * h)
        return step.dense(u), u, crossed_u, landed_u

    def not_tried(_):
        return step.theta, jnp.ones((), c.y.dtype), crossed, jnp.asarray(False)

    try_kink = ~landed & (step.err <= 1.0) & jnp.isfinite(step.err)
    theta_u, u, crossed_u, landed_u = jax.lax.cond(try_kink, at_kink, not_tried, None)
    truncated = try_kink & landed_u & (u < 1.0)
    crossed = jnp.where(truncated, crossed_u, crossed)
    return KinkLanding(
        theta=jnp.where(truncated, theta_u, step.theta),
        h_done=jnp.where(truncated, u * h, h),
        truncated=truncated,
        landed=landed | truncated,
        h_kink=h_kink,
        held=held_pairs(geometry, kinks) | crossed,
    )
