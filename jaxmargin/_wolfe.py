"""Wolfe's algorithm on a Gram matrix: the min-norm point of a convex hull, with a warm start.

Shared by `min_norm_point` (Clarke sets) and the beta -> infinity limit flow
(_flow/_limit_field.py), whose min-norm point over the examples on the minimum margin
changes little from one step to the next: a warm start from the previous corral then costs
one major iteration.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Weights below this leave the corral (Wolfe's minor cycle).
WEIGHT_FLOOR = 1e-14


def bordered_solve(gram, support, top, bottom, ridge=0.0, border=None):
    """Solve [[K, b], [b^T, 0]] [a; mu] = [top; bottom] on the support (a_i = 0 off it), b the
    indicator of `border` (default: the support): the KKT system of a quadratic in a with the
    sum of a over the border fixed. Returns a.

    `ridge` (relative to the largest diagonal entry on the support) keeps the system regular
    when the supported points are affinely dependent; 0 solves it exactly."""
    k = gram.shape[0]
    both = support[:, None] & support[None, :]
    scale = jnp.max(jnp.where(support, jnp.diag(gram), 0.0))
    regular = gram + ridge * scale * jnp.eye(k, dtype=gram.dtype)
    border = (support if border is None else support & border).astype(gram.dtype)
    system = jnp.zeros((k + 1, k + 1), gram.dtype)
    system = system.at[:k, :k].set(jnp.where(both, regular, jnp.eye(k, dtype=gram.dtype)))
    system = system.at[:k, k].set(border)
    system = system.at[k, :k].set(border)
    rhs = jnp.concatenate([jnp.where(support, top, 0.0), jnp.full((1,), bottom, gram.dtype)])
    return jnp.linalg.solve(system, rhs)[:k]


def affine_minimizer(gram, support, ridge=0.0):
    """Minimise a^T K a over sum(a) = 1, a_i = 0 off the support."""
    return bordered_solve(gram, support, jnp.zeros(gram.shape[0], gram.dtype), 1.0, ridge)


def wolfe(gram, allowed, weights0, tol, max_iterations):
    """(weights, gap): the min-norm point of conv{g_j : allowed_j} given the Gram matrix of the
    g_j, from the convex weights `weights0` (supported on allowed points).

    gap = ||x||^2 - min_j <x, g_j> over allowed j (>= ||x - x*||^2; 0 at the optimum); the loop
    stops when gap <= tol * max_j ||g_j||^2 or after max_iterations major iterations.
    """
    k = gram.shape[0]
    scale = jnp.max(jnp.where(allowed, jnp.diag(gram), 0.0))

    def wolfe_gap(weights):
        inner = gram @ weights
        masked = jnp.where(allowed, inner, jnp.inf)
        return weights @ inner - jnp.min(masked), jnp.argmin(masked)

    def minor_step(state):
        weights, support, _, count = state
        affine = affine_minimizer(gram, support)
        inside = jnp.all(jnp.where(support, affine > WEIGHT_FLOOR, True))
        # Move from weights towards the affine minimizer until a weight hits 0, drop it.
        blocking = support & (affine <= WEIGHT_FLOOR)
        ratios = jnp.where(blocking, weights / jnp.maximum(weights - affine, 1e-300), jnp.inf)
        step = jnp.where(inside, 1.0, jnp.clip(jnp.min(ratios), 0.0, 1.0))
        weights = weights + step * (affine - weights)
        support = support & (weights > WEIGHT_FLOOR)
        weights = jnp.where(support, jnp.maximum(weights, 0.0), 0.0)
        return weights / jnp.sum(weights), support, inside, count + 1

    def major_step(state):
        weights, support, iteration, _ = state
        _, entering = wolfe_gap(weights)
        support = support.at[entering].set(True)
        # A minor cycle drops at least one point per step, so k + 1 steps always suffice.
        weights, support, _, _ = jax.lax.while_loop(
            lambda s: ~s[2] & (s[3] <= k + 1),
            minor_step,
            (weights, support, jnp.bool_(False), jnp.int32(0)),
        )
        gap, _ = wolfe_gap(weights)
        return weights, support, iteration + 1, gap

    def keep_going(state):
        weights, _, iteration, gap = state
        return (gap > tol * scale) & (iteration < max_iterations) & jnp.all(jnp.isfinite(weights))

    weights0 = jnp.where(allowed, weights0, 0.0)
    gap, _ = wolfe_gap(weights0)
    state = (weights0, weights0 > 0, jnp.int32(0), gap)
    weights, _, _, gap = jax.lax.while_loop(keep_going, major_step, state)
    return weights, gap
