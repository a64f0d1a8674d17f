"""Full-batch gradient descent on the exponential loss: the baselines the flows are compared with.

The algorithm is plain GD, w_{k+1} = w_k - eta_k grad L(w_k) with L(w) = sum_i exp(-m_i(w)) (a
sum, not a mean), under three step-size schedules:

* "constant":   eta_k = lr (Soudry et al. 2018).
* "normalized": eta_k = lr / L(w_k), a fixed step lr on ln L (Nacson et al. 2019).
* "loss_based": eta_k = alpha_k / L(w_k), alpha multiplied by 2^(1/5) after a step that lowered
  the loss, otherwise divided by 2^(1/10) and the step redone (Lyu & Li 2020).

Because grad L = L grad ln L, every schedule is a step of size eta_k L(w_k) along -grad ln L, which
is computed in the log domain (grad ln L = -sum_i softmax(-m)_i grad m_i) and applied by optax's
SGD. ln L and ln t, with GD time t = sum_k eta_k, are never exponentiated, so a run stays finite
where L underflows float64; there the constant-step update eta L underflows to exactly 0, which
is what constant-step GD honestly does in float64.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ._margins import log_norm, polar, raw_margins, soft_margin_from_scaled
from ._predictors import Params, Predictor, check_positive_int
from ._validation import check_all, check_choice

SCHEDULES = ("constant", "loss_based", "normalized")
ALPHA_GROWTH = 2.0 ** (1 / 5)  # Lyu & Li (2020), after a step that lowered the loss
ALPHA_SHRINK = 2.0 ** (1 / 10)  # Lyu & Li (2020), after a rejected step


class GDTrajectory(NamedTuple):
    """A GD run logged at step 0 and at log-spaced attempt indices in [1, steps].

    Every array has one entry per log point (leading axis of `params` too). Attempts count every
    update tried; `step` counts the accepted ones (they differ for "loss_based", and by the one
    attempt that failed if an update was non-finite).

    Attributes:
        step: accepted steps so far.
        attempts: attempted steps so far (accepted or rejected).
        log_time: ln t with GD time t = sum of the accepted eta_k (-inf at step 0).
        rho: ||w||_2.
        log_rho: ln ||w||_2 (finite where rho would overflow).
        log_loss: ln L(w).
        soft_margin: gamma~(w) = -ln L(w) / ||w||^L.
        hard_margin: gamma(w) = min_i m_i(w) / ||w||^L.
        step_size: lr, or alpha for "loss_based", that the next attempt uses.
        params: the parameters at each log point (leading log axis on every layer).
        final_params: the parameters after the last attempt.
        status: "ok", or the attempt that produced non-finite values (GD stopped before it).
    """

    step: jax.Array
    attempts: jax.Array
    log_time: jax.Array
    rho: jax.Array
    log_rho: jax.Array
    log_loss: jax.Array
    soft_margin: jax.Array
    hard_margin: jax.Array
    step_size: jax.Array
    params: Params
    final_params: Params
    status: str


class _State(NamedTuple):
    params: Params
    opt_state: Any
    log_loss: jax.Array
    grad: Params  # grad ln L at params
    step_size: jax.Array  # lr, or alpha for "loss_based"
    log_time: jax.Array
    step: jax.Array
    attempts: jax.Array
    failed: jax.Array  # an attempt produced non-finite values; nothing moves after it


def next_alpha(alpha, lowered):
    """Lyu & Li's (2020) update of alpha: x 2^(1/5) if the loss fell, / 2^(1/10) otherwise."""
    return jnp.where(lowered, alpha * ALPHA_GROWTH, alpha / ALPHA_SHRINK)


def log_learning_rate(schedule: str, step_size, log_loss):
    """ln eta_k: ln lr ("constant"), ln lr - ln L ("normalized") or ln alpha - ln L."""
    if schedule == "constant":
        return jnp.log(step_size)
    return jnp.log(step_size) - log_loss


def step_on_log_loss(schedule: str, step_size, log_loss):
    """eta_k L(w_k), the step along -grad ln L: lr L ("constant"), else lr or alpha itself.

    Not exp(ln eta + ln L), which would add the rounding of ln L to ln alpha (1.5e-11 at
    ln L = -1e5, everything beyond 1e16). For "constant" it underflows to exactly 0 once L does,
    as float64 GD does.
    """
    if schedule == "constant":
        return jnp.exp(jnp.log(step_size) + log_loss)
    return step_size


def _log_indices(steps: int, num_logs: int) -> np.ndarray:
    """0 and up to num_logs unique, log-spaced integers in [1, steps] (steps always included)."""
    if num_logs >= steps:
        grid = np.arange(1, steps + 1)
    else:
        grid = np.unique(np.rint(np.geomspace(1, steps, num_logs)).astype(np.int64))
    return np.concatenate([[0], grid])


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


