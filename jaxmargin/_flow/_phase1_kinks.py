"""Phase 1 on ReLU-type models: Dormand-Prince steps with the activation pattern frozen per step.

Why: with the live pattern, a step across a kink sees a jump in the field; the error test rejects
it until h x jump < tol, h then grows back, and on deep nets phase 1 spent most of its steps
there (docs/decisions.md D54). Here, as in the stiff stage, each step freezes the pattern at its
start (_kinks.kink_step: the pairs on a kink at their Clarke element, held on it when they slide;
the others on the side they are on), so its stages see a smooth field. A pair that ends the step
beyond its kink is kept there when gating it late fits the error tolerance, else the step is
redone to land on it (_kink_landing) and the next start decides whether it slides or goes
through; a held pair that the next start releases makes the step be redone shorter when it was
held too long. The Clarke element does not depend on the clock: the polar one (p = softmax(-m)
= softmax(-beta q)) serves the seed's.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .._margins import log_norm
from . import _stepping as stepping
from ._dormand_prince import A_MATRIX, B4, B5, dense_output, upward_crossing
from ._kink_geometry import KinkGeometry, unit_scale
from ._kink_landing import kink_crossings, landing_band, project_onto_kinks
from ._kinks import KinkStep, kink_step
from ._stepping import Outcome, StepCarry

# The first step size tried, in tau (the controller grows it by up to 10x a step).
FIRST_STEP = 1e-4


class SeedProblem(NamedTuple):
    """What every phase-1 step reads (fixed for the run)."""

    degree: int
    geometry: KinkGeometry
    margins_and_grads: object  # (theta, gates) -> (q, per-example gradients): the Clarke element
    gated_margins: object  # (w, gates) -> m with gated units on their frozen linear pieces
    options: object  # StiffOptions: candidates, on_kink, landing, qp_iterations
    slots: int
    rtol: float
    atol: float
    x_end: jax.Array
    save_xs: jax.Array
    max_steps: int


class SeedStart(NamedTuple):
    """What a step computes at its start (kept for its redos)."""

    kinks: KinkStep
    field0: jax.Array  # the frozen field at the start (w, t)
    rate0: jax.Array  # d z(theta) / d tau at the start, per pair


def _unit_preactivations(problem: SeedProblem, w):
    return problem.geometry.preactivations(w / jnp.linalg.norm(w))


def _frozen_field(problem: SeedProblem, kinks: KinkStep, y):
    """(dw/dtau, dt/dtau) = (sum_i p_i grad m_i, 1/L), p = softmax(-m), under the step's gates,
    projected onto the tangent space of the sliding pairs' kinks."""
    m, pullback = jax.vjp(lambda v: problem.gated_margins(v, kinks.gates), y[:-1])
    g = kinks.projector()(pullback(jax.nn.softmax(-m))[0])
    # dt/dtau = 1/L; the cap keeps a dummy phase 1 of a run that starts separated finite.
    return jnp.concatenate([g, jnp.exp(jnp.minimum(jax.nn.logsumexp(-m), 700.0))[None]])


def _step_start(problem: SeedProblem, y, z) -> SeedStart:
    w = y[:-1]
    s = log_norm(w)
    options = problem.options._replace(candidates=problem.slots)
    kinks = kink_step(
        problem.geometry, problem.margins_and_grads, problem.degree, options, s, w * jnp.exp(-s), z
    )
    field0 = _frozen_field(problem, kinks, y)
    _, rate0 = jax.jvp(lambda v: _unit_preactivations(problem, v), (w,), (field0[:-1],))
    return SeedStart(kinks, field0, rate0)


def _rms(v):
    return jnp.sqrt(jnp.mean(v * v))


def _dormand_prince(problem: SeedProblem, start: SeedStart, y, h):
    """(y_new, error over tolerance, stage increments h K, the error norm's scale) of one step
    under frozen gates."""
    A, b5, b4 = (jnp.asarray(c, y.dtype) for c in (A_MATRIX, B5, B4))

    def stage(i, K):
        return K.at[i].set(_frozen_field(problem, start.kinks, y + h * (A[i] @ K)))

    K = jnp.zeros((7,) + y.shape, y.dtype).at[0].set(start.field0)
    K = jax.lax.fori_loop(1, 7, stage, K)
    y_new = y + h * (b5 @ K)
    scale = problem.atol + problem.rtol * jnp.maximum(jnp.abs(y), jnp.abs(y_new))
    return y_new, _rms(h * ((b5 - b4) @ K) / scale), h * K, scale


