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

ReLU kinks (NOTES §4): the min-norm problem then also ranges over the Clarke sets of the pairs
(example i, unit k) on a kink z_ik = 0: min ||P (sum_i lambda_i b_i + sum_ik mu_ik c_ik a_ik)||
over lambda in the simplex and mu_ik in [0, lambda_i] (a_ik = grad z_ik; b_i, c_ik as in
_kink_geometry.py). A pair whose mu_ik is interior slides: the velocity is orthogonal to a_ik
(dz_ik/ds = 0). With the sliding set S fixed, that is the smooth problem with every tangent
gradient projected off span{a_ik : S} (the velocity then does not depend on the sliding alphas,
for any depth: the alphas move the gradients only within that span). S and lambda are chosen at
the start of each step by alternating Wolfe (lambda, alphas fixed) with the W-method's box QP
and side test (alphas, lambda fixed: _rosenbrock.clarke_pairs with p := lambda); during the step
the activation pattern is frozen (branch margins), pairs of the examples in E that reach their
kink are landed on like events, and the step ends with a Newton projection onto equal margins on
E and z = 0 on S. A sliding pair whose alpha leaves [0, 1] within a step leaves at the next
step's start (not located as an event).

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
from ._box_qp import FISTA_ITERATIONS
from ._dormand_prince import A_MATRIX, B4, B5, dense_output, first_root_of_any
from ._kink_geometry import KinkGeometry

# Keeps the KKT system on E regular when E's tangent gradients are nearly affinely dependent.
_RIDGE = 1e-13
# At the switch from finite beta: examples with p_i / p_max > exp(-_SWITCH_GAP) may be on the min.
_SWITCH_GAP = 40.0
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
            TOO_MANY_KINKS; the reference problem, L = 3, holds 128 by s ~ 10).
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


class _LimitField(NamedTuple):
    dtheta: jax.Array  # dtheta/ds (tangent at the unit direction)
    margins: jax.Array  # q (n,)
    weights: jax.Array  # lambda (n,)
    q_min: jax.Array  # lambda . q, the common margin of E


def _tangent(rows, unit):
    return rows - jnp.outer(rows @ unit, unit)


def _tangent_gradients(margins_and_grads, theta, geometry=None, kinks=None):
    """(unit theta, q, tangent gradients, their Gram matrix); with kinks, under the step's gates
    and projected off the gradients of the held pairs."""
    unit = theta / jnp.linalg.norm(theta)
    q, G = margins_and_grads(unit, None if kinks is None else kinks.gates)
    tangents = _tangent(G, unit)
    if kinks is not None:
        project = ros.tangent_projector(
            _tangent(geometry.rows(unit, kinks.slots, kinks.gates), unit), kinks.hold
        )
        tangents = jax.vmap(project)(tangents)
    return unit, q, tangents, tangents @ tangents.T


def _velocity(degree, q, tangents, weights):
    q_min = weights @ q
    # q_min > 0 after t0 (Lemma 4); the guard only keeps padding runs finite.
    q_min = jnp.where(q_min > 0, q_min, 1.0)
    return (weights @ tangents) / (degree * q_min), q_min


