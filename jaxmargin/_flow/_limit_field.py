"""The beta -> infinity limit field: the min-norm Clarke element of the minimum-margin examples.

Why (docs/background.md §2-§3): p = softmax(-beta q) resolves margin gaps of order 1/beta, i.e.
the last digits of the unit-norm margins q once beta = ||w||^L passes ~1e10; there the W-method's
steps collapse and its direction drifts (docs/decisions.md D30). As beta -> infinity, p concentrates
on the examples on the minimum margin and is fixed, not by their gaps, but by the requirement
that those margins stay equal: p -> lambda, the min-norm point of conv{P grad q_i : i on the
minimum}, P = I - theta theta^T, and the flow becomes

    dtheta/ds = P G^T lambda / (L q_min),   lambda = argmin over the simplex of ||P G^T lambda||,

an active-set DAE. The examples with lambda_i > 0 (the set E) keep equal margins, all rising at
the rate ||P G^T lambda||^2 / (L q_min) >= 0 (Wolfe's optimality conditions), so q_min never
decreases. No beta appears: the limit flow is autonomous in s and reaches any s. Against the
flow at finite beta its error in theta is O(1/beta).

ReLU kinks (docs/background.md §4): the min-norm problem also ranges over the Clarke sets of the
pairs (example i, unit k) on a kink z_ik = 0: min ||P (sum_i lambda_i b_i + sum_ik mu_ik c_ik
a_ik)|| over lambda in the simplex and mu_ik in [0, lambda_i] (a_ik = grad z_ik; b_i, c_ik as in
_kink_geometry.py). A pair whose mu_ik is interior slides: the velocity is orthogonal to a_ik.
With the sliding set fixed, that is the smooth problem with every tangent gradient projected off
span{a_ik : sliding} (the velocity then does not depend on the sliding alphas, for any depth).
The sliding set and lambda are chosen at the start of each step by alternating Wolfe (alphas
fixed) with the W-method's box QP and side test (lambda fixed): choose_kinks.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .._wolfe import WEIGHT_FLOOR, affine_minimizer, bordered_solve, wolfe
from ._box_qp import FISTA_ITERATIONS
from ._kink_geometry import KinkGeometry, unit_scale
from ._kinks import clarke_pairs, frozen_gates, on_kink_slots
from ._projectors import tangent_projector

# Keeps the KKT system on E regular when E's tangent gradients are nearly affinely dependent.
_RIDGE = 1e-13
# A kink's rate below this (relative to ||a_k|| ||dtheta/ds||) has no side.
_RATE_FLOOR = 1e-9
_WRONG_WAY_ROUNDS = 4
# Rounds of the alternation (Wolfe for lambda, box QP for the kinks' alphas) at a step's start.
_KINK_ROUNDS = 3


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
        candidates: ReLU kinks: slots for the pairs on their kinks (more stops the flow with
            TOO_MANY_KINKS).
        on_kink: |z| relative to the largest |z| of the same unit over all examples, below
            which a pair counts as on its kink.
        kink_landing: how far past a kink (relative to mean |z|) a step may end.
        qp_iterations: FISTA iterations of the box QP for the kinks' Clarke element.
    """

    tol: float = 1e-8
    touching: float = 1e-10
    landing: float = 1e-12
    leaving: float = 1e-9
    first_step: float = 1e-2
    wolfe_tol: float = 1e-15
    wolfe_iterations: int = 200
    candidates: int = 256
    on_kink: float = 1e-6
    kink_landing: float = 1e-9
    qp_iterations: int = FISTA_ITERATIONS


class StepKinks(NamedTuple):
    """The kinks' state during a step (ReLU nets): frozen gates and the pairs held on z = 0."""

    gates: object  # gates of the frozen activation pattern (branch margins)
    slots: jax.Array  # (k,) pair indices of the pairs on their kinks at the step's start
    hold: jax.Array  # (k,) bool: held on z = 0 (sliding) during the step
    on_kink: jax.Array  # (P,) bool: on their kinks at the step's start
    alpha: jax.Array  # (k,) their kink derivatives (0 or 1 for those not held)
    overflow: jax.Array  # more pairs on their kinks than the k slots


class LimitField(NamedTuple):
    dtheta: jax.Array  # dtheta/ds (tangent at the unit direction)
    margins: jax.Array  # q (n,)
    weights: jax.Array  # lambda (n,)
    q_min: jax.Array  # lambda . q, the common margin of E


def tangent(rows, unit):
    return rows - jnp.outer(rows @ unit, unit)


