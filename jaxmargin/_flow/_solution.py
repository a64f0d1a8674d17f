"""FlowSolution and FlowStatus: what a gradient-flow run returns."""

from __future__ import annotations

import enum
from typing import NamedTuple

import jax


class Status(enum.IntEnum):
    """How a run ended: FlowStatus.code (an int array) compares equal to these."""

    REACHED_TARGET = 0
    DIRECTION_CONVERGED = 1
    MAX_STEPS = 2
    SOLVER_FAILED = 3
    NOT_SEPARATED = 4
    TOO_MANY_KINKS = 5

    @property
    def message(self) -> str:
        return STATUS_MESSAGES[self]


REACHED_TARGET = Status.REACHED_TARGET
DIRECTION_CONVERGED = Status.DIRECTION_CONVERGED
MAX_STEPS = Status.MAX_STEPS
SOLVER_FAILED = Status.SOLVER_FAILED
NOT_SEPARATED = Status.NOT_SEPARATED
TOO_MANY_KINKS = Status.TOO_MANY_KINKS

STATUS_MESSAGES = {
    REACHED_TARGET: "reached the target (beta_max or s_max)",
    DIRECTION_CONVERGED: "the direction converged (||dtheta/ds|| fell below direction_tol)",
    MAX_STEPS: "max_steps was exhausted before the target",
    SOLVER_FAILED: "the solver failed (step size collapsed or a non-finite value appeared);"
    " the outputs stop at the last good point",
    NOT_SEPARATED: "the soft margin never became positive within tau_max / max_steps:"
    " the model did not separate the data",
    TOO_MANY_KINKS: "more ReLU pre-activations sat on their kinks than the integrator has slots"
    " for: raise the option kink_slots (FlowOptions); the outputs stop at the last good point",
}


class FlowStatus(NamedTuple):
    """How a run ended.

    Attributes:
        code: a Status (an int array; batched runs have one each).
        separated: whether the soft margin became positive (phase 2 was reached).
        steps: accepted solver steps, phase 1 and after t0 (shape (2,)).
        rejected_steps: rejected solver steps, phase 1 and after t0 (shape (2,)).
        tau0, s0, log_t0: the clocks at t0, when the soft margin first exceeded 0.
        best_soft_margin: the largest soft margin among the saved points.
        s_limit: s = ln ||w|| where the beta -> infinity limit flow took over (nan where it
            did not; solver="rosenbrock" only). The stiff stage runs from s0 to s_limit.
        limit_steps: accepted steps of the limit flow (part of steps[1]).
    """

    code: jax.Array
    separated: jax.Array
    steps: jax.Array
    rejected_steps: jax.Array
    tau0: jax.Array
    s0: jax.Array
    log_t0: jax.Array
    best_soft_margin: jax.Array
    s_limit: jax.Array
    limit_steps: jax.Array

    @property
    def message(self) -> str:
        return STATUS_MESSAGES[int(self.code)]


class FlowSolution(NamedTuple):
    """Saved points of a gradient flow, phase 1 (tau clock) then phase 2 (s = ln rho clock).

    Every array has a leading save axis; `params` is a pytree with that leading axis. Points
    are log-spaced in tau in phase 1 and evenly spaced in s (log-spaced in rho) in phase 2.

    Attributes:
        s: ln ||w||.
        tau: the seed's time (flow of ln L).
        log_t: ln of the exponential-loss time t (flow of L), kept in log space.
        rho: ||w||.
        log_loss: ln L(w) = ln sum_i exp(-m_i(w)).
        soft_margin: -ln L(w) / ||w||^L.
        hard_margin: min_i m_i(w) / ||w||^L.
        params: w at each saved point (not finite where ||w|| exceeds float64's range).
        direction: the unit direction theta = w / ||w|| at each saved point (a params pytree;
            finite at any s).
        phase: 1 before t0, 2 after.
        log_half_drho2_dtau, sign_half_drho2_dtau: (1/2) d||w||^2/dtau as the integrator saw
            it (log of its absolute value and its sign), for the Lyu & Li identity check.
        valid: False for padding rows (batched runs keep a fixed number of rows).
        status: a FlowStatus.
    """

    s: jax.Array
    tau: jax.Array
    log_t: jax.Array
    rho: jax.Array
    log_loss: jax.Array
    soft_margin: jax.Array
    hard_margin: jax.Array
    params: tuple
    direction: tuple
    phase: jax.Array
    log_half_drho2_dtau: jax.Array
    sign_half_drho2_dtau: jax.Array
    valid: jax.Array
    status: FlowStatus
