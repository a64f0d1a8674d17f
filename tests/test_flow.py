import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flow_references import DeepLinear, polar_flow, tau_flow
from helpers import row, small_separable
from jax.flatten_util import ravel_pytree

import jaxmargin as jm
from jaxmargin._flow import _solution as codes

SOLVER_SETTINGS = {
    "dopri8": dict(solver="dopri8", rtol=1e-12, atol=1e-14),
    # Phase 2 on the linearly implicit W-method (second order: a tighter tolerance).
    "rosenbrock": dict(solver="rosenbrock", rtol=1e-11, atol=1e-14, max_steps=400_000),
}


@pytest.mark.parametrize("solver", sorted(SOLVER_SETTINGS))
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_smooth_models_against_scipy(depth, solver, key):
    X, y = small_separable(key)
    predictor = jm.linear() if depth == 1 else jm.deep_linear(depth, 3)
    params0 = jax.tree.map(lambda w: 0.3 * w, predictor.init(jax.random.fold_in(key, 1), 3))
    model = DeepLinear([p.shape for p in params0])
    w0 = np.asarray(ravel_pytree(params0)[0])
    solution = jm.gradient_flow(
        predictor, params0, X, y, s_max=1.5, num_saves=40, **SOLVER_SETTINGS[solver]
    )
    assert solution.status.code == codes.REACHED_TARGET, solution.status.message

    tau0, state0 = tau_flow(model, np.asarray(X), np.asarray(y), w0, 1e4)
    assert float(solution.status.tau0) == pytest.approx(tau0, rel=1e-7)
    phase2 = np.asarray(solution.phase) == 2
    first = int(np.argmax(phase2))
    w_t0 = np.asarray(ravel_pytree(row(solution.params, first))[0])
    np.testing.assert_allclose(w_t0, state0[:-1], rtol=1e-7, atol=1e-9)

    s = np.asarray(solution.s)[phase2]
    w_ref0 = state0[:-1]
    log_loss0 = -(-np.log(np.sum(np.exp(-model.margins_and_gradients(w_ref0, X, y)[0]))))
    thetas, soft, tau, log_t_loss = polar_flow(
        model,
        np.asarray(X),
        np.asarray(y),
        w_ref0 / np.linalg.norm(w_ref0),
        s[0],
        tau0,
        np.log(state0[-1]) + log_loss0,
        s,
    )
    ours = np.stack(
        [np.asarray(ravel_pytree(row(solution.params, i))[0]) for i in np.flatnonzero(phase2)]
    )
    ours = ours / np.linalg.norm(ours, axis=1, keepdims=True)
    np.testing.assert_allclose(ours, thetas, atol=1e-7)
    np.testing.assert_allclose(np.asarray(solution.soft_margin)[phase2], soft, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(np.asarray(solution.tau)[phase2], tau, rtol=1e-7)
    log_t_ref = log_t_loss - np.asarray(solution.log_loss)[phase2]
    np.testing.assert_allclose(np.asarray(solution.log_t)[phase2], log_t_ref, rtol=1e-7, atol=1e-7)


def test_zero_start_linear_and_rest_point_error(key):
    X, y = small_separable(key)
    solution = jm.gradient_flow(jm.linear(), (jnp.zeros(3),), X, y, s_max=1.0, solver="tsit5")
    assert solution.status.code == codes.REACHED_TARGET
    svm = jm.svm_direction(X, y)
    assert float(solution.hard_margin[-1]) <= svm.margin + 1e-12
    with pytest.raises(ValueError, match="rest point"):
        jm.gradient_flow(
            jm.deep_linear(2, 3), (jnp.zeros((3, 3)), jnp.zeros(3)), X, y, s_max=1.0, solver="tsit5"
        )


def test_one_example_from_zero():
    """n = 1, w(0) = 0: -ln L(w0) is exactly 0, so t0 is the start itself (the event's root sits
    on the interval's end). Exact flow: dw/dtau = y x, w = tau y x, gamma~ = ||x|| for tau > 0."""
    x = jnp.array([[1.0, -2.0, 0.5]])
    for label in (1.0, -1.0):
        y = jnp.array([label])
        solution = jm.gradient_flow(
            jm.linear(), (jnp.zeros(3),), x, y, beta_max=1e3, solver="tsit5"
        )
        assert solution.status.code == codes.REACHED_TARGET, solution.status.message
        after = np.asarray(solution.phase) == 2
        norm = float(jnp.linalg.norm(x))
        np.testing.assert_allclose(np.asarray(solution.soft_margin)[after], norm, rtol=1e-9)
        w = np.asarray(solution.params[0][-1])
        np.testing.assert_allclose(
            w / np.linalg.norm(w), label * np.asarray(x[0]) / norm, atol=1e-12
        )
        np.testing.assert_allclose(float(solution.rho[-1]), 1e3, rtol=1e-9)


def test_not_separable_reports_best_margin():
    X = jnp.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    y = jnp.array([1.0, 1.0, 1.0])  # x and -x share a label: no linear separator
    solution = jm.gradient_flow(
        jm.linear(), (jnp.array([0.1, 0.2]),), X, y, s_max=3.0, tau_max=50.0, solver="tsit5"
    )
    assert solution.status.code == codes.NOT_SEPARATED
    assert not bool(solution.status.separated)
    assert np.isfinite(float(solution.status.best_soft_margin))
    assert float(solution.status.best_soft_margin) < 0
    assert "did not separate" in solution.status.message


def test_no_blow_up_for_degree_three_and_failures_keep_outputs(key):
    X, y = small_separable(key)
    predictor = jm.deep_linear(3, 3)
    params0 = predictor.init(key, 3)
    # In the tau clock an L = 3 flow reaches infinity at a finite tau; in s it cannot.
    solution = jm.gradient_flow(predictor, params0, X, y, beta_max=1e6, rtol=1e-8, solver="tsit5")
    assert np.all(np.isfinite(np.asarray(solution.soft_margin)))
    assert float(solution.rho[-1]) ** 3 == pytest.approx(1e6, rel=1e-9)
    tau = np.asarray(solution.tau)[np.asarray(solution.phase) == 2]
    assert np.all(np.diff(tau) > 0) and np.all(np.diff(np.diff(tau)[-5:]) < 0)  # tau saturates
    starved = jm.gradient_flow(predictor, params0, X, y, beta_max=1e6, max_steps=30, solver="tsit5")
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
    X, y = small_separable(key)
    traces = []
    counted = _counted_relu(traces)
    batch = jax.vmap(lambda k: counted.init(k, 3))(jax.random.split(key, 3))
    first = jm.gradient_flow_batch(counted, batch, X, y, s_max=1.0, num_saves=12, solver="tsit5")
    count = len(traces)
    batch2 = jax.tree.map(lambda a: 1.1 * a, batch)
    jm.gradient_flow_batch(counted, batch2, X, y, s_max=1.0, num_saves=12, solver="tsit5")
    assert len(traces) == count
    for i in range(3):
        single = jm.gradient_flow(
            counted, row(batch, i), X, y, s_max=1.0, num_saves=12, sliding=None, solver="tsit5"
        )
        rows = np.asarray(first.valid[i])
        # Batched matmuls round differently, and adaptive step sequences amplify round-off up
        # to the solver tolerance (rtol 1e-8): compare at 100 x that.
        np.testing.assert_allclose(
            np.asarray(first.soft_margin[i])[rows], single.soft_margin, rtol=1e-6, atol=1e-9
        )


def test_repeated_runs_reuse_the_compiled_stages(key):
    """gradient_flow compiles its stages once per (options, shapes) (_pipeline.py's cache): a
    second start of the same shapes is neither traced nor compiled again."""
    X, y = small_separable(key)
    traces = []
    counted = _counted_relu(traces)
    params = counted.init(key, 3)
    options = dict(solver="tsit5", s_max=1.0, num_saves=12, sliding=None)
    first = jm.gradient_flow(counted, params, X, y, **options)
    count = len(traces)
    assert count > 0
    second = jm.gradient_flow(counted, jax.tree.map(lambda a: 1.1 * a, params), X, y, **options)
    assert len(traces) == count
    assert first.status.code == second.status.code == codes.REACHED_TARGET
    assert float(second.soft_margin[-1]) != float(first.soft_margin[-1])  # a run of its own


def test_bad_arguments(key):
    X, y = small_separable(key)
    params = jm.linear().init(key, 3)
    with pytest.raises(ValueError, match="target"):
        jm.gradient_flow(jm.linear(), params, X, y, solver="tsit5")
    with pytest.raises(ValueError, match="solver"):
        jm.gradient_flow(jm.linear(), params, X, y, s_max=1.0, solver="rk99")
    with pytest.raises(ValueError, match="labels"):
        jm.gradient_flow(jm.linear(), params, X, 2 * y, s_max=1.0, solver="tsit5")
