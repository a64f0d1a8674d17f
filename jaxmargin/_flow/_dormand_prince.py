"""Dormand-Prince 5(4): the tableau, its dense output, the first root of an event on it, and an
explicit integrator with an upward event (phase 1 of the asymptotic engine).

Why a hand-written integrator next to diffrax: phase 1 is compiled on the critical path of every
run (the later stages compile while it runs). diffrax's Dopri5 with an event and function saves
puts the (sliding) velocity into the compiled program several times (its stage loop, its first
step's size, the saves' functions in the step loop, at t1 and at the event); here it is one
stage loop with one field evaluation, the first step's size from the field at the start
(Hairer's first guess without his second evaluation), saves and the event on the dense output
(docs/decisions.md D7). The limit flow (_limit_stage.py) steps with the same tableau and dense
output.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ._stepping import Outcome

# Dormand & Prince (1980), 5(4): stage coefficients, 5th-order weights, 4th-order weights.
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
A_MATRIX = tuple(row + (0.0,) * (7 - len(row)) for row in _A)
B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)

# Dormand-Prince's dense output (Shampine 1986, as diffrax's Dopri5): the midpoint weights.
_C_MID = (
    6025192743 / 30085553152 / 2,
    0.0,
    51252292925 / 65400821598 / 2,
    -2691868925 / 45128329728 / 2,
    187940372067 / 1594534317056 / 2,
    -1776094331 / 19743644256 / 2,
    11237099 / 235043384 / 2,
)
# first_root_of_any: grid points that bracket the first root, then Illinois iterations.
_ROOT_GRID, _ROOT_ITERATIONS = 8, 12


def dense_output(y0, y1, increments):
    """(value, d value / du) of the 4th-order dense output, u in [0, 1], of a Dormand-Prince
    step from y0 to y1 with stage increments h K (7, d): the quartic through y0, the midpoint
    estimate and y1 with the step's end slopes."""
    f0, f1 = increments[0], increments[6]
    mid = y0 + jnp.asarray(_C_MID) @ increments
    a = 2.0 * (f1 - f0) - 8.0 * (y1 + y0) + 16.0 * mid
    b = 5.0 * f0 - 3.0 * f1 + 18.0 * y0 + 14.0 * y1 - 32.0 * mid
    c = f1 - 4.0 * f0 - 11.0 * y0 - 5.0 * y1 + 16.0 * mid

    def value(u):
        return (((a * u + b) * u + c) * u + f0) * u + y0

    def rate(u):  # d value / du
        return ((4.0 * a * u + 3.0 * b) * u + 2.0 * c) * u + f0

    return value, rate


def first_root_of_any(g_at, g0, relevant, fallback):
    """The first u in (0, 1] where some relevant entry of g_at(u) (g0 = g_at(0), positive on
    them) turns negative: bracketed on a grid of _ROOT_GRID points, then the entry whose secant
    root in the bracket comes first is solved by the Illinois method. `fallback` where no grid
    point has a root (e.g. an entry that comes back above 0 by the next grid point)."""
    us = jnp.arange(1, _ROOT_GRID + 1) / _ROOT_GRID
    values = jax.vmap(g_at)(us)
    crossing = relevant[None] & (values < 0)
    found = jnp.any(crossing)
    j = jnp.argmax(jnp.any(crossing, axis=1))
    ua = jnp.where(j > 0, us[j - 1], 0.0)
    ga = jnp.where(j > 0, values[j - 1], g0)
    ub, gb = us[j], values[j]
    secant = ua + (ub - ua) * ga / jnp.where(ga > gb, ga - gb, 1.0)
    k = jnp.argmin(jnp.where(crossing[j] & (ga >= 0), secant, jnp.inf))

    def illinois(_, state):
        ua, ga, ub, gb, kept = state
        u = ub - gb * (ub - ua) / jnp.where(gb != ga, gb - ga, 1.0)
        g = g_at(u)[k]
        past = g < 0
        # The end kept twice in a row has its value halved (the Illinois modification).
        ga = jnp.where(past & (kept == 1), 0.5 * ga, ga)
        gb = jnp.where(~past & (kept == -1), 0.5 * gb, gb)
        return (
            jnp.where(past, ua, u),
            jnp.where(past, ga, g),
            jnp.where(past, u, ub),
            jnp.where(past, g, gb),
            jnp.where(past, 1, -1),
        )

    ua, ga, ub, gb, _ = jax.lax.fori_loop(0, _ROOT_ITERATIONS, illinois, (ua, ga[k], ub, gb[k], 0))
    best = jnp.where(jnp.abs(gb) <= jnp.abs(ga), ub, ua)
    return jnp.where(found, best, jnp.minimum(fallback, 1.0))


