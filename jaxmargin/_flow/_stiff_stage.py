"""The stiff stage: the polar flow from t0 on, by linearly implicit Rosenbrock-W steps.

Each step (docs/background.md §3-§4):
1. its start: the kinks' Clarke element and sliding set (_kinks.kink_step), the field under
   those gates and projected onto the sliding pairs' tangent space, its stiff factor V, and
   dF/ds (the field depends on s through beta = e^(L s));
2. the W-step (_w_step.py) and its embedded error estimate on the direction theta;
3. kink crossings: a pair that ends more than its landing band past its kink makes the step be
   redone shorter (_kink_landing.kink_crossings);
4. a step that passed: the held pairs projected back onto their kinks, the clocks tau and
   ln(t L) by quadrature along the step (_clocks.py);
5. the save grid, the step-size controller and the outcome.

The stage ends at x_end, when ||dtheta/ds|| < direction_tol, or (with `stall`) when its step
falls below a floor past a given s: the W-method's steps collapse as beta grows, and the
engine continues on the beta -> infinity limit flow (_limit_stage.py).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from . import _clocks as clocks
from . import _stepping as stepping
from ._box_qp import FISTA_ITERATIONS
from ._kink_geometry import KinkGeometry, unit_scale
from ._kink_landing import kink_crossings, landing_band, project_onto_kinks
from ._kinks import KinkStep, kink_step
from ._stepping import Outcome, StepCarry
from ._w_step import METHODS, PolarField, evaluate, stiff_factor


class StiffOptions(NamedTuple):
    """Options of the stiff stage.

    Attributes:
        tol: local error tolerance per step, absolute on the unit direction theta (the clocks
            are integrated by quadrature, outside the step control).
        candidates: slots for the kink pairs on their kinks (more stops with KINK_OVERFLOW).
        on_kink: |z| relative to the largest |z| of its unit over the examples (unit_scale), below
            which a pair counts as on its kink.
        landing: how far from a kink (relative to mean |z|) a step that lands on it may always
            end (see _kink_landing.landing_band).
        qp_iterations: FISTA iterations of the box QP that picks the Clarke element on kinks
            (its active-set finish then solves exactly; see _box_qp.FISTA_ITERATIONS).
        first_step: the first step size tried.
        method: "ros2" (order 2) or "ros34pw2" (order 3), a key of _w_step.METHODS.
    """

    tol: float = 1e-6
    candidates: int = 128
    on_kink: float = 1e-6
    landing: float = 1e-9
    qp_iterations: int = FISTA_ITERATIONS
    first_step: float = 1e-4
    method: str = "ros2"


class StiffProblem(NamedTuple):
    """What every step of the stage reads (fixed for the run)."""

    degree: int
    margins: object  # theta -> q
    margins_and_grads: object  # (theta, gates) -> (q, per-example gradients)
    stage_fields: object  # the same with gated units on their frozen linear pieces
    geometry: KinkGeometry | None
    options: StiffOptions
    slots: int  # kink slots of the current steps (at most options.candidates: slot_sizes)
    x_end: jax.Array
    save_xs: jax.Array
    max_steps: int
    direction_tol: jax.Array
    stall: tuple | None  # (s from which, step floor)


class StepStart(NamedTuple):
    """What a step computes at its start, before it knows its size (kept for its redos)."""

    kinks: KinkStep
    field: PolarField
    stiff: jax.Array  # V, the stiff part A = -V V^T
    stiff_gram: jax.Array  # V^T V, for the W-solves of every size tried from this start
    field_rate: jax.Array  # dF/ds at the start


class Attempt(NamedTuple):
    """A W-step of size h from the carry's point, with its tests."""

    h: jax.Array
    clipped: jax.Array  # the step ends at the next save point (or x_end)
    target: jax.Array
    y_new: jax.Array
    err: jax.Array  # error over tolerance (inf where not finite)
    finite: jax.Array
    crossed: jax.Array  # pairs put on their kinks at the step's end
    landed: jax.Array  # no pair ended beyond its landing band
    h_land: jax.Array  # the step size that lands on the first kink crossed too far


def _preactivations(problem: StiffProblem, theta):
    if problem.geometry is None:
        return jnp.zeros((1,), theta.dtype)
    return problem.geometry.preactivations(theta / jnp.linalg.norm(theta))


def _step_start(problem: StiffProblem, s, theta, z) -> StepStart:
    options = problem.options._replace(candidates=problem.slots)
    kinks = kink_step(
        problem.geometry, problem.margins_and_grads, problem.degree, options, s, theta, z
    )
    project = kinks.projector()

    def field_dy(x):
        return evaluate(problem.degree, problem.stage_fields, project, x, theta, kinks.gates).dy

    field = evaluate(problem.degree, problem.stage_fields, project, s, theta, kinks.gates)
    # Non-autonomous: the polar field depends on s through beta = e^(L s), with a derivative
    # ~ beta in the stiff directions; W-methods take it as the column of the augmented
    # system's Jacobian (s' = 1), i.e. + gamma_i h dF/ds in stage i (see _w_step.py).
    _, field_rate = jax.jvp(field_dy, (s,), (jnp.ones_like(s),))
    V = stiff_factor(field, project)
    return StepStart(kinks, field, V, V.T @ V, field_rate)


