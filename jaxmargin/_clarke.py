"""Clarke subdifferentials of homogeneous predictors (Definition 1 and Lemmas 2, 4 of the seed).

- `autodiff_subgradient`: the element autodiff returns, with relu'(0) chosen in [0, 1].
- `sampled_clarke_subgradients`: limiting gradients from random points near w (gradient
  sampling), each extrapolated back to w along its ray so that it is an element of the Clarke
  set at w itself and not only near it.
- `min_norm_point`: the min-norm element of the convex hull of vectors (Wolfe's algorithm).
- `euler_identity_residual` (Lemma 2: <s, w> = L f(w)) and `lemma4_slack`
  (Lemma 4: <v, w> + L ln sum exp(-m_i) >= 0 for v in the chain-rule subdifferential of -ln L).

Vectors are flat: a params tuple is raveled with `jax.flatten_util.ravel_pytree`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from ._margins import log_exp_loss_from_scaled, polar
from ._predictors import Params, Predictor
from ._validation import check_all, check_params, check_predictor
from ._wolfe import wolfe


def _with_kink_convention(predictor: Predictor, relu_grad_at_zero) -> Predictor:
    if relu_grad_at_zero is None or predictor.relu_grad_at_zero is None:
        return predictor
    return predictor.rebuild(relu_grad_at_zero=relu_grad_at_zero)


def autodiff_subgradient(
    predictor: Predictor, params: Params, x, *, relu_grad_at_zero: float | None = None
) -> jax.Array:
    """Flat gradient of f(x; w) in w as autodiff computes it, with relu'(0) = relu_grad_at_zero.

    For ReLU networks this is an element of a conservative field (Bolte & Pauwels 2020); it lies
    in the Clarke subdifferential for these bias-free networks but not for every program (see
    Kakade & Lee 2018: relu(z) - relu(-z) gets derivative 0 at z = 0 while its Clarke set is {1}).
    """
    predictor = _with_kink_convention(check_predictor(predictor), relu_grad_at_zero)
    x = jnp.asarray(x, dtype=jnp.float64)
    params = check_params(predictor, params, x.shape)
    return ravel_pytree(jax.grad(predictor.apply)(params, x))[0]


def margin_jacobian(
    predictor: Predictor, params: Params, X, y, *, relu_grad_at_zero: float | None = None
) -> jax.Array:
    """Rows: the autodiff elements of the subdifferentials of m_i(w) = y_i f(x_i; w), (n, d)."""
    predictor, params, X, y = check_all(predictor, params, X, y)
    predictor = _with_kink_convention(predictor, relu_grad_at_zero)
    return _margin_jacobian(predictor, params, X, y)


@functools.partial(jax.jit, static_argnums=0)
def _margin_jacobian(predictor, params, X, y):
    flat, unravel = ravel_pytree(params)
    grad_f = jax.grad(lambda w, x: predictor.apply(unravel(w), x))
    return y[:, None] * jax.vmap(grad_f, in_axes=(None, 0))(flat, X)


def sampled_clarke_subgradients(
    fn, params, key, *, num_samples: int = 32, radius: float = 1e-6, extrapolate: bool = True
) -> jax.Array:
    """Gradient sampling: limiting gradients of fn at params, one per random ray, (k, d).

    For each sample a direction u is drawn uniformly on the unit sphere and the gradient is
    taken at w + r u with r = radius * ||w||. With `extrapolate` (default) the gradients at r
    and 2r are combined as 2 g(r) - g(2r): for piecewise-polynomial functions such as ReLU
    networks the pattern of kinks is constant on (0, 2r] for small r, so this is the limit of
    gradients along the ray, an exact element of the Clarke subdifferential at w, up to O(r^2).

    Args:
        fn: a scalar function of the params pytree (e.g. lambda w: predictor.apply(w, x)).
        params: the point w.
        key: a jax.random key.
        num_samples: number of rays.
        radius: ball radius relative to ||w|| (absolute when w = 0).
        extrapolate: remove the O(r) bias of sampled gradients by Richardson extrapolation.
    """
    flat, unravel = ravel_pytree(params)
    flat = jnp.asarray(flat, dtype=jnp.float64)
    scale = jnp.linalg.norm(flat)
    r = radius * jnp.where(scale > 0, scale, 1.0)
    directions = jax.random.normal(key, (num_samples, flat.size), dtype=jnp.float64)
    directions = directions / jnp.linalg.norm(directions, axis=1, keepdims=True)
    grad = jax.vmap(jax.grad(lambda w: fn(unravel(w))))
    near = grad(flat[None, :] + r * directions)
    if not extrapolate:
        return near
    return 2.0 * near - grad(flat[None, :] + 2.0 * r * directions)


# --------------------------------------------------------------------------- min-norm point


class MinNormPoint(NamedTuple):
    """Result of `min_norm_point`.

    Attributes:
        point: the min-norm element x* of conv{g_1, ..., g_k}, shape (d,).
        weights: convex weights lambda with x* = sum_j lambda_j g_j, shape (k,).
        gap: Wolfe's certificate ||x||^2 - min_j <x, g_j> >= ||x - x*||^2 (0 at the optimum).
        converged: whether the gap fell below the tolerance within the iteration budget.
    """

    point: jax.Array
    weights: jax.Array
    gap: jax.Array
    converged: jax.Array


@functools.partial(jax.jit, static_argnames=("max_iterations",))
def _wolfe(vectors, tol, max_iterations):
    gram = vectors @ vectors.T
    k = gram.shape[0]
    scale = jnp.max(jnp.diag(gram))
    start = jnp.argmin(jnp.diag(gram))
    weights0 = jnp.zeros(k, vectors.dtype).at[start].set(1.0)
    weights, gap = wolfe(gram, jnp.ones(k, bool), weights0, tol, max_iterations)
    return MinNormPoint(weights @ vectors, weights, gap, gap <= tol * scale)


def min_norm_point(vectors, *, tol: float = 1e-13, max_iterations: int | None = None):
    """Min-norm element of the convex hull of the rows of `vectors` (Wolfe 1976).

    Wolfe's algorithm is an exact active-set method: it terminates after finitely many steps
    with the optimal affine combination of a corral of points. It runs inside jax.lax loops, so
    it jits and vmaps; the Gram matrix is formed, so accuracy on x* is about sqrt(tol) * max||g||.

    Args:
        vectors: shape (k, d), the points g_j (e.g. sampled Clarke subgradients).
        tol: stop when ||x||^2 - min_j <x, g_j> <= tol * max_j ||g_j||^2.
        max_iterations: major-iteration cap (default 50 + 10 k).

    Returns:
        MinNormPoint(point, weights, gap, converged).

    References:
        P. Wolfe, "Finding the nearest point in a polytope", Math. Programming 11 (1976).
    """
    vectors = jnp.asarray(vectors, dtype=jnp.float64)
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise ValueError(f"vectors must have shape (k, d) with k >= 1, got {vectors.shape}")
    if not isinstance(vectors, jax.core.Tracer) and not np.all(np.isfinite(np.asarray(vectors))):
        raise ValueError("vectors contain non-finite values")
    if max_iterations is None:
        max_iterations = 50 + 10 * vectors.shape[0]
    return _wolfe(vectors, tol, max_iterations)


# --------------------------------------------------------------------------- Lemmas 2 and 4


def euler_identity_residual(predictor: Predictor, params: Params, x, subgradients) -> jax.Array:
    """Lemma 2: <s, w> - L f(x; w) for each flat subgradient s (shape (..., d) -> (...,))."""
    predictor = check_predictor(predictor)
    x = jnp.asarray(x, dtype=jnp.float64)
    params = check_params(predictor, params, x.shape)
    flat = ravel_pytree(params)[0]
    subgradients = jnp.asarray(subgradients, dtype=jnp.float64)
    if subgradients.shape[-1] != flat.size:
        raise ValueError(
            f"subgradients have {subgradients.shape[-1]} entries, params have {flat.size}"
        )
    return subgradients @ flat - predictor.degree * predictor.apply(params, x)


def chain_rule_element(predictor: Predictor, params: Params, X, y, margin_subgradients):
    """v = sum_i p_i v_i with p = softmax(-m), v_i in the subdifferential of m_i: an element of
    -∂ ln sum_i exp(-m_i(w)) by the chain rule (the v of Lemma 4)."""
    predictor, params, X, y = check_all(predictor, params, X, y)
    log_beta, theta = polar(predictor, params)
    q = y * jax.vmap(predictor.apply, in_axes=(None, 0))(theta, X)
    # softmax(-beta q) without forming beta q when beta is huge: shift by q_min first.
    gap = q - jnp.min(q)
    beta_gap = jnp.where(gap > 0, jnp.exp(log_beta + jnp.log(jnp.where(gap > 0, gap, 1.0))), 0.0)
    weights = jax.nn.softmax(-beta_gap)
    margin_subgradients = jnp.asarray(margin_subgradients, dtype=jnp.float64)
    if margin_subgradients.shape[0] != X.shape[0]:
        raise ValueError("margin_subgradients needs one row per example")
    return weights @ margin_subgradients


def lemma4_slack(predictor: Predictor, params: Params, X, y, v) -> jax.Array:
    """Lemma 4: <v, w> + L ln sum_i exp(-m_i(w)), which is >= 0 for v in the chain-rule
    subdifferential of -ln L(w) (log domain: finite where L underflows)."""
    predictor, params, X, y = check_all(predictor, params, X, y)
    log_beta, theta = polar(predictor, params)
    q = y * jax.vmap(predictor.apply, in_axes=(None, 0))(theta, X)
    return jnp.asarray(v) @ ravel_pytree(params)[0] + predictor.degree * log_exp_loss_from_scaled(
        log_beta, q
    )
