"""gradient_flow: the seed's flow on diffrax, in two phases and three clocks.

Phase 1 integrates the tau-flow from params0 until the soft margin first exceeds 0 (t0), located
by a diffrax event with a bisection root finder on -ln L (same sign as the soft margin, finite at
w = 0); with solver="rosenbrock" by _dormand_prince.integrate's event on the same function.
Phase 2 integrates the polar clock s = ln ||w|| from t0, where ||w|| cannot blow up in finite
"time" because s itself is the clock (NOTES §2: in tau, L >= 3 blows up at a finite tau).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
from jax.flatten_util import ravel_pytree

from .._margins import log_norm
from .._validation import check_all
from . import _dormand_prince as dp
from . import _limit as lim
from . import _pipeline
from . import _rosenbrock as ros
from . import _solution as S
from ._fields import (
    PolarState,
    SeedState,
    make_margin_fn,
    margins_summary,
    polar_field,
    polar_quantities,
    seed_field,
    seed_velocity,
)
from ._kink_geometry import kink_geometry, per_example_margins
from ._sliding import SlidingOptions, make_velocity

SOLVERS = {
    "tsit5": diffrax.Tsit5,
    "dopri8": diffrax.Dopri8,
    "dopri5": diffrax.Dopri5,
    "heun": diffrax.Heun,
    "bosh3": diffrax.Bosh3,
}
# Phase 2 with the linearly implicit Rosenbrock-W integrator of _rosenbrock.py (stiff regime,
# beta >> 1); phase 1 then runs Dormand-Prince 5(4) on _dormand_prince.py (one field in its
# compiled program). Why Dormand-Prince: on the reference problem (L = 3, rtol 1e-6) diffrax's
# Tsit5 reached t0 in 1227 accepted + 2334 rejected steps, its Dopri5 in 867 + 1523 (a run to
# beta = 250: 22.1 s vs 16.6 s; Bosh3 and Dopri8 rejected more). The hand-written one takes
# 1045 + 1940 there: its error estimate is Hairer's, 3/2 of diffrax's Dopri5's.
ROSENBROCK = "rosenbrock"
# The W-method hands over to the limit flow when its step falls below _STALL_STEP past
# beta = _STALL_BETA (see _phase2_rosenbrock).
_STALL_BETA, _STALL_STEP = 1e8, 1e-5
# limit_beta="auto": where the limit flow takes over (see gradient_flow).
_AUTO_LIMIT_BETA, _AUTO_LIMIT_BETA_KINKS = 1e10, 1e6
_OUTCOME_CODES = {
    ros.REACHED_END: S.REACHED_TARGET,
    ros.CONVERGED: S.DIRECTION_CONVERGED,
    ros.OUT_OF_STEPS: S.MAX_STEPS,
    ros.FAILED: S.SOLVER_FAILED,
    ros.KINK_OVERFLOW: S.TOO_MANY_KINKS,
}


class _Static(NamedTuple):
    """Options that fix the shape of the computation (one compilation per value)."""

    predictor: object
    saves_phase1: int
    saves_phase2: int
    max_steps: int
    solver: str
    rtol: float
    atol: float
    stop_on_direction: bool
    sliding: SlidingOptions | None
    limit_beta: float | None


class _Phase1(NamedTuple):
    """Phase 1's rows and where it ended: what phase 2 starts from."""

    records: S.FlowSolution  # the log-spaced saves, then the final point
    steps: jax.Array
    rejected: jax.Array
    out_of_steps: jax.Array
    failed: jax.Array  # phase 1's integrator failed (not the step budget)
    start_separated: jax.Array  # params0 separates the data already: no phase 1
    separated: jax.Array
    w1: jax.Array  # w at t0 (params0 for a run that starts separated)
    tau1: jax.Array
    log_t_loss1: jax.Array  # ln(t L) at t0
    run_phase2: jax.Array
    s_end: jax.Array  # where phase 2 ends


def _record(
    degree, unravel, s, tau, log_t, q, params_flat, phase, log_abs_lhs, sign_lhs
) -> S.FlowSolution:
    log_loss, soft, hard = margins_summary(degree, s, q)
    return S.FlowSolution(
        s=s,
        tau=tau,
        log_t=log_t,
        rho=jnp.exp(s),
        log_loss=log_loss,
        soft_margin=soft,
        hard_margin=hard,
        params=unravel(params_flat),
        # diffrax pads unused save slots with inf, so every saved leaf is a float.
        phase=jnp.asarray(phase, jnp.float64),
        log_half_drho2_dtau=log_abs_lhs,
        sign_half_drho2_dtau=sign_lhs,
        valid=jnp.asarray(1.0),
        status=None,
    )


