import jax
import jax.numpy as jnp
import mpmath
import numpy as np
import pytest
from helpers import VECTOR_PREDICTORS

import jaxmargin as jm

NORMS = [1e-6, 1e-2, 1.0, 30.0, 1e3, 1e20, 1e100]


def _at_norm(params, norm):
    """params rescaled to ||w|| = norm exactly in the direction (float64 scaling)."""
    current = float(jnp.exp(jm.log_norm(params)))
    return tuple(layer * (norm / current) for layer in params)


def _separating_mlp(key, X, y, depth):
    """A relu_mlp that separates the data: a positive unit reading out the label direction."""
    predictor = jm.relu_mlp(depth, 6)
    params = list(predictor.init(key, X.shape[1]))
    direction = jnp.ones(X.shape[1])
    params[0] = params[0].at[0].set(direction).at[1].set(-direction)
    for k in range(1, depth - 1):
        params[k] = params[k].at[0].set(0.0).at[1].set(0.0).at[0, 0].set(1.0).at[1, 1].set(1.0)
    params[-1] = params[-1].at[0].set(1.0).at[1].set(-1.0)
    return predictor, tuple(params)


# --------------------------------------------------------------------------- mpmath reference


def _mp_forward(layers, x, relu):
    hidden = [mpmath.mpf(float(v)) for v in x]
    for W in layers[:-1]:
        hidden = [mpmath.fsum(mpmath.mpf(float(a)) * h for a, h in zip(row, hidden)) for row in W]
        if relu:
            hidden = [h if h > 0 else mpmath.mpf(0) for h in hidden]
    return mpmath.fsum(mpmath.mpf(float(a)) * h for a, h in zip(layers[-1], hidden))


def _mp_soft_margin(layers, X, y, degree, relu, loss):
    margins = [float(t) * _mp_forward(layers, x, relu) for x, t in zip(np.asarray(X), y)]
    norm = mpmath.sqrt(mpmath.fsum(mpmath.mpf(float(v)) ** 2 for W in layers for v in np.ravel(W)))
    if loss == "exp":
        inverse = -mpmath.log(mpmath.fsum(mpmath.exp(-m) for m in margins))
    else:
        summed = mpmath.fsum(mpmath.log1p(mpmath.exp(-m)) for m in margins)
        inverse = -mpmath.log(mpmath.expm1(summed))
    return inverse / norm**degree


@pytest.mark.parametrize("loss", ["exp", "logistic"])
@pytest.mark.parametrize("model", ["linear", "deep_linear_3", "relu_mlp_2", "relu_mlp_3"])
def test_soft_margin_against_mpmath(model, loss, key):
    mpmath.mp.dps = 60
    data_key, weight_key = jax.random.split(key)
    X = jax.random.normal(data_key, (12, 4))
    y = jnp.sign(X.sum(axis=1))
    if model.startswith("relu"):
        predictor, base = _separating_mlp(weight_key, X, y, int(model[-1]))
    else:
        predictor = {"linear": jm.linear(), "deep_linear_3": jm.deep_linear(3, 4)}[model]
        base = predictor.init(weight_key, 4)
        if model == "linear":  # a separating direction, so that huge norms are informative
            base = (jnp.ones(4) + 0.1 * base[0],)
    relu = model.startswith("relu")
    for norm in NORMS:
        params = _at_norm(base, norm)
        ours = float(jm.soft_margin(predictor, params, X, y, loss=loss))
        layers = [np.asarray(layer) for layer in params]
        reference = _mp_soft_margin(layers, X, np.asarray(y), predictor.degree, relu, loss)
        assert np.isfinite(ours)
        assert ours == pytest.approx(float(reference), rel=1e-11, abs=1e-300), (norm, ours)