def _held_on_kinks(problem: SeedProblem, start: SeedStart, hold, w):
    """w with the pairs in `hold` put back on their kinks (its norm kept)."""

    def onto_kinks(slots):
        def project(w):
            theta = project_onto_kinks(
                problem.geometry,
                slots,
                w,
                hold,
                jnp.zeros((1, w.shape[0]), w.dtype),
                jnp.zeros(1, bool),
                start.kinks.gates,
            )
            return jnp.linalg.norm(w) * theta

        return project

    # Crossings can hold more pairs than the step's slots: those take the capacity's.
    held = jnp.sum(hold)
    branches = [lambda w: w, onto_kinks(problem.slots)]
    if problem.slots < problem.options.candidates:
        branches.append(onto_kinks(problem.options.candidates))
    branch = jnp.where(held == 0, 0, jnp.where(held <= problem.slots, 1, len(branches) - 1))
    return jax.lax.switch(branch, branches, w)


def _crossing_error(problem: SeedProblem, start: SeedStart, z0, z1, flip, y_new, h, k_end, scale):
    """The error over tolerance of a step that kept the pairs in `flip` on their start side
    after they crossed: (the largest fraction of the step after a crossing, linear in z) x h x
    the field's jump at the step's end (k_end, under the step's gates) when they take their new
    side."""
    gates = start.kinks.gates
    alpha = jnp.concatenate([layer[1] for layer in gates], axis=1).ravel()
    alpha = jnp.where(flip, (z1 > 0).astype(alpha.dtype), alpha)
    flipped = start.kinks._replace(gates=problem.geometry.gates(jnp.ones(flip.shape, bool), alpha))
    jump = _frozen_field(problem, flipped, y_new) - k_end
    rest = jnp.max(jnp.where(flip, jnp.abs(z1) / (jnp.abs(z0) + jnp.abs(z1)), 0.0))
    return _rms(rest * h * jump / scale)


def _body(problem: SeedProblem, event, c: StepCarry, start: SeedStart) -> StepCarry:
    """One step attempt: the frozen-pattern step and its error and kink tests; on a pass the
    held pairs put back on their kinks and the next step's start, which must not release a
    pair held during the step too late; then the saves and the event (t0) on the dense output."""
    clipped = c.h >= problem.x_end - c.x
    h = jnp.where(clipped, problem.x_end - c.x, c.h)
    y_new, err, increments, scale = _dormand_prince(problem, start, c.y, h)
    finite = jnp.isfinite(err) & jnp.all(jnp.isfinite(y_new))
    err = jnp.where(finite, err, jnp.inf)

    w0, w_new = c.y[:-1], y_new[:-1]
    z_new = _unit_preactivations(problem, w_new)
    # The landing band: how far past a kink the step may end and have the pair put on it; the
    # error tolerance on the direction is rtol (the state's is rtol |w|).
    speed = jnp.linalg.norm(start.field0[:-1]) / jnp.linalg.norm(w0)
    floor = problem.options.landing * unit_scale(z_new, problem.geometry.num_examples)
    band = landing_band(floor, start.rate0, speed, problem.rtol)
    crossed, too_far, h_land = kink_crossings(
        c.z, z_new, ~start.kinks.on_kink, band, h, start.rate0
    )
    # A pair that crossed too far was gated on its old side from its crossing on: the state is
    # off by about (the rest of the step) x (the jump its new side makes in the field). Where
    # that fits the error tolerance the step goes through the crossings (the pairs end on their
    # new side), else it is redone to land on the first. Why: with hundreds of examples most
    # crossings are of examples far from the soft-min (small p_i, a small jump), and landing on
    # each costs a step and a redo (docs/decisions.md D50, D54).
    through_err = jax.lax.cond(
        jnp.any(too_far),
        lambda: _crossing_error(
            problem, start, c.z, z_new, too_far, y_new, h, increments[6] / h, scale
        ),
        lambda: jnp.zeros((), err.dtype),
    )
    through = through_err <= 1.0
    crossed = crossed & ~too_far
    passed = (err <= 1.0) & through & finite & ~start.kinks.overflow

    # Pairs that slid, or crossed into the landing band, are put back on their kinks.
    w_acc = jax.lax.cond(
        passed,
        lambda w: _held_on_kinks(problem, start, start.kinks.sliding | crossed, w),
        lambda w: w,
        w_new,
    )
    y_acc = y_new.at[:-1].set(w_acc)
    z_acc = _unit_preactivations(problem, w_acc)
    following = jax.lax.cond(passed, lambda: _step_start(problem, y_acc, z_acc), lambda: start)
    # A pair held during the step may have had to leave its kink within it (its Clarke
    # derivative reached 0 or 1): the next start releases it. Held too long by up to h, the
    # state is off by about h/2 times the change of velocity the release makes (it grows
    # from 0 at the release); beyond the error tolerance the step is redone shorter.
    released = start.kinks.sliding & ~following.kinks.sliding & ~following.kinks.overflow
    late = 0.5 * (h * following.field0 - increments[6]) / scale
    release_err = jnp.where(jnp.any(released), _rms(late), 0.0)
    accept = passed & (release_err <= 1.0)
    h_release = h * jnp.clip(0.9 * jnp.where(release_err > 0, release_err, 1.0) ** -0.5, 0.2, 0.9)
    h_land = jnp.where(passed & ~accept, h_release, h_land)

    value, _ = dense_output(c.y, y_new, increments)
    at_t0 = accept & (event(c.y) <= 0) & (event(y_acc) > 0)
    u_stop = jax.lax.cond(
        at_t0,
        lambda: upward_crossing(lambda u: event(value(u)), y_new.dtype),
        lambda: jnp.ones((), y_new.dtype),
    )
    x_stop = jnp.where(at_t0, c.x + u_stop * h, jnp.where(clipped, problem.x_end, c.x + h))
    y_stop = jnp.where(at_t0, value(u_stop), y_acc)

    at_save = accept & ~c.saved & (problem.save_xs <= x_stop)
    u_saves = jnp.clip((problem.save_xs - c.x) / jnp.where(h > 0, h, 1.0), 0.0, 1.0)
    ys = jnp.where(at_save[:, None], jax.vmap(value)(u_saves), c.ys)

    factor = stepping.error_factor(err, 5, 10.0)
    h_next, h_resume = stepping.next_step(c, accept, clipped, h, factor, h_land, err <= 1.0)
    new = c._replace(
        x=jnp.where(accept, x_stop, c.x),
        y=jnp.where(accept, y_stop, c.y),
        z=jnp.where(accept, z_acc, c.z),
        h=h_next,
        h_resume=h_resume,
        ys=ys,
        saved=c.saved | at_save,
        steps=c.steps + accept,
        rejected=c.rejected + ~accept,
        max_sliding=jnp.maximum(c.max_sliding, start.kinks.num_sliding),
        # The next step starts from `following` (a redo from the same point keeps `start`).
        start=jax.tree.map(lambda a, b: jnp.where(accept, a, b), following, start),
        fresh=jnp.asarray(False),
    )
    outcome = jnp.select(
        [
            start.kinks.overflow,
            at_t0,
            accept & (x_stop >= problem.x_end),
            stepping.collapsed(h_next, c.x),
            new.steps + new.rejected >= problem.max_steps,
        ],
        [
            Outcome.KINK_OVERFLOW,
            Outcome.EVENT,
            Outcome.REACHED_END,
            Outcome.FAILED,
            Outcome.OUT_OF_STEPS,
        ],
        Outcome.RUNNING,
    )
    return new._replace(outcome=outcome)