def _attempt(problem: StiffProblem, c: StepCarry, start: StepStart) -> Attempt:
    """The W-step to the next save point or by the carry's step size, its error and kinks."""
    S = problem.save_xs.shape[0]
    method_step, _ = METHODS[problem.options.method]
    target = jnp.minimum(problem.save_xs[jnp.minimum(c.index, S - 1)], problem.x_end)
    target = jnp.where(c.index < S, target, problem.x_end)
    clipped = c.h >= target - c.x
    h = jnp.where(clipped, target - c.x, c.h)
    projector = start.kinks.projector()

    def field_at(x, y):
        return evaluate(problem.degree, problem.stage_fields, projector, x, y, start.kinks.gates).dy

    k1, y_new, err_y = method_step(
        field_at, start.stiff, start.field_rate, c.x, c.y, h, start.field.dy, start.stiff_gram
    )
    # Only the direction is controlled: the clocks are integrated by quadrature after the step.
    err = jnp.linalg.norm(err_y) / problem.options.tol
    finite = jnp.isfinite(err) & jnp.all(jnp.isfinite(y_new))
    err = jnp.where(finite, err, jnp.inf)
    y_new = y_new / jnp.linalg.norm(y_new)

    crossed = jnp.zeros_like(start.kinks.sliding)
    landed, h_land = jnp.asarray(True), jnp.inf
    if problem.geometry is not None:
        z_new = _preactivations(problem, y_new)
        scale = jnp.maximum(jnp.mean(jnp.abs(z_new)), 1e-300)
        _, rate0 = jax.jvp(lambda y: _preactivations(problem, y), (c.y,), (k1,))
        band = landing_band(
            problem.options.landing * scale, rate0, jnp.linalg.norm(k1), problem.options.tol
        )
        crossed, too_far, h_land = kink_crossings(c.z, z_new, ~start.kinks.on_kink, band, h, rate0)
        landed = ~jnp.any(too_far)
    return Attempt(h, clipped, target, y_new, err, finite, crossed, landed, h_land)


def _finish(problem: StiffProblem, c: StepCarry, start: StepStart, attempt: Attempt):
    """(end point, clocks at it) of a step that passed its tests: the held pairs projected back
    onto their kinks; tau and ln(t L) by quadrature along the step (one more field evaluation
    at its end, for the slope of -ln L)."""
    y_acc = attempt.y_new
    if problem.geometry is not None:
        hold = start.kinks.sliding | attempt.crossed

        def onto_kinks(slots):
            return lambda v: project_onto_kinks(
                problem.geometry,
                slots,
                v,
                hold,
                start.field.grads,
                start.field.weights > 1e-12,
                start.kinks.gates,
            )

        # Crossings can hold more pairs than the step's slots: those take the capacity's.
        held = jnp.sum(hold)
        branches = [lambda v: v, onto_kinks(problem.slots)]
        if problem.slots < problem.options.candidates:
            branches.append(onto_kinks(problem.options.candidates))
        branch = jnp.where(held == 0, 0, jnp.where(held <= problem.slots, 1, len(branches) - 1))
        y_acc = jax.lax.switch(branch, branches, y_acc)
    h, L = attempt.h, problem.degree
    at_start = clocks.clock_exponents(L, problem.margins, c.x, c.y)
    at_end = clocks.clock_exponents(L, problem.margins, c.x + h, y_acc)
    end_field = evaluate(
        L, problem.stage_fields, start.kinks.projector(), c.x + h, y_acc, start.kinks.gates
    )
    aux_new = jnp.stack(
        [
            c.aux[0] + clocks.exp_trapezoid(h, at_start[0], at_end[0]),
            clocks.advance_log_t_loss(
                h,
                c.aux[1],
                at_start,
                at_end,
                start.field.log_loss_rate,
                end_field.log_loss_rate,
            ),
        ]
    )
    return y_acc, aux_new


