"""The Clarke element on ReLU kinks: which pairs a step holds on z = 0, and at what derivative.

A pair (example i, hidden unit k) sits on its kink when its pre-activation z_ik = 0 (to
`on_kink` of the mean |z|). Its activation derivative alpha is then any value in [0, 1] (the
Clarke interval), and the flow's velocity is the min-norm element of the resulting set (Davis,
Drusvyatskiy, Kakade & Lee 2020): a box QP over the alphas. A pair whose alpha lands inside
(0, 1) slides (the velocity keeps z_ik = 0); the others leave to the side their rate points to
(Filippov's side test). For one step the whole activation pattern is frozen: the pairs on a kink
at their Clarke element, the others on the side they start on (docs/background.md §4).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ._box_qp import box_qp
from ._fields import softmax_of_scaled
from ._kink_geometry import KinkGeometry, unit_scale
from ._projectors import projected_in_row_space, projector_factor, projector_from_factor

# Rounds of clarke_pairs: for one hidden layer (the second re-solves the held pairs with the
# leaving ones on their side), and for nets with more.
CLARKE_ROUNDS_ONE_LAYER, CLARKE_ROUNDS = 2, 3


def on_kink_slots(z, on, k):
    """The first k pairs with `on` set, compacted (not top_k, which costs more over thousands of
    pairs): (slots (k,), on_slot (k,) bool, on_kink (P,) bool, overflow: more than k on)."""
    slots = jnp.nonzero(on, size=k, fill_value=0)[0]
    on_slot = jnp.arange(k) < jnp.sum(on)
    return slots, on_slot, jnp.zeros(z.shape[0], bool).at[slots].max(on_slot), jnp.sum(on) > k


def frozen_gates(geometry: KinkGeometry, z, slots, on_slot, alpha):
    """Gates freezing the activation pattern of pre-activations z: the pairs in `slots` on their
    kinks (on_slot) at derivative alpha, the others at the side they are on."""
    P = geometry.num_pairs
    written = jnp.where(on_slot, slots, P)  # padding slots are dropped, not written to pair 0
    pattern = jnp.where(z > 0, 1.0, 0.0).astype(alpha.dtype)
    return geometry.gates(jnp.ones(P, bool), pattern.at[written].set(alpha, mode="drop"))


def clarke_pairs(
    geometry: KinkGeometry,
    margins_and_grads,
    options,
    y_unit,
    weights_of,
    slots,
    on_slot,
    on_kink,
    alpha_at=None,
    rounds=None,
):
    """The Clarke element of the velocity sum_i p_i grad m_i on the pairs in `slots` that sit on
    their kinks (on_slot), p = weights_of(margins): (rows, alpha, holds) with rows the kinks'
    gradients a_k, alpha the kink derivatives and holds the pairs held on z = 0 (sliding, or
    attracted from both sides). Shared by the W-method (p = softmax(-beta q)) and the
    beta -> infinity limit flow (p = lambda, its min-norm weights).

    With one hidden layer the velocity is affine in alpha and one round is exact. Deeper, a
    pair's signal c_k depends on the alphas above it and its row a_k on those below, so the
    element is found by rounds, each linearised at the last round's alphas (gates). Why: on the
    reference problem (L = 3) a first-layer pair whose example also had two second-layer pairs
    on their kinks got c_k from alpha = 0 for them; the side test then sent it off its kink to
    the wrong side, it came back and was landed on again, with steps shrinking geometrically
    (docs/decisions.md D23).

    The min-norm element is the velocity only of the pairs it makes slide: one that leaves its
    kink takes the derivative of the side it leaves to (the side test), which the box QP had
    not assumed. The rounds after the first keep the pairs that left at their side's derivative
    and re-solve the QP over the held ones. Why: in phase 1 of an L = 3 net a second-layer pair
    slid because the QP had a crossing pair of the same unit on its upper side; that pair went
    below, and the sliding one was held on its kink, off Euler's path by 1e-3 (docs/decisions.md
    D54). `alpha_at`: the first round's alphas (default 0); `rounds`: their number (default
    CLARKE_ROUNDS_ONE_LAYER for one hidden layer, else CLARKE_ROUNDS)."""
    P, k = geometry.num_pairs, slots.shape[0]
    written = jnp.where(on_slot, slots, P)  # padding slots are dropped, not written to pair 0
    alpha = jnp.zeros(k, y_unit.dtype) if alpha_at is None else alpha_at
    if rounds is None:
        rounds = CLARKE_ROUNDS_ONE_LAYER if geometry.hidden_layers == 1 else CLARKE_ROUNDS

    def round_(_, state):
        _, alpha, _, free = state
        alpha_all = jnp.zeros(P, y_unit.dtype).at[written].set(alpha, mode="drop")
        gates = geometry.gates(on_kink, alpha_all)
        rows, alpha, holds = _clarke_round(
            geometry,
            margins_and_grads,
            options,
            y_unit,
            weights_of,
            slots,
            on_slot,
            gates,
            alpha,
            free,
        )
        return rows, alpha, holds, holds

    # A loop, not unrolled: one copy of the round (and its box QP) in the compiled program.
    state = (jnp.zeros((k, y_unit.shape[0]), y_unit.dtype), alpha, jnp.zeros(k, bool), on_slot)
    return jax.lax.fori_loop(0, rounds, round_, state)[:3]


def _clarke_round(
    geometry, margins_and_grads, options, y_unit, weights_of, slots, on_slot, gates, alpha_at, free
):
    """One round of clarke_pairs, linearised at the kink derivatives alpha_at (in gates); the
    QP picks the alphas of the pairs in `free`, the others keep alpha_at."""
    rows = jnp.where(on_slot[:, None], geometry.rows(y_unit, slots, gates), 0.0)
    m, G = margins_and_grads(y_unit, gates)
    p = weights_of(m)
    # Setting the pair's derivative to alpha in [0, 1] adds alpha * c_k * a_k to g.
    c = (1.0 - geometry.slope) * geometry.signal(y_unit, gates, p)[slots]
    g0 = G.T @ p - rows.T @ (c * alpha_at)  # the velocity at alpha = 0 (to first order)
    # A pair can hold itself on its kink only if its Clarke interval moves its own rate
    # (by c_k ||a_k||^2) by more than rounding of the rates (~||g|| ||a_k||): c_k ~ p_i,
    # which vanishes for the examples that drop out of the soft-min as beta grows, and
    # alpha = b / c is then noise. Such pairs cross: the side test below gates them.
    gram = rows @ rows.T  # everything below is in the rows' span: one k x k Gram serves it
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
    significant = on_slot & (jnp.abs(c) * norms > 1e-8 * jnp.linalg.norm(g0))
    holds = free & significant
    # The pairs that left in an earlier round keep their side's derivative: b = c alpha_at.
    kept = on_slot & ~free
    b_kept = jnp.where(kept, c * alpha_at, 0.0)
    c_qp = jnp.where(holds, c, 0.0)
    rows_g0 = rows @ g0
    b = b_kept + box_qp(
        gram,
        rows_g0 + gram @ b_kept,
        jnp.minimum(c_qp, 0.0),
        jnp.maximum(c_qp, 0.0),
        holds,
        options.qp_iterations,
    )
    alpha = jnp.clip(jnp.where(c_qp != 0, b / jnp.where(c_qp != 0, c_qp, 1.0), 0.0), 0.0, 1.0)
    alpha = jnp.where(kept, alpha_at, alpha)
    slides = holds & (alpha > 1e-9) & (alpha < 1.0 - 1e-9)
    c = jnp.where(significant, c, 0.0)
    # Filippov's side test for the other pairs on a kink. The min-norm element is the
    # velocity only for a pair it makes slide; one at a bound must leave its kink to the
    # side whose derivative it uses (with c > 0 the QP picks the other side for a crossing
    # pair), and a pair with no hold crosses to the side its rate points to. z_k' is
    # linear in alpha_k: <P (g0 + R^T b), a_k> + (alpha_k - alpha) c_k <P a_k, a_k>.
    # (Rates are instantaneous: the stiff relaxation of p within a step is not in them.)
    project = projected_in_row_space(gram, slides)
    rate = project(rows_g0 + gram @ b)
    reach = c * jnp.diagonal(project(gram))
    rate_below = rate - alpha * reach  # z_k' with the z < 0 derivative (alpha_k = 0)
    rate_above = rate + (1.0 - alpha) * reach  # with the z > 0 one (alpha_k = 1)
    leaves = on_slot & ~slides
    attracted = leaves & (rate_below > 0) & (rate_above < 0)
    alpha = jnp.where(leaves & (rate_below >= 0) & (rate_above >= 0), 1.0, alpha)
    alpha = jnp.where(leaves & (rate_below <= 0) & (rate_above <= 0), 0.0, alpha)
    return rows, alpha, slides | attracted


class KinkStep(NamedTuple):
    """A step's kinks: the frozen activation pattern and the pairs held on z = 0."""

    gates: object
    # projector_factor of the sliding pairs' kink gradients (None: no kinks); built once a
    # step: the stages, the step's end and its redos after a rejection all project with it.
    factor: tuple | None
    sliding: jax.Array  # (P,) bool: pairs held on their kink during the step
    on_kink: jax.Array  # (P,) bool
    num_sliding: jax.Array
    overflow: jax.Array  # more pairs on their kinks than slots: the step cannot be trusted

    def projector(self):
        """v -> v projected onto the tangent space of the sliding pairs' kinks."""
        if self.factor is None:
            return lambda v: v
        return projector_from_factor(self.factor)