class _SeedRun(NamedTuple):
    """Phase 1's integration, whichever integrator ran it."""

    records: S.FlowSolution  # the log-spaced saves, then the final point
    final: SeedState
    tau_final: jax.Array
    event: jax.Array  # it stopped at t0
    out_of_steps: jax.Array
    failed: jax.Array
    steps: jax.Array
    rejected: jax.Array


def _seed_record(margin_fn, velocity_fn, unravel, degree):
    def record(tau, state: SeedState, args):
        del args
        velocity, _ = seed_velocity(velocity_fn, state.w)
        log_rho = log_norm(state.w)
        theta = state.w * jnp.exp(-log_rho)
        half_drho2 = state.w @ velocity
        return _record(
            degree,
            unravel,
            log_rho,
            tau,
            jnp.log(state.t),
            margin_fn(theta),
            state.w,
            1,
            jnp.log(jnp.abs(half_drho2)),
            jnp.sign(half_drho2),
        )

    return record


def _phase1_save_ts(static, tau_end):
    # t0 is not known in advance: log-spaced saves over six decades below tau_end, plus the
    # final point (t0 itself, or the end of the budget).
    return jnp.geomspace(1e-6, 1.0, static.saves_phase1 - 1) * tau_end


def _phase1_diffrax(static, margin_fn, velocity_fn, unravel, degree, w0, tau_end) -> _SeedRun:
    record = _seed_record(margin_fn, velocity_fn, unravel, degree)

    # diffrax calls event functions with keywords t, y, args.
    def separated(t, y, args, **kwargs):
        del t, args, kwargs
        return -jax.nn.logsumexp(-margin_fn(y.w))

    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(seed_field(velocity_fn)),
        SOLVERS[static.solver](),
        0.0,
        tau_end,
        None,
        SeedState(w0, jnp.zeros((), w0.dtype)),
        saveat=diffrax.SaveAt(
            subs=[
                diffrax.SubSaveAt(ts=_phase1_save_ts(static, tau_end), fn=record),
                diffrax.SubSaveAt(t1=True, fn=record),
                diffrax.SubSaveAt(t1=True),
            ]
        ),
        stepsize_controller=diffrax.PIDController(rtol=static.rtol, atol=static.atol),
        # Bisection on -ln L over the step that crossed 0: robust where the field has kinks
        # (Newton on the dense interpolant failed to converge there).
        # expand_if_necessary: under vmap the root find also runs for batch members whose
        # event did not fire (their result is discarded); a bracket check would abort all.
        event=diffrax.Event(
            separated,
            root_finder=optx.Bisection(rtol=1e-12, atol=1e-12, expand_if_necessary=True),
            direction=True,
        ),
        max_steps=static.max_steps,
        throw=False,
    )
    ended = [
        sol.result == r
        for r in (
            diffrax.RESULTS.successful,
            diffrax.RESULTS.event_occurred,
            diffrax.RESULTS.max_steps_reached,
        )
    ]
    return _SeedRun(
        records=_concatenate(sol.ys[0], sol.ys[1]),
        final=jax.tree.map(lambda leaf: leaf[0], sol.ys[2]),
        tau_final=sol.ts[2][0],
        event=ended[1],
        out_of_steps=ended[2],
        failed=~(ended[0] | ended[1] | ended[2]),
        steps=sol.stats["num_accepted_steps"],
        rejected=sol.stats["num_rejected_steps"],
    )


