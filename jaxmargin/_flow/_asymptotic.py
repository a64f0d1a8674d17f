"""The asymptotic chain: phase 1 to t0, the stiff stage, the beta -> infinity limit flow, rows.

Each stage is a pure function stage(static, *arrays) of the static config, the data and the
earlier stages' outputs; `chain` runs them through `call` (directly under one jit, or as
separate programs compiled ahead: _pipeline.py). The stiff stage hands over to the limit flow
at limit_beta, or from beta = STALL_BETA on where its steps stall; the limit-flow stage is left
out of the program when the run cannot reach either.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from .._margins import log_norm
from . import _clocks as clocks
from . import _limit_stage as limit_stage
from . import _records as records
from . import _stiff_stage as stiff_stage
from ._fields import margins_summary
from ._kink_geometry import kink_geometry, per_example_margins
from ._limit_field import LimitOptions
from ._options import STALL_BETA, STALL_STEP, StaticConfig
from ._phase1 import Phase1, integrate_seed, kinked_integrator, phase1
from ._rows import Rows, finish, status_of
from ._stepping import Integration, Outcome


class StiffRun(NamedTuple):
    """The stiff stage's integration and where it started."""

    run: Integration
    s0: jax.Array


def _save_ss(static: StaticConfig, s0, s_end):
    return jnp.linspace(s0, s_end, static.saves_phase2)


def _continues_in_limit(stiff: StiffRun, s_end):
    run = stiff.run
    return ((run.outcome == Outcome.REACHED_END) | (run.outcome == Outcome.STALLED)) & (
        s_end > run.x
    )


def stage_phase1(static: StaticConfig, params0, X, y, tau_max, s_target) -> Phase1:
    """Phase 1 to t0; on ReLU-type models with the activation pattern frozen per step and kink
    crossings landed on (docs/decisions.md D54), unless sliding=None asks for autodiff's element.
    (The records' velocity there is autodiff's: they use only <w, velocity>, the same for every
    Clarke element by Euler's identity.)"""
    if static.predictor.kinks is None or static.sliding is None:
        return phase1(static, integrate_seed, params0, X, y, tau_max, s_target, static.sliding)
    return phase1(static, kinked_integrator(X, y), params0, X, y, tau_max, s_target, None)


def stage_stiff(static: StaticConfig, params0, X, y, phase1: Phase1, direction_tol) -> StiffRun:
    """The polar flow from t0 by Rosenbrock-W steps, up to the switch to the limit flow."""
    predictor = static.predictor
    degree = predictor.degree
    _, unravel = ravel_pytree(params0)
    margins_and_grads = per_example_margins(predictor, unravel, X, y)
    geometry = kink_geometry(predictor, unravel, X, y, phase1.w1)
    # ROS34PW2 where kinks make a step's start dear (it is shared by the stages), ROS2 for the
    # smooth models, where ROS34PW2's steps collapse earlier (docs/decisions.md D20).
    options = stiff_stage.StiffOptions(
        tol=static.rtol,
        candidates=static.kink_slots,
        method="ros2" if geometry is None else "ros34pw2",
    )
    s0 = log_norm(phase1.w1)
    theta0 = phase1.w1 * jnp.exp(-s0)
    # A run that starts separated sets its clock t at the quasi-steady value (see there).
    log_t_loss0 = jnp.where(
        phase1.start_separated,
        clocks.separated_start_log_t_loss(degree, margins_and_grads, s0, theta0),
        phase1.log_t_loss1,
    )
    use_limit = static.limit_beta is not None
    s_switch = math.log(static.limit_beta) / degree if use_limit else math.inf
    stall = None
    if use_limit:
        stall = (min(math.log(STALL_BETA), math.log(static.limit_beta)) / degree, STALL_STEP)
    run = stiff_stage.integrate(
        margins_and_grads,
        degree,
        geometry,
        options,
        s0,
        theta0,
        jnp.stack([phase1.tau1, log_t_loss0]),
        jnp.minimum(phase1.s_end, s_switch),
        _save_ss(static, s0, phase1.s_end),
        static.max_steps,
        direction_tol=direction_tol,
        stage_fields=per_example_margins(predictor, unravel, X, y, branch=True),
        stall=stall,
    )
    return StiffRun(run, s0)


