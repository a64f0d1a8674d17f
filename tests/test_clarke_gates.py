"""The gate fit of the KKT certificate (jaxmargin/_clarke_gates.py) and its LSI solver, against
references that share nothing with them: scipy's SLSQP, KKT multipliers found by NNLS, and
limiting gradients taken by plain autodiff at points pushed off the kinks."""

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
    reference = minimize(lambda v: 0.5 * np.sum((A @ v - b) ** 2), np.zeros(8),
                         jac=lambda v: A.T @ (A @ v - b), method="SLSQP",
                         constraints={"type": "ineq", "fun": lambda v: G @ v - h,
                                      "jac": lambda v: G},
                         options={"ftol": 1e-14, "maxiter": 1000})  # fmt: skip
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
        least_squares_with_inequalities(np.eye(2), np.ones(2), np.array([[1.0, 0.0], [-1.0, 0.0]]),
                                        np.array([1.0, 0.0]))  # fmt: skip


def _on_kinks(params, X, kinks):
    """params with the pre-activations listed in `kinks` ((example, layer, unit)) exactly 0:
    each unit's incoming row projected off the layer inputs of its examples, layer by layer."""
    layers = [np.array(layer) for layer in params]
    for layer, unit in sorted({(layer, unit) for _, layer, unit in kinks}):
        inputs = []
        for example in [i for i, l, u in kinks if (l, u) == (layer, unit)]:
            hidden = np.asarray(X[example])
            for below in layers[:layer]:
                hidden = np.maximum(below @ hidden, 0.0)
            inputs.append(hidden)
        basis = np.linalg.qr(np.array(inputs).T)[0]
        row = layers[layer][unit]
        layers[layer][unit] = row - basis @ (basis.T @ row)
    return tuple(jnp.asarray(layer) for layer in layers)


def _limiting_gradient(predictor, params, x, kinks, signs, eps=1e-9):
    """Plain autodiff gradient of f(x; .) at a point where each unit of `kinks` ((layer, unit),
    layers in order) has pre-activation sign * eps: rows moved along that layer's input, layer
    after layer. Away from other kinks this is the limiting gradient of that sign pattern, to
    O(eps)."""
    layers = [np.array(layer) for layer in params]
    for (layer, unit), sign in zip(kinks, signs):
        hidden = np.asarray(x)
        for below in layers[:layer]:
            hidden = np.maximum(below @ hidden, 0.0)
        row = layers[layer][unit]
        layers[layer][unit] = row + (sign * eps - row @ hidden) / (hidden @ hidden) * hidden
    moved = tuple(jnp.asarray(layer) for layer in layers)
    return np.asarray(ravel_pytree(jax.grad(predictor.apply)(moved, x))[0])


def _kinked_problem(depth):
    """4 points in 3-d, a width-5 ReLU net with some pre-activations exactly 0 (two examples;
    for depth 3 in both hidden layers), |f| >= 0.05 on every example (the first data seed that
    gives it: a kinked unit whose layer has no other active unit would make f = 0)."""
    if depth == 2:
        kinks = {0: [(0, 0), (0, 1), (0, 2)], 1: [(0, 2), (0, 3)]}
    else:
        kinks = {0: [(0, 0), (0, 1), (1, 0)], 1: [(1, 3)]}
    pairs = [(i, layer, unit) for i, units in kinks.items() for layer, unit in units]
    predictor = jm.relu_mlp(depth, 5)
    for seed in range(100):
        key_x, key_w = jax.random.split(jax.random.key(seed))
        X = jax.random.normal(key_x, (4, 3))
        params = _on_kinks(predictor.init(key_w, 3), X, pairs)
        f = jax.vmap(predictor.apply, in_axes=(None, 0))(params, X)
        if float(jnp.min(jnp.abs(f))) >= 0.05:
            return predictor, params, X, jnp.sign(f), kinks
    raise AssertionError("no seed gives a problem with |f| >= 0.05")


@pytest.mark.parametrize("depth", [2, 3])
def test_gate_fit_against_the_vertices_of_the_clarke_sets(depth):
    """One hidden layer: the gate fit is the exact minimum over the cones of the Clarke sets,
    which are the convex hulls of the limiting gradients of all 2^K sign patterns (taken by
    plain autodiff off the kinks; NNLS over all of them is the brute-force reference). Two:
    no fit may beat that minimum (its gated elements lie in the Clarke sets), and every vertex
    of the gates is one of those limiting gradients."""
    predictor, params, X, y, kinks = _kinked_problem(depth)
    kinked = kinked_units(predictor, params, X, 1e-9)
    found = {(i, layer, unit) for layer, mask in enumerate(kinked)
             for i, unit in zip(*np.nonzero(mask))}  # fmt: skip
    assert found == {(i, layer, unit) for i, units in kinks.items() for layer, unit in units}

    columns, vertices = [], {}
    for i in range(X.shape[0]):
        units = kinks.get(i, [])
        for signs in itertools.product([-1.0, 1.0], repeat=len(units)):
            g = float(y[i]) * _limiting_gradient(predictor, params, X[i], units, signs)
            columns.append(g)
            vertices[i, signs] = g
    columns = np.array(columns)
    rng = np.random.default_rng(depth)
    b = rng.normal(size=columns.shape[1])
    b /= np.linalg.norm(b)
    brute = np.linalg.norm(b - best_nnls(columns.T, b) @ columns)
    fit = fit_gates(predictor, params, X, y, b, kinked)
    print(f"depth {depth}: brute force {brute:.6e}, gate fit {fit.residual:.6e}")
    assert fit.residual >= brute - 1e-9
    if depth == 2:
        assert fit.residual == pytest.approx(brute, rel=1e-7)

    # The gated gradient at each vertex of the gates is that sign pattern's limiting gradient.
    w, unravel = ravel_pytree(params)
    for (i, signs), expected in vertices.items():
        masks = [np.zeros(mask.shape[1], bool) for mask in kinked]
        alphas = [np.zeros(mask.shape[1]) for mask in kinked]
        for (layer, unit), sign in zip(kinks.get(i, []), signs):
            masks[layer][unit], alphas[layer][unit] = True, float(sign > 0)
        gates = tuple((jnp.asarray(m), jnp.asarray(a)) for m, a in zip(masks, alphas))
        gated = jax.grad(lambda v: y[i] * predictor.kinks.gated_apply(unravel(v), X[i], gates))(w)
        np.testing.assert_allclose(np.asarray(gated), expected,
                                   atol=1e-7 * np.linalg.norm(expected))  # fmt: skip


def test_gate_fit_recovers_an_element_of_the_cone():
    """A target built from known gates and multipliers (one hidden layer): the fit reaches it."""
    predictor, params, X, y, kinks = _kinked_problem(2)
    kinked = kinked_units(predictor, params, X, 1e-9)
    w, unravel = ravel_pytree(params)
    rng = np.random.default_rng(0)
    gates = tuple((jnp.asarray(mask), jnp.asarray(rng.uniform(size=mask.shape))) for mask in kinked)
    elements = jax.vmap(jax.grad(lambda v, x, label, gate: label * predictor.kinks.gated_apply(
        unravel(v), x, gate)), in_axes=(None, 0, 0, 0))(w, X, y, gates)  # fmt: skip
    b = rng.uniform(0.5, 2.0, X.shape[0]) @ np.asarray(elements)
    fit = fit_gates(predictor, params, X, y, b / np.linalg.norm(b), kinked)
    assert fit.residual <= 1e-10
