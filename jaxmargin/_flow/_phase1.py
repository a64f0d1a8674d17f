"""Phase 1: the seed's flow in its clock tau, from params0 until the soft margin first exceeds 0.

dw/dtau = sum_i p_i grad m_i(w), p = softmax(-m), with the exponential-loss time t beside it
(dt/dtau = 1/L). The run stops at t0, where -ln L (same sign as the soft margin, finite at
w = 0) crosses 0 upwards; after it, s = ln ||w|| is the clock (in tau, ||w|| blows up at a
finite tau for L >= 3: docs/background.md §2). The integrator is the chain's: Dormand-Prince 5(4)
(integrate_seed, the engine's; on ReLU-type models kinked_integrator, the activation pattern
frozen per step: _phase1_kinks.py) or a diffrax solver (_explicit.py); the rest is this module's.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from .._margins import log_norm
from . import _dormand_prince as dormand_prince
from . import _phase1_kinks as phase1_kinks
from . import _records as records
from . import _solution as solution
from ._fields import SeedState, make_margin_fn, polar_quantities, seed_field
from ._kink_geometry import kink_geometry, per_example_margins
from ._sliding import make_velocity
from ._stepping import Outcome
from ._stiff_stage import StiffOptions


class SeedRun(NamedTuple):
    """Phase 1's integration, whichever integrator ran it."""

    records: solution.FlowSolution  # the log-spaced saves, then the final point
    final: SeedState
    tau_final: jax.Array
    event: jax.Array  # it stopped at t0
    out_of_steps: jax.Array
    failed: jax.Array
    steps: jax.Array
    rejected: jax.Array
    kink_overflow: jax.Array = False  # more pairs on their kinks than its slots


class Phase1(NamedTuple):
    """Phase 1's rows and where it ended: what the later stages start from."""

    records: solution.FlowSolution  # the log-spaced saves, then the final point
    steps: jax.Array
    rejected: jax.Array
    out_of_steps: jax.Array
    failed: jax.Array  # phase 1's integrator failed (not the step budget)
    kink_overflow: jax.Array  # more pairs on their kinks than phase 1's slots (kink_slots)
    start_separated: jax.Array  # params0 separates the data already: no phase 1
    separated: jax.Array
    w1: jax.Array  # w at t0 (params0 for a run that starts separated)
    tau1: jax.Array
    log_t_loss1: jax.Array  # ln(t L) at t0
    run_phase2: jax.Array
    s_end: jax.Array  # where the run after t0 ends


def integrate_seed(static, margin_fn, velocity_fn, unravel, degree, w0, tau_end) -> SeedRun:
    """Phase 1 by _dormand_prince.integrate on the state (w, t): one field evaluation in the
    compiled program (docs/decisions.md D7), the records after it."""
    field = seed_field(velocity_fn)

    def flat_field(y):
        rate = field(None, SeedState(y[:-1], y[-1]), None)
        return jnp.concatenate([rate.w, rate.t[None]])

    y0, save_taus = _start_and_saves(static, w0, tau_end)
    out = dormand_prince.integrate(
        flat_field,
        _separation(margin_fn),
        y0,
        tau_end,
        save_taus,
        static.rtol,
        static.atol,
        static.max_steps,
    )
    return _seed_run(margin_fn, velocity_fn, unravel, degree, y0, save_taus, out)


def kinked_integrator(X, y):
    """integrate_seed's counterpart for ReLU-type models on the data (X, y): steps with the
    activation pattern frozen and kink crossings landed on (_phase1_kinks.py)."""

    def integrate(static, margin_fn, velocity_fn, unravel, degree, w0, tau_end) -> SeedRun:
        predictor = static.predictor
        y0, save_taus = _start_and_saves(static, w0, tau_end)

        def gated_margins(w, gates):
            apply = functools.partial(predictor.kinks.gated_apply, branch=True)
            return y * jax.vmap(apply, in_axes=(None, 0, 0))(unravel(w), X, gates)

        out = phase1_kinks.integrate(
            kink_geometry(predictor, unravel, X, y, w0),
            per_example_margins(predictor, unravel, X, y),
            gated_margins,
            degree,
            StiffOptions(tol=static.rtol, candidates=static.kink_slots),
            y0,
            tau_end,
            save_taus,
            static.rtol,
            static.atol,
            static.max_steps,
            _separation(margin_fn),
        )
        return _seed_run(margin_fn, velocity_fn, unravel, degree, y0, save_taus, out)

    return integrate