def stage_limit(
    static: StaticConfig, params0, X, y, phase1: Phase1, stiff: StiffRun, direction_tol
) -> Integration:
    """The limit flow from the stiff stage's end (a run of no steps where it did not hand
    over)."""
    predictor = static.predictor
    _, unravel = ravel_pytree(params0)
    geometry = kink_geometry(predictor, unravel, X, y, phase1.w1)
    run, s_end = stiff.run, phase1.s_end
    go_on = _continues_in_limit(stiff, s_end)
    # With kinks the limit flow freezes the activation pattern within a step (branch values).
    limit_margins = per_example_margins(predictor, unravel, X, y, branch=geometry is not None)
    return limit_stage.integrate(
        limit_margins,
        predictor.degree,
        LimitOptions(tol=static.rtol, candidates=static.limit_kink_slots),
        run.x,
        run.y,
        run.aux[0],
        jnp.where(go_on, s_end, run.x),
        _save_ss(static, stiff.s0, s_end),
        jnp.maximum(static.max_steps - run.steps - run.rejected, 1),
        direction_tol=direction_tol,
        geometry=geometry,
        finite_beta_rows=True,
    )


def _merge(finite_beta: Integration, limit: Integration, use_limit) -> Integration:
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


def _rows(static, unravel, X, y, phase1: Phase1, stiff: StiffRun, limit) -> Rows:
    """The rows after t0 from the stiff stage and the limit flow."""
    degree = static.predictor.degree
    margins_and_grads = per_example_margins(static.predictor, unravel, X, y)

    def margins(w):
        return margins_and_grads(w, None)[0]

    out = stiff.run
    outcome, steps, rejected = out.outcome, out.steps, out.rejected
    s_limit, limit_steps = jnp.full((), jnp.nan, out.x.dtype), jnp.zeros_like(steps)
    if limit is not None:
        go_on = _continues_in_limit(stiff, phase1.s_end)
        outcome = jnp.where(go_on, limit.outcome, out.outcome)
        steps, rejected = steps + limit.steps, rejected + limit.rejected
        s_limit = jnp.where(go_on, out.x, s_limit)
        limit_steps = jnp.where(go_on, limit.steps, limit_steps)
        out = _merge(out, limit, go_on)

    def row(s, theta, aux):
        q = margins(theta)
        log_loss, _, _ = margins_summary(degree, s, q)
        log_dtau_ds = clocks.clock_exponents(degree, margins, s, theta)[0]
        return records.record(
            degree,
            unravel,
            s,
            aux[0],
            aux[1] - log_loss,
            q,
            jnp.exp(s) * theta,
            theta,
            2,
            2.0 * s - log_dtau_ds,
            jnp.ones_like(s),
        )

    # Unused rows are inf, as the explicit chain pads them.
    rows = records.blank_unsaved(jax.vmap(row)(out.xs, out.ys, out.auxs), out.saved)
    return Rows(rows, status_of(outcome), steps, rejected, stiff.s0, s_limit, limit_steps)


def stage_rows(static: StaticConfig, params0, X, y, phase1: Phase1, stiff: StiffRun, limit):
    _, unravel = ravel_pytree(params0)
    rows2 = _rows(static, unravel, X, y, phase1, stiff, limit)
    log_t_loss1 = jnp.where(
        phase1.start_separated,
        rows2.records.log_t[0] + rows2.records.log_loss[0],
        phase1.log_t_loss1,
    )
    return finish(static, params0, X, y, phase1, rows2, log_t_loss1)


def chain(static: StaticConfig, call, params0, X, y, tau_max, s_target, direction_tol):
    """The stages in order, each run as call(stage, *args) (see _pipeline.py)."""
    data = (params0, X, y)
    first = call(stage_phase1, *data, tau_max, s_target)
    stiff = call(stage_stiff, *data, first, direction_tol)
    limit = None
    if static.limit_beta is not None:
        limit = call(stage_limit, *data, first, stiff, direction_tol)
    return call(stage_rows, *data, first, stiff, limit)