def _phase1_dopri(static, margin_fn, velocity_fn, unravel, degree, w0, tau_end) -> _SeedRun:
    """Phase 1 of solver="rosenbrock": _dormand_prince.integrate on the state (w, t) (one
    field evaluation in the compiled program: see that module), the records after it."""
    field = seed_field(velocity_fn)

    def flat_field(y):
        rate = field(None, SeedState(y[:-1], y[-1]), None)
        return jnp.concatenate([rate.w, rate.t[None]])

    def separated(y):
        return -jax.nn.logsumexp(-margin_fn(y[:-1]))

    y0 = jnp.concatenate([w0, jnp.zeros(1, w0.dtype)])
    save_ts = _phase1_save_ts(static, tau_end)
    out = dp.integrate(
        flat_field, separated, y0, tau_end, save_ts, static.rtol, static.atol, static.max_steps
    )
    taus = jnp.concatenate([save_ts, out.x[None]])
    reached = jnp.concatenate([out.saved, jnp.ones(1, bool)])
    # Rows not reached are recorded at y0 (finite) and then set to inf, as diffrax pads them.
    ys = jnp.where(reached[:, None], jnp.concatenate([out.ys, out.y[None]]), y0)
    record = _seed_record(margin_fn, velocity_fn, unravel, degree)
    # lax.map, not vmap: the records' velocity is compiled once, unbatched.
    records = jax.lax.map(
        lambda row: record(row[0], SeedState(row[1][:-1], row[1][-1]), None), (taus, ys)
    )
    records = jax.tree.map(
        lambda leaf: jnp.where(reached.reshape((-1,) + (1,) * (leaf.ndim - 1)), leaf, jnp.inf),
        records,
    )
    return _SeedRun(
        records=records,
        final=SeedState(out.y[:-1], out.y[-1]),
        tau_final=out.x,
        event=out.event,
        out_of_steps=out.out_of_steps,
        failed=out.failed,
        steps=out.steps,
        rejected=out.rejected,
    )


def _phase2(
    static, margin_fn, velocity_fn, unravel, degree, w1, log_t_loss1, tau1, s_end, direction_tol
):
    del margin_fn
    s0 = log_norm(w1)
    state0 = PolarState(w1 * jnp.exp(-s0), tau1, log_t_loss1)

    def record(s, state: PolarState, args):
        del args
        pol = polar_quantities(velocity_fn, degree, s, state.theta)
        log_loss, _, _ = margins_summary(degree, s, pol.q)
        return _record(
            degree,
            unravel,
            s,
            state.tau,
            state.log_t_loss - log_loss,
            pol.q,
            jnp.exp(s) * pol.theta,
            2,
            2.0 * s - pol.log_dtau_ds,
            jnp.ones_like(s),
        )

    def converged(t, y, args, **kwargs):
        del args, kwargs
        pol = polar_quantities(velocity_fn, degree, t, y.theta)
        return jnp.linalg.norm(pol.dtheta_ds) - direction_tol

    event = None
    if static.stop_on_direction:
        event = diffrax.Event(converged, root_finder=None, direction=False)
    save_ss = jnp.linspace(s0, s_end, static.saves_phase2)
    solution = diffrax.diffeqsolve(
        diffrax.ODETerm(polar_field(velocity_fn, degree)),
        SOLVERS[static.solver](),
        s0,
        s_end,
        None,
        state0,
        saveat=diffrax.SaveAt(subs=[diffrax.SubSaveAt(ts=save_ss, fn=record)]),
        stepsize_controller=diffrax.PIDController(rtol=static.rtol, atol=static.atol),
        event=event,
        max_steps=static.max_steps,
        throw=False,
    )
    return solution, s0


class _WMethod(NamedTuple):
    """Phase 2's W-method integration (solver="rosenbrock") and where it started."""

    run: ros.Integration
    s0: jax.Array


class _Rows(NamedTuple):
    """Phase 2's saved rows with its outcome code and step counts."""

    records: S.FlowSolution
    code: jax.Array
    steps: jax.Array
    rejected: jax.Array
    s0: jax.Array


