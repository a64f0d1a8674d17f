"""The gate fit of the KKT certificate (jaxmargin/_clarke_gates.py) and its LSI solver, against
references independent of them: scipy's SLSQP, KKT multipliers found by NNLS, and limiting
gradients taken by plain autodiff at points pushed off the kinks (brute force over all sign
patterns)."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from scipy.optimize import minimize

import jaxmargin as jm
from jaxmargin._clarke_gates import fit_gates, kinked_units
from jaxmargin._nnls import best_nnls, least_squares_with_inequalities

jax.config.update("jax_enable_x64", True)


@pytest.mark.parametrize("seed", range(4))
def test_least_squares_with_inequalities_matches_slsqp_and_is_kkt(seed):
    rng = np.random.default_rng(seed)
    A, b = rng.normal(size=(30, 8)), rng.normal(size=30)
    G = rng.normal(size=(12, 8))
    h = G @ rng.normal(size=8) - rng.uniform(0.0, 1.0, 12)  # feasible, some constraints bind
    x = least_squares_with_inequalities(A, b, G, h)
    assert np.all(G @ x - h >= -1e-10)
    reference = minimize(
        lambda v: 0.5 * np.sum((A @ v - b) ** 2),
        np.zeros(8),
        jac=lambda v: A.T @ (A @ v - b),
        method="SLSQP",
        constraints={"type": "ineq", "fun": lambda v: G @ v - h, "jac": lambda v: G},
        options={"ftol": 1e-14, "maxiter": 1000},
    )
    # (SLSQP may report a line-search failure at its optimum; only its value is compared.)
    assert np.all(G @ reference.x - h >= -1e-8)
    assert np.sum((A @ x - b) ** 2) <= np.sum((A @ reference.x - b) ** 2) * (1 + 1e-9)
    # KKT: the gradient is a non-negative combination of the binding constraints' normals.
    binding = G @ x - h <= 1e-9
    assert binding.any()
    nu = best_nnls(G[binding].T, A.T @ (A @ x - b))
    assert np.linalg.norm(G[binding].T @ nu - A.T @ (A @ x - b)) <= 1e-9 * np.linalg.norm(A.T @ b)


def test_least_squares_with_inequalities_rejects_infeasible_constraints():
    with pytest.raises(ValueError, match="infeasible"):
        least_squares_with_inequalities(
            np.eye(2), np.ones(2), np.array([[1.0, 0.0], [-1.0, 0.0]]), np.array([1.0, 0.0])
        )


def _layer_inputs(layers, x, layer, slope):
    hidden = np.asarray(x)
    for below in layers[:layer]:
        z = below @ hidden
        hidden = np.maximum(z, slope * z)
    return hidden


def _on_kinks(params, X, kinks, slope):
    """params with the pre-activations listed in `kinks` ((example, layer, unit)) exactly 0:
    each unit's incoming row projected off the layer inputs of its examples, layer by layer."""
    layers = [np.array(layer) for layer in params]
    for layer, unit in sorted({(layer, unit) for _, layer, unit in kinks}):
        inputs = [
            _layer_inputs(layers, X[i], layer, slope)
            for i, kink_layer, kink_unit in kinks
            if (kink_layer, kink_unit) == (layer, unit)
        ]
        basis = np.linalg.qr(np.array(inputs).T)[0]
        row = layers[layer][unit]
        layers[layer][unit] = row - basis @ (basis.T @ row)
    return tuple(jnp.asarray(layer) for layer in layers)


def _limiting_gradient(predictor, params, x, kinks, signs, slope, eps=1e-9):
    """Plain autodiff gradient of f(x; .) at a point where each unit of `kinks` ((layer, unit),
    layers in order) has pre-activation sign * eps: rows moved along that layer's input, layer
    after layer. Away from other kinks this is the limiting gradient of that sign pattern, to
    O(eps)."""
    layers = [np.array(layer) for layer in params]
    for (layer, unit), sign in zip(kinks, signs):
        hidden = _layer_inputs(layers, x, layer, slope)
        row = layers[layer][unit]
        layers[layer][unit] = row + (sign * eps - row @ hidden) / (hidden @ hidden) * hidden
    moved = tuple(jnp.asarray(layer) for layer in layers)
    return np.asarray(ravel_pytree(jax.grad(predictor.apply)(moved, x))[0])


def _kinked_problem(depth, slope):
    """4 points in 3-d, a width-5 (leaky) ReLU net with some pre-activations exactly 0 (two
    examples; for depth 3 in both hidden layers), |f| >= 0.05 on every example (the first data
    seed that gives it: a kinked unit whose layer has no other active unit would make f = 0)."""
    if depth == 2:
        kinks = {0: [(0, 0), (0, 1), (0, 2)], 1: [(0, 2), (0, 3)]}
    else:
        kinks = {0: [(0, 0), (0, 1), (1, 0)], 1: [(1, 3)]}
    pairs = [(i, layer, unit) for i, units in kinks.items() for layer, unit in units]
    predictor = jm.relu_mlp(depth, 5) if slope == 0 else jm.leaky_relu_mlp(depth, 5, slope)
    for seed in range(100):
        key_x, key_w = jax.random.split(jax.random.key(seed))
        X = jax.random.normal(key_x, (4, 3))
        params = _on_kinks(predictor.init(key_w, 3), X, pairs, slope)
        f = jax.vmap(predictor.apply, in_axes=(None, 0))(params, X)
        if float(jnp.min(jnp.abs(f))) >= 0.05:
            return predictor, params, X, jnp.sign(f), kinks
    raise AssertionError("no seed gives a problem with |f| >= 0.05")


