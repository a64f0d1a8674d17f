"""Positively homogeneous predictors as pure functions.

A predictor is a `Predictor` NamedTuple of pure functions, in the style of optax's
`GradientTransformation`: `init(key, in_shape) -> params`, `apply(params, x) -> scalar` for ONE
input, and its homogeneity degree `degree` = L, with f(x; c w) = c^L f(x; w) for every c > 0.

Every predictor's params are a tuple of arrays, one per layer (one per factor of the product for
diagonal networks). `layer_degrees[k]` is the degree of f in layer k alone, which the
multi-homogeneous normalization (Lyu & Li 2020, §4.4) uses.

The linear family is here, the ReLU-type networks in _relu_nets.py. Factories are cached:
calling `relu_mlp(2, 32)` twice returns the same object, so jitted functions that take a
predictor as a static argument compile once.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Params = tuple[jax.Array, ...]


class Predictor(NamedTuple):
    """An L-homogeneous predictor f(x; w).

    Attributes:
        init: `init(key, in_shape) -> params`, a tuple of arrays; `in_shape` is an int (vector
            inputs) or a tuple (image inputs of the CNN).
        apply: `apply(params, x) -> scalar` for a single input `x`.
        degree: the homogeneity degree L of `apply` in `params`.
        name: a readable description, used in error messages and result records.
        layer_degrees: degree of f in each entry of params (for product normalization).
        relu_grad_at_zero: the value autodiff uses for relu'(0) (None for models without kinks).
        rebuild: `rebuild(**changes) -> Predictor`, the same model with other options
            (e.g. `relu_grad_at_zero`), or None.
        end_to_end: for linear-in-x models, `end_to_end(params) -> beta` with f(x) = <beta, x>.
        kinks: for networks with (leaky) ReLU kinks, a `Kinks` giving the pre-activations and
            an `apply` whose kink derivatives can be set (the Filippov/Clarke element used on
            sliding manifolds by the flow engine), or None.
    """

    init: Callable[..., Params]
    apply: Callable[[Params, jax.Array], jax.Array]
    degree: int
    name: str = "custom"
    layer_degrees: tuple[int, ...] | None = None
    relu_grad_at_zero: float | None = None
    rebuild: Callable[..., Predictor] | None = None
    end_to_end: Callable[[Params], jax.Array] | None = None
    kinks: Kinks | None = None


class Kinks(NamedTuple):
    """Access to the kinks of a ReLU-type network, for sliding-mode (Filippov) velocities.

    Attributes:
        preactivations: `preactivations(params, x, gates=None) -> tuple` of the hidden
            pre-activations z of one input, one array per hidden layer (per kink site, each
            1-D, for networks whose kinks were found by tracing: _traced_kinks.py); with
            `gates` (as in gated_apply) their gradients take the gated units' derivatives
            (deeper layers' z depend on the Clarke elements chosen below them).
        gated_apply: `gated_apply(params, x, gates) -> scalar`, the same value as `apply`, but
            where `gates[k]` = (mask, alpha) with mask True the derivative of the activation
            at unit j of hidden layer k is taken to be slope + alpha_j (1 - slope), whatever
            the sign of z_j: the element of the Clarke interval that keeps z_j on its kink.
            An optional `offsets` (one array per hidden layer, zeros leave the value unchanged)
            is added to the post-activations: its gradient is the backpropagated signal
            d f / d h_j that scales the Clarke interval of unit j. With `branch=True` a masked
            unit also takes its value from that derivative (derivative * z, the linear piece
            it selects), so that a frozen activation pattern gives one smooth field: what an
            integrator's inner stages need when a stage point strays across a kink.
    """

    preactivations: Callable
    gated_apply: Callable
    slope: float = 0.0  # negative-side slope of the activation (0 for ReLU)


# --------------------------------------------------------------------------- activations


def kinked_linear(slope: float, grad_at_zero: float) -> Callable[[jax.Array], jax.Array]:
    """max(z, slope*z) whose autodiff derivative at z = 0 is a chosen Clarke element.

    The Clarke derivative of the (leaky) ReLU at 0 is the interval [slope, 1]; `grad_at_zero` in
    [0, 1] picks slope + grad_at_zero * (1 - slope) in it. jax.nn.relu always picks 0.
    """
    kink_derivative = slope + grad_at_zero * (1.0 - slope)

    @jax.custom_jvp
    def activation(z):
        return jnp.where(z > 0, z, slope * z)

    @activation.defjvp
    def _jvp(primals, tangents):
        (z,), (dz,) = primals, tangents
        derivative = jnp.where(z > 0, 1.0, jnp.where(z < 0, slope, kink_derivative))
        return activation(z), derivative.astype(dz.dtype) * dz

    return activation


# --------------------------------------------------------------------------- helpers


def gaussian_layers(key, shapes, fan_ins, scale) -> Params:
    keys = jax.random.split(key, len(shapes))
    return tuple(
        scale * jax.random.normal(k, s, dtype=jnp.float64) / math.sqrt(fan_in)
        for k, s, fan_in in zip(keys, shapes, fan_ins)
    )


def vector_in_dim(in_shape) -> int:
    if isinstance(in_shape, int):
        return in_shape
    if len(in_shape) == 1:
        return int(in_shape[0])
    raise ValueError(f"this predictor takes vector inputs; got input shape {tuple(in_shape)}")


def check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_unit_interval(name: str, value: Any) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1] (a Clarke element), got {value}")
    return value


def _chain_product(params: Params) -> jax.Array:
    """w_L^T W_{L-1} ... W_1 for the deep linear net (the end-to-end linear predictor)."""
    beta = params[-1]
    for layer in reversed(params[:-1]):
        beta = beta @ layer
    return beta


# --------------------------------------------------------------------------- linear family


@functools.cache
def linear(*, init_scale: float = 1.0) -> Predictor:
    """f(x; w) = <w, x>, degree 1. params = (w,)."""

    def init(key, in_shape):
        d = vector_in_dim(in_shape)
        return gaussian_layers(key, [(d,)], [d], init_scale)

    def apply(params, x):
        return params[0] @ x

    return Predictor(
        init, apply, 1, "linear", (1,), None, None, end_to_end=lambda params: params[0]
    )


@functools.cache
def _deep_linear(depth: int, width: int, init_scale: float) -> Predictor:
    def init(key, in_shape):
        d = vector_in_dim(in_shape)
        shapes = [(width, d)] + [(width, width)] * (depth - 2) + [(width,)]
        fan_ins = [d] + [width] * (depth - 1)
        return gaussian_layers(key, shapes, fan_ins, init_scale)

    def apply(params, x):
        return _chain_product(params) @ x

    rebuild = functools.partial(deep_linear, depth, width, init_scale=init_scale)
    return Predictor(
        init,
        apply,
        depth,
        f"deep_linear(depth={depth}, width={width})",
        (1,) * depth,
        None,
        rebuild,
        end_to_end=_chain_product,
    )


def deep_linear(depth: int, width: int, *, init_scale: float = 1.0) -> Predictor:
    """Fully connected deep linear network w_L^T W_{L-1} ... W_1 x, degree L = depth >= 2.

    Gunasekar et al. (2018): gradient flow converges in direction to the L2 max-margin SVM.
    """
    check_positive_int("depth", depth, 2)
    check_positive_int("width", width)
    return _deep_linear(depth, width, float(init_scale))


@functools.cache
def _diagonal_linear(depth: int, init_scale: float) -> Predictor:
    def end_to_end(params):
        return functools.reduce(jnp.multiply, params)

    def init(key, in_shape):
        d = vector_in_dim(in_shape)
        return gaussian_layers(key, [(d,)] * depth, [1] * depth, init_scale)

    def apply(params, x):
        return end_to_end(params) @ x

    rebuild = functools.partial(diagonal_linear, depth, init_scale=init_scale)
    return Predictor(
        init,
        apply,
        depth,
        f"diagonal_linear(depth={depth})",
        (1,) * depth,
        None,
        rebuild,
        end_to_end=end_to_end,
    )


def diagonal_linear(depth: int, *, init_scale: float = 1.0) -> Predictor:
    """Diagonal linear network <u_1 ⊙ ... ⊙ u_L, x>, degree L = depth.

    Gunasekar et al. (NeurIPS 2018): the direction of beta = u_1 ⊙ ... ⊙ u_L tends to a
    stationary point of min ||beta||_{2/L} s.t. y_n <x_n, beta> >= 1 (L = 2: the l1 max margin).
    Each u_k is initialised i.i.d. N(0, init_scale^2).
    """
    check_positive_int("depth", depth, 1)
    return _diagonal_linear(depth, float(init_scale))
