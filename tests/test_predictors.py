import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import VECTOR_PREDICTORS

import jaxmargin as jm

SCALES = np.logspace(-3, 3, 13)


def _outputs(predictor, params, X):
    return jax.vmap(predictor.apply, in_axes=(None, 0))(params, X)


@pytest.mark.parametrize("name", sorted(VECTOR_PREDICTORS))
def test_homogeneity_to_1e_10(name, key, reference_data):
    predictor = VECTOR_PREDICTORS[name]
    X, _ = reference_data
    params = predictor.init(key, X.shape[1])
    base = _outputs(predictor, params, X)
    for c in SCALES:
        scaled = _outputs(predictor, jax.tree.map(lambda w: c * w, params), X)
        expected = c**predictor.degree * base
        np.testing.assert_allclose(scaled, expected, rtol=1e-10, atol=1e-300)
    assert jm.estimate_degree(predictor, params, X) == pytest.approx(predictor.degree, abs=1e-9)


@pytest.mark.parametrize("channels", [(4,), (4, 6), (3, 4, 5)])
def test_cnn_homogeneity_and_degree(channels, key):
    predictor = jm.relu_cnn(channels, kernel_size=3, pool=2)
    X = jax.random.normal(key, (5, 8, 8))
    params = predictor.init(key, (8, 8))
    assert predictor.degree == len(channels) + 1 and len(params) == len(channels) + 1
    base = _outputs(predictor, params, X)
    for c in SCALES:
        scaled = _outputs(predictor, jax.tree.map(lambda w: c * w, params), X)
        np.testing.assert_allclose(scaled, c**predictor.degree * base, rtol=1e-10)
    jm.assert_homogeneous(predictor, params, X)


def test_cnn_takes_channels_last_inputs(key):
    predictor = jm.relu_cnn((4,))
    params = predictor.init(key, (6, 6, 3))
    assert params[0].shape == (3, 3, 3, 4)
    assert jnp.shape(predictor.apply(params, jnp.ones((6, 6, 3)))) == ()


def test_biased_model_is_rejected(key, reference_data):
    X, _ = reference_data

    # Every bias scales with c like its layer's input, except at the output of a deep net:
    # v . relu(W x + b) + b_out is c^2 (...) + c b_out, not homogeneous.
    def init(key, in_dim):
        k1, k2 = jax.random.split(key)
        return (jax.random.normal(k1, (4, in_dim)), jax.random.normal(k2, (4,)), jnp.ones(()))

    def apply(params, x):
        return params[1] @ jax.nn.relu(params[0] @ x) + params[2]

    biased = jm.Predictor(init, apply, 2, "two-layer relu with output bias")
    with pytest.raises(ValueError, match="not positively homogeneous"):
        jm.estimate_degree(biased, biased.init(key, 5), X)


def test_wrong_declared_degree_is_rejected(key, reference_data):
    X, _ = reference_data
    true = jm.relu_mlp(2, 8)
    lying = true._replace(degree=3, name="relu_mlp claiming degree 3")
    with pytest.raises(ValueError, match="declares degree 3"):
        jm.assert_homogeneous(lying, true.init(key, 5), X)


def test_end_to_end_linear_predictors(key, reference_data):
    X, _ = reference_data
    for predictor in (jm.linear(), jm.deep_linear(4, 5), jm.diagonal_linear(3)):
        params = predictor.init(key, 5)
        beta = predictor.end_to_end(params)
        np.testing.assert_allclose(_outputs(predictor, params, X), X @ beta, rtol=1e-12)


def test_relu_grad_at_zero_selects_clarke_element():
    for slope in (0.0, 0.25):
        for a in (0.0, 0.3, 1.0):
            activation = jm.kinked_linear(slope, a)
            assert jax.grad(activation)(0.0) == pytest.approx(slope + a * (1 - slope))
            assert jax.grad(activation)(-1.0) == pytest.approx(slope)
            assert jax.grad(activation)(2.0) == pytest.approx(1.0)


def test_factories_are_cached_and_rebuild():
    assert jm.relu_mlp(2, 8) is jm.relu_mlp(2, 8)
    half = jm.relu_mlp(2, 8).rebuild(relu_grad_at_zero=0.5)
    assert half is jm.relu_mlp(2, 8, relu_grad_at_zero=0.5) and half.relu_grad_at_zero == 0.5


def test_margin_functions_compile_once(key, reference_data):
    X, y = reference_data
    predictor = jm.relu_mlp(2, 8)
    traces = []

    def counting_apply(params, x):
        traces.append(1)
        return predictor.apply(params, x)

    counted = predictor._replace(apply=counting_apply)
    for seed in range(3):
        jm.soft_margin(counted, counted.init(jax.random.key(seed), 5), X, y)
    first = len(traces)
    jm.soft_margin(counted, counted.init(jax.random.key(9), 5), X, y)
    assert len(traces) == first


@pytest.mark.parametrize(
    "factory, message",
    [
        (lambda: jm.relu_mlp(0, 4), "depth"),
        (lambda: jm.relu_mlp(2, 0), "width"),
        (lambda: jm.relu_mlp(2, 4, relu_grad_at_zero=1.5), "relu_grad_at_zero"),
        (lambda: jm.leaky_relu_mlp(2, 4, 1.0), "slope"),
        (lambda: jm.deep_linear(1, 4), "depth"),
        (lambda: jm.relu_cnn(()), "convolution"),
    ],
)
def test_bad_factory_arguments(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()