def _w_method(static, predictor, unravel, X, y, phase1: _Phase1, direction_tol) -> _WMethod:
    """Phase 2 on the linearly implicit integrator, up to the switch to the limit flow."""
    degree = predictor.degree
    margins_and_grads = per_example_margins(predictor, unravel, X, y)
    w1 = phase1.w1
    geometry = kink_geometry(predictor, unravel, X, y, w1)
    clock = ros.Clock(True, degree)
    # ROS34PW2 where kinks make a step's start dear (its kink step, ~45% of a ROS2 attempt on the
    # reference problem, L = 3, is shared by the stages): measured there to beta = 1e6, 975
    # accepted steps and 41.7 s instead of 1972 and 53.3 s (same start; ROS2's steps were ~85%
    # set by its error test). ROS2 for the smooth models: on diagonal nets ROS34PW2's steps
    # collapse from beta ~ 7e7 (the minimum-margin examples swap within a step) and its last
    # point before the stall left gamma~ 5e-5 low (issue 5's note, 2026-11-29).
    options = ros.RosenbrockOptions(
        tol=static.rtol, method="ros2" if geometry is None else "ros34pw2"
    )
    s0 = log_norm(w1)
    theta0 = w1 * jnp.exp(-s0)
    # A run that starts separated sets its clock t at the quasi-steady value (see there).
    log_t_loss0 = jnp.where(
        phase1.start_separated,
        ros.quasi_steady_log_t_loss(clock, margins_and_grads, s0, theta0),
        phase1.log_t_loss1,
    )
    # Phase 2 switches to the beta -> infinity limit flow (_limit.py) at limit_beta, or earlier,
    # from beta = 1e8 on, where the W-method's steps stall (its linearised softmax then flips
    # between minimum-margin examples within a step: diagonal nets at beta ~ 2e8).
    branch_margins_and_grads = per_example_margins(predictor, unravel, X, y, branch=True)
    use_limit = static.limit_beta is not None
    s_switch = math.log(static.limit_beta) / degree if use_limit else math.inf
    stall = (
        (min(math.log(_STALL_BETA), math.log(static.limit_beta)) / degree, _STALL_STEP)
        if use_limit
        else None
    )
    run = ros.integrate(
        clock,
        lambda w: margins_and_grads(w, None)[0],
        margins_and_grads,
        geometry,
        options,
        s0,
        theta0,
        jnp.stack([phase1.tau1, log_t_loss0]),
        jnp.minimum(phase1.s_end, s_switch),
        _save_ss(static, s0, phase1.s_end),
        static.max_steps,
        direction_tol=direction_tol,
        branch_margins_and_grads=branch_margins_and_grads,
        stall=stall,
    )
    return _WMethod(run, s0)


def _save_ss(static, s0, s_end):
    return jnp.linspace(s0, s_end, static.saves_phase2)


def _continues_in_limit(w: _WMethod, s_end):
    run = w.run
    return ((run.outcome == ros.REACHED_END) | (run.outcome == ros.STALLED)) & (s_end > run.x)


def _rosenbrock_rows(
    static, predictor, unravel, X, y, phase1: _Phase1, w: _WMethod, limit: ros.Integration | None
) -> _Rows:
    """Phase 2's rows from the W-method and the limit flow, in the diffrax path's layout."""
    degree = predictor.degree
    margins_and_grads = per_example_margins(predictor, unravel, X, y)

    def margins(w):
        return margins_and_grads(w, None)[0]

    clock = ros.Clock(True, degree)
    out = w.run
    outcome, steps, rejected = out.outcome, out.steps, out.rejected
    if limit is not None:
        go_on = _continues_in_limit(w, phase1.s_end)
        outcome = jnp.where(go_on, limit.outcome, out.outcome)
        steps, rejected = steps + limit.steps, rejected + limit.rejected
        out = _merge_rows(out, limit, go_on)

    def record(s, theta, aux, saved):
        q = margins(theta)
        log_loss, _, _ = margins_summary(degree, s, q)
        log_dtau_ds = ros.log_clock_rate(clock, margins, s, theta)
        row = _record(
            degree,
            unravel,
            s,
            aux[0],
            aux[1] - log_loss,
            q,
            jnp.exp(s) * theta,
            2,
            2.0 * s - log_dtau_ds,
            jnp.ones_like(s),
        )
        # Unused rows are inf, as diffrax pads them.
        return jax.tree.map(lambda leaf: jnp.where(saved, leaf, jnp.inf), row)

    records = jax.vmap(record)(out.xs, out.ys, out.auxs, out.saved)
    code = jnp.select(
        [outcome == k for k in _OUTCOME_CODES], list(_OUTCOME_CODES.values()), S.SOLVER_FAILED
    )
    return _Rows(records, code, steps, rejected, w.s0)


