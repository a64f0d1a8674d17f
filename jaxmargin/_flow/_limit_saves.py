"""The limit-flow stage's saved points: from the dense output, on E's equal margins and the held
kinks, and (in gradient_flow) with E's margins spread as the flow at finite beta keeps them.

`problem` is the stage's LimitProblem (_limit_stage.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .._wolfe import WEIGHT_FLOOR
from . import _clocks as clocks
from . import _stepping as stepping
from ._limit_field import equalize, held_pairs


def _spread_offsets(problem, x, F1, active):
    """Offsets o with q_i + o_i equal on E where beta (q_i - q_min) = -ln(lambda_i / lambda_max),
    beta = e^(L x): the spread of E's margins that the flow at finite beta keeps (p = softmax(-beta
    q) equals lambda on E; docs/decisions.md D51). Zero without finite_beta_rows: E's margins
    equal, the limit flow's own points."""
    if not problem.finite_beta_rows:
        return jnp.zeros_like(F1.weights)
    ratio = jnp.maximum(F1.weights, WEIGHT_FLOOR) / jnp.max(F1.weights)
    return jnp.where(active, jnp.log(ratio) * jnp.exp(-problem.degree * x), 0.0)


def save_passed(
    problem, c, new, F1, kinks, active, step, x_new, theta_new, aux_new, h, accept, final
):
    """The save points the step passed, from the dense output, each put back on E's equal
    margins (or their finite-beta spread, _spread_offsets) and the held kinks (the dense output
    is off them by its error), with clocks from the margins there; where the run stops (`final`)
    off the save grid, its last point as one more row. Not steps cut at the save grid: the
    error test allows far longer steps than the grid's spacing (docs/decisions.md D35).
    Returns (carry, a row was stored at the carry's point)."""
    S = problem.save_xs.shape[0]
    degree = problem.degree
    held = None if problem.geometry is None else held_pairs(problem.geometry, kinks)

    def on_grid(new):
        index = jnp.minimum(new.index, S - 1)
        return accept & (new.index < S) & (problem.save_xs[index] <= x_new)

    def pending(state):
        new, at_point, final_done = state
        return on_grid(new) | (final & ~at_point & ~final_done & (new.index < S))

    def save_next(state):
        new, at_point, _ = state
        index = jnp.minimum(new.index, S - 1)
        grid = on_grid(new)
        x_save = jnp.where(grid, problem.save_xs[index], new.x)
        at_end = ~grid | (x_save >= x_new)
        u = jnp.where(at_end, 1.0, (x_save - c.x) / jnp.where(h > 0, h, 1.0))
        point = jnp.where(grid, jnp.where(at_end, theta_new, step.dense(u)), new.y)
        offsets = _spread_offsets(problem, x_save, F1, active)
        theta = equalize(
            problem.margins_and_grads,
            point,
            active,
            geometry=problem.geometry,
            kinks=kinks,
            held=held,
            candidates=problem.options.candidates,
            offsets=offsets,
        )
        # Clocks from the common level of E (the offsets taken out).
        q = problem.margins_and_grads(theta, None if kinks is None else kinks.gates)[0]
        q_min = F1.weights @ (q + offsets)
        rate = step.dense_rate(u) / jnp.where(h > 0, h, 1.0)
        dtheta = rate - (rate @ theta) * theta
        tau = c.aux[0] + clocks.tau_increment(
            degree, c.x, x_save - c.x, F1.q_min, F1.dtheta, q_min, dtheta
        )
        between = jnp.stack([tau, clocks.limit_log_t_loss(degree, x_save, q_min, dtheta)])
        aux = jnp.where(at_end, jnp.where(grid, aux_new, new.aux), between)
        new = stepping.store(new, jnp.where(grid & at_end, x_new, x_save), theta, aux, index)
        return new._replace(index=new.index + 1), at_point | at_end, ~grid

    new, at_point, _ = jax.lax.while_loop(
        pending, save_next, (new, jnp.asarray(False), jnp.asarray(False))
    )
    return new, at_point
