"""The beta -> infinity limit flow (_limit_field.py, _limit_stage.py): its pieces against
scipy, the limits it must reach exactly (l1 max margin of diagonal nets, SVM of deep linear
nets, beta up to float64's range), and its agreement with the W-method at finite beta."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from helpers import linearly_separable
from jax.flatten_util import ravel_pytree

import jaxmargin as jm
from jaxmargin._checks import theorem5_max_decrease
from jaxmargin._flow import _limit_field as limit_field
from jaxmargin._flow import _solution as codes
from jaxmargin._flow._kink_geometry import per_example_margins
from jaxmargin._wolfe import wolfe


def _unit(v):
    v = np.asarray(v)
    v = v / np.max(np.abs(v))  # params reach 1e300: scale before squaring
    return v / np.linalg.norm(v)


def _scipy_min_norm(vectors):
    k = vectors.shape[0]
    result = scipy.optimize.minimize(
        lambda a: np.sum((a @ vectors) ** 2),
        np.full(k, 1.0 / k),
        method="SLSQP",
        jac=lambda a: 2.0 * vectors @ (a @ vectors),
        bounds=[(0.0, 1.0)] * k,
        constraints=[{"type": "eq", "fun": lambda a: np.sum(a) - 1.0}],
        options={"ftol": 1e-15, "maxiter": 1000},
    )
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
    theta_new = limit_field.equalize(margins_and_grads, theta, active, sweeps=4)
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
    solution = jm.gradient_flow(
        predictor, params0, X, y, beta_max=1e30, solver="rosenbrock", rtol=1e-6, max_steps=20_000
    )
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
    solution = jm.gradient_flow(
        predictor, params0, X, y, beta_max=1e30, solver="rosenbrock", rtol=1e-6, max_steps=20_000
    )
    assert solution.status.code == codes.REACHED_TARGET, solution.status.message
    last = jax.tree.map(lambda a: a[-1], solution.params)
    distance = np.linalg.norm(_unit(predictor.end_to_end(last)) - jm.svm_direction(X, y).direction)
    print(f"deep linear L=3, beta=1e30: distance to the SVM direction {distance:.2e}")
    assert distance <= 1e-8
    assert theorem5_max_decrease(solution) <= 1e-8
    assert np.all(np.isfinite(np.asarray(solution.log_t)))


def test_linear_soudry_reaches_beta_1e300():
    X, y = jm.soudry_dataset(0)
    solution = jm.gradient_flow(
        jm.linear(),
        (jnp.zeros(2),),
        X,
        y,
        beta_max=1e300,
        solver="rosenbrock",
        rtol=1e-8,
        max_steps=50_000,
    )
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
    margin and clocks up to the O(1/beta) the limit flow neglects (measured 1.7e-9 / 4.1e-10 /
    4.1e-10 / 1.4e-12 for L = 2)."""
    X, y = linearly_separable(20261128, 40, 10)
    predictor = jm.deep_linear(depth, 5)
    finite_beta, limit = _switch_against_finite_beta(
        predictor,
        predictor.init(jax.random.key(1), 10),
        X,
        y,
        1e10,
        1e8,
        300_000,
        direction_tol=1e-7,
        tols=(1e-8, 1e-8, 1e-9),
    )
    assert limit.status.steps[1] < finite_beta.status.steps[1]


def test_limit_flow_rows_carry_the_soft_margin_of_the_flow_at_finite_beta():
    """Switching at beta = 1e6 vs the W-method all the way to 1e9, at the saved points after the
    switch: the soft margins agree to 1e-3 / beta (measured 2e-5 / beta). The limit flow keeps
    the margins of E equal; its saved points restore the spread the flow keeps at finite beta
    (p = lambda on E); with equal margins the soft margin sat 0.455 / beta below the
    W-method's at every row, a fall of 2e-6 relative at the switch (docs/decisions.md D51)."""
    X, y = linearly_separable(20261128, 40, 10)
    predictor = jm.deep_linear(2, 5)
    params0 = predictor.init(jax.random.key(1), 10)
    finite_beta, limit = (
        jm.gradient_flow(
            predictor,
            params0,
            X,
            y,
            beta_max=1e9,
            solver="rosenbrock",
            rtol=1e-8,
            max_steps=300_000,
            limit_beta=limit_beta,
        )
        for limit_beta in (None, 1e6)
    )
    s_w, s_limit = np.asarray(finite_beta.s), np.asarray(limit.s)
    common, in_w, in_limit = np.intersect1d(s_w, s_limit, return_indices=True)
    past = np.exp(2 * common) > 1.01e6
    assert np.sum(past) >= 20
    gap = np.asarray(limit.soft_margin)[in_limit] - np.asarray(finite_beta.soft_margin)[in_w]
    gap_times_beta = np.abs(gap[past]) * np.exp(2 * common[past])
    print(f"\nlargest |soft margin difference| x beta past the switch: {gap_times_beta.max():.2e}")
    assert gap_times_beta.max() <= 1e-3
    assert theorem5_max_decrease(limit) <= 1e-8


