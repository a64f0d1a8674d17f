"""Datasets of the suite: the reference problem, digit pairs, Chizat & Bach's clusters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ._references_linear import soudry_dataset as soudry_dataset  # noqa: F401  (re-export)


def reference_problem(
    depth: int,
    *,
    width: int = 32,
    n: int = 50,
    dim: int = 5,
    seed: int = 0,
    init_scale: float = 0.5,
):
    """The reference problem of docs/background.md §6: (predictor, params0, X, y).

    n points x ~ N(0, I_dim) and y = sign(sum_j x_j), from jax.random.key(seed) split into a data
    key and a weight key; a bias-free ReLU MLP of `width` and `depth` layers, weights
    N(0, 1/fan_in) times init_scale.
    """
    from ._relu_nets import relu_mlp

    data_key, weight_key = jax.random.split(jax.random.key(seed))
    X = jax.random.normal(data_key, (n, dim), dtype=jnp.float64)
    y = jnp.sign(X.sum(axis=1))
    predictor = relu_mlp(depth, width, init_scale=init_scale)
    return predictor, predictor.init(weight_key, dim), X, y


def digits_pair(first: int = 0, second: int = 1, *, images: bool = False, max_per_class=None):
    """Two classes of scikit-learn's bundled 8x8 digits (no download): (X, y), y = +1 for `first`.

    Pixels are scaled to [0, 1]; `images=True` keeps the (8, 8) shape for CNNs, otherwise X has
    64 columns. A pair of digit classes is linearly separable through the origin in practice.
    """
    from sklearn.datasets import load_digits

    if first == second:
        raise ValueError("digits_pair needs two different classes")
    digits = load_digits()
    chosen = []
    for label in (first, second):
        index = np.flatnonzero(digits.target == label)
        chosen.append(index if max_per_class is None else index[:max_per_class])
    index = np.concatenate(chosen)
    X = digits.images[index] / 16.0 if images else digits.data[index] / 16.0
    y = np.where(digits.target[index] == first, 1.0, -1.0)
    return jnp.asarray(X, jnp.float64), jnp.asarray(y)


def chizat_bach_clusters(key, *, n: int = 200, dim: int = 10, grid: int = 3, spread: float = 0.3):
    """Chizat & Bach (COLT 2020) data: a grid x grid array of clusters in the first two
    coordinates with random +-1 cluster labels, uniform noise in the remaining coordinates.

    A constant coordinate 1 is appended so that a bias-free network can still separate clusters
    away from the origin (the usual bias-folding trick, which keeps homogeneity).
    """
    k_labels, k_cluster, k_jitter, k_noise = jax.random.split(key, 4)
    centres = jnp.stack(jnp.meshgrid(jnp.arange(grid), jnp.arange(grid)), -1).reshape(-1, 2)
    centres = (centres - (grid - 1) / 2.0) * (2.0 / max(grid - 1, 1))
    labels = jnp.where(jax.random.bernoulli(k_labels, 0.5, (grid * grid,)), 1.0, -1.0)
    cluster = jax.random.randint(k_cluster, (n,), 0, grid * grid)
    jitter = jax.random.uniform(k_jitter, (n, 2), minval=-spread, maxval=spread) / grid
    noise = jax.random.uniform(k_noise, (n, max(dim - 3, 0)), minval=-1.0, maxval=1.0)
    X = jnp.concatenate([centres[cluster] + jitter, noise, jnp.ones((n, 1))], axis=1)
    return X.astype(jnp.float64), labels[cluster]