def _tangent_gradients(margins_and_grads, theta, geometry=None, kinks=None):
    """(unit theta, q, tangent gradients, their Gram matrix); with kinks, under the step's gates
    and projected off the gradients of the held pairs."""
    unit = theta / jnp.linalg.norm(theta)
    q, G = margins_and_grads(unit, None if kinks is None else kinks.gates)
    tangents = tangent(G, unit)
    if kinks is not None:
        project = tangent_projector(
            tangent(geometry.rows(unit, kinks.slots, kinks.gates), unit), kinks.hold
        )
        tangents = jax.vmap(project)(tangents)
    return unit, q, tangents, tangents @ tangents.T


def _velocity(degree, q, tangents, weights):
    q_min = weights @ q
    # q_min > 0 after t0 (Lemma 4); the guard only keeps padding runs finite.
    q_min = jnp.where(q_min > 0, q_min, 1.0)
    return (weights @ tangents) / (degree * q_min), q_min


def evaluate(margins_and_grads, degree, theta, active, geometry=None, kinks=None) -> LimitField:
    """The limit field at theta with the set E = active fixed (lambda from the KKT system)."""
    _, q, tangents, gram = _tangent_gradients(margins_and_grads, theta, geometry, kinks)
    weights = affine_minimizer(gram, active, ridge=_RIDGE)
    dtheta, q_min = _velocity(degree, q, tangents, weights)
    return LimitField(dtheta, q, weights, q_min)


def choose_active_set(
    margins_and_grads,
    degree,
    options: LimitOptions,
    theta,
    allowed_of,
    weights0,
    geometry=None,
    kinks=None,
):
    """Wolfe's min-norm point over the examples allowed_of(q) allows, warm-started from weights0
    (restricted to them): the field at theta."""
    _, q, tangents, gram = _tangent_gradients(margins_and_grads, theta, geometry, kinks)
    weights, _ = wolfe(gram, allowed_of(q), weights0, options.wolfe_tol, options.wolfe_iterations)
    dtheta, q_min = _velocity(degree, q, tangents, weights)
    return LimitField(dtheta, q, weights, q_min)