def _attempt(state: _State, loss_and_grad, optimizer, schedule: str) -> _State:
    """One GD update tried from state; kept if finite (and, for "loss_based", if L fell)."""
    log_eta = log_learning_rate(schedule, state.step_size, state.log_loss)
    stride = step_on_log_loss(schedule, state.step_size, state.log_loss)
    hyperparams = {**state.opt_state.hyperparams, "learning_rate": stride}
    opt_state = state.opt_state._replace(hyperparams=hyperparams)
    updates, opt_state = optimizer.update(state.grad, opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    log_loss, grad = loss_and_grad(params)
    finite = _all_finite((params, log_loss, grad))
    lowered = log_loss < state.log_loss
    live = ~state.failed & finite
    accepted = live & (lowered if schedule == "loss_based" else True)
    moved = _State(
        params,
        opt_state,
        log_loss,
        grad,
        state.step_size,
        jnp.logaddexp(state.log_time, log_eta),
        state.step + 1,
        state.attempts,
        state.failed,
    )
    new = jax.tree.map(lambda a, b: jnp.where(accepted, a, b), moved, state)
    step_size = state.step_size
    if schedule == "loss_based":
        step_size = next_alpha(step_size, lowered)
    return new._replace(
        step_size=jnp.where(live, step_size, state.step_size),
        attempts=state.attempts + (~state.failed).astype(state.attempts.dtype),
        failed=state.failed | ~finite,
    )


def _record(predictor: Predictor, X, y, state: _State) -> dict:
    """The logged quantities, margins from the polar split (no ||w||^L is ever formed)."""
    log_beta, theta = polar(predictor, state.params)
    q = raw_margins(predictor, theta, X, y)
    log_rho = log_norm(state.params)
    return dict(
        step=state.step,
        attempts=state.attempts,
        log_time=state.log_time,
        rho=jnp.exp(log_rho),
        log_rho=log_rho,
        log_loss=state.log_loss,
        soft_margin=soft_margin_from_scaled(log_beta, q),
        hard_margin=jnp.min(q),
        step_size=state.step_size,
        params=state.params,
    )


@functools.partial(jax.jit, static_argnames=("predictor", "schedule", "steps", "num_logs"))
def _run(predictor, params0, X, y, step_size0, *, schedule, steps, num_logs):
    def log_loss(params):  # ln L = logsumexp(-m): finite long after L itself underflows
        return jax.nn.logsumexp(-raw_margins(predictor, params, X, y))

    loss_and_grad = jax.value_and_grad(log_loss)
    optimizer = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0)
    log_loss0, grad0 = loss_and_grad(params0)
    zero = jnp.zeros((), jnp.int64)
    state0 = _State(
        params0,
        optimizer.init(params0),
        log_loss0,
        grad0,
        jnp.asarray(step_size0, jnp.float64),
        jnp.asarray(-jnp.inf),
        zero,
        zero,
        jnp.asarray(False),
    )

    def run_segment(state, length):  # the attempts between two log points, then a log record
        state = jax.lax.fori_loop(
            0, length, lambda _, s: _attempt(s, loss_and_grad, optimizer, schedule), state
        )
        return state, _record(predictor, X, y, state)

    segment_lengths = jnp.asarray(np.diff(_log_indices(steps, num_logs)))
    final, logs = jax.lax.scan(run_segment, state0, segment_lengths)
    first = _record(predictor, X, y, state0)
    logs = jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), first, logs)
    return final, logs


def _positive(name: str, value) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def _initial_step_size(schedule: str, lr, alpha0) -> float:
    if schedule == "loss_based":
        if lr is not None:
            raise ValueError("schedule 'loss_based' sets its steps from alpha0; lr is not used")
        return _positive("alpha0", alpha0)
    if lr is None:
        raise ValueError(f"schedule {schedule!r} needs a learning rate lr")
    return _positive("lr", lr)


def gradient_descent(
    predictor: Predictor,
    params0: Params,
    X,
    y,
    *,
    schedule: str,
    lr: float | None = None,
    steps: int,
    alpha0: float = 0.1,
    num_logs: int = 100,
) -> GDTrajectory:
    """Full-batch GD on the summed exponential loss, jitted, in float64 and the log domain.

    The loop is a lax.scan over log segments of lax.fori_loop attempts; one compilation serves
    each (predictor, shapes, schedule, steps, num_logs), with lr and alpha0 traced.

    Args:
        predictor: an L-homogeneous `Predictor`.
        params0: initial parameters, as `predictor.init` returns them.
        X, y: inputs (n, ...) and labels in {-1, +1}.
        schedule: "constant", "normalized" or "loss_based" (see the module docstring).
        lr: the step size of "constant" and "normalized" (required there, unused otherwise).
        steps: number of attempts (= steps for "constant" and "normalized").
        alpha0: alpha(0) of "loss_based" (0.1 as in Lyu & Li 2020).
        num_logs: number of log-spaced log points in [1, steps] (fewer if they collide).

    Returns:
        A `GDTrajectory`. If an update produced non-finite values, GD stopped before it and
        `status` says at which attempt; no NaN is returned silently.

    References:
        D. Soudry, E. Hoffer, M. S. Nacson, S. Gunasekar, N. Srebro, "The Implicit Bias of
        Gradient Descent on Separable Data", JMLR 19, 2018.
        M. S. Nacson, J. Lee, S. Gunasekar, P. Savarese, N. Srebro, D. Soudry, "Convergence of
        Gradient Descent on Separable Data", AISTATS 2019.
        K. Lyu, J. Li, "Gradient Descent Maximizes the Margin of Homogeneous Neural Networks",
        ICLR 2020.
    """
    check_choice("schedule", schedule, SCHEDULES)
    predictor, params0, X, y = check_all(predictor, params0, X, y)
    steps = check_positive_int("steps", steps)
    num_logs = check_positive_int("num_logs", num_logs)
    step_size0 = _initial_step_size(schedule, lr, alpha0)
    final, logs = _run(
        predictor, params0, X, y, step_size0, schedule=schedule, steps=steps, num_logs=num_logs
    )
    status = "ok"
    if bool(final.failed):
        status = f"stopped: attempt {int(final.attempts)} produced non-finite values"
    return GDTrajectory(**logs, final_params=final.params, status=status)
