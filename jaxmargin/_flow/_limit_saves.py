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


def spread_as_at_finite_beta(problem, theta, x, F1, kinks, active, held):
    """theta with E's margins spread as the flow at beta = e^(L x) keeps them: p = softmax(-beta q)
    equals lambda on E where beta (q_i - q_min) = -ln(lambda_i / lambda_max) (a move of O(1/beta);
    docs/decisions.md D51). The limit flow's equal margins would put the soft margin of a saved
    point below the finite-beta flow's by O(1/beta), a fall at the switch."""
    ratio = jnp.maximum(F1.weights, WEIGHT_FLOOR) / jnp.max(F1.weights)
    offsets = jnp.where(active, jnp.log(ratio) * jnp.exp(-problem.degree * x), 0.0)
    return equalize(
        problem.margins_and_grads,
        theta,
        active,
        geometry=problem.geometry,
        kinks=kinks,
        held=held,
        candidates=problem.options.candidates,
        offsets=offsets,
    )


def save_passed(problem, c, new, F1, kinks, active, step, x_new, theta_new, aux_new, h, accept):
    """The save points the step passed, from the dense output, each put back on E's equal
    margins and the held kinks (the dense output is off them by its error), with clocks from
    the margins there. Not steps cut at the save grid: the error test allows far longer steps
    than the grid's spacing (docs/decisions.md D35)."""
    S = problem.save_xs.shape[0]
    degree = problem.degree
    held_before = None if problem.geometry is None else held_pairs(problem.geometry, kinks)

    def pending(state):
        new, _ = state
        index = jnp.minimum(new.index, S - 1)
        return accept & (new.index < S) & (problem.save_xs[index] <= x_new)

    def save_next(state):
        new, _ = state
        index = jnp.minimum(new.index, S - 1)
        x_save = problem.save_xs[index]
        at_end = x_save >= x_new

        def between(_):
            u = (x_save - c.x) / h
            theta = equalize(
                problem.margins_and_grads,
                step.dense(u),
                active,
                geometry=problem.geometry,
                kinks=kinks,
                held=held_before,
                candidates=problem.options.candidates,
            )
            q = problem.margins_and_grads(theta, None if kinks is None else kinks.gates)[0]
            q_min = F1.weights @ q
            rate = step.dense_rate(u) / h
            dtheta = rate - (rate @ theta) * theta
            tau = c.aux[0] + clocks.tau_increment(
                degree, c.x, x_save - c.x, F1.q_min, F1.dtheta, q_min, dtheta
            )
            log_t_loss = clocks.limit_log_t_loss(degree, x_save, q_min, dtheta)
            return theta, jnp.stack([tau, log_t_loss])

        theta, aux = jax.lax.cond(at_end, lambda _: (theta_new, aux_new), between, None)
        if problem.finite_beta_rows:
            theta = spread_as_at_finite_beta(problem, theta, x_save, F1, kinks, active, held_before)
        new = stepping.store(new, jnp.where(at_end, x_new, x_save), theta, aux, index)
        return new._replace(index=new.index + 1), at_end

    return jax.lax.while_loop(pending, save_next, (new, jnp.asarray(False)))