def _gated_gradient(predictor, params, x, label, kinked_shapes, units, gates):
    """s(g) of one example through the predictor's gated_apply, gates on `units` only."""
    w, unravel = ravel_pytree(params)
    masks = [np.zeros(width, bool) for width in kinked_shapes]
    alphas = [np.zeros(width) for width in kinked_shapes]
    for (layer, unit), gate in zip(units, gates):
        masks[layer][unit], alphas[layer][unit] = True, gate
    arrays = tuple((jnp.asarray(m), jnp.asarray(a)) for m, a in zip(masks, alphas))
    return np.asarray(
        jax.grad(lambda v: label * predictor.kinks.gated_apply(unravel(v), x, arrays))(w)
    )


@pytest.mark.parametrize("depth, slope", [(2, 0.0), (3, 0.0), (2, 0.1)])
def test_gated_gradients_are_in_the_clarke_sets(depth, slope):
    """The claim the gate fit rests on, against limiting gradients taken by plain autodiff at
    points pushed off the kinks (all 2^K sign patterns): the gated gradient at a vertex of the
    gates is that pattern's limiting gradient, and at interior gates the multilinear
    interpolation of them (a convex combination: an element of the Clarke set)."""
    predictor, params, X, y, kinks = _kinked_problem(depth, slope)
    kinked = kinked_units(predictor, params, X, 1e-9)
    found = {
        (i, layer, unit) for layer, mask in enumerate(kinked) for i, unit in zip(*np.nonzero(mask))
    }
    assert found == {(i, layer, unit) for i, units in kinks.items() for layer, unit in units}
    widths = [mask.shape[1] for mask in kinked]
    rng = np.random.default_rng(depth)
    for i, units in kinks.items():
        patterns = list(itertools.product([0, 1], repeat=len(units)))
        vertex = {
            p: float(y[i])
            * _limiting_gradient(predictor, params, X[i], units, [2.0 * s - 1.0 for s in p], slope)
            for p in patterns
        }
        scale = max(np.linalg.norm(v) for v in vertex.values())
        for p in patterns:
            gated = _gated_gradient(predictor, params, X[i], y[i], widths, units, p)
            np.testing.assert_allclose(gated, vertex[p], atol=1e-7 * scale)
        g = rng.uniform(0.1, 0.9, len(units))
        interpolated = sum(
            np.prod([gk if s else 1.0 - gk for gk, s in zip(g, p)]) * vertex[p] for p in patterns
        )
        np.testing.assert_allclose(
            _gated_gradient(predictor, params, X[i], y[i], widths, units, g),
            interpolated,
            atol=1e-7 * scale,
        )


@pytest.mark.parametrize("depth, slope", [(2, 0.0), (3, 0.0), (2, 0.1)])
def test_gate_fit_against_brute_force_over_the_vertices(depth, slope):
    """NNLS over the limiting gradients of all sign patterns of all examples is the exact
    minimum over the cones of the Clarke sets (brute force). One hidden layer: the gate fit is
    that minimum. Two: no fit may beat it. Targets: a random direction, and a combination of
    the vertices with interior weights plus noise (whose minimum needs interior gates)."""
    predictor, params, X, y, kinks = _kinked_problem(depth, slope)
    kinked = kinked_units(predictor, params, X, 1e-9)
    columns, owner = [], []
    for i in range(X.shape[0]):
        units = kinks.get(i, [])
        for signs in itertools.product([-1.0, 1.0], repeat=len(units)):
            columns.append(
                float(y[i]) * _limiting_gradient(predictor, params, X[i], units, signs, slope)
            )
            owner.append(i)
    columns, owner = np.array(columns), np.array(owner)
    rng = np.random.default_rng(depth)
    inside = rng.uniform(0.5, 1.0, len(columns)) @ columns
    for b, interior in (
        (rng.normal(size=columns.shape[1]), False),
        (
            inside / np.linalg.norm(inside)
            + 0.05 * rng.normal(size=columns.shape[1]) / np.sqrt(columns.shape[1]),
            True,
        ),
    ):
        b /= np.linalg.norm(b)
        weights = best_nnls(columns.T, b)
        brute = np.linalg.norm(b - weights @ columns)
        if interior:  # the brute-force minimum mixes sign patterns of example 0
            assert np.sum(weights[owner == 0] > 1e-9) >= 2
        fit = fit_gates(predictor, params, X, y, b, kinked)
        print(f"depth {depth}, slope {slope}: brute force {brute:.9e}, gate fit {fit.residual:.9e}")
        assert fit.residual >= brute - 1e-9
        if depth == 2:
            assert fit.residual == pytest.approx(brute, rel=1e-7)


def test_gate_fit_recovers_an_element_of_the_cone():
    """The optimiser alone (shares gated_apply with the fit): a target built from known interior
    gates and positive multipliers (one hidden layer) is reached."""
    predictor, params, X, y, kinks = _kinked_problem(2, 0.0)
    kinked = kinked_units(predictor, params, X, 1e-9)
    w, unravel = ravel_pytree(params)
    rng = np.random.default_rng(0)
    gates = tuple((jnp.asarray(mask), jnp.asarray(rng.uniform(size=mask.shape))) for mask in kinked)
    elements = jax.vmap(
        jax.grad(
            lambda v, x, label, gate: label * predictor.kinks.gated_apply(unravel(v), x, gate)
        ),
        in_axes=(None, 0, 0, 0),
    )(w, X, y, gates)
    b = rng.uniform(0.5, 2.0, X.shape[0]) @ np.asarray(elements)
    fit = fit_gates(predictor, params, X, y, b / np.linalg.norm(b), kinked)
    assert fit.residual <= 1e-10