def evaluate(margins_and_grads, degree, theta, active, geometry=None, kinks=None) -> _LimitField:
    """The limit field at theta with the set E = active fixed (lambda from the KKT system)."""
    _, q, tangents, gram = _tangent_gradients(margins_and_grads, theta, geometry, kinks)
    weights = affine_minimizer(gram, active, ridge=_RIDGE)
    dtheta, q_min = _velocity(degree, q, tangents, weights)
    return _LimitField(dtheta, q, weights, q_min)


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
    return _LimitField(dtheta, q, weights, q_min)


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
    # theta, and by s ~ 240 (beta ~ 1e208, L = 2) a global scale counted ~100 of their pairs as
    # on their kinks, crowding the real ones out of the `candidates` slots.
    on = jnp.abs(z) <= options.on_kink * _unit_scale(z, weights0.shape[0])
    slots, on_slot, on_kink, overflow = ros.on_kink_slots(z, on, k)
    alpha = jnp.where(z[slots] > 0, 1.0, 0.0).astype(theta.dtype)

    def step_kinks(alpha, hold):
        return StepKinks(
            ros.frozen_gates(geometry, z, slots, on_slot, alpha),
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
    # towards its kink (measured on the reference problem, L = 2: one pair then chattered,
    # released and landed on again every step). Such a pair is held as well: the later rounds
    # re-solve Wolfe with it held. Holding is always safe for the margins (every held pair only
    # constrains the min-norm problem: the margins of E still rise at ||v||^2 / (L q_min)).
    # Holding some can turn others back (L = 3: a pair then drifted the wrong way at a steady
    # rate, landed on step after step): repeated until none turns, at most _WRONG_WAY_ROUNDS.
    # All in one loop: one copy of Wolfe, the tangent projector and the box QP in the compiled
    # program (three copies of Wolfe when the phases were separate loops).
    def round_(state):
        rows, turned, field, kinks, index = state
        kinks = step_kinks(kinks.alpha, kinks.hold | turned)
        field = choose_active_set(
            margins_and_grads, degree, options, unit, allowed_of, field.weights, geometry, kinks
        )

        def clarke(_):
            # One linearisation per round, at the last round's alphas: the alternation's
            # rounds are clarke_pairs' rounds for deeper nets.
            rows, alpha, hold = ros.clarke_pairs(
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
            return _tangent(rows, unit), jnp.zeros_like(turned), step_kinks(alpha, hold)

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
    field0 = _LimitField(
        jnp.zeros_like(theta), jnp.zeros_like(weights0), weights0, jnp.zeros((), theta.dtype)
    )
    state = (jnp.zeros((k, theta.shape[0]), theta.dtype), jnp.zeros(k, bool), field0, kinks0, 0)
    _, _, field, kinks, _ = jax.lax.while_loop(more, round_, state)
    return field, kinks


def _unit_scale(z, n):
    """Per pair, the largest |z| of its unit over the n examples (pairs are example-major)."""
    return jnp.tile(jnp.max(jnp.abs(z.reshape(n, -1)), axis=0), n)


def _held_pairs(geometry, kinks):
    return jnp.zeros(geometry.num_pairs, bool).at[kinks.slots].max(kinks.hold)


def equalize(
    margins_and_grads, theta, active, sweeps=2, geometry=None, kinks=None, held=None, candidates=128
):
    """Unit theta with the margins of `active` all equal: the smallest move in the span of their
    tangent gradients, the common level free (Newton sweeps on q_i + <P grad q_i, delta> = c,
    sum of the coefficients 0: the optimality condition for c). The level is not prescribed
    because near a KKT point no move raises all the margins of E together. With kinks, the
    pairs in `held` (P,) are put back on z = 0 in the same solve (under the step's gates)."""

    def sweep(_, theta):
        unit = theta / jnp.linalg.norm(theta)
        q, G = margins_and_grads(unit, None if kinks is None else kinks.gates)
        rows, support, border, top = _tangent(G, unit), active, active, -q
        if geometry is not None:
            # The live margins (a pair off its frozen side moves the margin off the frozen
            # piece); the frozen pieces' gradients.
            top = -margins_and_grads(unit, None)[0]
            k = min(candidates, geometry.num_pairs)
            slots = jnp.nonzero(held, size=k, fill_value=0)[0]
            on = jnp.arange(k) < jnp.sum(held)
            kink_rows = _tangent(geometry.rows(unit, slots, kinks.gates), unit)
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


def log_dtau_ds(degree, s, q_min):
    return -(degree - 2) * s - jnp.log(degree * q_min)


def _tau_increment(degree, s, h, q_min_a, dtheta_a, q_min_b, dtheta_b):
    """tau's increment over [s, s + h]: the integral of dtau/ds = exp(phi), phi = ln dtau/ds,
    with phi the cubic Hermite interpolant of its end values and slopes (_rosenbrock's
    log_exp_integral). phi' = -(L - 2) - L ||dtheta/ds||^2: q_min rises at the rate
    L q_min ||dtheta/ds||^2. Why not the exponential trapezoid: over the steps that the saves no
    longer cut it was 4.6e-7 (relative) off in tau against the W-method (ReLU, L = 2, switch at
    beta = 1e6 vs the W-method to 1e8; 2.1e-8 with steps cut at the saves)."""

    def slope(dtheta):
        return -(degree - 2) - degree * (dtheta @ dtheta)

    log_increment = ros.log_exp_integral(
        jnp.where(h > 0, h, 1.0),
        log_dtau_ds(degree, s, q_min_a),
        log_dtau_ds(degree, s + h, q_min_b),
        slope(dtheta_a),
        slope(dtheta_b),
    )
    return jnp.where(h > 0, jnp.exp(log_increment), 0.0)


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


def integrate(
    margins_and_grads,
    degree,
    options: LimitOptions,
    s0,
    theta0,
    tau0,
    s_end,
    save_xs,
    max_steps,
    direction_tol=0.0,
    geometry=None,
    s_enter=None,
) -> ros.Integration:
    """The limit flow from a point (s0, theta0) of the flow at finite beta to s_end, saving at
    the save_xs >= s0 (the entry point is the row at s0); aux = (tau, ln(t L)) as in the
    W-method. Stops early when ||dtheta/ds|| < direction_tol. With `geometry` (ReLU nets),
    margins_and_grads must take the branch values of gated units
    (_kink_geometry.per_example_margins(..., branch=True)).

    The first iteration enters the limit flow (a step of size 0, not counted): E and lambda by
    Wolfe over the examples that p = softmax(-beta q) at beta = e^(L s_enter) (default s0)
    does not yet separate from the minimum (with kinks: and the sliding pairs), then the
    nearest point with E's margins equal (a move of O(1/beta): the margins of E differ by
    ln(p_i / p_j) / beta at finite beta) and the sliding pairs on their kinks. Why in the loop:
    its Wolfe / Clarke rounds, projection and field are the steps' own (one copy each in the
    compiled program: the limit flow on the reference problem, L = 3, compiled in 8.5 s instead
    of 10.3 s with a separate entry)."""
    dtype = theta0.dtype
    S = save_xs.shape[0]
    theta0 = theta0 / jnp.linalg.norm(theta0)
    log_beta_enter = degree * (s0 if s_enter is None else s_enter)
    # Wolfe starts from the example of smallest margin (always allowed).
    q0, _ = margins_and_grads(theta0, None)
    weights0 = jnp.zeros_like(q0).at[jnp.argmin(q0)].set(1.0)
    if geometry is not None:
        pairs_per_example = geometry.num_pairs // weights0.shape[0]

    def start_field(theta, weights, entering):
        def allowed_of(q):
            gap = q - jnp.min(q)
            near = gap <= options.touching * jnp.abs(jnp.min(q))
            return jnp.where(
                entering, gap <= _SWITCH_GAP * jnp.exp(-log_beta_enter), near | (weights > 0)
            )

        return choose_kinks(
            margins_and_grads, degree, options, theta, allowed_of, weights, geometry
        )

    def aux_at(s, tau, field):
        return jnp.stack([tau, quasi_steady_log_t_loss(degree, s, field.q_min, field.dtheta)])

    # The step's start (Wolfe, the kinks' Clarke element) is kept for a rejected step's redo.
    start0 = ros.placeholder(lambda: start_field(theta0, weights0, True))
    num_initial = jnp.sum(save_xs < s0)
    aux0 = jnp.stack([jnp.asarray(tau0, dtype), jnp.asarray(jnp.nan, dtype)])  # set on entry
    carry = ros._Carry(
        x=jnp.asarray(s0, dtype),
        y=theta0,
        aux=aux0,
        z=weights0,
        h=jnp.asarray(options.first_step, dtype),
        h_resume=jnp.zeros((), dtype),
        index=num_initial,
        xs=jnp.where(save_xs <= s0, s0, save_xs),
        ys=jnp.broadcast_to(theta0, (S,) + theta0.shape),
        auxs=jnp.broadcast_to(aux0, (S, 2)),
        saved=jnp.zeros(S, bool),
        steps=jnp.zeros((), jnp.int32),
        rejected=jnp.zeros((), jnp.int32),
        outcome=jnp.where(s0 >= s_end, ros.REACHED_END, -1),
        max_sliding=jnp.zeros((), jnp.int32),
        start=start0,
        fresh=jnp.asarray(True),
    )

    def body(c: ros._Carry):
        entering = c.steps == 0  # the entry iteration (counted in steps, subtracted at the end)
        # The carry's z holds lambda (the W-method keeps pre-activations there).
        F1, kinks = ros.reuse_after_rejection(
            c.fresh, lambda: start_field(c.y, c.z, entering), c.start
        )
        active = F1.weights > WEIGHT_FLOOR
        # Steps end at s_end, not at the save grid (the saves come from the dense output).
        clipped = (c.h >= s_end - c.x) & ~entering
        h = jnp.where(entering, 0.0, jnp.where(clipped, s_end - c.x, c.h))

        # The stages in a loop (one field in the compiled program instead of six).
        def stage(i, state):
            K, _ = state
            field = evaluate(
                margins_and_grads,
                degree,
                c.y + h * (jnp.asarray(A_MATRIX)[i] @ K),
                active,
                geometry,
                kinks,
            )
            return K.at[i].set(field.dtheta), field

        K0 = jnp.zeros((7,) + c.y.shape, dtype).at[0].set(F1.dtheta)
        K, last = jax.lax.fori_loop(1, 7, stage, (K0, F1))
        theta_new = c.y + h * (jnp.asarray(B5) @ K)
        err_y = h * ((jnp.asarray(B5) - jnp.asarray(B4)) @ K)
        err = jnp.linalg.norm(err_y) / options.tol
        dense, dense_rate = dense_output(c.y, theta_new, h * K)

        # ReLU kinks: a pair of an example in E that crosses its kink during the step is landed
        # on (the step ends within kink_landing past it: on the dense output, or redone shorter)
        # and put on it; the next step's start decides whether it slides or goes through. Pairs
        # of the other examples cross freely (lambda_i = 0: they do not enter the velocity).
        h_kink, landed_kinks, held = jnp.inf, jnp.asarray(True), None
        truncated, h_done = jnp.asarray(False), h
        if geometry is not None:
            # z and dz/ds at the start (a JVP: the quadratic guess of kink_crossings).
            z0, rate0 = jax.jvp(
                lambda t: geometry.preactivations(t / jnp.linalg.norm(t)), (c.y,), (F1.dtheta,)
            )
            in_e = jnp.repeat(active, pairs_per_example)
            side = jnp.zeros_like(z0).at[kinks.slots].set(jnp.where(kinks.alpha > 0.5, 1.0, -1.0))
            leaving = in_e & kinks.on_kink & ~_held_pairs(geometry, kinks)

            def bands(z1):
                """(crossings' landing tolerance, leaving pairs' band) at pre-activations z1."""
                scale = jnp.maximum(jnp.mean(jnp.abs(z1)), 1e-300)
                # The band is floored at the crossings' tolerance: units that no example uses
                # decay (their own scale reached 1e-25 on the reference problem, L = 2, by
                # s ~ 400), and a band relative to it alone asked for landings of 1e-14 (the
                # step size collapsed).
                return options.kink_landing * scale, jnp.maximum(
                    options.on_kink * _unit_scale(z0, active.shape[0]), options.kink_landing * scale
                )

            def kinks_at(z1, h):
                """(crossed, landed, h_kink) for a step of size h ending at pre-activations z1."""
                landing, band = bands(z1)
                # Off their kinks: a change of sign is a crossing. On them and not held: the
                # pair leaves to the side of its alpha in {0, 1}; the side test is
                # instantaneous, and one that ends on the other side, beyond half the on-kink
                # band, is landed within the band and held. (A landing at kink_landing past
                # z = 0 instead made pairs with a near-zero rate, released and drifting back
                # by ~1e-9, chatter on the reference problem, L = 3: ~40% of the steps were
                # landings of ~1e-7.) Not the W-method's landing_band: with it the bench's
                # L = 3 continuation ended with more than 256 pairs on kinks (TOO_MANY_KINKS
                # at s = 9663, 2026-11-29); suspected, not isolated: near the limit a band of
                # the tolerance is far wider than a step's travel, and pairs are held before
                # they reach their kinks.
                crossed, too_far, h_cross = ros.kink_crossings(
                    z0, z1, in_e & ~kinks.on_kink, landing, h, rate0
                )
                back = leaving & (side * z1 < -0.5 * band)
                back_too_far = leaving & (side * z1 < -band)
                # A linear guess that ends 3/4 of the band past the kink, on the wrong side.
                h_back = (
                    h
                    * jnp.maximum(side * z0 + 0.75 * band, 1e-3 * band)
                    / jnp.maximum(side * (z0 - z1), 1e-300)
                )
                h_kink = jnp.minimum(h_cross, jnp.min(jnp.where(back_too_far, h_back, jnp.inf)))
                return crossed | back, ~jnp.any(too_far | back_too_far), h_kink

            z1 = geometry.preactivations(theta_new / jnp.linalg.norm(theta_new))
            crossed, landed_kinks, h_kink = kinks_at(z1, h)
            # Entering, the held pairs are the sliding ones only.
            crossed, landed_kinks = crossed & ~entering, landed_kinks | entering
            # A step that passed its error test but went past a kink ends at the kink instead:
            # the first root on Dormand-Prince's dense output (4th order, as the error
            # estimate), where diffrax's events end a step. Why: redone from the start, a landing
            # took two attempts and the pair's band was often missed again (the reference
            # problem, L = 3, 1e6 -> 1e12: 69 of 228 attempts were such redos).

            def at_kink(_):
                def z_at(u):
                    theta_u = dense(u)
                    return geometry.preactivations(theta_u / jnp.linalg.norm(theta_u))

                # Aimed at the middle of the landing bands: g = 0 half the crossing band past
                # the kink (crossings), or 3/4 of the band on the wrong side (leaving pairs).
                landing, band = bands(z1)
                free = in_e & ~kinks.on_kink & (z0 != 0)
                sign = jnp.where(free, jnp.sign(z0), side)
                offset = jnp.where(free, 0.5 * landing, 0.75 * band)

                def g_at(u):
                    return sign * z_at(u) + offset

                g0 = sign * z0 + offset
                u = first_root_of_any(g_at, g0, (free | leaving) & (g0 > 0), h_kink / h)
                crossed_u, landed_u, _ = kinks_at(z_at(u), u * h)
                return dense(u), u, crossed_u, landed_u

            def not_tried(_):
                return theta_new, jnp.ones((), dtype), crossed, jnp.asarray(False)

            try_kink = ~landed_kinks & (err <= 1.0) & jnp.isfinite(err)
            theta_u, u, crossed_u, landed_u = jax.lax.cond(try_kink, at_kink, not_tried, None)
            truncated = try_kink & landed_u & (u < 1.0)
            theta_new = jnp.where(truncated, theta_u, theta_new)
            crossed = jnp.where(truncated, crossed_u, crossed)
            landed_kinks = landed_kinks | truncated
            h_done = jnp.where(truncated, u * h, h)
            held = _held_pairs(geometry, kinks) | crossed

        def finish(theta_new):
            """(end point on E's equal margins and the held kinks, its field with the step's E
            (for the clocks: the next step's Wolfe call may change E, not the common margin),
            the gaps to the common margin)."""
            theta_new = equalize(
                margins_and_grads,
                theta_new,
                active,
                geometry=geometry,
                kinks=kinks,
                held=held,
                candidates=options.candidates,
            )
            end = evaluate(margins_and_grads, degree, theta_new, active, geometry, kinks)
            if geometry is None:
                gap1 = last.margins - last.q_min
            else:  # off E with the live activation pattern (their pairs may have crossed)
                gap1 = margins_and_grads(theta_new, None)[0] - end.q_min
            return theta_new, end, gap1

        def skip(theta_new):
            return theta_new, F1, F1.margins - F1.q_min

        # A step that fails its error test or a kink landing is redone without the projection
        # and the end field (~23 ms of a ~70 ms attempt on the reference problem, L = 3); its
        # examples joining E are then found on the redo.
        finite = jnp.isfinite(err) & jnp.all(jnp.isfinite(theta_new))
        passed = (err <= 1.0) & finite & landed_kinks
        theta_new, end, gap1 = jax.lax.cond(passed, finish, skip, theta_new)
        finite = finite & jnp.isfinite(end.q_min)
        err = jnp.where(finite, err, jnp.inf)

        # Events: an example off E comes down through the common margin (it joins), or a weight
        # of E turns negative (that example leaves). Redo the step shorter until it ends within
        # `landing` / `leaving` past the event; the next step's Wolfe call sorts E out.
        scale = jnp.abs(last.q_min)
        gap0 = F1.margins - F1.q_min
        crossed = ~active & (gap1 < -options.landing * scale) & (gap0 > gap1)
        h_join = jnp.min(
            jnp.where(
                crossed, h_done * (gap0 + 0.5 * options.landing * scale) / (gap0 - gap1), jnp.inf
            )
        )
        left = active & (last.weights < -options.leaving)
        h_leave = jnp.min(
            jnp.where(
                left,
                h * (F1.weights + 0.5 * options.leaving) / (F1.weights - last.weights),
                jnp.inf,
            )
        )
        h_land = jnp.minimum(jnp.minimum(h_join, h_leave), h_kink)
        landed = (~jnp.any(crossed) & ~jnp.any(left) & landed_kinks) | entering

        tau_new = c.aux[0] + _tau_increment(
            degree, c.x, h_done, F1.q_min, F1.dtheta, end.q_min, end.dtheta
        )
        x_new = jnp.where(clipped & ~truncated, s_end, c.x + h_done)
        aux_new = aux_at(x_new, tau_new, end)
        finite = finite & jnp.all(jnp.isfinite(aux_new))
        accept = (err <= 1.0) & landed & finite
        overflow = jnp.asarray(False) if kinks is None else kinks.overflow
        accept = accept & ~overflow

        factor = jnp.clip(0.9 * jnp.where(err > 0, err, 1e-10) ** -0.2, 0.2, 5.0)
        h_next, h_resume = ros.next_step(
            c, accept, clipped, h, factor, h_land, (err <= 1.0) & finite
        )
        h_next = jnp.where(entering, c.h, h_next)
        num_held = jnp.sum(active) if geometry is None else jnp.sum(kinks.hold)
        new = c._replace(
            x=jnp.where(accept, x_new, c.x),
            y=jnp.where(accept, theta_new, c.y),
            aux=jnp.where(accept, aux_new, c.aux),
            z=jnp.where(accept, F1.weights, c.z),
            h=h_next,
            h_resume=h_resume,
            steps=c.steps + accept,
            rejected=c.rejected + ~accept,
            max_sliding=jnp.maximum(c.max_sliding, num_held.astype(jnp.int32)),
            start=(F1, kinks),
            fresh=accept,
        )
        # The save points the step passed: from the dense output, each put back on E's equal
        # margins and the held kinks (equalize; the dense output is off them by its error) with
        # clocks from the margins there. Why not steps cut at the save grid (as the W-method
        # does): on the reference problem, L = 3, 1e6 -> 1e12, the 150 saves cut ~90 of the
        # limit flow's ~155 steps, whose error test allowed steps ~10x longer.
        held_before = None if geometry is None else _held_pairs(geometry, kinks)

        def pending(state):
            new, _ = state
            return accept & (new.index < S) & (save_xs[jnp.minimum(new.index, S - 1)] <= x_new)

        def save_next(state):
            new, _ = state
            index = jnp.minimum(new.index, S - 1)
            x_save = save_xs[index]
            at_end = x_save >= x_new

            def between(_):
                u = (x_save - c.x) / h
                theta = equalize(
                    margins_and_grads,
                    dense(u),
                    active,
                    geometry=geometry,
                    kinks=kinks,
                    held=held_before,
                    candidates=options.candidates,
                )
                q = margins_and_grads(theta, None if kinks is None else kinks.gates)[0]
                q_min = F1.weights @ q
                rate = dense_rate(u) / h
                dtheta = rate - (rate @ theta) * theta
                tau = c.aux[0] + _tau_increment(
                    degree, c.x, x_save - c.x, F1.q_min, F1.dtheta, q_min, dtheta
                )
                log_t_loss = quasi_steady_log_t_loss(degree, x_save, q_min, dtheta)
                return theta, jnp.stack([tau, log_t_loss])

            theta, aux = jax.lax.cond(at_end, lambda _: (theta_new, aux_new), between, None)
            new = ros._store(new, jnp.where(at_end, x_new, x_save), theta, aux, index)
            return new._replace(index=new.index + 1), at_end

        new, at_save = jax.lax.while_loop(pending, save_next, (new, jnp.asarray(False)))

        converged = (direction_tol > 0) & (jnp.linalg.norm(F1.dtheta) < direction_tol) & ~entering
        collapsed = h_next < 1e-14 * (1.0 + jnp.abs(c.x))
        outcome = jnp.select(
            [
                overflow,
                accept & (x_new >= s_end),
                converged,
                collapsed,
                new.steps + new.rejected >= max_steps,
            ],
            [ros.KINK_OVERFLOW, ros.REACHED_END, ros.CONVERGED, ros.FAILED, ros.OUT_OF_STEPS],
            -1,
        )
        new = new._replace(outcome=outcome)
        # A run that stops off the save grid keeps its last point in the next free row.
        final = ros._store(new, new.x, new.y, new.aux, jnp.minimum(new.index, S - 1))
        off_grid = (outcome >= 0) & ~at_save & (new.index < S)
        new = jax.tree.map(lambda a, b: jnp.where(off_grid, a, b), final, new)
        return new._replace(index=new.index + off_grid)

    out = jax.lax.while_loop(lambda c: c.outcome < 0, body, carry)
    return ros.Integration(
        out.xs,
        out.ys,
        out.auxs,
        out.saved,
        out.x,
        out.y,
        out.aux,
        out.outcome,
        jnp.maximum(out.steps - 1, 0),
        out.rejected,
        out.max_sliding,
    )