def _merge_rows(finite_beta, limit, use_limit):
    """The saved rows of both integrations in order of s (one more row than the save grid: the
    switch point is off the grid); the limit flow's count only where it ran."""
    saved = jnp.concatenate([finite_beta.saved, limit.saved & use_limit])
    xs = jnp.concatenate([finite_beta.xs, limit.xs])
    order = jnp.argsort(jnp.where(saved, xs, jnp.inf))[: finite_beta.xs.shape[0] + 1]

    def pick(a, b):
        return jnp.concatenate([a, b])[order]

    return finite_beta._replace(
        xs=xs[order],
        ys=pick(finite_beta.ys, limit.ys),
        auxs=pick(finite_beta.auxs, limit.auxs),
        saved=saved[order],
    )


def _concatenate(first, second):
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b]), first, second)


# --------------------------------------------------------------------------- the stages
# A run is a chain of stages, each a pure function of the static config, the data and the
# earlier stages' outputs: phase 1; phase 2 (diffrax, or the W-method); the limit flow (solver
# "rosenbrock" with a switch); the rows and status. _solve jits the whole chain as one program
# (the batched and sharded paths vmap it); gradient_flow compiles the stages as separate
# programs, the later ones while the earlier ones run (_pipeline.py).


def _stage_phase1(static: _Static, params0, X, y, tau_max, s_target) -> _Phase1:
    predictor = static.predictor
    degree = predictor.degree
    w0, unravel = ravel_pytree(params0)
    margin_fn = make_margin_fn(predictor, unravel, X, y)
    velocity_fn = make_velocity(predictor, unravel, X, y, static.sliding)

    # A run that starts separated skips phase 1 (a dummy solve over tau in [0, 1e-300] keeps
    # the shapes; its rows are marked invalid). Its clock t starts at the offset dt/ds(s0) x 1
    # (the time origin is a convention; a zero start would make ln t = -inf and the ln(t L)
    # equation singular), so ln t is finite from the first saved point.
    start_separated = jax.nn.logsumexp(-margin_fn(w0)) < 0
    tau_end = jnp.where(start_separated, 1e-300, tau_max)
    phase1 = _phase1_dopri if static.solver == ROSENBROCK else _phase1_diffrax
    run = phase1(static, margin_fn, velocity_fn, unravel, degree, w0, tau_end)
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
    # Phase 2 runs from s0 to s_target. A run that did not separate, or that separated beyond
    # the target already, gets a dummy phase 2 (diffrax needs increasing save times) whose
    # rows are marked invalid.
    run_phase2 = separated & (s_target > s1)
    s_end = jnp.where(run_phase2, s_target, s1 + 1e-9 * (1.0 + jnp.abs(s1)))
    return _Phase1(
        records=run.records,
        steps=run.steps,
        rejected=run.rejected,
        out_of_steps=run.out_of_steps,
        failed=run.failed,
        start_separated=start_separated,
        separated=separated,
        w1=w1,
        tau1=tau1,
        log_t_loss1=log_t_loss1,
        run_phase2=run_phase2,
        s_end=s_end,
    )


def _stage_phase2(static: _Static, params0, X, y, phase1: _Phase1, direction_tol):
    """Phase 2: its rows (diffrax), or the W-method's integration (rosenbrock)."""
    predictor = static.predictor
    _, unravel = ravel_pytree(params0)
    if static.solver == ROSENBROCK:
        return _w_method(static, predictor, unravel, X, y, phase1, direction_tol)
    margin_fn = make_margin_fn(predictor, unravel, X, y)
    velocity_fn = make_velocity(predictor, unravel, X, y, static.sliding)
    sol2, s0 = _phase2(
        static,
        margin_fn,
        velocity_fn,
        unravel,
        predictor.degree,
        phase1.w1,
        phase1.log_t_loss1,
        phase1.tau1,
        phase1.s_end,
        direction_tol,
    )
    code = jnp.select(
        [
            sol2.result == diffrax.RESULTS.event_occurred,
            sol2.result == diffrax.RESULTS.max_steps_reached,
            sol2.result == diffrax.RESULTS.successful,
        ],
        [S.DIRECTION_CONVERGED, S.MAX_STEPS, S.REACHED_TARGET],
        S.SOLVER_FAILED,
    )
    return _Rows(
        sol2.ys[0], code, sol2.stats["num_accepted_steps"], sol2.stats["num_rejected_steps"], s0
    )


def _has_limit_stage(static: _Static):
    return static.solver == ROSENBROCK and static.limit_beta is not None