class EventIntegration(NamedTuple):
    """What integrate reached: the saves, where it stopped and why."""

    saved: jax.Array  # (S,) bool: save_xs[j] was reached
    ys: jax.Array  # (S, d) the states at the saves (y0 where not reached)
    x: jax.Array  # where it stopped: the event, x_end, or the last accepted point
    y: jax.Array
    outcome: jax.Array  # EVENT (event(y) crossed 0 upwards), REACHED_END, OUT_OF_STEPS, FAILED
    steps: jax.Array  # accepted steps
    rejected: jax.Array


class _Carry(NamedTuple):
    x: jax.Array
    y: jax.Array
    K: jax.Array  # (7, d) stage slopes; K[0] is the field at y once `started`
    started: jax.Array
    h: jax.Array
    ys: jax.Array
    saved: jax.Array
    steps: jax.Array
    rejected: jax.Array
    outcome: jax.Array  # RUNNING until one of the others


# The event's location on a step: u to 2^-60 of the step (below float64's resolution of u near 1).
_BISECTIONS = 60
# The step-size controller: diffrax's PIDController defaults (integral control, error order 5).
_SAFETY, _FACTOR_MIN, _FACTOR_MAX = 0.9, 0.2, 10.0


def _rms(v):
    return jnp.sqrt(jnp.mean(v * v))


def upward_crossing(g, dtype):
    """u in (0, 1] just past where g (g(0) <= 0 < g(1)) crosses 0: bisection to 2^-_BISECTIONS,
    the end where g > 0. Why not first_root_of_any's secant method: with a start a rounding
    error short of the event (w(t0) from another solver: -ln L = -1e-17) its bracket's upper end
    did not converge (it stopped at u ~ 1e-4 with the soft margin at 4e-7), and its nearer end
    was u = 0 (t = 0: ln t = -inf). diffrax's phase 1 also bisects; this runs once per run."""

    def halve(_, bracket):
        lo, hi = bracket
        mid = 0.5 * (lo + hi)
        past = g(mid) > 0
        return jnp.where(past, lo, mid), jnp.where(past, mid, hi)

    _, hi = jax.lax.fori_loop(0, _BISECTIONS, halve, (jnp.zeros((), dtype), jnp.ones((), dtype)))
    return hi