def _start_and_saves(static, w0, tau_end):
    """The state (w, t) at tau = 0 and the phase-1 save times."""
    y0 = jnp.concatenate([w0, jnp.zeros(1, w0.dtype)])
    return y0, records.phase1_save_taus(static.saves_phase1, tau_end)


def _separation(margin_fn):
    """The event of t0: -ln L(w), for the state y = (w, t)."""

    def separated(y):
        return -jax.nn.logsumexp(-margin_fn(y[:-1]))

    return separated


def _seed_run(margin_fn, velocity_fn, unravel, degree, y0, save_taus, out) -> SeedRun:
    """The SeedRun of an integration that stopped at out.x, out.y (an EventIntegration or a
    StepCarry) with the states at save_taus in out.ys: the records of its rows."""
    taus = jnp.concatenate([save_taus, out.x[None]])
    reached = jnp.concatenate([out.saved, jnp.ones(1, bool)])
    # Rows not reached are recorded at y0 (finite) and then set to inf.
    ys = jnp.where(reached[:, None], jnp.concatenate([out.ys, out.y[None]]), y0)
    seed_record = records.seed_recorder(margin_fn, velocity_fn, unravel, degree)
    # lax.map, not vmap: the records' velocity is compiled once, unbatched.
    rows = jax.lax.map(
        lambda row: seed_record(row[0], SeedState(row[1][:-1], row[1][-1]), None), (taus, ys)
    )
    return SeedRun(
        records=records.blank_unsaved(rows, reached),
        final=SeedState(out.y[:-1], out.y[-1]),
        tau_final=out.x,
        event=out.outcome == Outcome.EVENT,
        out_of_steps=out.outcome == Outcome.OUT_OF_STEPS,
        failed=out.outcome == Outcome.FAILED,
        steps=out.steps,
        rejected=out.rejected,
        kink_overflow=out.outcome == Outcome.KINK_OVERFLOW,
    )


def phase1(static, integrate, params0, X, y, tau_max, s_target, sliding) -> Phase1:
    """Phase 1 with the integrator `integrate` (integrate_seed's signature) and the velocity on
    kinks `sliding` (SlidingOptions, or None for autodiff's element), and where the run after t0
    starts and ends."""
    predictor = static.predictor
    degree = predictor.degree
    w0, unravel = ravel_pytree(params0)
    margin_fn = make_margin_fn(predictor, unravel, X, y)
    velocity_fn = make_velocity(predictor, unravel, X, y, sliding)

    # A run that starts separated skips phase 1 (a dummy solve over tau in [0, 1e-300] keeps
    # the shapes; its rows are marked invalid). Its clock t starts at the offset dt/ds(s0) x 1
    # (the time origin is a convention; a zero start would make ln t = -inf and the ln(t L)
    # equation singular), so ln t is finite from the first saved point.
    start_separated = jax.nn.logsumexp(-margin_fn(w0)) < 0
    tau_end = jnp.where(start_separated, 1e-300, tau_max)
    run = integrate(static, margin_fn, velocity_fn, unravel, degree, w0, tau_end)
    final1 = run.final
    separated = start_separated | run.event
    w1 = jnp.where(start_separated, w0, final1.w)
    tau1 = jnp.where(start_separated, 0.0, run.tau_final)
    s1 = log_norm(w1)
    log_t_loss1 = jnp.where(
        start_separated,
        polar_quantities(velocity_fn, degree, s1, w1 * jnp.exp(-s1)).log_dtau_ds,
        jnp.log(final1.t) + jax.nn.logsumexp(-margin_fn(final1.w)),
    )
    # The run after t0 goes from s0 to s_target. One that did not separate, or that separated
    # beyond the target already, gets a dummy one (save times must increase) whose rows are
    # marked invalid.
    run_phase2 = separated & (s_target > s1)
    s_end = jnp.where(run_phase2, s_target, s1 + 1e-9 * (1.0 + jnp.abs(s1)))
    return Phase1(
        records=run.records,
        steps=run.steps,
        rejected=run.rejected,
        out_of_steps=run.out_of_steps,
        failed=run.failed,
        kink_overflow=jnp.asarray(run.kink_overflow),
        start_separated=start_separated,
        separated=separated,
        w1=w1,
        tau1=tau1,
        log_t_loss1=log_t_loss1,
        run_phase2=run_phase2,
        s_end=s_end,
    )
