import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flow_references import DeepLinear, polar_flow, projected_euler_soft_margin, tau_flow
from jax.flatten_util import ravel_pytree

import jaxmargin as jm
from jaxmargin._checks import lyu_li_identity_residual, sandwich_violation, theorem5_max_decrease
from jaxmargin._flow import _solution as codes


def _separable(key, n=8, dim=3):
    X = jax.random.normal(key, (n, dim))
    y = jnp.sign(X @ jnp.array([1.0, 0.5, -0.3][:dim]))
    return X, y


def _last(tree, row):
    return jax.tree.map(lambda a: a[row], tree)


SOLVER_SETTINGS = {
    "dopri8": dict(solver="dopri8", rtol=1e-12, atol=1e-14),
    # Phase 2 on the linearly implicit W-method (second order: a tighter tolerance).
    "rosenbrock": dict(solver="rosenbrock", rtol=1e-11, atol=1e-14, max_steps=400_000),
}


@pytest.mark.parametrize("solver", sorted(SOLVER_SETTINGS))
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_smooth_models_against_scipy(depth, solver, key):
    X, y = _separable(key)
    predictor = jm.linear() if depth == 1 else jm.deep_linear(depth, 3)
    params0 = jax.tree.map(lambda w: 0.3 * w, predictor.init(jax.random.fold_in(key, 1), 3))
    model = DeepLinear([p.shape for p in params0])
    w0 = np.asarray(ravel_pytree(params0)[0])
    solution = jm.gradient_flow(predictor, params0, X, y, s_max=1.5, num_saves=40,
                                **SOLVER_SETTINGS[solver])  # fmt: skip
    assert solution.status.code == codes.REACHED_TARGET, solution.status.message

    tau0, state0 = tau_flow(model, np.asarray(X), np.asarray(y), w0, 1e4)
    assert float(solution.status.tau0) == pytest.approx(tau0, rel=1e-7)
    phase2 = np.asarray(solution.phase) == 2
    first = int(np.argmax(phase2))
    w_t0 = np.asarray(ravel_pytree(_last(solution.params, first))[0])
    np.testing.assert_allclose(w_t0, state0[:-1], rtol=1e-7, atol=1e-9)

    s = np.asarray(solution.s)[phase2]
    w_ref0 = state0[:-1]
    log_loss0 = -(-np.log(np.sum(np.exp(-model.margins_and_gradients(w_ref0, X, y)[0]))))
    thetas, soft, tau, log_t_loss = polar_flow(
        model, np.asarray(X), np.asarray(y), w_ref0 / np.linalg.norm(w_ref0), s[0], tau0,
        np.log(state0[-1]) + log_loss0, s,
    )  # fmt: skip
    ours = np.stack([np.asarray(ravel_pytree(_last(solution.params, i))[0])
                     for i in np.flatnonzero(phase2)])  # fmt: skip
    ours = ours / np.linalg.norm(ours, axis=1, keepdims=True)
    np.testing.assert_allclose(ours, thetas, atol=1e-7)
    np.testing.assert_allclose(np.asarray(solution.soft_margin)[phase2], soft, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(np.asarray(solution.tau)[phase2], tau, rtol=1e-7)
    log_t_ref = log_t_loss - np.asarray(solution.log_loss)[phase2]
    np.testing.assert_allclose(np.asarray(solution.log_t)[phase2], log_t_ref, rtol=1e-7, atol=1e-7)


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
    to_t0 = jm.gradient_flow(predictor, params0, X, y, s_max=-50.0, rtol=1e-8, atol=1e-11)
    s0 = float(to_t0.status.s0)
    horizon = 0.4
    solution = jm.gradient_flow(predictor, params0, X, y, s_max=s0 + horizon, rtol=1e-8,
                                atol=1e-11, num_saves=16)  # fmt: skip
    assert solution.status.code == codes.REACHED_TARGET, solution.status.message
    start = int(np.argmax(np.asarray(solution.phase) == 2))
    theta0 = jax.tree.map(lambda a: a / float(solution.rho[start]), _last(solution.params, start))
    # Six halvings: with four (down to 2.5e-4) Euler was not yet in its asymptotic regime from
    # some starts (differences -1.6e-5, +1.6e-5, 2.8e-6: a spurious 'order' 2.5, seen
    # 2026-11-28 after a change of the start's kink band); down to 6.25e-5 it reads 0.92.
    steps = [2e-3, 1e-3, 5e-4, 2.5e-4, 1.25e-4, 6.25e-5]
    euler = [projected_euler_soft_margin(predictor, theta0, X, y, s0, s0 + horizon, h)
             for h in steps]  # fmt: skip
    differences = np.abs(np.diff(euler))
    order = np.log2(differences[-2] / differences[-1])
    extrapolated = 2 * euler[-1] - euler[-2]
    engine = float(solution.soft_margin[-1])
    print(f"depth {depth}: Euler {euler}, observed order {order:.2f}, extrapolated"
          f" {extrapolated:.8f}, engine {engine:.8f}")  # fmt: skip
    assert abs(engine - extrapolated) <= 1e-4
    assert 0.5 <= order <= 2.5  # first order, as a kinked Filippov flow allows


def _just_past_t0(predictor, params0, X, y):
    """A strictly separated point: the engine's phase 1 at a loose tolerance (rtol 1e-4, wide
    kink band 1e-3: deep nets crawl along kinks at tight ones) to s(t0) + 0.05, last save.
    (Loss-based GD, used before, left several seeds unseparated after 1,600 steps.)"""
    sliding = jm.SlidingOptions(candidates=8, threshold=1e-3)
    loose = dict(rtol=1e-4, atol=1e-6, max_steps=5000, num_saves=8, sliding=sliding)
    probe = jm.gradient_flow(predictor, params0, X, y, s_max=-50.0, **loose)
    assert bool(probe.status.separated), probe.status.message
    past_t0 = jm.gradient_flow(predictor, params0, X, y, s_max=float(probe.status.s0) + 0.05,
                               **loose)  # fmt: skip
    start = _last(past_t0.params, -1)
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
    solution = jm.gradient_flow(predictor, params0, X, y, beta_max=beta_max, rtol=1e-8,
                                atol=1e-11, num_saves=40, max_steps=20_000)  # fmt: skip
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
    # (5, 3) moved to slow (34 s) to keep `make test` under 10 minutes; L = 5 runs there.
    [(4, 1)] + [pytest.param(d, s, marks=pytest.mark.slow)
                for d, s in ((5, 3), (4, 0), (4, 2), (5, 2), (5, 4), (5, 5), (5, 7))],
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
    solution = jm.gradient_flow(predictor, start, X, y, s_max=s1 + 0.3, rtol=1e-6, atol=1e-8,
                                num_saves=40, max_steps=20_000,
                                sliding=jm.SlidingOptions(candidates=8))  # fmt: skip
    assert solution.status.code == codes.REACHED_TARGET, solution.status.message
    assert np.sum(np.asarray(solution.phase) == 2) >= 30
    decrease = theorem5_max_decrease(solution)
    assert decrease <= 1e-6, (depth, seed, decrease)
    assert sandwich_violation(solution, X.shape[0], depth) <= 1e-12


@pytest.mark.parametrize("depth", [1, 2])
def test_lyu_li_identity_along_output(depth, key):
    X, y = _separable(key)
    predictor = jm.linear() if depth == 1 else jm.deep_linear(2, 3)
    params0 = predictor.init(jax.random.fold_in(key, 2), 3)
    solution = jm.gradient_flow(predictor, params0, X, y, s_max=2.0, rtol=1e-12, atol=1e-14,
                                solver="dopri8", num_saves=400)  # fmt: skip
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
    solution = jm.gradient_flow(predictor, params0, X, y, beta_max=300.0, rtol=1e-6, atol=1e-8,
                                num_saves=64,
                                sliding=jm.SlidingOptions(candidates=8, threshold=1e-5))  # fmt: skip
    assert solution.status.code == codes.REACHED_TARGET, solution.status.message

    def sides(params):
        m = y * jax.vmap(predictor.apply, in_axes=(None, 0))(params, X)
        p = jax.nn.softmax(-m)
        return 2.0 * (p @ m), 2.0 * (p @ jnp.abs(m))

    right, scale = (np.asarray(a) for a in jax.vmap(sides)(solution.params))
    left = np.asarray(solution.sign_half_drho2_dtau) * np.exp(
        np.asarray(solution.log_half_drho2_dtau))
    phase = np.asarray(solution.phase)
    for which in (1, 2):
        rows = (phase == which) & np.isfinite(left)
        assert rows.sum() >= 5
        residual = np.max(np.abs(left[rows] - right[rows]) / scale[rows])
        assert residual <= 1e-6, (which, residual)


def test_zero_start_linear_and_rest_point_error(key):
    X, y = _separable(key)
    solution = jm.gradient_flow(jm.linear(), (jnp.zeros(3),), X, y, s_max=1.0)
    assert solution.status.code == codes.REACHED_TARGET
    svm = jm.svm_direction(X, y)
    assert float(solution.hard_margin[-1]) <= svm.margin + 1e-12
    with pytest.raises(ValueError, match="rest point"):
        jm.gradient_flow(jm.deep_linear(2, 3), (jnp.zeros((3, 3)), jnp.zeros(3)), X, y,
                         s_max=1.0)  # fmt: skip


def test_one_example_from_zero():
    """n = 1, w(0) = 0: -ln L(w0) is exactly 0, so t0 is the start itself (the event's root sits
    on the interval's end). Exact flow: dw/dtau = y x, w = tau y x, gamma~ = ||x|| for tau > 0."""
    x = jnp.array([[1.0, -2.0, 0.5]])
    for label in (1.0, -1.0):
        y = jnp.array([label])
        solution = jm.gradient_flow(jm.linear(), (jnp.zeros(3),), x, y, beta_max=1e3)
        assert solution.status.code == codes.REACHED_TARGET, solution.status.message
        after = np.asarray(solution.phase) == 2
        norm = float(jnp.linalg.norm(x))
        np.testing.assert_allclose(np.asarray(solution.soft_margin)[after], norm, rtol=1e-9)
        w = np.asarray(solution.params[0][-1])
        np.testing.assert_allclose(w / np.linalg.norm(w), label * np.asarray(x[0]) / norm,
                                   atol=1e-12)  # fmt: skip
        np.testing.assert_allclose(float(solution.rho[-1]), 1e3, rtol=1e-9)


def test_not_separable_reports_best_margin():
    X = jnp.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    y = jnp.array([1.0, 1.0, 1.0])  # x and -x share a label: no linear separator
    solution = jm.gradient_flow(jm.linear(), (jnp.array([0.1, 0.2]),), X, y, s_max=3.0,
                                tau_max=50.0)  # fmt: skip
    assert solution.status.code == codes.NOT_SEPARATED
    assert not bool(solution.status.separated)
    assert np.isfinite(float(solution.status.best_soft_margin))
    assert float(solution.status.best_soft_margin) < 0
    assert "did not separate" in solution.status.message


def test_no_blow_up_for_degree_three_and_failures_keep_outputs(key):
    X, y = _separable(key)
    predictor = jm.deep_linear(3, 3)
    params0 = predictor.init(key, 3)
    # In the tau clock an L = 3 flow reaches infinity at a finite tau; in s it cannot.
    solution = jm.gradient_flow(predictor, params0, X, y, beta_max=1e6, rtol=1e-8)
    assert np.all(np.isfinite(np.asarray(solution.soft_margin)))
    assert float(solution.rho[-1]) ** 3 == pytest.approx(1e6, rel=1e-9)
    tau = np.asarray(solution.tau)[np.asarray(solution.phase) == 2]
    assert np.all(np.diff(tau) > 0) and np.all(np.diff(np.diff(tau)[-5:]) < 0)  # tau saturates
    starved = jm.gradient_flow(predictor, params0, X, y, beta_max=1e6, max_steps=30)
    assert starved.status.code == codes.MAX_STEPS
    assert starved.s.shape[0] >= 1 and np.all(np.isfinite(np.asarray(starved.soft_margin)))


def _counted_relu(traces):
    """A ReLU net without kink handling whose apply appends to `traces` each time it is traced."""
    predictor = jm.relu_mlp(2, 4)

    def counting_apply(params, x):
        traces.append(1)
        return predictor.apply(params, x)

    return predictor._replace(apply=counting_apply, kinks=None)


def test_batch_over_seeds_compiles_once(key):
    X, y = _separable(key)
    traces = []
    counted = _counted_relu(traces)
    batch = jax.vmap(lambda k: counted.init(k, 3))(jax.random.split(key, 3))
    first = jm.gradient_flow_batch(counted, batch, X, y, s_max=1.0, num_saves=12)
    count = len(traces)
    batch2 = jax.tree.map(lambda a: 1.1 * a, batch)
    jm.gradient_flow_batch(counted, batch2, X, y, s_max=1.0, num_saves=12)
    assert len(traces) == count
    for i in range(3):
        single = jm.gradient_flow(counted, _last(batch, i), X, y, s_max=1.0, num_saves=12,
                                  sliding=None)  # fmt: skip
        rows = np.asarray(first.valid[i])
        # Batched matmuls round differently, and adaptive step sequences amplify round-off up
        # to the solver tolerance (rtol 1e-8): compare at 100 x that.
        np.testing.assert_allclose(np.asarray(first.soft_margin[i])[rows], single.soft_margin,
                                   rtol=1e-6, atol=1e-9)  # fmt: skip


def test_repeated_runs_reuse_the_compiled_stages(key):
    """gradient_flow compiles its stages once per (options, shapes) (_pipeline.py's cache): a
    second start of the same shapes is neither traced nor compiled again."""
    X, y = _separable(key)
    traces = []
    counted = _counted_relu(traces)
    params = counted.init(key, 3)
    options = dict(s_max=1.0, num_saves=12, sliding=None)
    first = jm.gradient_flow(counted, params, X, y, **options)
    count = len(traces)
    assert count > 0
    second = jm.gradient_flow(counted, jax.tree.map(lambda a: 1.1 * a, params), X, y, **options)
    assert len(traces) == count
    assert first.status.code == second.status.code == codes.REACHED_TARGET
    assert float(second.soft_margin[-1]) != float(first.soft_margin[-1])  # a run of its own


def test_bad_arguments(key):
    X, y = _separable(key)
    params = jm.linear().init(key, 3)
    with pytest.raises(ValueError, match="target"):
        jm.gradient_flow(jm.linear(), params, X, y)
    with pytest.raises(ValueError, match="solver"):
        jm.gradient_flow(jm.linear(), params, X, y, s_max=1.0, solver="rk99")
    with pytest.raises(ValueError, match="labels"):
        jm.gradient_flow(jm.linear(), params, X, 2 * y, s_max=1.0)