def integrate(field, event, y0, x_end, save_xs, rtol, atol, max_steps) -> EventIntegration:
    """dy/dx = field(y) from (0, y0) to x_end, or to the first upward crossing of event(y)
    through 0 (located on the dense output); the states at save_xs (increasing, in [0, x_end])
    from the dense output. Error test: the RMS norm of the embedded error over
    atol + rtol max(|y|, |y_new|) (diffrax's). At most max_steps attempts."""
    dtype = y0.dtype
    S = save_xs.shape[0]
    A, b5, b4 = (jnp.asarray(c, dtype) for c in (A_MATRIX, B5, B4))

    def step_size(c: _Carry, K):
        # The first step: 0.01 ||y0|| / ||f(y0)|| in the error norm's scale (Hairer, Norsett &
        # Wanner's first guess); later steps: the controller's.
        scale = atol + rtol * jnp.abs(c.y)
        d0, d1 = _rms(c.y / scale), _rms(K[0] / scale)
        first = jnp.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / jnp.where(d1 > 0, d1, 1.0))
        return jnp.minimum(jnp.where(c.started, c.h, first), x_end - c.x)

    def body(c: _Carry):
        def stage(i, K):
            return K.at[i].set(field(c.y + step_size(c, K) * (A[i] @ K)))

        # Stage 0 (the field at y) only before the first step: later it is the last step's
        # stage 7 (FSAL), or kept from the rejected attempt.
        K = jax.lax.fori_loop(jnp.where(c.started, 1, 0), 7, stage, c.K)
        h = step_size(c, K)
        y_new = c.y + h * (b5 @ K)
        scale = atol + rtol * jnp.maximum(jnp.abs(c.y), jnp.abs(y_new))
        err = _rms(h * ((b5 - b4) @ K) / scale)
        finite = jnp.isfinite(err) & jnp.all(jnp.isfinite(y_new))
        err = jnp.where(finite, err, jnp.inf)
        accept = err <= 1.0

        value, _ = dense_output(c.y, y_new, h * K)
        crossed = accept & (event(c.y) <= 0) & (event(y_new) > 0)

        def first_crossing(_):
            return upward_crossing(lambda u: event(value(u)), dtype)

        u_stop = jax.lax.cond(crossed, first_crossing, lambda _: jnp.ones((), dtype), None)
        x_stop = jnp.where(crossed, c.x + u_stop * h, c.x + h)
        y_stop = jnp.where(crossed, value(u_stop), y_new)

        at_save = accept & ~c.saved & (save_xs <= x_stop)
        u_saves = jnp.clip((save_xs - c.x) / jnp.where(h > 0, h, 1.0), 0.0, 1.0)
        ys = jnp.where(at_save[:, None], jax.vmap(value)(u_saves), c.ys)

        # diffrax's rule: an accepted step is not followed by a shorter one, a rejected one is
        # redone at most _SAFETY times as long.
        factor = _SAFETY * jnp.where(err > 0, err, 1e-10) ** -0.2
        factor = jnp.clip(
            factor, jnp.where(accept, 1.0, _FACTOR_MIN), jnp.where(accept, _FACTOR_MAX, _SAFETY)
        )
        steps, rejected = c.steps + accept, c.rejected + ~accept
        outcome = jnp.select(
            [
                crossed,
                accept & (x_stop >= x_end),
                steps + rejected >= max_steps,
                h * factor < 1e-14 * (1.0 + jnp.abs(c.x)),
            ],
            [Outcome.EVENT, Outcome.REACHED_END, Outcome.OUT_OF_STEPS, Outcome.FAILED],
            Outcome.RUNNING,
        )
        return _Carry(
            x=jnp.where(accept, x_stop, c.x),
            y=jnp.where(accept, y_stop, c.y),
            K=jnp.where(accept, K.at[0].set(K[6]), K),
            started=jnp.asarray(True),
            h=h * factor,
            ys=ys,
            saved=c.saved | at_save,
            steps=steps,
            rejected=rejected,
            outcome=outcome,
        )

    zero = jnp.zeros((), jnp.int32)
    carry = _Carry(
        x=jnp.zeros((), dtype),
        y=y0,
        K=jnp.zeros((7,) + y0.shape, dtype),
        started=jnp.asarray(False),
        h=jnp.zeros((), dtype),
        ys=jnp.broadcast_to(y0, (S,) + y0.shape),
        saved=jnp.zeros(S, bool),
        steps=zero,
        rejected=zero,
        outcome=jnp.where(x_end > 0, Outcome.RUNNING, Outcome.REACHED_END),
    )
    out = jax.lax.while_loop(lambda c: c.outcome == Outcome.RUNNING, body, carry)
    return EventIntegration(
        out.saved,
        out.ys,
        out.x,
        out.y,
        out.outcome,
        out.steps,
        out.rejected,
    )