def _switch_against_finite_beta(
    predictor, params0, X, y, beta_max, switch, max_steps, direction_tol, tols
):
    """The W-method all the way to beta_max vs the limit flow from `switch` on: the final
    directions within direction_tol, soft margin / ln t / tau within relative tols."""
    runs = [
        jm.gradient_flow(
            predictor,
            params0,
            X,
            y,
            beta_max=beta_max,
            solver="rosenbrock",
            rtol=1e-8,
            max_steps=max_steps,
            limit_beta=limit_beta,
        )
        for limit_beta in (None, switch)
    ]
    for run in runs:
        assert run.status.code == codes.REACHED_TARGET, run.status.message
    finite_beta, limit = runs

    def direction(run):
        return _unit(ravel_pytree(jax.tree.map(lambda a: a[-1], run.params))[0])

    distance = np.linalg.norm(direction(limit) - direction(finite_beta))
    # Printed (pytest -s): the measured numbers that the docstrings and the README quote.
    print(f"\nswitch at {switch:g} vs the W-method to {beta_max:g}: direction {distance:.2e}")
    assert distance <= direction_tol
    for field, tol in zip(("soft_margin", "log_t", "tau"), tols):
        a, b = float(getattr(limit, field)[-1]), float(getattr(finite_beta, field)[-1])
        print(f"  {field} relative difference {abs(a - b) / abs(b):.2e}")
        assert a == pytest.approx(b, rel=tol), field
    return finite_beta, limit


def test_limit_beta_is_validated():
    X, y = jm.soudry_dataset(0)
    with pytest.raises(ValueError, match="limit_beta"):
        jm.gradient_flow(
            jm.linear(), (jnp.zeros(2),), X, y, beta_max=1e12, solver="rosenbrock", limit_beta=10.0
        )


def _small_relu_problem(seed, depth=2):
    """n = 16 points in 3-d, y = sign(sum x), a width-6 bias-free ReLU MLP (the problem of
    tests/test_stiff_stage.py's phase-2 tests, other seeds)."""
    k_data, k_w = jax.random.split(jax.random.key(seed))
    X = jax.random.normal(k_data, (16, 3))
    predictor = jm.relu_mlp(depth, 6)
    return predictor, predictor.init(k_w, 3), X, jnp.sign(X.sum(axis=1))


def test_relu_flow_reaches_a_kkt_point():
    """Issue 5: gradient flow on a ReLU net (L = 2) with the W-method, then from beta = 1e6 the
    limit flow with sliding kinks, until ||dtheta/ds|| < 1e-7 (beta ~ 1e58 here):
    kkt_certificate, which fits multipliers to sampled Clarke elements by NNLS (nothing shared
    with the flow's Wolfe and box-QP solves), finds the last point stationary to <= 1e-6; and
    gamma~ never decreased. Measured: certificate 5.2e-8."""
    predictor, params0, X, y = _small_relu_problem(4)
    flow = jm.gradient_flow(
        predictor,
        params0,
        X,
        y,
        beta_max=1e300,
        solver="rosenbrock",
        rtol=1e-8,
        max_steps=100_000,
        direction_tol=1e-7,
    )
    assert flow.status.code == codes.DIRECTION_CONVERGED, flow.status.message
    assert theorem5_max_decrease(flow) <= 1e-8
    certificate = jm.kkt_certificate(
        predictor, jax.tree.map(lambda a: a[-1], flow.params), X, y, clarke_samples=256
    )
    print(
        f"KKT stationarity {certificate.stationarity:.3e} at beta = "
        f"10^{2 * float(flow.s[-1]) / np.log(10):.0f}"
    )
    assert certificate.stationarity <= 1e-6
    assert certificate.complementary_slackness <= 1e-10


