"""FlowOptions (one definition of every run option), the public status codes, and what a run
records beside params: the unit direction at every saved point and where each stage began."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmargin as jm


def test_every_flow_function_lists_the_options_with_their_defaults():
    defaults = jm.FlowOptions()
    for function in (jm.gradient_flow, jm.gradient_flow_batch, jm.sweep_gradient_flow):
        parameters = inspect.signature(function).parameters
        for name, value in vars(defaults).items():
            assert parameters[name].default == value, (function.__name__, name)
    limit = inspect.signature(jm.limit_flow).parameters
    assert limit["rtol"].default == defaults.rtol and "solver" not in limit


def test_options_are_validated_once_with_clear_errors():
    with pytest.raises(ValueError, match="solver must be one of"):
        jm.FlowOptions(solver="euler")
    with pytest.raises(ValueError, match="num_saves"):
        jm.FlowOptions(num_saves=3)
    with pytest.raises(ValueError, match="kink_slots"):
        jm.FlowOptions(solver="rosenbrock", kink_slots=0)
    with pytest.raises(TypeError, match="unknown options"):
        jm.FlowOptions.merge(None, {"colour": "red"})
    merged = jm.FlowOptions.merge(jm.FlowOptions(rtol=1e-6, solver="dopri5"), {"rtol": 1e-4})
    assert (merged.rtol, merged.solver) == (1e-4, "dopri5")


@pytest.mark.parametrize(
    "option", [{"limit_beta": 1e8}, {"kink_slots": 64}, {"limit_kink_slots": 512}]
)
def test_options_of_the_asymptotic_engine_raise_with_an_explicit_solver(option):
    (name,) = option
    with pytest.raises(ValueError, match=name):
        jm.FlowOptions(solver="tsit5", **option)
    X, y = jm.soudry_dataset(0)
    with pytest.raises(ValueError, match=name):
        jm.gradient_flow(jm.linear(), (jnp.zeros(2),), X, y, s_max=1.0, solver="tsit5", **option)
    jm.FlowOptions(solver="rosenbrock", **option)  # applies there


def test_limit_flow_rejects_options_that_are_not_its_own():
    X, y = jm.soudry_dataset(0)
    w = (jnp.asarray(jm.svm_direction(X, y).direction),)
    with pytest.raises(TypeError, match="limit_flow takes"):
        jm.limit_flow(jm.linear(), w, X, y, s_max=10.0, solver="tsit5")
    with pytest.raises(ValueError, match="tau_max"):
        jm.limit_flow(jm.linear(), w, X, y, s_max=10.0, options=jm.FlowOptions(tau_max=5.0))


def test_status_codes_are_public():
    assert jm.Status.TOO_MANY_KINKS == 5 and "kink_slots" in jm.Status.TOO_MANY_KINKS.message
    X, y = jm.soudry_dataset(0)
    solution = jm.gradient_flow(jm.linear(), (jnp.zeros(2),), X, y, s_max=1.0, solver="tsit5")
    assert solution.status.code == jm.Status.REACHED_TARGET
    # The explicit solvers have no limit-flow stage.
    assert np.isnan(float(solution.status.s_limit)) and int(solution.status.limit_steps) == 0


def test_direction_is_saved_past_float64s_range_of_params():
    """Linear model on Soudry's data to s = 800: ||w|| passes float64's range at s ~ 709.8,
    where the run stops (ln t overflows too); the last params are not finite, the direction is,
    and it is the SVM direction. The stages' starts are recorded."""
    X, y = jm.soudry_dataset(0)
    solution = jm.gradient_flow(
        jm.linear(), (jnp.zeros(2),), X, y, s_max=800.0, max_steps=50_000
    )  # no solver named: the default is the asymptotic engine
    assert jm.FlowOptions().solver == "rosenbrock"
    status = solution.status
    assert status.code == jm.Status.SOLVER_FAILED, status.message  # stopped where t overflows
    assert float(solution.s[-1]) > 709.0
    assert not np.all(np.isfinite(np.asarray(solution.params[0][-1])))
    directions = np.asarray(solution.direction[0])
    assert np.all(np.isfinite(directions))
    np.testing.assert_allclose(np.linalg.norm(directions, axis=1), 1.0, atol=1e-12)
    svm = jm.svm_direction(X, y).direction
    assert np.linalg.norm(directions[-1] - svm) <= 1e-12
    # Where params are finite, the direction is params / ||params||.
    finite = np.all(np.isfinite(np.asarray(solution.params[0])), axis=1)
    params = np.asarray(solution.params[0])[finite]
    params = params / np.max(np.abs(params), axis=1, keepdims=True)  # ||w|| reaches 1e307
    np.testing.assert_allclose(
        directions[finite], params / np.linalg.norm(params, axis=1, keepdims=True), atol=1e-12
    )
    # The stiff stage from t0, the limit flow from beta = 1e10 ("auto" for smooth models) or
    # from 1e8 on where the stiff stage's steps stall.
    assert float(status.s0) < np.log(1e8) <= float(status.s_limit) <= np.log(1e10)
    assert 0 < int(status.limit_steps) <= int(status.steps[1])


def test_running_out_of_kink_slots_names_the_option():
    """A small ReLU problem whose stiff stage holds more than one pair on a kink at once."""
    k_data, k_w = jax.random.split(jax.random.key(2))
    X = jax.random.normal(k_data, (16, 3))
    y = jnp.sign(X.sum(axis=1))
    predictor = jm.relu_mlp(2, 6)
    solution = jm.gradient_flow(
        predictor,
        predictor.init(k_w, 3),
        X,
        y,
        beta_max=1e8,
        solver="rosenbrock",
        rtol=1e-6,
        kink_slots=1,
    )
    assert solution.status.code == jm.Status.TOO_MANY_KINKS
    assert "kink_slots" in solution.status.message
    assert np.isnan(float(solution.status.s_limit))  # it stopped before the limit flow
