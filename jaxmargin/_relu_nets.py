"""Bias-free ReLU-type networks: MLPs (ReLU, leaky ReLU) and a small CNN with max-pooling.

Each is a Predictor of degree L = its number of weight layers; those with hidden layers carry a
Kinks record (pre-activations and gated evaluation) so that the flow engine can hold their kinks:
written by hand for the MLPs (the reference the traced kinks are tested against), found by
tracing for the CNN (_traced_kinks.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ._predictors import (
    Kinks,
    Predictor,
    check_positive_int,
    check_unit_interval,
    gaussian_layers,
    kinked_linear,
    vector_in_dim,
)
from ._traced_kinks import TracedNetwork

# --------------------------------------------------------------------------- ReLU family


@functools.cache
def _leaky_mlp(depth, width, slope, relu_grad_at_zero, init_scale) -> Predictor:
    activation = kinked_linear(slope, relu_grad_at_zero)

    def init(key, in_shape):
        d = vector_in_dim(in_shape)
        if depth == 1:
            return gaussian_layers(key, [(d,)], [d], init_scale)
        shapes = [(width, d)] + [(width, width)] * (depth - 2) + [(width,)]
        fan_ins = [d] + [width] * (depth - 1)
        return gaussian_layers(key, shapes, fan_ins, init_scale)

    def apply(params, x):
        hidden = x
        for layer in params[:-1]:
            hidden = activation(layer @ hidden)
        return params[-1] @ hidden

    def preactivations(params, x, gates=None):
        if gates is not None:
            return _gated_forward(params, x, gates, None, False)[0]
        out, hidden = [], x
        for layer in params[:-1]:
            z = layer @ hidden
            out.append(z)
            hidden = activation(z)
        return tuple(out)

    def gated_apply(params, x, gates, offsets=None, branch=False):
        return _gated_forward(params, x, gates, offsets, branch)[1]

    def _gated_forward(params, x, gates, offsets, branch):
        hidden, preacts = x, []
        if offsets is None:
            offsets = (0.0,) * (depth - 1)
        for layer, (mask, alpha), offset in zip(params[:-1], gates, offsets):
            z = layer @ hidden
            preacts.append(z)
            sign_rule = jnp.where(
                z > 0, 1.0, jnp.where(z < 0, slope, slope + relu_grad_at_zero * (1.0 - slope))
            )
            derivative = jnp.where(mask, slope + alpha * (1.0 - slope), sign_rule)
            z_value = jax.lax.stop_gradient(z)
            value = activation(z_value)
            if branch:
                value = jnp.where(mask, derivative * z_value, value)
            # Value exactly activation(z) (or the branch's); derivative in z exactly `derivative`.
            hidden = value + (z - z_value) * derivative + offset
        return tuple(preacts), params[-1] @ hidden

    kind = "relu_mlp" if slope == 0.0 else f"leaky_relu_mlp[slope={slope}]"
    rebuild = functools.partial(
        _mlp_factory,
        depth,
        width,
        slope,
        relu_grad_at_zero=relu_grad_at_zero,
        init_scale=init_scale,
    )
    name = f"{kind}(depth={depth}, width={width}, relu'(0)={relu_grad_at_zero})"
    kinks = Kinks(preactivations, gated_apply, slope) if depth >= 2 else None
    return Predictor(
        init, apply, depth, name, (1,) * depth, relu_grad_at_zero, rebuild, kinks=kinks
    )


def _mlp_factory(depth, width, slope, *, relu_grad_at_zero=0.0, init_scale=1.0) -> Predictor:
    check_positive_int("depth", depth)
    check_positive_int("width", width)
    slope = float(slope)
    if not 0.0 <= slope < 1.0:
        raise ValueError(f"slope must lie in [0, 1), got {slope}")
    grad0 = check_unit_interval("relu_grad_at_zero", relu_grad_at_zero)
    return _leaky_mlp(depth, width, slope, grad0, float(init_scale))


def relu_mlp(
    depth: int, width: int, *, relu_grad_at_zero: float = 0.0, init_scale: float = 1.0
) -> Predictor:
    """Bias-free ReLU network w_L^T relu(W_{L-1} ... relu(W_1 x)), degree L = depth.

    Weights are N(0, init_scale^2 / fan_in). `relu_grad_at_zero` is the element of the Clarke
    derivative [0, 1] that autodiff returns at a kink (jax.nn.relu uses 0). depth = 1 is linear.
    """
    return _mlp_factory(
        depth, width, 0.0, relu_grad_at_zero=relu_grad_at_zero, init_scale=init_scale
    )


def leaky_relu_mlp(
    depth: int,
    width: int,
    slope: float,
    *,
    relu_grad_at_zero: float = 0.0,
    init_scale: float = 1.0,
) -> Predictor:
    """Bias-free leaky-ReLU network (activation max(z, slope z)), degree L = depth.

    `relu_grad_at_zero` = a picks slope + a (1 - slope) in the Clarke interval [slope, 1].
    """
    return _mlp_factory(
        depth, width, slope, relu_grad_at_zero=relu_grad_at_zero, init_scale=init_scale
    )


# --------------------------------------------------------------------------- CNN


def _max_pool(z, pool):
    # Max-pooling is 1-homogeneous: max(c a) = c max(a) for c > 0.
    return jax.lax.reduce_window(
        z, -jnp.inf, jax.lax.max, (pool, pool, 1), (pool, pool, 1), "VALID"
    )


@functools.cache
def _relu_cnn(channels, kernel_size, pool, relu_grad_at_zero, init_scale) -> Predictor:
    activation = kinked_linear(0.0, relu_grad_at_zero)

    def features(kernels, x):
        hidden = x if x.ndim == 3 else x[..., None]
        for kernel in kernels:
            # Zero padding keeps the convolution linear in the kernel, hence homogeneous.
            hidden = jax.lax.conv_general_dilated(
                hidden[None], kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
            )[0]
            hidden = _max_pool(activation(hidden), pool)
        return hidden.reshape(-1)

    def init(key, in_shape):
        in_shape = tuple(in_shape) if not isinstance(in_shape, int) else (in_shape,)
        if len(in_shape) not in (2, 3):
            raise ValueError(f"relu_cnn takes (H, W) or (H, W, C) inputs, got {in_shape}")
        in_channels = in_shape[2] if len(in_shape) == 3 else 1
        widths = (in_channels, *channels)
        shapes = [(kernel_size, kernel_size, a, b) for a, b in zip(widths[:-1], widths[1:])]
        fan_ins = [kernel_size * kernel_size * a for a in widths[:-1]]
        key_conv, key_dense = jax.random.split(key)
        kernels = gaussian_layers(key_conv, shapes, fan_ins, init_scale)
        n_features = jax.eval_shape(features, kernels, jnp.zeros(in_shape)).shape[0]
        if n_features == 0:
            raise ValueError(f"input {in_shape} is too small for {len(channels)} poolings")
        dense = gaussian_layers(key_dense, [(n_features,)], [n_features], init_scale)
        return (*kernels, *dense)

    def apply(params, x):
        return params[-1] @ features(params[:-1], x)

    depth = len(channels) + 1
    rebuild = functools.partial(
        relu_cnn,
        channels,
        kernel_size,
        pool,
        relu_grad_at_zero=relu_grad_at_zero,
        init_scale=init_scale,
    )
    name = f"relu_cnn(channels={channels}, kernel={kernel_size}, pool={pool})"
    # Its kinks (relu units, and ties within the pooling windows) are found by tracing apply.
    kinks = TracedNetwork(apply, relu_grad_at_zero, name).kinks()
    return Predictor(
        init, apply, depth, name, (1,) * depth, relu_grad_at_zero, rebuild, kinks=kinks
    )


def relu_cnn(
    channels: tuple[int, ...] = (8, 16),
    kernel_size: int = 3,
    pool: int = 2,
    *,
    relu_grad_at_zero: float = 0.0,
    init_scale: float = 1.0,
) -> Predictor:
    """Bias-free CNN: [conv (SAME, zero padded) -> ReLU -> max-pool] per channel entry, then a
    linear read-out. Degree L = len(channels) + 1. `init(key, (H, W))` or `(H, W, C)`.
    """
    channels = tuple(check_positive_int("channels[i]", c) for c in channels)
    if not channels:
        raise ValueError("relu_cnn needs at least one convolution layer")
    check_positive_int("kernel_size", kernel_size)
    check_positive_int("pool", pool)
    grad0 = check_unit_interval("relu_grad_at_zero", relu_grad_at_zero)
    return _relu_cnn(channels, kernel_size, pool, grad0, float(init_scale))
