"""Numerical homogeneity check: estimate L from f(c w) over c in [1e-3, 1e3].

The margin theory (Lemma 2, Theorem 5) needs f(x; c w) = c^L f(x; w) for all c > 0. A model with
biases, or any other non-homogeneous program, fails this check with a ValueError.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ._predictors import Params, Predictor
from ._validation import check_data, check_params, check_predictor

DEFAULT_SCALES = tuple(np.logspace(-3, 3, 13))


def _outputs(predictor, params, X):
    return jax.vmap(predictor.apply, in_axes=(None, 0))(params, X)


def estimate_degree(
    predictor: Predictor,
    params: Params,
    X,
    *,
    scales=DEFAULT_SCALES,
    rtol: float = 1e-8,
) -> float:
    """Least-squares estimate of L in f(x; c w) = c^L f(x; w), checked on every input and scale.

    Args:
        predictor, params: the model at a reference point w.
        X: inputs, shape (n, ...); those with f(x; w) = 0 carry no information and are skipped.
        scales: the factors c (default 13 values log-spaced in [1e-3, 1e3]).
        rtol: largest relative deviation of f(c w) from c^L f(w) accepted.

    Returns:
        The estimated degree L (a float).

    Raises:
        ValueError: the model is not positively homogeneous (e.g. it has biases), or f vanishes
            on every input.
    """
    predictor = check_predictor(predictor)
    X, _ = check_data(X, jnp.ones(jnp.shape(X)[0]))
    params = check_params(predictor, params, X.shape[1:])
    f0 = np.asarray(_outputs(predictor, params, X))
    informative = np.abs(f0) > 1e-12 * np.max(np.abs(f0), initial=0.0)
    if not informative.any():
        raise ValueError(f"{predictor.name}: f(x; w) = 0 on every input; L cannot be estimated")
    scales = np.asarray(scales, dtype=np.float64)
    scales = scales[scales != 1.0]
    if scales.size == 0 or np.any(scales <= 0):
        raise ValueError("scales must be positive and not all equal to 1")
    scaled = np.stack(
        [np.asarray(_outputs(predictor, jax.tree.map(lambda w: c * w, params), X)) for c in scales]
    )[:, informative]
    ratios = scaled / f0[informative]
    if np.any(~np.isfinite(ratios)) or np.any(ratios <= 0):
        raise ValueError(
            f"{predictor.name} is not positively homogeneous: f(c w) / f(w) is not positive for"
            " some c > 0 (a bias or other non-homogeneous term?)"
        )
    log_c = np.log(scales)[:, None]
    degree = float(np.sum(log_c * np.log(ratios)) / np.sum(log_c**2 * np.ones_like(ratios)))
    relative_deviation = np.max(np.abs(ratios / np.exp(degree * log_c) - 1.0))
    if relative_deviation > rtol:
        raise ValueError(
            f"{predictor.name} is not positively homogeneous: f(c w) deviates from c^L f(w) by"
            f" {relative_deviation:.3g} relative at the best-fitting L = {degree:.6g}"
            f" (tolerance {rtol:g}); biases break homogeneity"
        )
    return degree


def assert_homogeneous(predictor: Predictor, params: Params, X, *, rtol: float = 1e-8) -> None:
    """Raise ValueError unless the model is homogeneous of its declared degree on X."""
    degree = estimate_degree(predictor, params, X, rtol=rtol)
    if abs(degree - predictor.degree) > 1e-6 * max(1.0, predictor.degree):
        raise ValueError(
            f"{predictor.name} declares degree {predictor.degree} but behaves like degree"
            f" {degree:.8g}"
        )
