"""Clarke elements of ReLU-network margins chosen through their gates, for KKT certificates.

At a point where example i has hidden units on their kinks (pre-activation z = 0), the Clarke
subdifferential of m_i(w) = y_i f(x_i; w) contains every gated gradient s_i(g): the gradient with
the activation derivative of each kinked unit k set to slope + g_k (1 - slope), g in [0, 1]^K
(`Kinks.gated_apply`). Why: a gradient of a network's output is a sum over paths of products of
one derivative per layer, so s_i is multilinear in g and s_i(g) is a convex combination of its
values at the vertices g in {0, 1}^K; and every vertex is a limit of gradients at nearby points
where m_i is differentiable: a kinked unit's pre-activation W[k] . h can be pushed to either side
by its own row W[k] (h != 0 wherever m_i > 0: a zero hidden layer gives f = 0), one layer after
the other from the input up, so every sign pattern occurs arbitrarily close to w. With one hidden
layer s_i is affine in g and the gated gradients are the whole Clarke set.

A kink certificate asks for min over lambda >= 0 and gates of ||b - sum_i lambda_i s_i(g_i)||.
Sampling the Clarke sets (_kkt.py) cannot resolve them when an example has dozens of units on
kinks (2^K vertices). Here: with the gates of all hidden layers but one fixed, s_i = a_i + C_i g
is affine in that layer's gates, and with mu = lambda_i g the problem is a least-squares problem
with linear inequalities (lambda >= 0, 0 <= mu_k <= lambda_i), solved by a finite method (Lawson &
Hanson's LSI -> LDP -> NNLS). One hidden layer: that is the exact minimum over the Clarke sets.
Deeper nets: block coordinate descent over the layers, each block exact; it stops where no
layer's block improves the residual by more than the stopping tolerance (not necessarily a
minimum), and the residual of any lambda >= 0 and gates in [0, 1] is a valid upper bound.

Units count as on their kinks within a first-order distance radius * ||w|| of them (|z| <=
radius ||w|| ||grad z||), the band in which _kkt.py's gradient sampling sees them too. For such a
unit with z != 0 the gated gradients at w are the Clarke elements of a nearby point where it is
exactly on its kink (within radius ||w|| per unit; further when one row is on its kink for
several examples at a small angle), up to the change of the gradients over that distance: the
certificate is exact for units exactly on their kinks (the limit flow holds its sliding pairs at
|z| ~ 1e-16 relative) and approximate to that order for the others.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from ._nnls import best_nnls, least_squares_with_inequalities

# Relative to the largest column norm: gate columns below it move nothing (a kinked unit whose
# back-propagated signal is zero) and are left out of the least-squares problems.
_NEGLIGIBLE_COLUMN = 1e-13


class GatedFit(NamedTuple):
    """Result of `fit_gates`.

    Attributes:
        residual: ||b - sum_i lambda_i s_i(g_i)||.
        weights: lambda (n,) >= 0 (relative to the target b).
        gates: per hidden layer (n, width) gates in [0, 1] (meaningful where `kinked`).
        kinked: per hidden layer (n, width) bool, the units on their kinks.
    """

    residual: float
    weights: np.ndarray
    gates: tuple
    kinked: tuple


@functools.lru_cache(maxsize=16)
def _gate_programs(predictor, structure, leaves, num_hidden):
    """Jitted (w flat, X, y, gates) -> gated gradients (n, d), and per hidden layer
    (w, X, y, gates, alpha) -> d s_i / d alpha (n, d, width); cached per predictor and parameter
    structure, shapes and dtypes (`leaves`) so that repeated certificates do not compile them
    again."""
    template = jax.tree.unflatten(structure, [jnp.zeros(shape, dtype) for shape, dtype in leaves])
    _, unravel = ravel_pytree(template)

    def gradient(w, x, label, gates):
        return jax.grad(lambda v: label * predictor.kinks.gated_apply(unravel(v), x, gates))(w)

    def layer_jacobian(layer):
        def one(w, x, label, gate_arrays, alpha):
            arrays = list(gate_arrays)
            arrays[layer] = (arrays[layer][0], alpha)
            return gradient(w, x, label, tuple(arrays))

        return jax.jit(jax.vmap(jax.jacfwd(one, argnums=4), in_axes=(None, 0, 0, 0, 0)))

    all_gradients = jax.jit(jax.vmap(gradient, in_axes=(None, 0, 0, 0)))
    return all_gradients, tuple(layer_jacobian(layer) for layer in range(num_hidden))


def kinked_units(predictor, params, X, radius: float) -> tuple:
    """Per hidden layer, (n, width) masks of the units within first-order distance
    radius * ||w|| of their kinks: |z| <= radius ||w|| ||grad_w z||."""
    w, unravel = ravel_pytree(params)

    def preactivations(w, x):
        return jnp.concatenate([z.ravel() for z in predictor.kinks.preactivations(unravel(w), x)])

    z = jax.vmap(preactivations, in_axes=(None, 0))(w, X)
    slopes = jax.vmap(jax.jacrev(preactivations), in_axes=(None, 0))(w, X)
    near = np.asarray(jnp.abs(z) <= radius * jnp.linalg.norm(w) * jnp.linalg.norm(slopes, axis=2))
    widths = [a.shape[0] for a in predictor.kinks.preactivations(params, X[0])]
    return tuple(np.split(near, np.cumsum(widths)[:-1], axis=1))


def _gate_arrays(kinked, gates):
    return tuple((jnp.asarray(mask), jnp.asarray(alpha)) for mask, alpha in zip(kinked, gates))


def _best_layer_gates(A_fixed, C, owner, b):
    """One block: min over lambda >= 0 and 0 <= mu <= lambda[owner] of
    ||A_fixed lambda + C mu - b|| (columns scaled to unit norm inside). Returns (lambda, mu,
    fitted): negligible gate columns are left out (mu = 0, fitted False: their gates are free)."""
    n, K = A_fixed.shape[1], C.shape[1]
    columns = np.hstack([A_fixed, C])
    norms = np.linalg.norm(columns, axis=0)
    keep = norms > _NEGLIGIBLE_COLUMN * max(norms.max(), 1e-300)
    keep[:n] = True  # lambda stays a variable (a zero column gets lambda = 0 from the fit)
    scale = np.where(norms > 0, norms, 1.0)
    kept = np.flatnonzero(keep)
    position = -np.ones(n + K, int)
    position[kept] = np.arange(kept.size)
    # Rows of G: lambda_i >= 0, mu_k >= 0, lambda_owner(k) - mu_k >= 0 (in scaled variables).
    rows = [np.eye(kept.size)]
    gate_columns = kept[kept >= n]
    if gate_columns.size:
        coupling = np.zeros((gate_columns.size, kept.size))
        coupling[np.arange(gate_columns.size), position[owner[gate_columns - n]]] = (
            1.0 / scale[owner[gate_columns - n]]
        )
        coupling[np.arange(gate_columns.size), position[gate_columns]] = -1.0 / scale[gate_columns]
        rows.append(coupling)
    x_scaled = least_squares_with_inequalities(
        columns[:, kept] / scale[kept], b, np.vstack(rows), strict=False
    )  # clipped below
    x = np.zeros(n + K)
    x[kept] = x_scaled / scale[kept]
    lam = np.maximum(x[:n], 0.0)
    mu = np.clip(x[n:], 0.0, lam[owner])
    return lam, mu, keep[n:]


def fit_gates(
    predictor, params, X, y, target, kinked, sweeps: int = 100, rel_improvement: float = 1e-3
) -> GatedFit:
    """Multipliers and gates of the units in `kinked` (per hidden layer, (n, width) masks) that
    make sum_i lambda_i s_i(g_i) closest to `target` (flat, like params): block coordinate
    descent over the hidden layers, at most `sweeps` passes, stopped when a pass improves the
    residual by less than rel_improvement (relative). Gates start at 1/2."""
    w = ravel_pytree(params)[0]
    leaves = tuple(
        (tuple(np.shape(leaf)), str(jnp.asarray(leaf).dtype)) for leaf in jax.tree.leaves(params)
    )
    all_gradients, jacobians = _gate_programs(
        predictor, jax.tree.structure(params), leaves, len(kinked)
    )
    X, y, b = jnp.asarray(X), jnp.asarray(y), np.asarray(target)
    gates = [np.where(mask, 0.5, 0.0) for mask in kinked]

    def evaluate(gates):
        S = np.asarray(all_gradients(w, X, y, _gate_arrays(kinked, gates)))  # (n, d)
        lam = best_nnls(S.T, b)
        return float(np.linalg.norm(b - lam @ S)), lam, S

    best_residual, best_lam, S = evaluate(gates)
    best_gates = [g.copy() for g in gates]
    for _ in range(sweeps):
        start = best_residual
        for layer, mask in enumerate(kinked):
            if not mask.any():
                continue
            C_full = np.asarray(
                jacobians[layer](w, X, y, _gate_arrays(kinked, gates), jnp.asarray(gates[layer]))
            )  # (n, d, width)
            owner, unit = np.nonzero(mask)
            C = C_full[owner, :, unit].T  # (d, K)
            # s_i is affine in this layer's gates: s_i(g) = a_i + C_i g.
            A_fixed = (S - np.einsum("ndk,nk->nd", C_full, np.where(mask, gates[layer], 0.0))).T
            lam, mu, fitted = _best_layer_gates(A_fixed, C, owner, b)
            new = gates[layer].copy()
            held = (lam[owner] > 0) & fitted
            new[owner[held], unit[held]] = mu[held] / lam[owner[held]]
            gates[layer] = np.clip(new, 0.0, 1.0)
            residual, lam, S = evaluate(gates)
            if residual < best_residual:
                best_residual, best_lam, best_gates = residual, lam, [g.copy() for g in gates]
        if best_residual >= (1.0 - rel_improvement) * start:
            break
    return GatedFit(best_residual, best_lam, tuple(best_gates), kinked)