def _stage_limit(
    static: _Static, params0, X, y, phase1: _Phase1, phase2: _WMethod, direction_tol
) -> ros.Integration:
    """Phase 2 from the W-method's end on the beta -> infinity limit flow (a run of no steps
    where the W-method did not hand over)."""
    predictor = static.predictor
    _, unravel = ravel_pytree(params0)
    geometry = kink_geometry(predictor, unravel, X, y, phase1.w1)
    run, s_end = phase2.run, phase1.s_end
    go_on = _continues_in_limit(phase2, s_end)
    # With kinks the limit flow freezes the activation pattern within a step (branch values).
    limit_margins = per_example_margins(predictor, unravel, X, y, branch=geometry is not None)
    return lim.integrate(
        limit_margins,
        predictor.degree,
        lim.LimitOptions(tol=static.rtol),
        run.x,
        run.y,
        run.aux[0],
        jnp.where(go_on, s_end, run.x),
        _save_ss(static, phase2.s0, s_end),
        jnp.maximum(static.max_steps - run.steps - run.rejected, 1),
        direction_tol,
        geometry,
    )


def _stage_rows(static: _Static, params0, X, y, phase1: _Phase1, phase2, limit):
    """The saved rows of both phases, valid flags and the status."""
    predictor = static.predictor
    _, unravel = ravel_pytree(params0)
    margin_fn = make_margin_fn(predictor, unravel, X, y)
    start_separated, separated, run_phase2 = (
        phase1.start_separated,
        phase1.separated,
        phase1.run_phase2,
    )
    log_t_loss1 = phase1.log_t_loss1
    if static.solver == ROSENBROCK:
        rows2 = _rosenbrock_rows(static, predictor, unravel, X, y, phase1, phase2, limit)
        log_t_loss1 = jnp.where(
            start_separated, rows2.records.log_t[0] + rows2.records.log_loss[0], log_t_loss1
        )
    else:
        rows2 = phase2

    records = _concatenate(phase1.records, rows2.records)
    in_phase2 = jnp.arange(records.s.shape[0]) >= static.saves_phase1
    valid = (
        jnp.isfinite(records.s)
        & jnp.isfinite(records.tau)
        & jnp.where(in_phase2, run_phase2, ~start_separated)
    )
    records = records._replace(valid=valid, phase=jnp.where(valid, records.phase, 0).astype(int))
    finite = jnp.all(
        jnp.stack([jnp.isfinite(records.soft_margin), jnp.isfinite(records.log_t)])
        | ~records.valid[None]
    )
    code = jnp.select(
        [
            ~separated & phase1.out_of_steps,
            ~separated & phase1.failed,
            ~separated,
            ~finite,
            ~run_phase2,
        ],
        [S.MAX_STEPS, S.SOLVER_FAILED, S.NOT_SEPARATED, S.SOLVER_FAILED, S.REACHED_TARGET],
        rows2.code,
    )
    valid_soft = jnp.where(records.valid, records.soft_margin, -jnp.inf)
    status = S.FlowStatus(
        code=code,
        separated=separated,
        steps=jnp.stack([phase1.steps, rows2.steps]),
        rejected_steps=jnp.stack([phase1.rejected, rows2.rejected]),
        tau0=jnp.where(separated, phase1.tau1, jnp.nan),
        s0=jnp.where(separated, rows2.s0, jnp.nan),
        log_t0=jnp.where(separated, log_t_loss1 - jax.nn.logsumexp(-margin_fn(phase1.w1)), jnp.nan),
        best_soft_margin=jnp.max(valid_soft),
    )
    return records._replace(status=status)


def _chain(static: _Static, call, params0, X, y, tau_max, s_target, direction_tol):
    """The stages in order, each run as call(stage, *args): stage(static, *args) directly, or
    its compiled program (_pipeline.run)."""
    data = (params0, X, y)
    phase1 = call(_stage_phase1, *data, tau_max, s_target)
    phase2 = call(_stage_phase2, *data, phase1, direction_tol)
    limit = None
    if _has_limit_stage(static):
        limit = call(_stage_limit, *data, phase1, phase2, direction_tol)
    return call(_stage_rows, *data, phase1, phase2, limit)


@functools.partial(jax.jit, static_argnums=0)
def _solve(static: _Static, params0, X, y, tau_max, s_target, direction_tol):
    """The whole run as one program (vmapped by gradient_flow_batch and the sweep)."""
    return _chain(
        static,
        lambda stage, *args: stage(static, *args),
        params0,
        X,
        y,
        tau_max,
        s_target,
        direction_tol,
    )


