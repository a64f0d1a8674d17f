"""Bad input raises an error that names the problem, never a silent NaN."""

import jax.numpy as jnp
import numpy as np
import pytest

import jaxmargin as jm


@pytest.fixture
def setup(key, reference_data):
    X, y = reference_data
    predictor = jm.relu_mlp(2, 8)
    return predictor, predictor.init(key, 5), X, y


FUNCTIONS = [jm.margins, jm.normalized_margins, jm.hard_margin, jm.soft_margin, jm.log_loss]


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_labels_must_be_plus_minus_one(fn, setup):
    predictor, params, X, y = setup
    with pytest.raises(ValueError, match="labels y must be -1 or \\+1; found \\[0.0\\]"):
        fn(predictor, params, X, (y + 1) / 2)


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_non_finite_inputs(fn, setup):
    predictor, params, X, y = setup
    with pytest.raises(ValueError, match="X contains non-finite"):
        fn(predictor, params, X.at[3, 1].set(jnp.nan), y)
    with pytest.raises(ValueError, match="params contain non-finite"):
        fn(predictor, (params[0].at[0, 0].set(jnp.inf), params[1]), X, y)


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_shape_mismatches(fn, setup):
    predictor, params, X, y = setup
    with pytest.raises(ValueError, match="50 examples but y has 49"):
        fn(predictor, params, X, y[:-1])
    with pytest.raises(ValueError, match="y must have shape"):
        fn(predictor, params, X, y[:, None])
    with pytest.raises(ValueError, match="X must have shape"):
        fn(predictor, params, X[0], y)
    with pytest.raises(ValueError, match="params do not match"):
        fn(predictor, params, X[:, :4], y)


def test_params_that_do_not_match_the_predictor(setup):
    predictor, params, X, y = setup
    with pytest.raises(ValueError, match="params do not match"):
        jm.soft_margin(predictor, params[:1], X, y)
    with pytest.raises(ValueError, match="params do not match"):
        jm.soft_margin(jm.relu_mlp(3, 8), params, X, y)
    with pytest.raises(TypeError, match="tuple of arrays"):
        jm.soft_margin(predictor, list(params), X, y)
    with pytest.raises(TypeError, match="Predictor"):
        jm.soft_margin(lambda w, x: 0.0, params, X, y)


def test_bad_option_names(setup):
    predictor, params, X, y = setup
    with pytest.raises(ValueError, match="loss must be one of"):
        jm.soft_margin(predictor, params, X, y, loss="hinge")
    with pytest.raises(ValueError, match="normalization must be one of"):
        jm.hard_margin(predictor, params, X, y, normalization="l1")


def test_zero_params_give_finite_or_infinite_values_not_nan(setup):
    predictor, params, X, y = setup
    zero = tuple(jnp.zeros_like(layer) for layer in params)
    assert float(jm.hard_margin(predictor, zero, X, y)) == 0.0
    assert float(jm.soft_margin(predictor, zero, X, y)) == -np.inf
