"""A linearly implicit integrator for the flow: stiff low-rank part implicit, kinks as constraints.

Why not a diffrax solver here (NOTES §3-§4): the polar field's Jacobian has a stiff part
-c (I - theta theta^T) G^T (diag p - p p^T) G, c = beta / (L p.q), of rank <= n and size ~ beta,
so explicit steps must shrink like 1/beta; diffrax's implicit solvers factor a dense Jacobian
(far too slow on ~1e3 parameters) and know nothing of the sliding manifolds of ReLU kinks, which
make adaptive steps collapse. This integrator:

- ROS2 (Verwer, Spee, Blom & Hundsdorfer, SIAM J. Sci. Comput. 1999), a 2-stage Rosenbrock-W
  method: second order for ANY matrix A in W = I - gamma h A, and L-stable when A is the stiff
  part. A is that low-rank part (Woodbury with an n x n Cholesky), plus the exact scalar
  derivative of the stiff ln(t L) clock equation. Embedded first-order estimate for step control.
- ReLU kinks (NOTES §4): at the start of each step, the pairs with z_ik = 0 get the min-norm
  element of their Clarke set (a box QP); those whose kink derivative lands inside (0, 1) slide,
  i.e. the step moves in the tangent space of {z_ik = 0} (orthogonal projection, which here is
  the Filippov equivalent control) and ends with a Newton projection back onto the manifold.
  A pair that crosses its kink during a step is located like an event: the step is redone, shorter,
  until it ends past the kink by less than `landing` (relative to the mean |z|), then snapped onto
  it; the next step's QP decides whether it slides or goes through.
- Events (phase 1: -ln L crossing 0, i.e. t0) are landed the same way.

One compiled lax.while_loop, vmappable over initial conditions.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ._box_qp import box_qp
from ._fields import softmax_of_scaled
from ._kink_geometry import KinkGeometry

GAMMA = 1.0 + 1.0 / math.sqrt(2.0)


class RosenbrockOptions(NamedTuple):
    """Options of the linearly implicit integrator.

    Attributes:
        tol: local error tolerance per step (absolute on the unit direction theta, relative on
            the clocks).
        candidates: kink pairs examined per step (the ones with smallest |z|).
        on_kink: |z| / mean |z| below which a pair counts as on its kink.
        landing: how far past a kink (relative to mean |z|) or past t0 a step may end.
        qp_iterations: iterations of the box QP that picks the Clarke element on kinks.
        first_step: the first step size tried.
    """

    tol: float = 1e-6
    candidates: int = 128
    on_kink: float = 1e-6
    landing: float = 1e-9
    qp_iterations: int = 300
    first_step: float = 1e-4


class Clock(NamedTuple):
    """How the flow looks in one clock x (static Python data: decides the compiled program).

    polar: x = s = ln ||w||, y = theta (unit), aux = (tau, ln(t L)).
    not polar: x = tau, y = w, aux = (t, unused).
    """

    polar: bool
    degree: int


class _Field(NamedTuple):
    dy: jax.Array
    daux: jax.Array
    aux_jacobian: jax.Array  # diagonal derivative of daux in aux (the stiff ln(tL) term)
    y_unit: jax.Array
    margins: jax.Array
    grads: jax.Array  # per-example gradients (n, d) at y_unit, under the step's gates
    weights: jax.Array  # p
    stiff_scale: jax.Array  # c


def evaluate(clock: Clock, margins_and_grads, projector, x, y, aux, gates) -> _Field:
    """The clock's field at (x, y, aux), with the step's kink gates and tangent projector."""
    L = clock.degree
    if clock.polar:
        y_unit = y / jnp.linalg.norm(y)
        m, G = margins_and_grads(y_unit, gates)
        p = softmax_of_scaled(L * x, m)
        g = projector(G.T @ p)
        # p.q > 0 after t0 (Lemma 4); the guard only keeps padding runs finite.
        pq = p @ m
        pq = jnp.where(pq > 0, pq, 1.0)
        tangent = g - (y_unit @ g) * y_unit
        log_dtau_ds = _log_dtau_ds(L, x, pq)
        # d(-ln L)/ds = beta ||g||^2 / (L p.q); d ln(tL)/ds = (dtau/ds)/(tL) - d(-ln L)/ds.
        log_loss_rate = L * x + 2.0 * jnp.log(jnp.linalg.norm(g)) - jnp.log(L * pq)
        relax = jnp.exp(log_dtau_ds - aux[1])
        # aux[0] = tau is integrated by quadrature (log_clock_rate), not by the W-method.
        daux = jnp.stack([jnp.zeros_like(relax), relax - jnp.exp(log_loss_rate)])
        jac = jnp.stack([jnp.zeros_like(relax), -relax])
        scale = jnp.exp(L * x) / (L * pq)
        return _Field(tangent / (L * pq), daux, jac, y_unit, m, G, p, scale)
    m, G = margins_and_grads(y, gates)
    p = jax.nn.softmax(-m)
    g = projector(G.T @ p)
    log_loss = jax.nn.logsumexp(-m)
    # dt/dtau = 1/L <= 1 before t0; the cap keeps a run that starts separated finite.
    daux = jnp.zeros(2, y.dtype)  # the clock t is integrated by quadrature (log_clock_rate)
    return _Field(g, daux, jnp.zeros(2, y.dtype), y, m, G, p, jnp.ones((), y.dtype))


def _log_dtau_ds(L, s, pq):
    """ln dtau/ds = -(L - 2) s - ln(L p.q) (NOTES §2); p.q > 0 after t0 (Lemma 4), the guard
    only keeps padding runs that never separated finite."""
    return -(L - 2) * s - jnp.log(L * jnp.where(pq > 0, pq, 1.0))


def log_clock_rate(clock: Clock, margins, x, y):
    """ln of d aux[0] / dx: ln dtau/ds (polar) or ln dt/dtau = -ln L (tau clock)."""
    if clock.polar:
        m = margins(y / jnp.linalg.norm(y))
        pq = softmax_of_scaled(clock.degree * x, m) @ m
        return _log_dtau_ds(clock.degree, x, pq)
    # Capped: a run that starts separated has a dummy phase 1 whose 1/L may overflow.
    return jnp.minimum(-jax.nn.logsumexp(-margins(y)), 700.0)


def exp_trapezoid(h, a, b):
    """integral over a step of length h of exp(linear from a to b): exact for linear exponents."""
    d = b - a
    small = jnp.abs(d) < 1e-8
    ratio = jnp.where(small, 1.0 + 0.5 * d, jnp.expm1(d) / jnp.where(small, 1.0, d))
    return h * jnp.exp(a) * ratio


# --------------------------------------------------------------------------- linear algebra


def tangent_projector(rows, active):
    """v -> v minus its component in span{rows[k] : active[k]} (rows need not be orthogonal)."""
    norms = jnp.linalg.norm(rows, axis=1, keepdims=True)
    R = jnp.where(active[:, None], rows / jnp.where(norms > 0, norms, 1.0), 0.0)
    gram = R @ R.T + jnp.diag(jnp.where(active, 1e-14, 1.0))
    factor = jax.scipy.linalg.cho_factor(gram)

    def project(v):
        coefficients = jax.scipy.linalg.cho_solve(factor, R @ v)
        return v - R.T @ coefficients

    return project


def stiff_factor(clock: Clock, field: _Field, projector):
    """V with A = -V V^T the stiff part of the field's Jacobian in y (d x n)."""
    U = projector(field.grads.T)
    if clock.polar:
        U = U - jnp.outer(field.y_unit, field.y_unit @ U)
    root_p = jnp.sqrt(field.weights)
    scaled = U * root_p[None, :]
    # G^T (diag p - p p^T) G = (G^T D^1/2 (I - r r^T)) (...)^T with r = sqrt(p), ||r|| = 1.
    V = scaled - jnp.outer(scaled @ root_p, root_p)
    return jnp.sqrt(field.stiff_scale) * V