# --------------------------------------------------------------------------- public API


def _prepare(predictor, params0, X, y, beta_max, s_max, tau_max, batched):
    if beta_max is None and s_max is None:
        raise ValueError("give a target: beta_max (for beta = ||w||^L) or s_max (for ln ||w||)")
    if beta_max is not None and not (beta_max > 0 and math.isfinite(beta_max)):
        raise ValueError(f"beta_max must be positive and finite, got {beta_max}")
    if not tau_max > 0:
        raise ValueError(f"tau_max must be positive, got {tau_max}")
    example = jax.tree.map(lambda leaf: leaf[0], params0) if batched else params0
    predictor, _, X, y = check_all(predictor, example, X, y)
    targets = []
    if beta_max is not None:
        targets.append(math.log(beta_max) / predictor.degree)
    if s_max is not None:
        targets.append(float(s_max))
    return predictor, X, y, min(targets)


def _check_not_rest_point(predictor, params0, batched):
    leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(params0)]
    if batched:
        norms2 = sum(np.sum(leaf.reshape(leaf.shape[0], -1) ** 2, axis=1) for leaf in leaves)
    else:
        norms2 = sum(np.sum(leaf**2) for leaf in leaves)
    if np.any(np.asarray(norms2) == 0.0) and predictor.degree >= 2:
        raise ValueError(
            f"params0 = 0 is a rest point of the flow for degree L = {predictor.degree} >= 2"
            " (every gradient vanishes there): start from a small random w(0) instead"
        )


def gradient_flow(
    predictor,
    params0,
    X,
    y,
    *,
    beta_max: float | None = None,
    s_max: float | None = None,
    tau_max: float = 1e4,
    max_steps: int = 100_000,
    direction_tol: float | None = None,
    num_saves: int = 200,
    solver: str = "tsit5",
    rtol: float = 1e-8,
    atol: float = 1e-10,
    sliding: SlidingOptions | None = SlidingOptions(),
    limit_beta: float | str | None = "auto",
) -> S.FlowSolution:
    """Integrate dw/dtau in -d ln sum_i exp(-m_i(w)) from params0, through t0, to a target.

    Args:
        predictor: an L-homogeneous Predictor.
        params0: initial params; params0 = 0 is allowed only for L = 1.
        X, y: the data, y in {-1, +1}.
        beta_max: stop when beta = ||w||^L reaches this.
        s_max: stop when s = ln ||w|| reaches this (the smaller target wins).
        tau_max: phase-1 budget in the seed's clock tau.
        max_steps: solver-step budget of each phase.
        direction_tol: stop when ||dtheta/ds|| < direction_tol (direction converged).
        num_saves: saved points, 1/4 in phase 1 (log-spaced tau), 3/4 in phase 2 (even in s).
        solver: a diffrax explicit solver name: "tsit5", "dopri5", "dopri8", "bosh3", "heun";
            or "rosenbrock": phase 2 on the linearly implicit Rosenbrock-W integrator of
            _rosenbrock.py (stiff part implicit, kinks as constraints), the one that reaches
            the asymptotic regime (beta >> 1e6); phase 1 then uses Dormand-Prince 5(4)
            (_dormand_prince.py) with the same rtol, atol.
        rtol, atol: PID step-size controller tolerances (rosenbrock: rtol is its local error
            tolerance).
        sliding: how ReLU kinks are handled (a SlidingOptions, see _sliding.py: the Filippov
            equivalent control on sliding kinks), or None for the plain autodiff element.
        limit_beta: solver="rosenbrock": from beta = limit_beta on, phase 2 follows the
            beta -> infinity limit flow (_limit.py: the min-norm point of the minimum-margin
            examples' Clarke gradients, an active-set flow, with sliding ReLU kinks as
            constraints; O(1/beta) from the flow at finite beta, no upper limit on beta), or
            from beta = 1e8 on if the W-method's steps stall there. "auto": 1e10 for models
            without kinks, 1e6 for ReLU-type models (where the W-method's steps shrink past
            ~1e6: 10^7.9 in 97 s on the reference problem, L = 2). None: the W-method all the
            way.

    Returns:
        A FlowSolution trimmed to its valid rows; `status` says how the run ended.
    """
    predictor, X, y, s_target = _prepare(predictor, params0, X, y, beta_max, s_max, tau_max, False)
    _check_not_rest_point(predictor, params0, batched=False)
    static = _static(
        predictor,
        num_saves,
        max_steps,
        solver,
        rtol,
        atol,
        direction_tol,
        sliding,
        limit_beta,
        s_target,
    )
    params0 = tuple(jnp.asarray(leaf, jnp.float64) for leaf in params0)
    out = _pipeline.run(
        static,
        functools.partial(_chain, static),
        params0,
        X,
        y,
        tau_max,
        s_target,
        _tol(direction_tol),
    )
    keep = np.asarray(out.valid)
    rows = jax.tree.map(lambda a: a[keep], out._replace(status=None))
    return rows._replace(status=out.status)


