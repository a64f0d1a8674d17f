import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from helpers import VECTOR_PREDICTORS, integer_relu_params_on_kinks
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxmargin as jm

CONVENTIONS = [0.0, 0.5, 1.0]


def _kink_setup(depth, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(-3, 4, size=5).astype(np.float64)
    x[0] = 2.0  # never the zero vector
    params, kinks = integer_relu_params_on_kinks(depth, 6, x, rng)
    return jnp.asarray(x), params, kinks


def _pre_activations(params, x):
    out, hidden = [], x
    for W in params[:-1]:
        z = W @ hidden
        out.append(z)
        hidden = jnp.maximum(z, 0.0)
    return out


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_lemma2_on_exact_kinks_every_convention(depth):
    x, params, kinks = _kink_setup(depth)
    pre = _pre_activations(params, x)
    assert all(float(pre[layer][unit]) == 0.0 for layer, unit in kinks)  # exactly on the kinks
    value = float(jm.relu_mlp(depth, 6).apply(params, x))
    gradients = []
    for a in CONVENTIONS:
        predictor = jm.relu_mlp(depth, 6, relu_grad_at_zero=a)
        s = jm.autodiff_subgradient(predictor, params, x)
        residual = float(jm.euler_identity_residual(predictor, params, x, s))
        scale = depth * abs(value) + float(jnp.linalg.norm(s)) * float(
            jnp.linalg.norm(jnp.concatenate([p.ravel() for p in params]))
        )
        assert abs(residual) <= 1e-13 * scale
        gradients.append(s)
    # The conventions give different elements: the test really sits on a kink.
    assert float(jnp.max(jnp.abs(gradients[0] - gradients[2]))) > 1e-3


@pytest.mark.parametrize("depth", [2, 3])
def test_lemma2_for_sampled_clarke_elements_and_combinations(depth, key):
    x, params, _ = _kink_setup(depth, seed=1)
    predictor = jm.relu_mlp(depth, 6)
    samples = jm.sampled_clarke_subgradients(
        lambda w: predictor.apply(w, x), params, key, num_samples=64, radius=1e-6
    )
    distinct = np.unique(np.round(np.asarray(samples), 4), axis=0)
    assert distinct.shape[0] >= 2  # several limiting gradients: a genuine kink
    weights = jax.random.dirichlet(key, jnp.ones(64), (16,))
    elements = jnp.concatenate([samples, weights @ samples])
    residuals = jm.euler_identity_residual(predictor, params, x, elements)
    w_norm = float(jnp.linalg.norm(jnp.concatenate([p.ravel() for p in params])))
    scale = float(jnp.max(jnp.linalg.norm(elements, axis=1))) * w_norm
    assert float(jnp.max(jnp.abs(residuals))) <= 1e-9 * scale
    # Without extrapolation the O(radius) bias of gradient sampling is visible.
    raw = jm.sampled_clarke_subgradients(
        lambda w: predictor.apply(w, x),
        params,
        key,
        num_samples=64,
        radius=1e-3,
        extrapolate=False,
    )
    raw_residual = jnp.abs(jm.euler_identity_residual(predictor, params, x, raw))
    assert float(jnp.max(raw_residual)) > 1e-6 * scale


def test_autodiff_leaves_clarke_set_for_relu_difference(key):
    """relu(z) - relu(-z) = z: Clarke derivative {1}, autodiff says 0 at z = 0."""

    def program(w):
        (z,) = w
        return jax.nn.relu(z) - jax.nn.relu(-z)

    at_zero = (jnp.zeros(()),)
    assert float(jax.grad(program)(at_zero)[0]) == 0.0
    sampled = jm.sampled_clarke_subgradients(program, at_zero, key, num_samples=8)
    np.testing.assert_allclose(sampled, 1.0, rtol=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    model=st.sampled_from(
        ["linear", "deep_linear_3", "relu_mlp_2", "relu_mlp_3", "leaky_relu_mlp_3", "diagonal_2"]
    ),
    seed=st.integers(0, 2**31 - 1),
    log_scale=st.floats(-2.0, 2.0),
    use_sampled=st.booleans(),
)
def test_lemma4_property(model, seed, log_scale, use_sampled):
    predictor = VECTOR_PREDICTORS[model]
    key = jax.random.key(seed)
    k_data, k_w, k_s = jax.random.split(key, 3)
    X = jax.random.normal(k_data, (8, 5))
    y = jnp.where(jax.random.bernoulli(k_data, 0.5, (8,)), 1.0, -1.0)
    params = jax.tree.map(lambda w: w * 10.0**log_scale, predictor.init(k_w, 5))
    if use_sampled:
        rows = []
        for i in range(8):
            samples = jm.sampled_clarke_subgradients(
                lambda w: y[i] * predictor.apply(w, X[i]),
                params,
                jax.random.fold_in(k_s, i),
                num_samples=4,
            )
            mix = jax.random.dirichlet(jax.random.fold_in(k_s, 100 + i), jnp.ones(4))
            rows.append(mix @ samples)
        margin_subgradients = jnp.stack(rows)
    else:
        margin_subgradients = jm.margin_jacobian(predictor, params, X, y)
    v = jm.chain_rule_element(predictor, params, X, y, margin_subgradients)
    slack = float(jm.lemma4_slack(predictor, params, X, y, v))
    m = jm.margins(predictor, params, X, y)
    scale = predictor.degree * float(jnp.max(jnp.abs(m)) + jnp.log(8.0))
    assert slack >= -1e-9 * scale
    p = jax.nn.softmax(-m)
    entropy = float(-jnp.sum(p * jnp.log(jnp.where(p > 0, p, 1.0))))
    assert slack == pytest.approx(predictor.degree * entropy, abs=1e-8 * scale)


def test_lemma4_slack_is_degree_times_entropy():
    """<v_i, w> = L m_i for every Clarke element, so the slack of Lemma 4 is exactly
    L * H(p), p = softmax(-m): zero when one example carries all the weight, L ln n at most."""
    predictor = jm.linear()
    X = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    y = jnp.array([1.0, 1.0])
    for w, expected in [((2.0, 2.0), np.log(2.0)), ((3.0, 1.0), None), ((800.0, 1.0), 0.0)]:
        params = (jnp.array(w),)
        jac = jm.margin_jacobian(predictor, params, X, y)
        v = jm.chain_rule_element(predictor, params, X, y, jac)
        p = np.exp(-np.array(w) + min(w)) / np.exp(-np.array(w) + min(w)).sum()
        entropy = -np.sum(p * np.log(np.where(p > 0, p, 1.0)))
        slack = float(jm.lemma4_slack(predictor, params, X, y, v))
        assert slack == pytest.approx(entropy, abs=1e-12)
        if expected is not None:
            assert slack == pytest.approx(expected, abs=1e-12)


def _scipy_min_norm(G):
    k = G.shape[0]
    result = scipy.optimize.minimize(
        lambda lam: 0.5 * np.sum((lam @ G) ** 2),
        np.full(k, 1.0 / k),
        jac=lambda lam: G @ (lam @ G),
        bounds=[(0.0, 1.0)] * k,
        constraints=[
            {"type": "eq", "fun": lambda lam: lam.sum() - 1.0, "jac": lambda lam: np.ones_like(lam)}
        ],
        method="SLSQP",
        options={"ftol": 1e-15, "maxiter": 2000},
    )
    return result.x @ G


@pytest.mark.parametrize(
    "k, d, shift",
    [(5, 3, 2.0), (12, 4, 1.0), (30, 10, 0.5), (8, 2, 0.0), (40, 5, 3.0), (3, 20, 0.0)],
)
def test_min_norm_point_against_scipy(k, d, shift):
    rng = np.random.default_rng(k * 100 + d)
    G = rng.normal(size=(k, d)) + shift * np.eye(d)[0]
    result = jm.min_norm_point(jnp.asarray(G))
    assert bool(result.converged)
    reference = _scipy_min_norm(G)
    np.testing.assert_allclose(result.point, reference, atol=2e-7)
    np.testing.assert_allclose(result.weights @ G, result.point, atol=1e-12)
    assert float(jnp.min(result.weights)) >= 0.0
    assert float(jnp.sum(result.weights)) == pytest.approx(1.0, abs=1e-12)
    # Optimality: <x, g_j> >= ||x||^2 for every j (the certificate Wolfe stops on).
    x = np.asarray(result.point)
    assert np.min(G @ x) >= x @ x - 1e-10 * np.max(np.sum(G**2, axis=1))


def test_min_norm_point_degenerate_inputs():
    G = jnp.array([[1.0, 1.0], [1.0, 1.0], [2.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    result = jm.min_norm_point(G)
    np.testing.assert_allclose(result.point, [1.0, 1.0], atol=1e-10)
    single = jm.min_norm_point(jnp.array([[3.0, -4.0]]))
    np.testing.assert_allclose(single.point, [3.0, -4.0])
    batched = jax.vmap(jm.min_norm_point)(jnp.stack([G, G + 1.0]))
    np.testing.assert_allclose(batched.point[1], [2.0, 2.0], atol=1e-10)
    with pytest.raises(ValueError, match="shape"):
        jm.min_norm_point(jnp.ones(3))
    with pytest.raises(ValueError, match="non-finite"):
        jm.min_norm_point(jnp.array([[1.0, jnp.nan]]))
