"""The beta -> infinity limit flow (_flow/_limit.py): its pieces against scipy, the limits it must
reach exactly (issue 5: l1 max margin of diagonal nets, SVM of deep linear nets, beta up to
float64's range), and its agreement with the W-method at finite beta."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from jax.flatten_util import ravel_pytree

import jaxmargin as jm
from jaxmargin._checks import theorem5_max_decrease
from jaxmargin._flow import _limit as lim
from jaxmargin._flow import _solution as codes
from jaxmargin._flow._kink_geometry import per_example_margins
from jaxmargin._wolfe import wolfe

from helpers import linearly_separable


def _unit(v):
    v = np.asarray(v)
    v = v / np.max(np.abs(v))  # params reach 1e300: scale before squaring
    return v / np.linalg.norm(v)


def _scipy_min_norm(vectors):
    k = vectors.shape[0]
    result = scipy.optimize.minimize(
        lambda a: np.sum((a @ vectors) ** 2), np.full(k, 1.0 / k), method="SLSQP",
        jac=lambda a: 2.0 * vectors @ (a @ vectors), bounds=[(0.0, 1.0)] * k,
        constraints=[{"type": "eq", "fun": lambda a: np.sum(a) - 1.0}],
        options={"ftol": 1e-15, "maxiter": 1000},
    )  # fmt: skip
    assert result.success, result.message
    return result.x @ vectors


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_wolfe_on_allowed_points_from_a_warm_start_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(12, 5)) + np.array([1.0, 0.5, 0.0, 0.0, 0.0])
    allowed = np.zeros(12, bool)
    allowed[rng.choice(12, size=7, replace=False)] = True
    # A warm start that is not optimal: uniform weights on three allowed points.
    weights0 = np.zeros(12)
    weights0[np.flatnonzero(allowed)[:3]] = 1.0 / 3.0
    gram = jnp.asarray(vectors @ vectors.T)
    weights, gap = wolfe(gram, jnp.asarray(allowed), jnp.asarray(weights0), 1e-15, 100)
    weights = np.asarray(weights)
    assert np.all(weights[~allowed] == 0.0) and np.all(weights >= 0.0)
    assert np.sum(weights) == pytest.approx(1.0, abs=1e-14)
    reference = _scipy_min_norm(vectors[allowed])
    assert np.linalg.norm(weights @ vectors - reference) <= 1e-6 * np.linalg.norm(reference)
    assert float(gap) <= 1e-12


def test_equalize_makes_the_active_margins_equal_with_a_small_move():
    X, y = linearly_separable(5, 30, 6)
    predictor = jm.deep_linear(2, 4)
    params = predictor.init(jax.random.key(0), 6)
    flat, unravel = ravel_pytree(params)
    margins_and_grads = per_example_margins(predictor, unravel, jnp.asarray(X), jnp.asarray(y))
    theta = flat / jnp.linalg.norm(flat)
    q, _ = margins_and_grads(theta, None)
    active = jnp.zeros(30, bool).at[jnp.argsort(q)[:4]].set(True)
    # From a spread of 0.15 (far from the flow's ~1e-8 per step): Newton converges
    # quadratically, 0.028, 3.6e-4, 7.7e-10, 6e-17 in four sweeps.
    theta_new = lim.equalize(margins_and_grads, theta, active, sweeps=4)
    q_new, _ = margins_and_grads(theta_new, None)
    spread = np.ptp(np.asarray(q_new)[np.asarray(active)])
    assert spread <= 1e-14, spread
    assert float(jnp.linalg.norm(theta_new)) == pytest.approx(1.0, abs=1e-14)
    # The move is of the order of the spread it removed (not a jump elsewhere on the sphere).
    before = np.ptp(np.asarray(q)[np.asarray(active)])
    assert float(jnp.linalg.norm(theta_new - theta)) <= 100.0 * before


def _diagonal_problem(seed):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((20, 8))
    y = np.sign(X[:, 0] - 0.7 * X[:, 1])
    return X, y


@pytest.mark.parametrize("seed", [3, 4])
def test_diagonal_depth2_reaches_the_l1_max_margin(seed):
    X, y = _diagonal_problem(seed)
    assert jm.l1_max_margin_is_unique(X, y)
    predictor = jm.diagonal_linear(2)
    params0 = predictor.init(jax.random.key(0), 8)
    # The W-method stalls near beta ~ 2e8 on these nets (the minimum-margin examples swap
    # within its steps); the engine then continues on the limit flow.
    solution = jm.gradient_flow(predictor, params0, X, y, beta_max=1e30, solver="rosenbrock",
                                rtol=1e-6, max_steps=20_000)  # fmt: skip
    assert solution.status.code == codes.REACHED_TARGET, solution.status.message
    last = jax.tree.map(lambda a: a[-1], solution.params)
    beta = np.asarray(predictor.end_to_end(last))
    distance = np.abs(beta / np.abs(beta).sum() - jm.l1_max_margin(X, y).direction).sum()
    print(f"diagonal L=2, seed {seed}, beta=1e30: l1 distance to the l1 max margin {distance:.2e}")
    assert distance <= 1e-6
    assert theorem5_max_decrease(solution) <= 1e-8


def test_deep_linear_depth3_reaches_the_svm_direction_at_beta_1e30():
    X, y = linearly_separable(0, 40, 10)  # the data of bench/asymptotic.py
    predictor = jm.deep_linear(3, 5)
    params0 = predictor.init(jax.random.key(1), 10)
    solution = jm.gradient_flow(predictor, params0, X, y, beta_max=1e30, solver="rosenbrock",
                                rtol=1e-6, max_steps=20_000)  # fmt: skip
    assert solution.status.code == codes.REACHED_TARGET, solution.status.message
    last = jax.tree.map(lambda a: a[-1], solution.params)
    distance = np.linalg.norm(_unit(predictor.end_to_end(last)) - jm.svm_direction(X, y).direction)
    print(f"deep linear L=3, beta=1e30: distance to the SVM direction {distance:.2e}")
    assert distance <= 1e-8
    assert theorem5_max_decrease(solution) <= 1e-8
    assert np.all(np.isfinite(np.asarray(solution.log_t)))


def test_linear_soudry_reaches_beta_1e300():
    X, y = jm.soudry_dataset(0)
    solution = jm.gradient_flow(jm.linear(), (jnp.zeros(2),), X, y, beta_max=1e300,
                                solver="rosenbrock", rtol=1e-8, max_steps=50_000)  # fmt: skip
    assert solution.status.code == codes.REACHED_TARGET, solution.status.message
    assert float(solution.s[-1]) == pytest.approx(np.log(1e300), rel=1e-12)
    direction = _unit(solution.params[0][-1])
    reference = jm.svm_direction(X, y)
    assert np.linalg.norm(direction - reference.direction) <= 1e-12
    assert theorem5_max_decrease(solution) <= 1e-9
    # ln t ~ beta gamma (the loss is ~ exp(-beta gamma) and t L -> O(1) for L = 1).
    assert float(solution.log_t[-1]) / 1e300 == pytest.approx(reference.margin, rel=1e-6)


@pytest.mark.parametrize("depth", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_limit_flow_continues_the_flow_at_finite_beta(depth):
    """Switching at beta = 1e8 vs the W-method all the way to 1e10: the same direction, soft
    margin and clocks up to the O(1/beta) the limit flow neglects (measured 2.5e-9 / 4e-10 /
    4e-10 / 3e-12 for L = 2)."""
    X, y = linearly_separable(20261128, 40, 10)
    predictor = jm.deep_linear(depth, 5)
    params0 = predictor.init(jax.random.key(1), 10)
    runs = [jm.gradient_flow(predictor, params0, X, y, beta_max=1e10, solver="rosenbrock",
                             rtol=1e-8, max_steps=300_000, limit_beta=limit_beta)
            for limit_beta in (None, 1e8)]  # fmt: skip
    for run in runs:
        assert run.status.code == codes.REACHED_TARGET, run.status.message
    finite_beta, limit = runs
    assert limit.status.steps[1] < finite_beta.status.steps[1]

    def direction(run):
        return _unit(ravel_pytree(jax.tree.map(lambda a: a[-1], run.params))[0])

    assert np.linalg.norm(direction(limit) - direction(finite_beta)) <= 1e-7
    for field, tol in (("soft_margin", 1e-8), ("log_t", 1e-8), ("tau", 1e-9)):
        a, b = float(getattr(limit, field)[-1]), float(getattr(finite_beta, field)[-1])
        assert a == pytest.approx(b, rel=tol), field


def test_limit_beta_is_validated():
    X, y = jm.soudry_dataset(0)
    with pytest.raises(ValueError, match="limit_beta"):
        jm.gradient_flow(jm.linear(), (jnp.zeros(2),), X, y, beta_max=1e12, solver="rosenbrock",
                         limit_beta=10.0)  # fmt: skip
