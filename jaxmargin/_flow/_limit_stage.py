"""The limit-flow stage: the beta -> infinity flow (_limit_field.py) integrated past any beta.

Each step:
1. its start: E and lambda by Wolfe, and with ReLU kinks the sliding set (choose_kinks);
2. a Dormand-Prince 5(4) step with E fixed (lambda from the KKT system on E at each stage);
3. kink crossings of E's pairs (_limit_landing.py): a step that passed its error test but went
   past a kink ends at the kink, on the dense output; one that went too far otherwise is redone
   shorter;
4. a step that passed: the end put back on E's equal margins and the held kinks (equalize: the
   DAE's drift), and its field;
5. events of E: an example off E coming down through the common margin joins, a weight of E
   turning negative leaves (the step is redone to end just past the event);
6. tau by quadrature, ln(t L) at its quasi-steady value (_clocks.py);
7. the save points the step passed, from the dense output, and the outcome.

The first iteration enters the limit flow (a step of size 0, not counted): E and lambda by Wolfe
over the examples that p = softmax(-beta q) at beta = e^(L s_enter) does not yet separate from
the minimum (with kinks: and the sliding pairs), then the nearest point with E's margins equal
(a move of O(1/beta)) and the sliding pairs on their kinks. It is the steps' own machinery (one
copy of each in the compiled program).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .._wolfe import WEIGHT_FLOOR
from . import _clocks as clocks
from . import _stepping as stepping
from ._dormand_prince import A_MATRIX, B4, B5, dense_output
from ._kink_geometry import KinkGeometry, unit_scale
from ._limit_field import LimitField, LimitOptions, choose_kinks, equalize, evaluate
from ._limit_landing import land_on_kinks
from ._limit_saves import save_passed
from ._stepping import Outcome, StepCarry

# At the switch from finite beta: examples with p_i / p_max > exp(-_SWITCH_GAP) may be on the min.
_SWITCH_GAP = 40.0


class LimitProblem(NamedTuple):
    """What every step of the stage reads (fixed for the run)."""

    margins_and_grads: object  # branch margins where there are kinks (frozen pattern per step)
    degree: int
    options: LimitOptions  # its candidates: the kink slots of the current steps
    capacity: int  # the most kink slots (loop_by_slots picks the steps' slots up to it)
    geometry: KinkGeometry | None
    s_end: jax.Array
    save_xs: jax.Array
    max_steps: jax.Array
    direction_tol: jax.Array
    log_beta_enter: jax.Array
    finite_beta_rows: bool  # saved points with E's margins spread as at beta = e^(L s)


class DormandPrince(NamedTuple):
    """A Dormand-Prince step of size h with E fixed."""

    theta: jax.Array
    err: jax.Array  # error over tolerance
    last: LimitField  # the field at the last stage (the step's end, before equalize)
    dense: object  # u in [0, 1] -> theta on the dense output
    dense_rate: object  # u -> d theta / du


def _start_field(problem: LimitProblem, theta, weights, entering):
    options = problem.options

    def allowed_of(q):
        gap = q - jnp.min(q)
        near = gap <= options.touching * jnp.abs(jnp.min(q))
        return jnp.where(
            entering,
            gap <= _SWITCH_GAP * jnp.exp(-problem.log_beta_enter),
            near | (weights > 0),
        )

    return choose_kinks(
        problem.margins_and_grads,
        problem.degree,
        options,
        theta,
        allowed_of,
        weights,
        problem.geometry,
    )


def _dormand_prince(problem: LimitProblem, theta, F1: LimitField, kinks, active, h):
    """The stages in a loop (one field in the compiled program instead of six)."""

    def stage(i, state):
        K, _ = state
        field = evaluate(
            problem.margins_and_grads,
            problem.degree,
            theta + h * (jnp.asarray(A_MATRIX)[i] @ K),
            active,
            problem.geometry,
            kinks,
        )
        return K.at[i].set(field.dtheta), field

    K0 = jnp.zeros((7,) + theta.shape, theta.dtype).at[0].set(F1.dtheta)
    K, last = jax.lax.fori_loop(1, 7, stage, (K0, F1))
    theta_new = theta + h * (jnp.asarray(B5) @ K)
    err_y = h * ((jnp.asarray(B5) - jnp.asarray(B4)) @ K)
    dense, dense_rate = dense_output(theta, theta_new, h * K)
    return DormandPrince(
        theta_new, jnp.linalg.norm(err_y) / problem.options.tol, last, dense, dense_rate
    )


def _finish(problem: LimitProblem, theta_new, F1, last, kinks, active, held):
    """(end point on E's equal margins and the held kinks, its field with the step's E (for the
    clocks: the next step's Wolfe call may change E, not the common margin), the gaps to the
    common margin)."""
    geometry = problem.geometry

    def onto(slots):
        return lambda theta: equalize(
            problem.margins_and_grads,
            theta,
            active,
            geometry=geometry,
            kinks=kinks,
            held=held,
            candidates=slots,
        )

    if geometry is None or problem.options.candidates == problem.capacity:
        theta_new = onto(problem.options.candidates)(theta_new)
    else:  # crossings can hold more pairs than the step's slots: those take the capacity's
        theta_new = jax.lax.cond(
            jnp.sum(held) <= problem.options.candidates,
            onto(problem.options.candidates),
            onto(problem.capacity),
            theta_new,
        )
    end = evaluate(problem.margins_and_grads, problem.degree, theta_new, active, geometry, kinks)
    if geometry is None:
        gap1 = last.margins - last.q_min
    else:  # off E with the live activation pattern (their pairs may have crossed)
        gap1 = problem.margins_and_grads(theta_new, None)[0] - end.q_min
    return theta_new, end, gap1


def _events_of_e(options, F1, last, gap1, active, h, h_done):
    """(h_land, none crossed): an example off E that came down through the common margin (it
    joins), or a weight of E that turned negative (that example leaves). The step is redone to
    end within `landing` / `leaving` past the event; the next step's Wolfe call sorts E out."""
    scale = jnp.abs(last.q_min)
    gap0 = F1.margins - F1.q_min
    crossed = ~active & (gap1 < -options.landing * scale) & (gap0 > gap1)
    h_join = jnp.min(
        jnp.where(crossed, h_done * (gap0 + 0.5 * options.landing * scale) / (gap0 - gap1), jnp.inf)
    )
    left = active & (last.weights < -options.leaving)
    h_leave = jnp.min(
        jnp.where(
            left, h * (F1.weights + 0.5 * options.leaving) / (F1.weights - last.weights), jnp.inf
        )
    )
    return jnp.minimum(h_join, h_leave), ~jnp.any(crossed) & ~jnp.any(left)


def _body(problem: LimitProblem, c: StepCarry) -> StepCarry:
    options, degree = problem.options, problem.degree
    entering = c.steps == 0  # the entry iteration (counted in steps, subtracted at the end)
    # The carry's z holds lambda (the stiff stage keeps pre-activations there).
    F1, kinks = stepping.reuse_after_rejection(
        c.fresh, lambda: _start_field(problem, c.y, c.z, entering), c.start
    )
    active = F1.weights > WEIGHT_FLOOR
    # Steps end at s_end, not at the save grid (the saves come from the dense output).
    clipped = (c.h >= problem.s_end - c.x) & ~entering
    h = jnp.where(entering, 0.0, jnp.where(clipped, problem.s_end - c.x, c.h))
    step = _dormand_prince(problem, c.y, F1, kinks, active, h)
    landing = land_on_kinks(problem, c, F1, kinks, active, h, step, entering)

    # A step that fails its error test or a kink landing is redone without the projection and
    # the end field; its examples joining E are then found on the redo.
    finite = jnp.isfinite(step.err) & jnp.all(jnp.isfinite(landing.theta))
    passed = (step.err <= 1.0) & finite & landing.landed
    theta_new, end, gap1 = jax.lax.cond(
        passed,
        lambda t: _finish(problem, t, F1, step.last, kinks, active, landing.held),
        lambda t: (t, F1, F1.margins - F1.q_min),
        landing.theta,
    )
    finite = finite & jnp.isfinite(end.q_min)
    err = jnp.where(finite, step.err, jnp.inf)
    h_events, no_events = _events_of_e(options, F1, step.last, gap1, active, h, landing.h_done)
    h_land = jnp.minimum(h_events, landing.h_kink)
    landed = (no_events & landing.landed) | entering

    tau_new = c.aux[0] + clocks.tau_increment(
        degree, c.x, landing.h_done, F1.q_min, F1.dtheta, end.q_min, end.dtheta
    )
    x_new = jnp.where(clipped & ~landing.truncated, problem.s_end, c.x + landing.h_done)
    aux_new = jnp.stack([tau_new, clocks.limit_log_t_loss(degree, x_new, end.q_min, end.dtheta)])
    finite = finite & jnp.all(jnp.isfinite(aux_new))
    # A step whose clocks overflow is redone shorter, as one that fails its error test (redone
    # at the same size, it would fail again until max_steps).
    err = jnp.where(finite, err, jnp.inf)
    overflow = jnp.asarray(False) if kinks is None else kinks.overflow
    accept = (err <= 1.0) & landed & finite & ~overflow

    factor = stepping.error_factor(err, 5, 5.0)
    h_next, h_resume = stepping.next_step(
        c, accept, clipped, h, factor, h_land, (err <= 1.0) & finite
    )
    h_next = jnp.where(entering, c.h, h_next)
    num_held = jnp.sum(active) if problem.geometry is None else jnp.sum(kinks.hold)
    new = c._replace(
        x=jnp.where(accept, x_new, c.x),
        y=jnp.where(accept, theta_new, c.y),
        aux=jnp.where(accept, aux_new, c.aux),
        z=jnp.where(accept, F1.weights, c.z),
        h=h_next,
        h_resume=h_resume,
        steps=c.steps + accept,
        rejected=c.rejected + ~accept,
        max_sliding=jnp.maximum(c.max_sliding, num_held.astype(jnp.int32)),
        start=(F1, kinks),
        fresh=accept,
    )
    converged = (
        (problem.direction_tol > 0)
        & (jnp.linalg.norm(F1.dtheta) < problem.direction_tol)
        & ~entering
    )
    outcome = jnp.select(
        [
            overflow,
            accept & (x_new >= problem.s_end),
            converged,
            stepping.collapsed(h_next, c.x),
            new.steps + new.rejected >= problem.max_steps,
        ],
        [
            Outcome.KINK_OVERFLOW,
            Outcome.REACHED_END,
            Outcome.CONVERGED,
            Outcome.FAILED,
            Outcome.OUT_OF_STEPS,
        ],
        Outcome.RUNNING,
    )
    new, at_point = save_passed(
        problem,
        c,
        new,
        F1,
        kinks,
        active,
        step,
        x_new,
        theta_new,
        aux_new,
        h,
        accept,
        outcome >= 0,
    )
    return stepping.end_with(new, outcome, at_point)


def integrate(
    margins_and_grads,
    degree,
    options: LimitOptions,
    s0,
    theta0,
    tau0,
    s_end,
    save_ss,
    max_steps,
    *,
    direction_tol=0.0,
    geometry=None,
    s_enter=None,
    finite_beta_rows=False,
) -> stepping.Integration:
    """The limit flow from a point (s0, theta0) of the flow at finite beta to s_end, saving at
    the save_ss >= s0 (the entry point is the row at s0); aux = (tau, ln(t L)) as in the stiff
    stage. Stops early when ||dtheta/ds|| < direction_tol. With `geometry` (ReLU nets),
    margins_and_grads must take the branch values of gated units
    (_kink_geometry.per_example_margins(..., branch=True)). The entry counts examples within
    _SWITCH_GAP / beta of the minimum at beta = e^(L s_enter) (default s0) as on it. With
    `finite_beta_rows` the saved points are the flow at finite beta to O(1/beta^2) in E's margins
    (_limit_saves.py); the integrated points keep E's margins equal."""
    dtype = theta0.dtype
    theta0 = theta0 / jnp.linalg.norm(theta0)
    problem = LimitProblem(
        margins_and_grads=margins_and_grads,
        degree=degree,
        options=options,
        capacity=options.candidates,
        geometry=geometry,
        s_end=s_end,
        save_xs=save_ss,
        max_steps=max_steps,
        direction_tol=direction_tol,
        log_beta_enter=degree * (s0 if s_enter is None else s_enter),
        finite_beta_rows=finite_beta_rows,
    )
    # Wolfe starts from the example of smallest margin (always allowed).
    q0, _ = margins_and_grads(theta0, None)
    weights0 = jnp.zeros_like(q0).at[jnp.argmin(q0)].set(1.0)
    aux0 = jnp.stack([jnp.asarray(tau0, dtype), jnp.asarray(jnp.nan, dtype)])  # set on entry
    carry = stepping.initial_carry(
        s0, theta0, aux0, weights0, options.first_step, save_ss, False, s_end, None
    )

    def count_on_kinks(c: StepCarry):
        z = geometry.preactivations(c.y / jnp.linalg.norm(c.y))
        return jnp.sum(jnp.abs(z) <= options.on_kink * unit_scale(z, q0.shape[0]))

    def sized(size):
        return problem._replace(options=options._replace(candidates=size))

    def start_of(size, c: StepCarry):
        return stepping.placeholder(lambda: _start_field(sized(size), c.y, c.z, True))

    def body_of(size):
        return lambda c: _body(sized(size), c)

    sizes = stepping.slot_sizes(
        options.candidates, None if geometry is None else geometry.num_pairs, theta0.shape[0]
    )
    out = stepping.loop_by_slots(carry, sizes, count_on_kinks, start_of, body_of)
    return stepping.integration(out, steps=jnp.maximum(out.steps - 1, 0))
