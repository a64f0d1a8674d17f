"""Input validation: bad input raises a ValueError/TypeError naming the problem.

Value checks (finite X, labels in {-1, +1}) need concrete arrays; inside a user's jit or vmap the
inputs are tracers and only the shape checks run. The public functions validate before they call
their jitted cores, so a direct call is always fully checked.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ._predictors import Predictor


def is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_predictor(predictor) -> Predictor:
    if not isinstance(predictor, Predictor):
        raise TypeError(
            "expected a jaxmargin Predictor (e.g. jaxmargin.relu_mlp(2, 32)),"
            f" got {type(predictor)}"
        )
    return predictor


def check_data(X, y) -> tuple[jax.Array, jax.Array]:
    """X of shape (n, ...) with finite entries, y of shape (n,) with values in {-1, +1}."""
    X = jnp.asarray(X, dtype=jnp.float64)
    y = jnp.asarray(y, dtype=jnp.float64)
    if X.ndim < 2:
        raise ValueError(f"X must have shape (n, ...) with one row per example, got {X.shape}")
    if y.ndim != 1:
        raise ValueError(f"y must have shape (n,), got {y.shape}")
    if X.shape[0] != y.shape[0]:
        raise ValueError(f"X has {X.shape[0]} examples but y has {y.shape[0]} labels")
    if X.shape[0] == 0:
        raise ValueError("the dataset is empty")
    if is_concrete(X) and not np.all(np.isfinite(np.asarray(X))):
        raise ValueError("X contains non-finite values (NaN or inf)")
    if is_concrete(y) and not np.all(np.abs(np.asarray(y)) == 1.0):
        bad = np.unique(np.asarray(y)[np.abs(np.asarray(y)) != 1.0])[:5]
        raise ValueError(f"labels y must be -1 or +1; found {bad.tolist()}")
    return X, y


@functools.lru_cache(maxsize=256)
def _expected_param_shapes(predictor: Predictor, in_shape):
    init_arg = in_shape[0] if len(in_shape) == 1 else in_shape
    return jax.eval_shape(lambda key: predictor.init(key, init_arg), jax.random.key(0))


def check_params(predictor: Predictor, params, in_shape: tuple[int, ...]):
    """params must have the tree structure and shapes that predictor.init gives for in_shape."""
    if not isinstance(params, tuple):
        raise TypeError(
            f"params must be a tuple of arrays (one per layer), as {predictor.name}.init returns;"
            f" got {type(params).__name__}"
        )
    try:
        expected = _expected_param_shapes(predictor, tuple(in_shape))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{predictor.name} cannot take inputs of shape {in_shape}: {error}")
    got_shapes = [jnp.shape(leaf) for leaf in jax.tree.leaves(params)]
    want_shapes = [leaf.shape for leaf in jax.tree.leaves(expected)]
    if jax.tree.structure(params) != jax.tree.structure(expected) or got_shapes != want_shapes:
        raise ValueError(
            f"params do not match {predictor.name} for inputs of shape {in_shape}: "
            f"expected layer shapes {want_shapes}, got {got_shapes}"
        )
    params = tuple(jnp.asarray(leaf, dtype=jnp.float64) for leaf in params)
    if all(is_concrete(leaf) for leaf in params):
        if not all(np.all(np.isfinite(np.asarray(leaf))) for leaf in params):
            raise ValueError("params contain non-finite values (NaN or inf)")
    return params


def check_all(predictor, params, X, y):
    """Validate a (predictor, params, X, y) call; return converted arrays."""
    predictor = check_predictor(predictor)
    X, y = check_data(X, y)
    params = check_params(predictor, params, X.shape[1:])
    return predictor, params, X, y


def check_choice(name: str, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")
    return value
