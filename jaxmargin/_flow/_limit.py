"""The beta -> infinity limit of the polar flow: an active-set flow on the minimum-margin examples.

Why (NOTES §2-§3): p = softmax(-beta q) resolves margin gaps of order 1/beta, i.e. the last digits
of the unit-norm margins q once beta = ||w||^L passes ~1e10; there the W-method's steps collapse
and its direction drifts (measured on deep linear L = 3 before this module existed: past 1e11,
distance to the SVM back at 1.1e-6 and gamma~ decreasing by 8e-6), and on diagonal nets its
linearised softmax flips between minimum-margin examples within a step from beta ~ 2e8 on
(steps of 1e-7 in s). As beta -> infinity, p concentrates on the examples on the minimum margin
and is fixed, not by their gaps, but by the requirement that those margins stay equal:
p -> lambda, the min-norm point of conv{P grad q_i : i on the minimum}, P = I - theta theta^T,
and the flow becomes

    dtheta/ds = P G^T lambda / (L q_min),   lambda = argmin over the simplex of ||P G^T lambda||,

an active-set DAE. The examples with lambda_i > 0 (the set E) keep equal margins, all rising at
the rate ||P G^T lambda||^2 / (L q_min) >= 0 (Wolfe's optimality conditions), so q_min never
decreases; other examples on the minimum rise faster and leave; examples above it join when
their margin comes down to it (located like an event, as kinks are in _rosenbrock.py). No beta
appears: the limit flow is autonomous in s and reaches any s (beta up to float64's range).
Against the flow at finite beta its error in theta is O(1/beta).

Clocks: tau by quadrature of dtau/ds = rho^(2-L) / (L q_min); ln(t L) at its quasi-steady value
(the ln(t L) equation relaxes at rate ~beta, so its deviation from that value is O(1/beta)).

Smooth predictors only: with ReLU kinks the min-norm problem would also range over the Clarke
sets of the sliding units (not implemented; those runs stay on the W-method).

Integrator: Dormand-Prince 5(4) with E fixed during a step (lambda from the KKT system on E at
each stage, Wolfe's algorithm at the start of each step, warm-started), then a min-norm Newton
correction that puts the margins of E back on a common value (the DAE's drift).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .._wolfe import WEIGHT_FLOOR, affine_minimizer, bordered_solve, wolfe
from . import _rosenbrock as ros

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
_A_MATRIX = tuple(row + (0.0,) * (7 - len(row)) for row in _A)
_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
# Keeps the KKT system on E regular when E's tangent gradients are nearly affinely dependent.
_RIDGE = 1e-13
# At the switch from finite beta: examples with p_i / p_max > exp(-_SWITCH_GAP) may be on the min.
_SWITCH_GAP = 40.0


class LimitOptions(NamedTuple):
    """Options of the limit-flow integrator.

    Attributes:
        tol: local error tolerance per step, absolute on the unit direction theta.
        touching: gap q_i - q_min, relative to q_min, below which example i is on the minimum.
        landing: how far below the minimum (relative to q_min) a joining example may end a step.
        leaving: how negative an example's lambda may become within a step (it then leaves E).
        first_step: the first step size tried.
        wolfe_tol: Wolfe's stopping gap, relative to max ||P grad q_i||^2.
        wolfe_iterations: cap on Wolfe's major iterations per step.
    """

    tol: float = 1e-8
    touching: float = 1e-10
    landing: float = 1e-12
    leaving: float = 1e-9
    first_step: float = 1e-2
    wolfe_tol: float = 1e-15
    wolfe_iterations: int = 200


class _LimitField(NamedTuple):
    dtheta: jax.Array  # dtheta/ds (tangent at the unit direction)
    margins: jax.Array  # q (n,)
    weights: jax.Array  # lambda (n,)
    q_min: jax.Array  # lambda . q, the common margin of E


def _tangent_gradients(margins_and_grads, theta):
    unit = theta / jnp.linalg.norm(theta)
    q, G = margins_and_grads(unit, None)
    tangents = G - jnp.outer(G @ unit, unit)
    return unit, q, tangents, tangents @ tangents.T


def _velocity(degree, q, tangents, weights):
    q_min = weights @ q
    # q_min > 0 after t0 (Lemma 4); the guard only keeps padding runs finite.
    q_min = jnp.where(q_min > 0, q_min, 1.0)
    return (weights @ tangents) / (degree * q_min), q_min


def evaluate(margins_and_grads, degree, theta, active) -> _LimitField:
    """The limit field at theta with the set E = active fixed (lambda from the KKT system)."""
    _, q, tangents, gram = _tangent_gradients(margins_and_grads, theta)
    weights = affine_minimizer(gram, active, ridge=_RIDGE)
    dtheta, q_min = _velocity(degree, q, tangents, weights)
    return _LimitField(dtheta, q, weights, q_min)


def choose_active_set(margins_and_grads, degree, options: LimitOptions, theta, allowed_of,
                      weights0):
    """Wolfe's min-norm point over the examples allowed_of(q) allows, warm-started from weights0
    (restricted to them): the field at theta."""
    _, q, tangents, gram = _tangent_gradients(margins_and_grads, theta)
    weights, _ = wolfe(gram, allowed_of(q), weights0, options.wolfe_tol,
                       options.wolfe_iterations)  # fmt: skip
    dtheta, q_min = _velocity(degree, q, tangents, weights)
    return _LimitField(dtheta, q, weights, q_min)


def equalize(margins_and_grads, theta, active, sweeps=2):
    """Unit theta with the margins of `active` all equal: the smallest move in the span of their
    tangent gradients, the common level free (Newton sweeps on q_i + <P grad q_i, delta> = c,
    sum of the coefficients 0: the optimality condition for c). The level is not prescribed
    because near a KKT point no move raises all the margins of E together."""
    for _ in range(sweeps):
        unit, q, tangents, gram = _tangent_gradients(margins_and_grads, theta)
        # G a + mu 1 = -q on E, sum(a) = 0: the common level is c = -mu.
        coefficients = bordered_solve(gram, active, -q, 0.0, ridge=_RIDGE)
        theta = unit + coefficients @ tangents
    return theta / jnp.linalg.norm(theta)


def log_dtau_ds(degree, s, q_min):
    return -(degree - 2) * s - jnp.log(degree * q_min)


def quasi_steady_log_t_loss(degree, s, q_min, dtheta):
    """ln(t L) where the ln(t L) equation is at rest to O(1/beta): with R = d(-ln L)/ds =
    beta ||g||^2 / (L q_min) growing like beta, ln(t L) = ln dtau/ds - ln(R + 2 - 2L) (the
    asymptotic expansion of t = integral of dt/ds; R's growth gives the 2 - 2L).
    ||g||^2 = ||P g||^2 + (L q_min)^2 by Euler's identity, and P g = L q_min dtheta/ds."""
    Lq = degree * q_min
    g2 = Lq**2 * (dtheta @ dtheta + 1.0)
    log_rate = degree * s + jnp.log(g2) - jnp.log(Lq)
    # R >= 1e8 wherever the limit flow runs (beta >= 1e8), so the correction is a log1p.
    correction = jnp.log1p((2.0 - 2.0 * degree) * jnp.exp(-log_rate))
    return log_dtau_ds(degree, s, q_min) - log_rate - correction


def enter(margins_and_grads, degree, options: LimitOptions, s, theta):
    """From a point of the flow at finite beta = e^(L s): E and lambda by Wolfe over the examples
    that p does not yet separate from the minimum, then the nearest point with E's margins equal
    (a move of O(1/beta): the margins of E differ by ln(p_i / p_j) / beta at finite beta).
    Returns (theta, weights)."""
    unit = theta / jnp.linalg.norm(theta)

    def allowed_of(q):
        return (q - jnp.min(q)) * jnp.exp(degree * s) < _SWITCH_GAP

    # Wolfe starts from the example of smallest margin (always allowed).
    q, _ = margins_and_grads(unit, None)
    weights0 = jnp.zeros_like(q).at[jnp.argmin(q)].set(1.0)
    field = choose_active_set(margins_and_grads, degree, options, unit, allowed_of, weights0)
    return equalize(margins_and_grads, unit, field.weights > WEIGHT_FLOOR), field.weights


def integrate(margins_and_grads, degree, options: LimitOptions, s0, theta0, weights0, tau0, s_end,
              save_xs, max_steps, direction_tol=0.0) -> ros.Integration:
    """The limit flow from (s0, theta0) with lambda0 = weights0 (from `enter`) to s_end, saving at
    the save_xs > s0; aux = (tau, ln(t L)) as in the W-method. Stops early when ||dtheta/ds|| <
    direction_tol."""
    dtype = theta0.dtype
    S = save_xs.shape[0]

    def start_field(theta, weights):
        def allowed_of(q):
            near = (q - jnp.min(q)) <= options.touching * jnp.abs(jnp.min(q))
            return near | (weights > 0)

        return choose_active_set(margins_and_grads, degree, options, theta, allowed_of, weights)

    def aux_at(s, tau, field):
        return jnp.stack([tau, quasi_steady_log_t_loss(degree, s, field.q_min, field.dtheta)])

    field0 = evaluate(margins_and_grads, degree, theta0, weights0 > WEIGHT_FLOOR)
    num_initial = jnp.sum(save_xs <= s0)
    aux0 = aux_at(s0, tau0, field0)
    carry = ros._Carry(
        x=jnp.asarray(s0, dtype), y=theta0, aux=aux0, z=weights0,
        h=jnp.asarray(options.first_step, dtype), index=num_initial,
        xs=jnp.where(save_xs <= s0, s0, save_xs), ys=jnp.broadcast_to(theta0, (S,) + theta0.shape),
        auxs=jnp.broadcast_to(aux0, (S, 2)), saved=jnp.zeros(S, bool),
        steps=jnp.zeros((), jnp.int32), rejected=jnp.zeros((), jnp.int32),
        outcome=jnp.where(s0 >= s_end, ros.REACHED_END, -1), max_sliding=jnp.zeros((), jnp.int32),
    )  # fmt: skip

    def body(c: ros._Carry):
        # The carry's z holds lambda (the W-method keeps pre-activations there).
        F1 = start_field(c.y, c.z)
        active = F1.weights > WEIGHT_FLOOR
        target = jnp.minimum(save_xs[jnp.minimum(c.index, S - 1)], s_end)
        target = jnp.where(c.index < S, target, s_end)
        clipped = c.h >= target - c.x
        h = jnp.where(clipped, target - c.x, c.h)

        # The stages in a loop (one field in the compiled program instead of six).
        def stage(i, state):
            K, _ = state
            field = evaluate(margins_and_grads, degree, c.y + h * (jnp.asarray(_A_MATRIX)[i] @ K),
                             active)  # fmt: skip
            return K.at[i].set(field.dtheta), field

        K0 = jnp.zeros((7,) + c.y.shape, dtype).at[0].set(F1.dtheta)
        K, last = jax.lax.fori_loop(1, 7, stage, (K0, F1))
        theta_new = c.y + h * (jnp.asarray(_B5) @ K)
        err_y = h * ((jnp.asarray(_B5) - jnp.asarray(_B4)) @ K)
        err = jnp.linalg.norm(err_y) / options.tol
        theta_new = equalize(margins_and_grads, theta_new, active)
        # The field at the step's end with the step's E, for the clocks (the next step's Wolfe
        # call may change E, not the common margin).
        end = evaluate(margins_and_grads, degree, theta_new, active)
        finite = jnp.isfinite(err) & jnp.all(jnp.isfinite(theta_new)) & jnp.isfinite(end.q_min)
        err = jnp.where(finite, err, jnp.inf)

        # Events: an example off E comes down through the common margin (it joins), or a weight
        # of E turns negative (that example leaves). Redo the step shorter until it ends within
        # `landing` / `leaving` past the event; the next step's Wolfe call sorts E out.
        scale = jnp.abs(last.q_min)
        gap0 = F1.margins - F1.q_min
        gap1 = last.margins - last.q_min
        crossed = ~active & (gap1 < -options.landing * scale) & (gap0 > gap1)
        h_join = jnp.min(jnp.where(
            crossed, h * (gap0 + 0.5 * options.landing * scale) / (gap0 - gap1), jnp.inf))
        left = active & (last.weights < -options.leaving)
        h_leave = jnp.min(jnp.where(
            left, h * (F1.weights + 0.5 * options.leaving) / (F1.weights - last.weights), jnp.inf))
        h_land = jnp.minimum(h_join, h_leave)
        landed = ~jnp.any(crossed) & ~jnp.any(left)

        tau_new = c.aux[0] + ros.exp_trapezoid(
            h, log_dtau_ds(degree, c.x, F1.q_min), log_dtau_ds(degree, c.x + h, end.q_min))
        x_new = jnp.where(clipped, target, c.x + h)
        aux_new = aux_at(x_new, tau_new, end)
        finite = finite & jnp.all(jnp.isfinite(aux_new))
        accept = (err <= 1.0) & landed & finite

        factor = jnp.clip(0.9 * jnp.where(err > 0, err, 1e-10) ** -0.2, 0.2, 5.0)
        h_next = jnp.where(accept, jnp.where(clipped, jnp.maximum(c.h, h * factor), h * factor),
                           jnp.minimum(h * jnp.minimum(factor, 1.0), h_land))  # fmt: skip
        new = c._replace(
            x=jnp.where(accept, x_new, c.x), y=jnp.where(accept, theta_new, c.y),
            aux=jnp.where(accept, aux_new, c.aux), z=jnp.where(accept, F1.weights, c.z),
            h=h_next, steps=c.steps + accept, rejected=c.rejected + ~accept,
            max_sliding=jnp.maximum(c.max_sliding, jnp.sum(active, dtype=jnp.int32)),
        )  # fmt: skip
        at_save = accept & clipped & (c.index < S) & (target == save_xs[jnp.minimum(c.index, S - 1)])
        stored = ros._store(new, new.x, new.y, new.aux, jnp.minimum(c.index, S - 1))
        new = jax.tree.map(lambda a, b: jnp.where(at_save, a, b), stored, new)
        new = new._replace(index=c.index + at_save)

        converged = (direction_tol > 0) & (jnp.linalg.norm(F1.dtheta) < direction_tol)
        collapsed = h_next < 1e-14 * (1.0 + jnp.abs(c.x))
        outcome = jnp.select(
            [accept & (x_new >= s_end), converged, collapsed, new.steps + new.rejected >= max_steps],
            [ros.REACHED_END, ros.CONVERGED, ros.FAILED, ros.OUT_OF_STEPS],
            -1,
        )
        new = new._replace(outcome=outcome)
        # A run that stops off the save grid keeps its last point in the next free row.
        final = ros._store(new, new.x, new.y, new.aux, jnp.minimum(new.index, S - 1))
        off_grid = (outcome >= 0) & ~at_save & (new.index < S)
        new = jax.tree.map(lambda a, b: jnp.where(off_grid, a, b), final, new)
        return new._replace(index=new.index + off_grid)

    out = jax.lax.while_loop(lambda c: c.outcome < 0, body, carry)
    return ros.Integration(out.xs, out.ys, out.auxs, out.saved, out.x, out.y, out.aux, out.outcome,
                           out.steps, out.rejected, out.max_sliding)  # fmt: skip