def choose_kinks(
    margins_and_grads,
    degree,
    options: LimitOptions,
    theta,
    allowed_of,
    weights0,
    geometry: KinkGeometry | None,
):
    """(field, kinks) at the start of a step: E and lambda by Wolfe, and with ReLU kinks the
    pairs on their kinks, their alphas and the sliding set, alternating Wolfe (alphas fixed) with
    the box QP and side test of the W-method (lambda fixed)."""
    if geometry is None:
        return choose_active_set(
            margins_and_grads, degree, options, theta, allowed_of, weights0
        ), None
    unit = theta / jnp.linalg.norm(theta)
    P = geometry.num_pairs
    k = min(options.candidates, P)
    z = geometry.preactivations(unit)
    # On its kink relative to the same unit's pre-activations on the other examples (pairs are
    # example-major), not to all of them: the units no example of E uses decay like e^-s in
    # theta, and a global scale then counts their pairs as on their kinks, crowding the real
    # ones out of the `candidates` slots (docs/decisions.md D34).
    on = jnp.abs(z) <= options.on_kink * unit_scale(z, weights0.shape[0])
    slots, on_slot, on_kink, overflow = on_kink_slots(z, on, k)
    alpha = jnp.where(z[slots] > 0, 1.0, 0.0).astype(theta.dtype)

    def step_kinks(alpha, hold):
        return StepKinks(
            frozen_gates(geometry, z, slots, on_slot, alpha),
            slots,
            hold,
            on_kink,
            alpha,
            overflow,
        )

    def wrong_way(field, kinks, rows):
        # Pairs of examples in E held by neither test whose rate leaves their kink on the
        # wrong side: alpha = 1 (the positive side) falling, alpha = 0 rising.
        side = jnp.where(kinks.alpha > 0.5, 1.0, -1.0)
        rates = rows @ field.dtheta
        in_e = (field.weights > WEIGHT_FLOOR)[slots // (P // field.weights.shape[0])]
        tiny = _RATE_FLOOR * jnp.linalg.norm(rows, axis=1) * jnp.linalg.norm(field.dtheta)
        return on_slot & ~kinks.hold & in_e & (side * rates < -tiny)

    # Rounds 0 .. _KINK_ROUNDS - 1 alternate Wolfe (alphas fixed) with one Clarke round (lambda
    # fixed: the box QP and side test of the W-method). The side test takes lambda as fixed;
    # lambda re-optimised with the chosen alphas can turn a leaving pair of an example in E back
    # towards its kink, where it would chatter (docs/decisions.md D33). Such a pair is held as well:
    # the later rounds re-solve Wolfe with it held. Holding is always safe for the margins
    # (every held pair only constrains the min-norm problem: the margins of E still rise at
    # ||v||^2 / (L q_min)). Holding some can turn others back: repeated until none turns, at
    # most _WRONG_WAY_ROUNDS. All in one loop: one copy of Wolfe, the tangent projector and the
    # box QP in the compiled program.
    def round_(state):
        rows, turned, field, kinks, index = state
        kinks = step_kinks(kinks.alpha, kinks.hold | turned)
        field = choose_active_set(
            margins_and_grads, degree, options, unit, allowed_of, field.weights, geometry, kinks
        )

        def clarke(_):
            # One linearisation per round, at the last round's alphas: the alternation's
            # rounds are clarke_pairs' rounds for deeper nets.
            rows, alpha, hold = clarke_pairs(
                geometry,
                margins_and_grads,
                options,
                unit,
                lambda _: field.weights,
                slots,
                on_slot,
                on_kink,
                alpha_at=kinks.alpha,
                rounds=1,
            )
            return tangent(rows, unit), jnp.zeros_like(turned), step_kinks(alpha, hold)

        def side_test(_):
            return rows, wrong_way(field, kinks, rows), kinks

        rows, turned, next_kinks = jax.lax.cond(index < _KINK_ROUNDS, clarke, side_test, None)
        return rows, turned, field, next_kinks, index + 1

    def more(state):
        _, turned, _, _, index = state
        return (index <= _KINK_ROUNDS) | (
            jnp.any(turned) & (index <= _KINK_ROUNDS + _WRONG_WAY_ROUNDS)
        )

    kinks0 = step_kinks(alpha, jnp.zeros(k, bool))
    # Only its weights are read (Wolfe's warm start) before the first round sets it.
    field0 = LimitField(
        jnp.zeros_like(theta), jnp.zeros_like(weights0), weights0, jnp.zeros((), theta.dtype)
    )
    state = (jnp.zeros((k, theta.shape[0]), theta.dtype), jnp.zeros(k, bool), field0, kinks0, 0)
    _, _, field, kinks, _ = jax.lax.while_loop(more, round_, state)
    return field, kinks


def held_pairs(geometry, kinks):
    return jnp.zeros(geometry.num_pairs, bool).at[kinks.slots].max(kinks.hold)


def equalize(
    margins_and_grads,
    theta,
    active,
    sweeps=2,
    geometry=None,
    kinks=None,
    held=None,
    candidates=128,
    offsets=None,
):
    """Unit theta with the margins of `active` all equal: the smallest move in the span of their
    tangent gradients, the common level free (Newton sweeps on q_i + <P grad q_i, delta> = c,
    sum of the coefficients 0: the optimality condition for c). The level is not prescribed
    because near a KKT point no move raises all the margins of E together. With kinks, the
    pairs in `held` (P,) are put back on z = 0 in the same solve (under the step's gates).
    With `offsets` (n,) it is q_i + offsets_i that are made equal on `active`."""

    def sweep(_, theta):
        unit = theta / jnp.linalg.norm(theta)
        q, G = margins_and_grads(unit, None if kinks is None else kinks.gates)
        shift = 0.0 if offsets is None else offsets
        rows, support, border, top = tangent(G, unit), active, active, -(q + shift)
        if geometry is not None:
            # The live margins (a pair off its frozen side moves the margin off the frozen
            # piece); the frozen pieces' gradients.
            top = -(margins_and_grads(unit, None)[0] + shift)
            k = min(candidates, geometry.num_pairs)
            slots = jnp.nonzero(held, size=k, fill_value=0)[0]
            on = jnp.arange(k) < jnp.sum(held)
            kink_rows = tangent(geometry.rows(unit, slots, kinks.gates), unit)
            norms = jnp.maximum(jnp.linalg.norm(kink_rows, axis=1), 1e-300)
            z = geometry.preactivations(unit)[slots]
            rows = jnp.concatenate([rows, kink_rows / norms[:, None]])
            support = jnp.concatenate([active, on])
            border = jnp.concatenate([active, jnp.zeros(k, bool)])
            top = jnp.concatenate([top, jnp.where(on, -z / norms, 0.0)])
        # G a + mu 1 = -q on E (z_k + <a_k, delta> = 0 on the held pairs), sum over E of a = 0:
        # the common level is c = -mu.
        coefficients = bordered_solve(rows @ rows.T, support, top, 0.0, ridge=_RIDGE, border=border)
        return unit + coefficients @ rows

    # A loop, not unrolled: one copy in the compiled program.
    theta = jax.lax.fori_loop(0, sweeps, sweep, theta)
    return theta / jnp.linalg.norm(theta)