def gradient_flow_batch(predictor, params0, X, y, **options) -> S.FlowSolution:
    """gradient_flow vmapped over a leading axis of params0 (seeds); one compilation per shape.

    Rows are not trimmed: `valid` marks the saved points of each run.
    """
    beta_max, s_max = options.pop("beta_max", None), options.pop("s_max", None)
    tau_max = options.pop("tau_max", 1e4)
    predictor, X, y, s_target = _prepare(predictor, params0, X, y, beta_max, s_max, tau_max, True)
    _check_not_rest_point(predictor, params0, batched=True)
    direction_tol = options.pop("direction_tol", None)
    static = static_from_options(predictor, options, direction_tol, s_target)
    params0 = tuple(jnp.asarray(leaf, jnp.float64) for leaf in params0)
    solve = jax.vmap(_solve, in_axes=(None, 0, None, None, None, None, None))
    return solve(static, params0, X, y, tau_max, s_target, _tol(direction_tol))


def static_from_options(predictor, options: dict, direction_tol, s_target) -> _Static:
    """The static config from gradient_flow_batch-style keyword options (consumed); the same
    defaults as gradient_flow. Unknown options raise a TypeError."""
    static = _static(
        predictor,
        options.pop("num_saves", 200),
        options.pop("max_steps", 100_000),
        options.pop("solver", "tsit5"),
        options.pop("rtol", 1e-8),
        options.pop("atol", 1e-10),
        direction_tol,
        options.pop("sliding", SlidingOptions()),
        options.pop("limit_beta", "auto"),
        s_target,
    )
    if options:
        raise TypeError(f"unknown options {sorted(options)}")
    return static


def _tol(direction_tol):
    return jnp.asarray(0.0 if direction_tol is None else direction_tol, jnp.float64)


def _static(
    predictor,
    num_saves,
    max_steps,
    solver,
    rtol,
    atol,
    direction_tol,
    sliding,
    limit_beta,
    s_target,
):
    if solver not in SOLVERS and solver != ROSENBROCK:
        raise ValueError(f"solver must be one of {sorted(SOLVERS) + [ROSENBROCK]}, got {solver!r}")
    if num_saves < 8:
        raise ValueError(f"num_saves must be at least 8, got {num_saves}")
    if max_steps < 1:
        raise ValueError(f"max_steps must be positive, got {max_steps}")
    if limit_beta == "auto":
        limit_beta = _AUTO_LIMIT_BETA_KINKS if predictor.kinks is not None else _AUTO_LIMIT_BETA
    if limit_beta is not None and not (
        isinstance(limit_beta, (int, float)) and 1e6 <= limit_beta < math.inf
    ):
        # Below ~1e6 the O(1/beta) error of the limit flow is no longer negligible (and its
        # quasi-steady clock ln(t L) assumes d(-ln L)/ds >> 1).
        raise ValueError(
            f'limit_beta must be "auto", None or a finite number >= 1e6, got {limit_beta!r}'
        )
    if solver != ROSENBROCK or (
        limit_beta is not None
        and predictor.degree * s_target <= math.log(min(limit_beta, _STALL_BETA))
    ):
        # No limit flow for this solver or model, or the target is below any switch: leave it
        # out of the compiled program (and out of the static key, so runs to other targets
        # share one compilation).
        limit_beta = None
    phase1 = max(num_saves // 4, 2)
    return _Static(
        predictor,
        phase1,
        num_saves - phase1,
        int(max_steps),
        solver,
        float(rtol),
        float(atol),
        direction_tol is not None,
        sliding,
        None if limit_beta is None else float(limit_beta),
    )