def _advance(problem: StiffProblem, c: StepCarry, start: StepStart, attempt: Attempt):
    """The carry after the attempt: accepted or not, the next step size, the save grid and the
    outcome."""
    S = problem.save_xs.shape[0]
    _, order = METHODS[problem.options.method]
    # A step its tests already reject skips the projection onto the kinks and the clocks.
    passed = (attempt.err <= 1.0) & attempt.landed & attempt.finite & ~start.kinks.overflow
    y_acc, aux_new = jax.lax.cond(
        passed,
        lambda v: _finish(problem, c, start, attempt._replace(y_new=v)),
        lambda v: (v, c.aux),
        attempt.y_new,
    )
    finite = attempt.finite & jnp.all(jnp.isfinite(aux_new))
    accept = passed & finite

    # A step whose clocks overflow is redone shorter, as one that fails its error test.
    h, clipped, err = attempt.h, attempt.clipped, jnp.where(finite, attempt.err, jnp.inf)
    factor = stepping.error_factor(err, order, 4.0)
    h_next, h_resume = stepping.next_step(c, accept, clipped, h, factor, attempt.h_land, err <= 1.0)
    x_new = jnp.where(clipped, attempt.target, c.x + h)
    new = c._replace(
        x=jnp.where(accept, x_new, c.x),
        y=jnp.where(accept, y_acc, c.y),
        aux=jnp.where(accept, aux_new, c.aux),
        z=jnp.where(accept, _preactivations(problem, y_acc), c.z)
        if problem.geometry is not None
        else c.z,
        h=h_next,
        h_resume=h_resume,
        steps=c.steps + accept,
        rejected=c.rejected + ~accept,
        max_sliding=jnp.maximum(c.max_sliding, start.kinks.num_sliding),
        start=start,
        fresh=accept,
    )
    index = jnp.minimum(c.index, S - 1)
    at_save = accept & clipped & (c.index < S) & (attempt.target == problem.save_xs[index])
    stored = stepping.store(new, new.x, new.y, new.aux, index)
    new = jax.tree.map(lambda a, b: jnp.where(at_save, a, b), stored, new)
    new = new._replace(index=c.index + at_save)

    converged = (problem.direction_tol > 0) & (
        jnp.linalg.norm(start.field.dy) < problem.direction_tol
    )
    collapsed = stepping.collapsed(h_next, c.x)
    stalled = jnp.asarray(False)
    if problem.stall is not None:
        stalled = (c.x >= problem.stall[0]) & (h_next < problem.stall[1])
    outcome = jnp.select(
        [
            start.kinks.overflow,
            accept & (x_new >= problem.x_end),
            converged,
            stalled,
            collapsed,
            new.steps + new.rejected >= problem.max_steps,
        ],
        [
            Outcome.KINK_OVERFLOW,
            Outcome.REACHED_END,
            Outcome.CONVERGED,
            Outcome.STALLED,
            Outcome.FAILED,
            Outcome.OUT_OF_STEPS,
        ],
        Outcome.RUNNING,
    )
    return stepping.end_with(new, outcome, at_save)


def integrate(
    margins_and_grads,
    degree,
    geometry: KinkGeometry | None,
    options: StiffOptions,
    s0,
    theta0,
    aux0,
    s_end,
    save_ss,
    max_steps,
    *,
    direction_tol=0.0,
    stage_fields=None,
    stall=None,
) -> stepping.Integration:
    """The polar flow from (s0, theta0) with clocks aux0 = (tau, ln(t L)) to s_end, saving at
    save_ss (increasing). Stops early when ||dtheta/ds|| < direction_tol, or, with
    stall = (s_from, h_min), when the step falls below h_min past s_from (STALLED).
    `stage_fields`: margins_and_grads whose gated units take the value of their gate's linear
    piece (_kink_geometry.per_example_margins(..., branch=True)), for the step's stages."""
    problem = StiffProblem(
        degree=degree,
        margins=lambda theta: margins_and_grads(theta, None)[0],
        margins_and_grads=margins_and_grads,
        stage_fields=margins_and_grads if stage_fields is None else stage_fields,
        geometry=geometry,
        options=options,
        slots=options.candidates,
        x_end=s_end,
        save_xs=save_ss,
        max_steps=max_steps,
        direction_tol=direction_tol,
        stall=stall,
    )
    z0 = _preactivations(problem, theta0)
    carry = stepping.initial_carry(
        s0, theta0, aux0, z0, options.first_step, save_ss, True, s_end, None
    )

    def count_on_kinks(c: StepCarry):
        return jnp.sum(jnp.abs(c.z) <= options.on_kink * unit_scale(c.z, geometry.num_examples))

    def start_of(size, c: StepCarry):
        sized = problem._replace(slots=size)
        return stepping.placeholder(lambda: _step_start(sized, c.x, c.y, c.z))

    def body_of(size):
        sized = problem._replace(slots=size)

        def body(c: StepCarry):
            start = stepping.reuse_after_rejection(
                c.fresh, lambda: _step_start(sized, c.x, c.y, c.z), c.start
            )
            return _advance(sized, c, start, _attempt(sized, c, start))

        return body

    sizes = stepping.slot_sizes(
        options.candidates, None if geometry is None else geometry.num_pairs, theta0.shape[0]
    )
    out = stepping.loop_by_slots(carry, sizes, count_on_kinks, start_of, body_of)
    return stepping.integration(out)
