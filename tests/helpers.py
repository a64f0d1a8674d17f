"""Shared test helpers: the predictor zoo, exact kink construction, separable data."""

import jax
import jax.numpy as jnp
import numpy as np

import jaxmargin as jm

VECTOR_PREDICTORS = {
    "linear": jm.linear(),
    "deep_linear_3": jm.deep_linear(3, 6),
    "deep_linear_5": jm.deep_linear(5, 4),
    "diagonal_2": jm.diagonal_linear(2),
    "diagonal_4": jm.diagonal_linear(4),
    "relu_mlp_1": jm.relu_mlp(1, 8),
    "relu_mlp_2": jm.relu_mlp(2, 16),
    "relu_mlp_3": jm.relu_mlp(3, 8),
    "relu_mlp_5": jm.relu_mlp(5, 6),
    "leaky_relu_mlp_3": jm.leaky_relu_mlp(3, 8, 0.2),
}


def integer_relu_params_on_kinks(depth, width, x, rng, n_zero_per_layer=2):
    """Integer weights of a relu_mlp with some pre-activations on x exactly 0.

    Integers keep every product exact in float64, so the kinks are hit exactly. Returns params
    and the list of (layer, unit) pairs placed on a kink.
    """
    layers, kinks = [], []
    hidden = np.asarray(x, dtype=np.float64)
    for layer_index in range(depth - 1):
        W = rng.integers(-3, 4, size=(width, hidden.size)).astype(np.float64)
        pivot = int(np.argmax(np.abs(hidden)))
        for unit in range(n_zero_per_layer):
            row = W[unit]
            # Make row . hidden = 0 exactly: row <- h_p * row - (row . h) e_p.
            dot = row @ hidden
            row *= hidden[pivot]
            row[pivot] -= dot
            kinks.append((layer_index, unit))
        layers.append(W)
        hidden = np.maximum(W @ hidden, 0.0)
    layers.append(rng.integers(-3, 4, size=width).astype(np.float64))
    return tuple(jax.numpy.asarray(layer) for layer in layers), kinks


def linearly_separable(seed, n, d):
    """(X, y): n Gaussian points in R^d labelled by a random hyperplane through 0."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    return X, np.sign(X @ rng.normal(size=d))


def small_separable(key, n=8, dim=3):
    """n Gaussian points in dim <= 3 dimensions labelled by a fixed hyperplane."""
    X = jax.random.normal(key, (n, dim))
    y = jnp.sign(X @ jnp.array([1.0, 0.5, -0.3][:dim]))
    return X, y


def row(tree, index):
    """The index-th saved row of every leaf."""
    return jax.tree.map(lambda a: a[index], tree)