@pytest.mark.slow  # ~6.5 min: 65 s for the two L = 2 seeds, ~5 min for the three L = 3 ones
@pytest.mark.parametrize("depth, seed", [(2, 3), (2, 4), (3, 0), (3, 3), (3, 4)])
def test_limit_flow_continues_a_relu_flow_to_a_kkt_point(depth, seed):
    """jm.limit_flow from the end of gradient flow at beta = 1e12 (the W-method) until
    ||dtheta/ds|| < 1e-7: kkt_certificate (sampled Clarke elements and its gate fit: least
    squares over multipliers and the kinked units' activation derivatives, nothing shared with
    the flow's Wolfe / box-QP solves) agrees with the flow's own speed (the relative
    stationarity residual of its min-norm Clarke element) and is <= 1e-6; the minimum margin
    never decreased. Measured, L = 2: certificate = speed to 9 digits (9.545e-8, 5.217e-8);
    L = 3: 9.813e-8 / 9.699e-8 / 6.117e-8 (the speed to 4 digits or better) at s = 1151 / 1258 /
    75. Seeds 1, 2 and 5 of the L = 3 problem do not separate within 100k phase-1 steps."""
    predictor, params0, X, y = _small_relu_problem(seed, depth=depth)
    flow = jm.gradient_flow(
        predictor, params0, X, y, beta_max=1e12, solver="rosenbrock", rtol=1e-8, max_steps=100_000
    )
    assert flow.status.code == codes.REACHED_TARGET, flow.status.message
    assert theorem5_max_decrease(flow) <= 1e-8
    start = jax.tree.map(lambda a: a[-1], flow.params)
    limit = jm.limit_flow(predictor, start, X, y, s_max=1e4, direction_tol=1e-7, max_steps=20_000)
    assert limit.code == codes.DIRECTION_CONVERGED, limit.message
    assert limit.speed < 1e-7
    assert np.all(np.diff(limit.margin) >= -1e-12 * limit.margin[:-1])
    certificate = jm.kkt_certificate(
        predictor, jax.tree.map(lambda a: a[-1], limit.directions), X, y, clarke_samples=256
    )
    print(
        f"L = {depth}, seed {seed}: s = {limit.s[-1]:.1f}, speed {limit.speed:.3e}, "
        f"certificate {certificate.stationarity:.3e}"
    )
    assert certificate.stationarity <= 1e-6
    assert certificate.stationarity == pytest.approx(limit.speed, rel=1e-3)
    assert certificate.complementary_slackness <= 1e-10
    # The flow's multipliers sit on the examples the certificate finds active.
    assert set(np.flatnonzero(limit.multipliers)) <= set(np.flatnonzero(certificate.active))


@pytest.mark.slow  # ~100 s: the W-method all the way to 1e8 on a ReLU net crawls
def test_relu_limit_flow_continues_the_flow_at_finite_beta():
    """ReLU L = 2: switching to the limit flow at beta = 1e6 vs the W-method all the way to
    1e8: the same direction, soft margin and clocks up to O(1/beta) at the switch (measured
    1.8e-6 / 5.6e-8 / 5.6e-8 / 9.2e-9; 1.8e-6 / 1.3e-7 / 1.3e-7 / 9.2e-9 before the saved rows
    carried the finite-beta spread of E's margins, D51; 5.1e-7 / 9.0e-8 / 9.0e-8 / 2.1e-8
    before the limit flow's kink landings and saves used its dense output)."""
    predictor, params0, X, y = _small_relu_problem(2)
    _switch_against_finite_beta(
        predictor, params0, X, y, 1e8, 1e6, 200_000, direction_tol=5e-6, tols=(1e-6, 1e-6, 1e-7)
    )


def test_limit_flow_on_a_linear_model_reaches_the_svm_direction():
    """The public limit_flow on a smooth model from a direction far from the limit (the
    examples nearest the minimum start on it, the others join): the SVM direction."""
    X, y = linearly_separable(7, 30, 5)
    reference = jm.svm_direction(X, y)
    start = (jnp.asarray(np.asarray(reference.direction) + 0.02 * np.ones(5)),)
    assert float(jnp.min(y * (X @ start[0]))) > 0
    limit = jm.limit_flow(jm.linear(), start, X, y, s_max=200.0, direction_tol=1e-12)
    assert limit.code in (codes.DIRECTION_CONVERGED, codes.REACHED_TARGET), limit.message
    assert np.linalg.norm(_unit(limit.directions[0][-1]) - reference.direction) <= 1e-8
    assert limit.margin[-1] == pytest.approx(reference.margin, rel=1e-10)
    assert np.all(np.diff(limit.margin) >= -1e-12 * limit.margin[:-1])


def test_limit_flow_rejects_bad_input():
    X, y = linearly_separable(7, 30, 5)
    w = jm.svm_direction(X, y).direction
    with pytest.raises(ValueError, match="separate"):
        jm.limit_flow(jm.linear(), (-jnp.asarray(w),), X, y, s_max=10.0)
    with pytest.raises(ValueError, match="s_max"):
        jm.limit_flow(jm.linear(), (jnp.asarray(w),), X, y, s_max=-1.0)
    with pytest.raises(ValueError, match="direction_tol"):
        jm.limit_flow(jm.linear(), (jnp.asarray(w),), X, y, s_max=10.0, direction_tol=0.0)


def test_limit_beta_auto_and_bad_strings():
    X, y = jm.soudry_dataset(0)
    with pytest.raises(ValueError, match="limit_beta"):
        jm.gradient_flow(
            jm.linear(),
            (jnp.zeros(2),),
            X,
            y,
            beta_max=1e12,
            solver="rosenbrock",
            limit_beta="sometimes",
        )
