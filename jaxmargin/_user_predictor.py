"""`predictor(apply, init, in_shape=...)`: a user's own homogeneous network as a Predictor.

The user writes `apply(params, x) -> scalar` for one input and `init(key, in_shape) -> params`
with params any pytree of float arrays (a tuple, a flax params dict, equinox's arrays from
`eqx.partition`). The Predictor's params are the tuple of its leaves (what every jaxmargin
function takes); its kinks are found by tracing (_traced_kinks.py), and its degree is read off
the jaxpr exactly (_kink_plan.py) and checked numerically (_homogeneity.estimate_degree).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ._homogeneity import estimate_degree
from ._predictors import Predictor, check_positive_int, check_unit_interval
from ._traced_kinks import TracedNetwork

# Inputs on which the degree is checked numerically.
_CHECK_INPUTS = 8


def _canonical_shape(in_shape):
    """An int for vector inputs (as check_params passes it to init), else a tuple."""
    shape = (in_shape,) if isinstance(in_shape, int | np.integer) else tuple(in_shape)
    if not shape or any(isinstance(s, bool) or not isinstance(s, int | np.integer) for s in shape):
        raise ValueError(f"in_shape must be an int or a tuple of ints, got {in_shape!r}")
    if any(s < 1 for s in shape):
        raise ValueError(f"in_shape must have positive sizes, got {in_shape!r}")
    return int(shape[0]) if len(shape) == 1 else tuple(int(s) for s in shape)


def _shape_tuple(in_shape) -> tuple[int, ...]:
    return (in_shape,) if isinstance(in_shape, int) else in_shape


def predictor(
    apply: Callable,
    init: Callable,
    *,
    in_shape,
    degree: int | None = None,
    name: str | None = None,
    relu_grad_at_zero: float = 0.0,
) -> Predictor:
    """A Predictor from a user's positively homogeneous network, its kinks found by tracing.

    Args:
        apply: `apply(params, x) -> scalar` for ONE input x (an output of size 1 is taken as
            the scalar). It may use linear and multilinear operations (matmuls, convolutions,
            sums, products, reshapes, ...), `jax.nn.relu`, `jnp.maximum(z, 0)`, leaky relu
            (`jnp.maximum(z, a * z)`, `jax.nn.leaky_relu`, `jnp.where(z > 0, z, a * z)`),
            `jnp.abs`, `jnp.maximum`/`jnp.minimum` of two values, `jnp.max` over axes and
            max-pooling (`lax.reduce_window` with `lax.max`, flax's `max_pool`, equinox's
            `MaxPool2d`, without padding). Any operation on the input alone is allowed.
        init: `init(key, in_shape) -> params`, any pytree of float arrays (for equinox:
            the arrays of `eqx.partition(model, eqx.is_inexact_array)`, with `apply`
            combining them with the rest). Vector inputs get an int `in_shape`.
        in_shape: the shape of one input (an int for vectors): the example on which the
            network is traced and its degree checked when the predictor is made. Other shapes
            work too (each is traced when first used).
        degree: the homogeneity degree L; None finds it. A wrong value raises.
        name: used in error messages and records.
        relu_grad_at_zero: at a kink, the element of relu's Clarke interval [0, 1] that the
            derivative of `apply` takes (0 as jax.nn.relu); kinks the flow engine holds take
            the Clarke element instead.

    Returns:
        A Predictor whose params are the tuple of the leaves of init's pytree (in
        `jax.tree.leaves` order), with `kinks` (None when the network has none) and
        `layer_degrees` (the degree in each leaf alone; None when it is not homogeneous in
        each one).

    Raises:
        ValueError: apply uses an operation that is not piecewise linear or multilinear in the
            parameters (the message names it and where it is), or is not positively
            homogeneous (e.g. a bias after a hidden layer), or its degree is not `degree`.
        NotImplementedError: max-pooling with padding.
    """
    if not callable(apply) or not callable(init):
        raise TypeError("apply and init must be callables: apply(params, x), init(key, in_shape)")
    in_shape = _canonical_shape(in_shape)
    if degree is not None:
        check_positive_int("degree", degree)
    grad0 = check_unit_interval("relu_grad_at_zero", relu_grad_at_zero)
    if name is None:
        name = f"predictor({getattr(apply, '__name__', type(apply).__name__)})"
    arguments = (apply, init, in_shape, degree, str(name), grad0)
    try:
        hash(arguments)
    except TypeError:  # e.g. a bound method of an equinox module holding arrays
        return _build(*arguments)
    return _cached_build(*arguments)


@functools.cache
def _cached_build(*arguments) -> Predictor:
    # Cached like the built-in factories: the same functions give the same Predictor, so jitted
    # functions that take it as a static argument compile once.
    return _build(*arguments)


def _build(apply, init, in_shape, degree, name, grad0) -> Predictor:
    @functools.cache
    def structure(shape):
        return jax.tree.structure(jax.eval_shape(lambda key: init(key, shape), jax.random.key(0)))

    def flat_init(key, shape):
        leaves = jax.tree.leaves(init(key, shape))
        for leaf in leaves:
            if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
                raise TypeError(
                    f"{name}: init must return a pytree of float arrays; found a leaf of type"
                    f" {jnp.result_type(leaf)} (for equinox, eqx.partition(model,"
                    " eqx.is_inexact_array))"
                )
        return tuple(jnp.asarray(leaf, dtype=jnp.float64) for leaf in leaves)

    def flat_apply(params, x):
        tree = structure(x.shape[0] if x.ndim == 1 else tuple(x.shape))
        if tree.num_leaves != len(params):
            raise ValueError(f"{name}: got {len(params)} arrays, init makes {tree.num_leaves}")
        out = apply(jax.tree.unflatten(tree, params), x)
        if jnp.size(out) != 1:
            raise ValueError(f"{name}: apply must return a scalar, got shape {jnp.shape(out)}")
        return jnp.reshape(out, ())

    network = TracedNetwork(flat_apply, grad0, name)
    params = flat_init(jax.random.key(0), in_shape)
    plan = network.plan(params, jnp.zeros(_shape_tuple(in_shape)))
    if degree is not None and degree != plan.degree:
        raise ValueError(f"{name} is declared of degree {degree} but has degree {plan.degree}")
    rebuild = functools.partial(
        predictor,
        apply,
        init,
        in_shape=in_shape,
        degree=degree,  # as given, so that rebuilding with the same options hits the cache
        name=name,
        relu_grad_at_zero=grad0,
    )
    result = Predictor(
        flat_init,
        network.apply,
        plan.degree,
        name,
        plan.layer_degrees,
        grad0,
        rebuild,
        kinks=network.kinks() if plan.has_kinks else None,
    )
    _check_degree_numerically(result, params, in_shape)
    return result


def _check_degree_numerically(result: Predictor, params, in_shape):
    """f(c w) = c^L f(w) on random inputs: a second check of the degree read off the jaxpr."""
    X = jax.random.normal(jax.random.key(1), (_CHECK_INPUTS, *_shape_tuple(in_shape)))
    if not np.any(np.asarray(jax.vmap(result.apply, in_axes=(None, 0))(params, X))):
        return  # f = 0 on these inputs (e.g. every unit dead): nothing to measure
    measured = estimate_degree(result, params, X)
    if abs(measured - result.degree) > 1e-6 * result.degree:
        raise ValueError(
            f"{result.name}: its jaxpr gives degree {result.degree}, but f(c w) / f(w) measures"
            f" {measured:.8g}"
        )