def w_solver(V, aux_jacobian, h):
    """(b_y, b_aux) -> (W^{-1} b_y, W^{-1} b_aux) for W = I - gamma h A (Woodbury)."""
    a = GAMMA * h
    n = V.shape[1]
    # M's eigenvalues are >= 1 (no diagonal scaling: scaled, its near-null directions, the
    # softmax's sum-to-one direction, made Cholesky break down at beta ~ 1e11).
    M = jnp.eye(n, dtype=V.dtype) + a * (V.T @ V)
    factor = jax.scipy.linalg.cho_factor(M)

    def solve_m(r):
        return jax.scipy.linalg.cho_solve(factor, r)

    def solve(b_y, b_aux):
        r = V.T @ b_y
        z = solve_m(r)
        z = z + solve_m(r - M @ z)  # one step of iterative refinement
        return b_y - a * (V @ z), b_aux / (1.0 - a * aux_jacobian)

    return solve


# --------------------------------------------------------------------------- kinks


class _KinkStep(NamedTuple):
    gates: object
    projector: object
    sliding: jax.Array  # (P,) bool: pairs held on their kink during the step
    on_kink: jax.Array  # (P,) bool
    num_sliding: jax.Array


def kink_step(geometry: KinkGeometry | None, margins_and_grads, clock, options, x, y, z):
    """Gates, tangent projector and sliding set for a step from (x, y) with pre-activations z."""
    if geometry is None:
        false = jnp.zeros((1,), bool)
        return _KinkStep(None, lambda v: v, false, false, jnp.zeros((), jnp.int32))
    P = geometry.num_pairs
    k = min(options.candidates, P)
    scale = jnp.maximum(jnp.mean(jnp.abs(z)), 1e-300)
    # Compaction, not top_k: top_k over a few thousand pairs costs ~0.6 ms on a CPU.
    on_all = jnp.abs(z) <= options.on_kink * scale
    slots = jnp.nonzero(on_all, size=k, fill_value=0)[0]
    on_slot = jnp.arange(k) < jnp.sum(on_all)
    on_kink = jnp.zeros(P, bool).at[slots].max(on_slot)
    y_unit = y / jnp.linalg.norm(y) if clock.polar else y

    def clarke_element(_):
        rows = jnp.where(on_slot[:, None], geometry.rows(y_unit, slots), 0.0)
        gates0 = geometry.gates(on_kink, jnp.zeros(P, y.dtype))
        m, G = margins_and_grads(y_unit, gates0)
        p = softmax_of_scaled(clock.degree * x, m) if clock.polar else jax.nn.softmax(-m)
        # Setting the pair's derivative to alpha in [0, 1] adds alpha * c_k * a_k to g.
        c = (1.0 - geometry.slope) * geometry.signal(y_unit, gates0, p)[slots]
        c = jnp.where(on_slot, c, 0.0)
        b = box_qp(rows @ rows.T, rows @ (G.T @ p), jnp.minimum(c, 0.0), jnp.maximum(c, 0.0),
                   on_slot, options.qp_iterations)  # fmt: skip
        alpha = jnp.clip(jnp.where(c != 0, b / jnp.where(c != 0, c, 1.0), 0.0), 0.0, 1.0)
        return rows, alpha

    def nothing_on_kinks(_):
        return jnp.zeros((k, y.shape[0]), y.dtype), jnp.zeros(k, y.dtype)

    # The QP costs ~k gradient evaluations: skip it when no pair is on its kink.
    rows, alpha = jax.lax.cond(jnp.any(on_slot), clarke_element, nothing_on_kinks, None)
    slides = on_slot & (alpha > 1e-9) & (alpha < 1.0 - 1e-9)
    gates = geometry.gates(on_kink, jnp.zeros(P, y.dtype).at[slots].set(alpha))
    sliding = jnp.zeros(P, bool).at[slots].max(slides)
    projector = tangent_projector(rows, slides)
    return _KinkStep(gates, projector, sliding, on_kink, jnp.sum(slides).astype(jnp.int32))


