"""The last stage: both phases' saved rows in one FlowSolution, valid flags and the status."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from . import _records as records
from . import _solution as solution
from ._fields import make_margin_fn
from ._phase1 import Phase1
from ._stepping import Outcome

# The integrators' outcomes as the public status codes.
STATUS_OF_OUTCOME = {
    Outcome.REACHED_END: solution.REACHED_TARGET,
    Outcome.CONVERGED: solution.DIRECTION_CONVERGED,
    Outcome.OUT_OF_STEPS: solution.MAX_STEPS,
    Outcome.FAILED: solution.SOLVER_FAILED,
    Outcome.KINK_OVERFLOW: solution.TOO_MANY_KINKS,
}


def status_of(outcome):
    """The public status code of an integrator's outcome (SOLVER_FAILED for any other)."""
    return jnp.select(
        [outcome == k for k in STATUS_OF_OUTCOME],
        list(STATUS_OF_OUTCOME.values()),
        solution.SOLVER_FAILED,
    )


class Rows(NamedTuple):
    """The run after t0: its saved rows with its status code and step counts."""

    records: solution.FlowSolution
    code: jax.Array
    steps: jax.Array
    rejected: jax.Array
    s0: jax.Array
    s_limit: jax.Array  # where the limit flow took over (nan: it did not)
    limit_steps: jax.Array


def finish(static, params0, X, y, phase1: Phase1, rows2: Rows, log_t_loss1):
    """The saved rows of both phases, valid flags and the status."""
    _, unravel = ravel_pytree(params0)
    margin_fn = make_margin_fn(static.predictor, unravel, X, y)
    start_separated, separated = phase1.start_separated, phase1.separated
    run_phase2 = phase1.run_phase2

    rows = records.concatenate(phase1.records, rows2.records)
    in_phase2 = jnp.arange(rows.s.shape[0]) >= static.saves_phase1
    valid = (
        jnp.isfinite(rows.s)
        & jnp.isfinite(rows.tau)
        & jnp.where(in_phase2, run_phase2, ~start_separated)
    )
    rows = rows._replace(valid=valid, phase=jnp.where(valid, rows.phase, 0).astype(int))
    finite = jnp.all(
        jnp.stack([jnp.isfinite(rows.soft_margin), jnp.isfinite(rows.log_t)]) | ~rows.valid[None]
    )
    code = jnp.select(
        [
            ~separated & phase1.out_of_steps,
            ~separated & phase1.failed,
            ~separated & phase1.kink_overflow,
            ~separated,
            ~finite,
            ~run_phase2,
        ],
        [
            solution.MAX_STEPS,
            solution.SOLVER_FAILED,
            solution.TOO_MANY_KINKS,
            solution.NOT_SEPARATED,
            solution.SOLVER_FAILED,
            solution.REACHED_TARGET,
        ],
        rows2.code,
    )
    valid_soft = jnp.where(rows.valid, rows.soft_margin, -jnp.inf)
    status = solution.FlowStatus(
        code=code,
        separated=separated,
        steps=jnp.stack([phase1.steps, rows2.steps]),
        rejected_steps=jnp.stack([phase1.rejected, rows2.rejected]),
        tau0=jnp.where(separated, phase1.tau1, jnp.nan),
        s0=jnp.where(separated, rows2.s0, jnp.nan),
        log_t0=jnp.where(separated, log_t_loss1 - jax.nn.logsumexp(-margin_fn(phase1.w1)), jnp.nan),
        best_soft_margin=jnp.max(valid_soft),
        s_limit=jnp.where(separated & run_phase2, rows2.s_limit, jnp.nan),
        limit_steps=rows2.limit_steps,
    )
    return rows._replace(status=status)
