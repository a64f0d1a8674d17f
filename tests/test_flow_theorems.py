"""Theorem 5 and the Lyu & Li identity on gradient_flow's output, and ReLU flows against halved
Euler (split from test_flow.py: pytest-xdist's loadfile puts a file on one worker, and the two
halves of test_flow.py ran ~6 min on one)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flow_references import projected_euler_soft_margin
from helpers import row, small_separable

import jaxmargin as jm
from jaxmargin._checks import lyu_li_identity_residual, sandwich_violation, theorem5_max_decrease
from jaxmargin._flow import _solution as codes


def _small_relu_problem(depth, seed, n=16, width=6):
    key = jax.random.key(seed)
    k_data, k_w = jax.random.split(key)
    X = jax.random.normal(k_data, (n, 3))
    y = jnp.sign(X.sum(axis=1))
    predictor = jm.relu_mlp(depth, width)
    return predictor, predictor.init(k_w, 3), X, y


# L = 3 takes minutes on 2 cores (phase 1 through many kinks): run it with `make test-slow`.
@pytest.mark.parametrize("depth", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_relu_against_halved_euler(depth):
    predictor, params0, X, y = _small_relu_problem(depth, seed=depth)
    to_t0 = jm.gradient_flow(
        predictor, params0, X, y, s_max=-50.0, rtol=1e-8, atol=1e-11, solver="tsit5"
    )
    s0 = float(to_t0.status.s0)
    horizon = 0.4
    solution = jm.gradient_flow(
        predictor,
        params0,
        X,
        y,
        s_max=s0 + horizon,
        rtol=1e-8,
        atol=1e-11,
        num_saves=16,
        solver="tsit5",
    )
    assert solution.status.code == codes.REACHED_TARGET, solution.status.message
    start = int(np.argmax(np.asarray(solution.phase) == 2))
    theta0 = jax.tree.map(lambda a: a / float(solution.rho[start]), row(solution.params, start))
    # Six halvings: with four (down to 2.5e-4) Euler was not yet in its asymptotic regime from
    # some starts (differences -1.6e-5, +1.6e-5, 2.8e-6: a spurious 'order' 2.5, seen
    # 2026-11-28 after a change of the start's kink band); down to 6.25e-5 it reads 0.92.
    steps = [2e-3, 1e-3, 5e-4, 2.5e-4, 1.25e-4, 6.25e-5]
    euler = [
        projected_euler_soft_margin(predictor, theta0, X, y, s0, s0 + horizon, h) for h in steps
    ]
    differences = np.abs(np.diff(euler))
    order = np.log2(differences[-2] / differences[-1])
    extrapolated = 2 * euler[-1] - euler[-2]
    engine = float(solution.soft_margin[-1])
    print(
        f"depth {depth}: Euler {euler}, observed order {order:.2f}, extrapolated"
        f" {extrapolated:.8f}, engine {engine:.8f}"
    )
    assert abs(engine - extrapolated) <= 1e-4
    assert 0.5 <= order <= 2.5  # first order, as a kinked Filippov flow allows


def _just_past_t0(predictor, params0, X, y):
    """A strictly separated point: the engine's phase 1 at a loose tolerance (rtol 1e-4, wide
    kink band 1e-3: deep nets crawl along kinks at tight ones) to s(t0) + 0.05, last save.
    (Loss-based GD, used before, left several seeds unseparated after 1,600 steps.)"""
    sliding = jm.SlidingOptions(candidates=8, threshold=1e-3)
    loose = dict(solver="tsit5", rtol=1e-4, atol=1e-6, max_steps=5000, num_saves=8, sliding=sliding)
    probe = jm.gradient_flow(predictor, params0, X, y, s_max=-50.0, **loose)
    assert bool(probe.status.separated), probe.status.message
    past_t0 = jm.gradient_flow(
        predictor, params0, X, y, s_max=float(probe.status.s0) + 0.05, **loose
    )
    start = row(past_t0.params, -1)
    assert float(jm.soft_margin(predictor, start, X, y)) > 0
    return start


def _check_theorem5(depth, seed, ds):
    smooth = depth == 1
    predictor, params0, X, y = _small_relu_problem(depth, seed, n=12, width=4)
    beta_max = 20.0
    if smooth:
        predictor, params0 = jm.linear(), (0.5 * params0[0],)
    else:
        # Theorem 5 is about what happens after t0: start from a strictly separated point just
        # past t0 and follow the flow for ds in s (phase-2 steps shrink like 1/beta).
        params0 = _just_past_t0(predictor, params0, X, y)
        beta_max = float(jnp.exp(depth * (jm.log_norm(params0) + ds)))
    solution = jm.gradient_flow(
        predictor,
        params0,
        X,
        y,
        beta_max=beta_max,
        rtol=1e-8,
        atol=1e-11,
        num_saves=40,
        max_steps=20_000,
        solver="tsit5",
    )
    assert solution.status.code == codes.REACHED_TARGET, solution.status.message
    decrease = theorem5_max_decrease(solution)
    assert decrease <= (1e-9 if smooth else 1e-6), (depth, seed, decrease)
    assert sandwich_violation(solution, X.shape[0], predictor.degree) <= 1e-12
    assert np.all(np.isfinite(np.asarray(solution.log_t)))


# Depths 4 and 5: test_theorem5_deep_relu. Depth 3 (25 s) runs in `make test-slow`, for the
# 10-minute budget of `make test` (depths 1, 2 and test_theorem5_deep_relu[4-1] stay).
@pytest.mark.parametrize("depth", [1, 2, pytest.param(3, marks=pytest.mark.slow)])
def test_theorem5_on_the_output(depth):
    _check_theorem5(depth, seed=0, ds=0.3)


# ReLU seeds whose flow separates these tiny problems (n = 12, width 4): of seeds 1-5 (L = 2)
# and 1-9 (L = 3), L = 2 seeds 2, 5 and L = 3 seeds 1, 4, 6 end NOT_SEPARATED (a unit dies
# and the margin tends to 0 from below) and L = 3 seeds 5, 8, 9 exhaust 5,000 phase-1 steps
# at rtol 1e-4 (measured 2026-11-28); L = 3 seed 2 separates, but its rtol-1e-8 run exhausts
# 20,000 steps.
@pytest.mark.slow
@pytest.mark.parametrize(
    "depth,seed", [(1, 1), (1, 2), (1, 3), (2, 1), (2, 3), (2, 4), (3, 3), (3, 7)]
)
def test_theorem5_more_seeds(depth, seed):
    _check_theorem5(depth, seed, ds=1.0)


def _gapped_data(n=16, dim=6, gap=0.5):
    """y = sign(sum x) on the first n Gaussian draws with |sum x| / sqrt(dim) >= gap."""
    draws = np.asarray(jax.random.normal(jax.random.key(0), (50 * n, dim)))
    X = jnp.asarray(draws[np.abs(draws.sum(axis=1)) / np.sqrt(dim) >= gap][:n])
    return X, jnp.sign(X.sum(axis=1))


# Seeds whose phase 1 reaches t0 within 5,000 steps at rtol 1e-4 (of L = 4 seeds 0-3 and L = 5
# seeds 2-7, measured 2026-11-28, L = 4 seed 3 and L = 5 seed 6 end NOT_SEPARATED). Theorem 5
# is about what follows t0.
@pytest.mark.parametrize(
    "depth,seed",
    # All slow (L = 4 seed 1: 52 s) to keep `make test` under 10 minutes: these run the explicit
    # solver; the default engine's deep-net Theorem 5 check in make test is
    # tests/test_kink_projection.py (L = 5).
    [
        pytest.param(d, s, marks=pytest.mark.slow)
        for d, s in ((4, 1), (5, 3), (4, 0), (4, 2), (5, 2), (5, 4), (5, 5), (5, 7))
    ],
)
def test_theorem5_deep_relu(depth, seed):
    """L = 4, 5: gamma~ after t0 never decreases by more than 1e-6 relative (rtol 1e-6).

    Phase 1 of deep nets crawls along kinks at tight tolerances, so it runs at rtol 1e-4 to
    s(t0) + 0.05; the tight run (default kink band) starts from there, strictly separated,
    for 0.3 in s.
    """
    X, y = _gapped_data()
    predictor = jm.relu_mlp(depth, 6)
    params0 = predictor.init(jax.random.key(1000 * depth + seed), X.shape[1])
    start = _just_past_t0(predictor, params0, X, y)
    s1 = float(jm.log_norm(start))
    solution = jm.gradient_flow(
        predictor,
        start,
        X,
        y,
        s_max=s1 + 0.3,
        rtol=1e-6,
        atol=1e-8,
        num_saves=40,
        max_steps=20_000,
        sliding=jm.SlidingOptions(candidates=8),
        solver="tsit5",
    )
    assert solution.status.code == codes.REACHED_TARGET, solution.status.message
    assert np.sum(np.asarray(solution.phase) == 2) >= 30
    decrease = theorem5_max_decrease(solution)
    assert decrease <= 1e-6, (depth, seed, decrease)
    assert sandwich_violation(solution, X.shape[0], depth) <= 1e-12


@pytest.mark.parametrize("depth", [1, 2])
def test_lyu_li_identity_along_output(depth, key):
    X, y = small_separable(key)
    predictor = jm.linear() if depth == 1 else jm.deep_linear(2, 3)
    params0 = predictor.init(jax.random.fold_in(key, 2), 3)
    solution = jm.gradient_flow(
        predictor, params0, X, y, s_max=2.0, rtol=1e-12, atol=1e-14, solver="dopri8", num_saves=400
    )
    residual = lyu_li_identity_residual(solution, predictor, X, y)
    assert residual <= 1e-6, residual


def test_lyu_li_identity_relu_tau_clock():
    """ReLU L = 2 through phase 1's kinks: the saved (1/2) d||w||^2/dtau (the engine's velocity)
    equals L sum_n p_n m_n recomputed from the saved params to 1e-6 relative, before and after
    t0. (The finite-difference check above needs a smooth ln t: a kinked flow is not.) Before
    t0 the residual is set by the sliding band (SlidingOptions.threshold): 1e-5 here, measured
    <= 2e-7; the default 1e-4 gives ~1.2e-6 on this problem and 1e-3 fails (3.0e-5)."""
    X, y = _gapped_data()
    predictor = jm.relu_mlp(2, 6)
    params0 = predictor.init(jax.random.key(4000), X.shape[1])
    solution = jm.gradient_flow(
        predictor,
        params0,
        X,
        y,
        beta_max=300.0,
        rtol=1e-6,
        atol=1e-8,
        num_saves=64,
        sliding=jm.SlidingOptions(candidates=8, threshold=1e-5),
        solver="tsit5",
    )
    assert solution.status.code == codes.REACHED_TARGET, solution.status.message

    def sides(params):
        m = y * jax.vmap(predictor.apply, in_axes=(None, 0))(params, X)
        p = jax.nn.softmax(-m)
        return 2.0 * (p @ m), 2.0 * (p @ jnp.abs(m))

    right, scale = (np.asarray(a) for a in jax.vmap(sides)(solution.params))
    left = np.asarray(solution.sign_half_drho2_dtau) * np.exp(
        np.asarray(solution.log_half_drho2_dtau)
    )
    phase = np.asarray(solution.phase)
    for which in (1, 2):
        rows = (phase == which) & np.isfinite(left)
        assert rows.sum() >= 5
        residual = np.max(np.abs(left[rows] - right[rows]) / scale[rows])
        assert residual <= 1e-6, (which, residual)
