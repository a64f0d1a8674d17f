"""The explicit chain: phase 1 and the polar flow on diffrax's explicit solvers (reference runs).

These solvers reach beta ~ 1e3-1e6 at most: the polar field is stiff, its stiffness ~ beta
(docs/background.md §3). They are kept as independent references for the asymptotic engine.
"""

from __future__ import annotations

import diffrax
import jax
import jax.numpy as jnp
import optimistix as optx
from jax.flatten_util import ravel_pytree

from .._margins import log_norm
from . import _records as records
from . import _solution as solution
from ._fields import (
    PolarState,
    SeedState,
    margins_summary,
    polar_field,
    polar_quantities,
    seed_field,
)
from ._phase1 import Phase1, SeedRun, phase1
from ._rows import Rows, finish
from ._sliding import make_velocity

SOLVERS = {
    "tsit5": diffrax.Tsit5,
    "dopri8": diffrax.Dopri8,
    "dopri5": diffrax.Dopri5,
    "heun": diffrax.Heun,
    "bosh3": diffrax.Bosh3,
}


def integrate_seed(static, margin_fn, velocity_fn, unravel, degree, w0, tau_end) -> SeedRun:
    """Phase 1 by diffeqsolve with an event at t0 and the rows as function saves."""
    seed_record = records.seed_recorder(margin_fn, velocity_fn, unravel, degree)

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
                diffrax.SubSaveAt(
                    ts=records.phase1_save_taus(static.saves_phase1, tau_end), fn=seed_record
                ),
                diffrax.SubSaveAt(t1=True, fn=seed_record),
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
    return SeedRun(
        records=records.concatenate(sol.ys[0], sol.ys[1]),
        final=jax.tree.map(lambda leaf: leaf[0], sol.ys[2]),
        tau_final=sol.ts[2][0],
        event=ended[1],
        out_of_steps=ended[2],
        failed=~(ended[0] | ended[1] | ended[2]),
        steps=sol.stats["num_accepted_steps"],
        rejected=sol.stats["num_rejected_steps"],
    )


def stage_phase1(static, params0, X, y, tau_max, s_target) -> Phase1:
    return phase1(static, integrate_seed, params0, X, y, tau_max, s_target, static.sliding)


def stage_polar(static, params0, X, y, phase1: Phase1, direction_tol) -> Rows:
    """The polar flow from t0 by diffeqsolve, its rows saved evenly in s."""
    predictor = static.predictor
    degree = predictor.degree
    _, unravel = ravel_pytree(params0)
    velocity_fn = make_velocity(predictor, unravel, X, y, static.sliding)
    s0 = log_norm(phase1.w1)
    state0 = PolarState(phase1.w1 * jnp.exp(-s0), phase1.tau1, phase1.log_t_loss1)

    def polar_record(s, state: PolarState, args):
        del args
        pol = polar_quantities(velocity_fn, degree, s, state.theta)
        log_loss, _, _ = margins_summary(degree, s, pol.q)
        return records.record(
            degree,
            unravel,
            s,
            state.tau,
            state.log_t_loss - log_loss,
            pol.q,
            jnp.exp(s) * pol.theta,
            pol.theta,
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
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(polar_field(velocity_fn, degree)),
        SOLVERS[static.solver](),
        s0,
        phase1.s_end,
        None,
        state0,
        saveat=diffrax.SaveAt(
            subs=[
                diffrax.SubSaveAt(
                    ts=jnp.linspace(s0, phase1.s_end, static.saves_phase2), fn=polar_record
                )
            ]
        ),
        stepsize_controller=diffrax.PIDController(rtol=static.rtol, atol=static.atol),
        event=event,
        max_steps=static.max_steps,
        throw=False,
    )
    code = jnp.select(
        [
            sol.result == diffrax.RESULTS.event_occurred,
            sol.result == diffrax.RESULTS.max_steps_reached,
            sol.result == diffrax.RESULTS.successful,
        ],
        [solution.DIRECTION_CONVERGED, solution.MAX_STEPS, solution.REACHED_TARGET],
        solution.SOLVER_FAILED,
    )
    steps = sol.stats["num_accepted_steps"]
    nan, zero = jnp.full((), jnp.nan, s0.dtype), jnp.zeros((), steps.dtype)
    return Rows(sol.ys[0], code, steps, sol.stats["num_rejected_steps"], s0, nan, zero)


def stage_rows(static, params0, X, y, phase1: Phase1, rows2: Rows):
    return finish(static, params0, X, y, phase1, rows2, phase1.log_t_loss1)


def chain(static, call, params0, X, y, tau_max, s_target, direction_tol):
    """The stages in order, each run as call(stage, *args) (see _pipeline.py)."""
    data = (params0, X, y)
    first = call(stage_phase1, *data, tau_max, s_target)
    rows2 = call(stage_polar, *data, first, direction_tol)
    return call(stage_rows, *data, first, rows2)