def project_onto_kinks(geometry: KinkGeometry, clock, options, y, hold, sweeps=2):
    """Newton (min-norm) corrections putting the pairs in `hold` back on z = 0."""
    k = min(options.candidates, geometry.num_pairs)
    for _ in range(sweeps):
        y_unit = y / jnp.linalg.norm(y) if clock.polar else y
        slots = jnp.nonzero(hold, size=k, fill_value=0)[0]
        active = jnp.arange(k) < jnp.sum(hold)
        z = geometry.preactivations(y_unit)[slots]
        rows = jnp.where(active[:, None], geometry.rows(y_unit, slots), 0.0)
        gram = rows @ rows.T + jnp.diag(jnp.where(active, 1e-14 * jnp.max(jnp.sum(
            rows * rows, axis=1)), 1.0))  # fmt: skip
        factor = jax.scipy.linalg.cho_factor(gram)
        correction = rows.T @ jax.scipy.linalg.cho_solve(factor, jnp.where(active, z, 0.0))
        y = y_unit - correction
    return y / jnp.linalg.norm(y) if clock.polar else y


# --------------------------------------------------------------------------- the loop

# Integrator outcomes.
REACHED_END = 0
EVENT = 1
OUT_OF_STEPS = 2
FAILED = 3
CONVERGED = 4