def kink_step(geometry: KinkGeometry | None, margins_and_grads, degree, options, s, theta, z):
    """Gates, tangent projector and sliding set for a polar step from (s, theta) with
    pre-activations z; `options` has the kinks' `candidates`, `on_kink` and `qp_iterations`."""
    y = theta
    if geometry is None:
        false = jnp.zeros((1,), bool)
        return KinkStep(None, None, false, false, jnp.zeros((), jnp.int32), jnp.asarray(False))
    P = geometry.num_pairs
    k = min(options.candidates, P)
    on = jnp.abs(z) <= options.on_kink * unit_scale(z, geometry.num_examples)
    slots, on_slot, on_kink, overflow = on_kink_slots(z, on, k)
    y_unit = y / jnp.linalg.norm(y)

    def clarke_element(_):
        def weights_of(m):
            return softmax_of_scaled(degree * s, m)

        return clarke_pairs(
            geometry, margins_and_grads, options, y_unit, weights_of, slots, on_slot, on_kink
        )

    def nothing_on_kinks(_):
        return (jnp.zeros((k, y.shape[0]), y.dtype), jnp.zeros(k, y.dtype), jnp.zeros(k, bool))

    # The QP costs ~k gradient evaluations: skip it when no pair is on its kink.
    rows, alpha, slides = jax.lax.cond(jnp.any(on_slot), clarke_element, nothing_on_kinks, None)
    # The whole activation pattern is frozen for the step: the pairs on a kink at their Clarke
    # element, the others at the side they start on. The stage point y + h k1 of a W-method
    # is not on the path and can stray across nearby kinks; evaluated with the live pattern,
    # the later stages see a jump and the step's end falls back across the kink it had just
    # landed on (docs/decisions.md D21). Crossings at the step's end are still landed on.
    gates = frozen_gates(geometry, z, slots, on_slot, alpha)
    sliding = jnp.zeros(P, bool).at[slots].max(slides)
    return KinkStep(
        gates,
        projector_factor(rows, slides),
        sliding,
        on_kink,
        jnp.sum(slides).astype(jnp.int32),
        overflow,
    )