@pytest.mark.parametrize("name", sorted(VECTOR_PREDICTORS))
def test_sandwich_up_to_norm_1e100(name, key, reference_data):
    X, y = reference_data
    predictor = VECTOR_PREDICTORS[name]
    base = predictor.init(key, X.shape[1])
    n = X.shape[0]
    for norm in NORMS:
        params = _at_norm(base, norm)
        soft = float(jm.soft_margin(predictor, params, X, y))
        hard = float(jm.hard_margin(predictor, params, X, y))
        log_beta = predictor.degree * np.log(norm)
        gap = np.exp(np.log(np.log(n)) - log_beta)  # ln(n) / ||w||^L, without overflow
        assert np.isfinite(soft) and np.isfinite(hard)
        slack = 1e-12 * (abs(hard) + gap)
        assert hard - gap - slack <= soft <= hard + slack, (norm, hard, soft, gap)


def test_hard_margin_and_log_loss_match_direct_formulas(key, reference_data):
    X, y = reference_data
    predictor = jm.relu_mlp(3, 8)
    params = predictor.init(key, 5)
    raw = jm.margins(predictor, params, X, y)
    norm = np.sqrt(sum(float(jnp.sum(layer**2)) for layer in params))
    assert float(jm.hard_margin(predictor, params, X, y)) == pytest.approx(
        float(jnp.min(raw)) / norm**3, rel=1e-12
    )
    assert float(jm.log_loss(predictor, params, X, y)) == pytest.approx(
        float(jnp.log(jnp.sum(jnp.exp(-raw)))), rel=1e-12
    )
    huge = _at_norm(params, 1e30)
    assert np.isfinite(float(jm.log_loss(predictor, huge, X, y)))


def test_product_normalization(key, reference_data):
    X, y = reference_data
    predictor = jm.relu_mlp(3, 8)
    params = predictor.init(key, 5)
    raw = jm.margins(predictor, params, X, y)
    layer_norms = [float(jnp.linalg.norm(layer)) for layer in params]
    expected = float(jnp.min(raw)) / np.prod(layer_norms)
    got = float(jm.hard_margin(predictor, params, X, y, normalization="product"))
    assert got == pytest.approx(expected, rel=1e-12)
    # Rebalancing layers (W1 * c, W2 / c) changes neither f nor the product normalization.
    rebalanced = (params[0] * 7.0, params[1] / 7.0, params[2])
    for loss in ("exp", "logistic"):
        a = jm.soft_margin(predictor, params, X, y, loss=loss, normalization="product")
        b = jm.soft_margin(predictor, rebalanced, X, y, loss=loss, normalization="product")
        assert float(a) == pytest.approx(float(b), rel=1e-12)
    assert float(jm.hard_margin(predictor, rebalanced, X, y)) != pytest.approx(
        float(jm.hard_margin(predictor, params, X, y)), rel=1e-3
    )


def test_vmap_over_params_and_datasets(key, reference_data):
    X, y = reference_data
    predictor = jm.relu_mlp(2, 8)
    keys = jax.random.split(key, 4)
    batch = jax.vmap(lambda k: predictor.init(k, 5))(keys)
    batched = jax.vmap(lambda p: jm.soft_margin(predictor, p, X, y))(batch)
    looped = [jm.soft_margin(predictor, predictor.init(k, 5), X, y) for k in keys]
    np.testing.assert_allclose(batched, looped, rtol=1e-13)

    datasets = jax.random.normal(key, (3, 20, 5))
    labels = jnp.sign(datasets.sum(axis=2))
    params = predictor.init(key, 5)
    over_data = jax.vmap(lambda a, b: jm.hard_margin(predictor, params, a, b))(datasets, labels)
    for i in range(3):
        assert float(over_data[i]) == pytest.approx(
            float(jm.hard_margin(predictor, params, datasets[i], labels[i])), rel=1e-13
        )
    jitted = jax.jit(lambda p: jm.soft_margin(predictor, p, X, y, loss="logistic"))
    assert float(jitted(params)) == pytest.approx(
        float(jm.soft_margin(predictor, params, X, y, loss="logistic")), rel=1e-13
    )