class Integration(NamedTuple):
    xs: jax.Array  # (S,) saved clock values
    ys: jax.Array  # (S, d) saved states (theta or w)
    auxs: jax.Array  # (S, 2) saved aux clocks
    saved: jax.Array  # (S,) bool: row holds a point
    x: jax.Array
    y: jax.Array
    aux: jax.Array
    outcome: jax.Array
    steps: jax.Array
    rejected: jax.Array
    max_sliding: jax.Array


class _Carry(NamedTuple):
    x: jax.Array
    y: jax.Array
    aux: jax.Array
    z: jax.Array
    h: jax.Array
    index: jax.Array
    xs: jax.Array
    ys: jax.Array
    auxs: jax.Array
    saved: jax.Array
    steps: jax.Array
    rejected: jax.Array
    outcome: jax.Array
    max_sliding: jax.Array


def _store(carry: _Carry, x, y, aux, index):
    return carry._replace(
        xs=carry.xs.at[index].set(x), ys=carry.ys.at[index].set(y),
        auxs=carry.auxs.at[index].set(aux), saved=carry.saved.at[index].set(True),
    )  # fmt: skip


def integrate(clock: Clock, margins, margins_and_grads, geometry, options: RosenbrockOptions, x0, y0,
              aux0, x_end, save_xs, max_steps, event=None, direction_tol=0.0) -> Integration:
    """Integrate from (x0, y0, aux0) to x_end, saving at save_xs (increasing); stop early on
    event(y) crossing 0 upwards (landed within `landing`), or ||dy/dx|| < direction_tol."""
    dtype = y0.dtype
    S = save_xs.shape[0]

    def preacts(y):
        if geometry is None:
            return jnp.zeros((1,), dtype)
        return geometry.preactivations(y / jnp.linalg.norm(y) if clock.polar else y)

    num_initial = jnp.sum(save_xs <= x0)
    carry = _Carry(
        x=jnp.asarray(x0, dtype), y=y0, aux=aux0, z=preacts(y0),
        h=jnp.asarray(options.first_step, dtype), index=num_initial,
        xs=jnp.where(save_xs <= x0, x0, save_xs), ys=jnp.broadcast_to(y0, (S,) + y0.shape),
        auxs=jnp.broadcast_to(aux0, (S, 2)), saved=save_xs <= x0,
        steps=jnp.zeros((), jnp.int32), rejected=jnp.zeros((), jnp.int32),
        outcome=jnp.where(x0 >= x_end, REACHED_END, -1), max_sliding=jnp.zeros((), jnp.int32),
    )  # fmt: skip

    def cond(c: _Carry):
        return c.outcome < 0

    def body(c: _Carry):
        ks = kink_step(geometry, margins_and_grads, clock, options, c.x, c.y, c.z)
        F1 = evaluate(clock, margins_and_grads, ks.projector, c.x, c.y, c.aux, ks.gates)
        V = stiff_factor(clock, F1, ks.projector)
        target = jnp.minimum(save_xs[jnp.minimum(c.index, S - 1)], x_end)
        target = jnp.where(c.index < S, target, x_end)
        clipped = c.h >= target - c.x
        h = jnp.where(clipped, target - c.x, c.h)
        solve = w_solver(V, F1.aux_jacobian, h)
        # Non-autonomous: the polar field depends on s through beta = e^(L s), with a derivative
        # ~ beta in the stiff directions; W-methods take it as the column of the augmented
        # system's Jacobian (s' = 1), i.e. + gamma h dF/ds in stage 1 and - in stage 2.
        if clock.polar:
            _, (fs_y, fs_a) = jax.jvp(
                lambda x: evaluate(clock, margins_and_grads, ks.projector, x, c.y, c.aux,
                                   ks.gates)[:2],
                (c.x,), (jnp.ones_like(c.x),),
            )  # fmt: skip
        else:
            fs_y, fs_a = jnp.zeros_like(c.y), jnp.zeros_like(c.aux)
        k1y, k1a = solve(F1.dy + GAMMA * h * fs_y, F1.daux + GAMMA * h * fs_a)
        F2 = evaluate(clock, margins_and_grads, ks.projector, c.x + h, c.y + h * k1y,
                      c.aux + h * k1a, ks.gates)  # fmt: skip
        k2y, k2a = solve(F2.dy - 2.0 * k1y - GAMMA * h * fs_y,
                         F2.daux - 2.0 * k1a - GAMMA * h * fs_a)  # fmt: skip
        y_new = c.y + h * (1.5 * k1y + 0.5 * k2y)
        aux_new = c.aux + h * (1.5 * k1a + 0.5 * k2a)
        aux_new = aux_new.at[0].set(c.aux[0] + exp_trapezoid(
            h, log_clock_rate(clock, margins, c.x, c.y), log_clock_rate(clock, margins, c.x + h,
                                                                          y_new)))  # fmt: skip
        err_y, err_a = 0.5 * h * (k1y + k2y), 0.5 * h * (k1a + k2a)
        # The embedded first-order estimate lags on the stiff ln(t L) clock (it relaxes at rate
        # ~ beta); filter it through W^-1 there, as Rosenbrock codes do (Hairer & Wanner IV.8).
        # Once it relaxes faster than the step (h beta >> 1) ln(t L) is slaved to theta, and its
        # residual e^(l-u) - r is a difference of two O(beta) terms whose rounding noise, not
        # the step, sets the estimate: filter a second time so that theta's error decides.
        err_a = (err_a / (1.0 - GAMMA * h * F1.aux_jacobian)).at[0].set(0.0)
        if clock.polar:
            # Deep in the stiff regime ln(t L) is slaved to theta: v = t L solves
            # v' = e^l - r v with r = d(-ln L)/ds ~ L beta gamma~, so v = e^l / (r - l') up to a
            # relative O(r' / r^2) = O(L / r). There the W-method's estimate is dominated by the
            # rounding noise of e^(l-u) - r (two O(beta) terms), so use the closed form instead.
            # Its extra gradient evaluation is skipped while the start of the step is far from
            # that regime (-aux_jacobian = e^(l-u) ~ r there).
            u_slaved, rate = jax.lax.cond(
                -F1.aux_jacobian[1] > 1e4,
                lambda v: quasi_steady_log_t_loss(clock, margins_and_grads, c.x + h, v,
                                                  with_rate=True),
                lambda v: (aux_new[1], jnp.zeros_like(aux_new[1])),
                y_new,
            )  # fmt: skip
            slaved = rate > 1e5
            aux_new = aux_new.at[1].set(jnp.where(slaved, u_slaved, aux_new[1]))
            err_a = jnp.where(slaved, 0.0, err_a)

        y_scale = 1.0 if clock.polar else 1.0 + jnp.linalg.norm(c.y)
        aux_scale = jnp.maximum(jnp.abs(c.aux), jnp.abs(aux_new))
        if clock.polar:  # tau relative, ln(t L) absolute-or-relative
            aux_scale = aux_scale.at[1].set(1.0 + aux_scale[1])
        err = jnp.maximum(
            jnp.linalg.norm(err_y) / (options.tol * y_scale),
            jnp.max(jnp.abs(err_a) / (options.tol * aux_scale + 1e-300)),
        )
        finite = jnp.isfinite(err) & jnp.all(jnp.isfinite(y_new)) & jnp.all(jnp.isfinite(aux_new))
        err = jnp.where(finite, err, jnp.inf)
        if clock.polar:
            y_new = y_new / jnp.linalg.norm(y_new)

        # Kink crossings and the event: redo the step shorter until it ends just past them.
        h_land = jnp.inf
        crossed = jnp.zeros_like(ks.sliding)
        landed = jnp.asarray(True)
        if geometry is not None:
            z_new = preacts(y_new)
            scale = jnp.maximum(jnp.mean(jnp.abs(z_new)), 1e-300)
            crossed = (jnp.sign(z_new) != jnp.sign(c.z)) & ~ks.on_kink & (c.z != 0)
            too_far = crossed & (jnp.abs(z_new) > options.landing * scale)
            # A step that ends just short of a kink it is heading for also lands on it (else
            # the next steps would approach it geometrically, a Zeno sequence).
            crossed = crossed | (~ks.on_kink & (jnp.abs(z_new) <= options.landing * scale)
                                 & (jnp.abs(z_new) < jnp.abs(c.z)))
            fraction = (jnp.abs(c.z) + 0.5 * options.landing * scale) / (
                jnp.abs(c.z) + jnp.abs(z_new))
            h_land = jnp.min(jnp.where(too_far, h * fraction, jnp.inf))
            landed = ~jnp.any(too_far)
        hit = jnp.asarray(False)
        if event is not None:
            e0, e1 = event(c.y), event(y_new)
            up = (e0 < 0) & (e1 >= 0)
            too_far = up & (e1 > options.landing)
            h_land = jnp.minimum(h_land, jnp.where(
                too_far, h * (jnp.abs(e0) + 0.5 * options.landing) / (jnp.abs(e0) + e1), jnp.inf))
            landed = landed & ~too_far
            hit = up & ~too_far
        accept = (err <= 1.0) & landed

        factor = jnp.clip(0.9 * jnp.where(err > 0, err, 1e-10) ** -0.5, 0.2, 4.0)
        h_next = jnp.where(accept, jnp.where(clipped, jnp.maximum(c.h, h * factor), h * factor),
                           jnp.minimum(h * jnp.minimum(factor, 1.0), h_land))  # fmt: skip

        y_acc = y_new
        if geometry is not None:
            hold = ks.sliding | crossed
            y_acc = jax.lax.cond(
                jnp.any(hold),
                lambda v: project_onto_kinks(geometry, clock, options, v, hold),
                lambda v: v,
                y_new,
            )
        x_new = jnp.where(clipped, target, c.x + h)
        new = c._replace(
            x=jnp.where(accept, x_new, c.x), y=jnp.where(accept, y_acc, c.y),
            aux=jnp.where(accept, aux_new, c.aux),
            z=jnp.where(accept, preacts(y_acc), c.z) if geometry is not None else c.z,
            h=h_next, steps=c.steps + accept, rejected=c.rejected + ~accept,
            max_sliding=jnp.maximum(c.max_sliding, ks.num_sliding),
        )  # fmt: skip
        at_save = accept & clipped & (c.index < S) & (target == save_xs[jnp.minimum(c.index, S - 1)])
        stored = _store(new, new.x, new.y, new.aux, jnp.minimum(c.index, S - 1))
        new = jax.tree.map(lambda a, b: jnp.where(at_save, a, b), stored, new)
        new = new._replace(index=c.index + at_save)

        converged = (direction_tol > 0) & (jnp.linalg.norm(F1.dy) < direction_tol)
        collapsed = h_next < 1e-14 * (1.0 + jnp.abs(c.x))
        outcome = jnp.select(
            [accept & (x_new >= x_end), accept & hit, converged, ~finite & collapsed, collapsed,
             new.steps + new.rejected >= max_steps],
            [REACHED_END, EVENT, CONVERGED, FAILED, FAILED, OUT_OF_STEPS],
            -1,
        )
        new = new._replace(outcome=outcome)
        # A run that stops off the save grid keeps its last point in the next free row.
        final = _store(new, new.x, new.y, new.aux, jnp.minimum(new.index, S - 1))
        off_grid = (outcome >= 0) & ~at_save & (new.index < S)
        new = jax.tree.map(lambda a, b: jnp.where(off_grid, a, b), final, new)
        return new._replace(index=new.index + off_grid)

    out = jax.lax.while_loop(cond, body, carry)
    return Integration(out.xs, out.ys, out.auxs, out.saved, out.x, out.y, out.aux, out.outcome,
                       out.steps, out.rejected, out.max_sliding)  # fmt: skip


def quasi_steady_log_t_loss(clock: Clock, margins_and_grads, x, y, with_rate=False):
    """ln(t L) for a run that starts separated at s = x: t := (dt/ds) / (d ln(dt/ds)/ds),
    i.e. t as if dt/ds had grown at its current exponential rate since s = -inf. This is the
    quasi-steady value of the stiff ln(t L) equation (starting anywhere else costs a transient
    of width ~1/beta in s); it is floored at dt/ds x 1 when that rate is below 1."""
    F = evaluate(clock, margins_and_grads, lambda v: v, x, y / jnp.linalg.norm(y),
                 jnp.zeros(2, y.dtype), None)
    L = clock.degree
    pq = F.weights @ F.margins
    log_dtau_ds = _log_dtau_ds(L, x, pq)
    g = F.grads.T @ F.weights
    rate = jnp.exp(L * x) * (g @ g) / (L * jnp.where(pq > 0, pq, 1.0)) - (L - 2)
    value = log_dtau_ds - jnp.log(jnp.maximum(rate, 1.0))
    return (value, rate) if with_rate else value