def integrate(
    geometry: KinkGeometry,
    margins_and_grads,
    gated_margins,
    degree,
    options,
    y0,
    x_end,
    save_xs,
    rtol,
    atol,
    max_steps,
    event,
) -> stepping.StepCarry:
    """dy/dtau for y = (w, t) from (0, y0) to x_end, or to the first upward crossing of
    event(y) through 0 (t0), with the states at save_xs (increasing) in the carry's ys."""
    problem = SeedProblem(
        degree,
        geometry,
        margins_and_grads,
        gated_margins,
        options,
        options.candidates,
        rtol,
        atol,
        x_end,
        save_xs,
        max_steps,
    )
    carry = stepping.initial_carry(
        jnp.zeros((), y0.dtype),
        y0,
        jnp.zeros(2, y0.dtype),
        _unit_preactivations(problem, y0[:-1]),
        FIRST_STEP,
        save_xs,
        False,
        x_end,
        None,
    )
    carry = carry._replace(xs=save_xs)

    def count_on_kinks(c: StepCarry):
        return jnp.sum(jnp.abs(c.z) <= options.on_kink * unit_scale(c.z, geometry.num_examples))

    def start_of(size, c: StepCarry):
        sized = problem._replace(slots=size)
        return stepping.placeholder(lambda: _step_start(sized, c.y, c.z))

    def body_of(size):
        sized = problem._replace(slots=size)

        def body(c: StepCarry):
            start = stepping.reuse_after_rejection(
                c.fresh, lambda: _step_start(sized, c.y, c.z), c.start
            )
            return _body(sized, event, c, start)

        return body

    sizes = stepping.slot_sizes(options.candidates, geometry.num_pairs, y0.shape[0] - 1)
    return stepping.loop_by_slots(carry, sizes, count_on_kinks, start_of, body_of)
