"""Filippov velocities on ReLU kinks: the equivalent control of sliding modes.

(docs/background.md §4.) The flow's velocity is g = sum_i p_i grad m_i(w), with p a function
of the margins. At a kink z_k(w) = 0 of a pre-activation that the field pushes into from both
sides, the solution slides: it stays on z_k = 0, and its velocity is the Clarke/Filippov element
whose kink derivative alpha_k in [0, 1] makes dz_k/dt = 0 (Filippov 1988; Utkin 1977), not the
autodiff element.
Autodiff with relu'(0) = 0 instead chatters across the kink and adaptive steps collapse.

Per evaluation: the pre-activations within `threshold` of 0 (relative to their mean) are "near"
(at most `candidates` of them, the nearest). With every near alpha at 0, zdot = b + J alpha is
affine in alpha (exactly so for one hidden layer; linearised for deeper nets), J by forward-mode
autodiff, one single-example pass per near pair.
A near pair slides when the field points into the kink from both sides: b_k > 0 (the z < 0
side is pushed up) and b_k + J_kk < 0 (the z > 0 side is pushed down). The sliding alphas solve
J_SS alpha_S = -b_S, clipped to [0, 1]; a pair whose alpha would leave [0, 1] leaves the kink.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ._box_qp import FISTA_ITERATIONS, box_qp
from ._kinks import on_kink_slots


class SlidingOptions(NamedTuple):
    """How phase 1 and the explicit solvers handle ReLU kinks (the equivalent control).

    Attributes:
        candidates: slots for the pairs near their kinks (beyond them, the nearest).
        threshold: |z| / mean |z| below which a pair is near its kink and gets the Clarke
            element. There relu(z) = alpha z holds only to O(threshold), so Euler's identity
            (and the Lyu & Li identity along phase 1) is off by about that much; a smaller band
            crawls on the reference problem (docs/decisions.md D11, `python
            bench/sliding_band.py --reference`).
        qp_iterations: FISTA iterations of the box QP that picks the Clarke element.
    """

    candidates: int = 64
    threshold: float = 1e-4
    qp_iterations: int = FISTA_ITERATIONS


# Slots of the smaller Clarke element (see make_velocity).
_FEW_SLOTS = 16


class Velocity(NamedTuple):
    g: jax.Array  # sum_i p_i grad m_i (the Filippov element on sliding kinks)
    margins: jax.Array
    p: jax.Array
    num_sliding: jax.Array


def make_velocity(predictor, unravel, X, y, sliding: SlidingOptions | None):
    """velocity(w, weights_fn) -> Velocity, with p = weights_fn(margins)."""

    def plain(w, weights_fn):
        m, pullback = jax.vjp(
            lambda flat: y * jax.vmap(predictor.apply, in_axes=(None, 0))(unravel(flat), X), w
        )
        p = weights_fn(m)
        return Velocity(pullback(p)[0], m, p, jnp.zeros((), jnp.int32))

    if sliding is None or predictor.kinks is None:
        return plain

    kinks = predictor.kinks

    def flat_preactivations(w):
        layers = jax.vmap(kinks.preactivations, in_axes=(None, 0))(unravel(w), X)
        return jnp.concatenate([z.ravel() for z in layers]), [z.shape for z in layers]

    def gates_of(flat_mask, flat_alpha, shapes):
        gates, offset = [], 0
        for shape in shapes:
            size = shape[0] * shape[1]
            gates.append(
                (
                    flat_mask[offset : offset + size].reshape(shape),
                    flat_alpha[offset : offset + size].reshape(shape),
                )
            )
            offset += size
        return gates

    def gated_margins(w, flat_mask, flat_alpha, shapes):
        per_example = jax.vmap(kinks.gated_apply, in_axes=(None, 0, 0))
        return y * per_example(unravel(w), X, gates_of(flat_mask, flat_alpha, shapes))

    def clarke_columns(w, weights_fn, flat_mask, flat_alpha, index, shapes):
        """(g, C): C[:, j] = dg / d alpha at slot j (pair index[j]), g = sum_i p_i grad m_i.

        Pair j belongs to one example e, so alpha_j moves m_e and grad m_e only: C[:, j] =
        p_e d(grad m_e) + dm_e G^T dp/dm_e, from one single-example forward-over-reverse pass
        per slot (jacfwd of g takes a pass over all n examples per slot: docs/decisions.md D12)."""
        examples = jnp.concatenate([jnp.repeat(jnp.arange(shape[0]), shape[1]) for shape in shapes])

        def margin(v, e, alpha):
            gate = jax.tree.map(lambda a: a[e], gates_of(flat_mask, alpha, shapes))
            return y[e] * kinks.gated_apply(unravel(v), X[e], gate)

        def per_example(e, alpha):
            return jax.value_and_grad(margin)(w, e, alpha)

        m, G = jax.vmap(per_example, in_axes=(0, None))(jnp.arange(X.shape[0]), flat_alpha)
        p = weights_fn(m)
        dp_dm = jax.jacfwd(weights_fn)(m)  # (n, n)

        def column(pair):
            e = examples[pair]
            direction = jnp.zeros_like(flat_alpha).at[pair].set(1.0)
            _, (dm, dgrad) = jax.jvp(lambda a: per_example(e, a), (flat_alpha,), (direction,))
            return p[e] * dgrad + dm * (G.T @ dp_dm[:, e])

        return G.T @ p, jax.vmap(column, out_axes=1)(index)

    def velocity(w, weights_fn):
        z, shapes = flat_preactivations(w)
        k = min(sliding.candidates, z.size)
        relative = jnp.abs(z) / jnp.maximum(jnp.mean(jnp.abs(z)), 1e-300)
        near_all = relative < sliding.threshold
        count = jnp.sum(near_all)

        def scatter(index, alpha, mask):
            # Padding slots are dropped, not written to pair 0 (whose mask they would clear).
            written = jnp.where(mask, index, z.size)
            return (
                jnp.zeros(z.size, bool).at[written].set(True, mode="drop"),
                jnp.zeros(z.size, z.dtype).at[written].set(alpha, mode="drop"),
            )

        def at(index, alpha, mask):
            flat_mask, flat_alpha = scatter(index, alpha, mask)
            m, pullback = jax.vjp(
                lambda flat: gated_margins(flat, flat_mask, flat_alpha, shapes), w
            )
            p = weights_fn(m)
            return Velocity(pullback(p)[0], m, p, jnp.sum(mask).astype(jnp.int32))

        def on_kinks(slots):
            def clarke_element(_):
                # The near pairs compacted into `slots`; beyond k of them, the k nearest.
                index, near, _, _ = on_kink_slots(z, near_all, slots)
                if slots == k:
                    index = jax.lax.cond(
                        count > k,
                        lambda: jax.lax.top_k(-relative, k)[1].astype(index.dtype),
                        lambda: index,
                    )
                sign_rule = (z[index] > 0).astype(z.dtype)
                # g(alpha) = g0 + C (alpha - alpha0): the Clarke set of the near kinks (exact
                # for one hidden layer, linearised for deeper nets).
                flat_mask, flat_alpha = scatter(index, sign_rule, near)
                g0, C = clarke_columns(w, weights_fn, flat_mask, flat_alpha, index, shapes)
                C = jnp.where(near[None, :], C, 0.0)
                alpha = box_least_squares(C, g0 - C @ sign_rule, near, sliding.qp_iterations)
                interior = near & (alpha > 0.0) & (alpha < 1.0)
                v = at(index, jnp.where(near, alpha, sign_rule), near)
                return v._replace(num_sliding=jnp.sum(interior).astype(jnp.int32))

            return clarke_element

        def off_kinks(_):
            none = jnp.zeros(1, bool)
            return at(jnp.zeros(1, jnp.int32), jnp.zeros(1, z.dtype), none)

        # The Clarke element costs several plain evaluations, growing with its slots: none when
        # no kink is near, _FEW_SLOTS when few are (docs/decisions.md D13).
        sizes = sorted({min(_FEW_SLOTS, k), k})
        branch = jnp.where(count == 0, 0, 1 + jnp.sum(count > jnp.asarray(sizes[:-1])))
        return jax.lax.switch(branch, [off_kinks] + [on_kinks(slots) for slots in sizes], None)

    return velocity


def box_least_squares(C, d, free, iterations):
    """argmin ||C a + d||^2 over a in [0, 1]^k; entries with free = False stay at 0.

    The min-norm element of the Clarke set is the velocity of the subgradient flow (Davis,
    Drusvyatskiy, Kakade & Lee 2020).
    """
    ones = jnp.ones(C.shape[1], C.dtype)
    return box_qp(C.T @ C, C.T @ d, 0.0 * ones, ones, free, iterations)
