"""KKT certificates (Lyu & Li 2020) and alignment (Ji & Telgarsky 2020) against derived answers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

import jaxmargin as jm
from jaxmargin._kkt import alignment, kkt_certificate


def _separable(seed, n, d):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    w_star = rng.normal(size=d)
    return X, np.sign(X @ w_star), w_star


def _flat(params):
    return np.concatenate([np.ravel(p) for p in params])


# --------------------------------------------------------------------------- linear: the SVM


@pytest.mark.parametrize("seed, n, d", [(0, 30, 5), (1, 40, 3), (2, 20, 8), (3, 60, 2), (-1, 0, 0)])
def test_svm_direction_is_a_kkt_point(seed, n, d):
    if seed < 0:
        X, y = jm.soudry_dataset(0)
    else:
        X, y, _ = _separable(seed, n, d)
    svm = jm.svm_direction(X, y)
    cert = kkt_certificate(jm.linear(), (jnp.asarray(svm.direction),), X, y)
    assert cert.stationarity <= 1e-8
    assert 0.0 <= cert.complementary_slackness <= 1e-8
    assert cert.margin == pytest.approx(svm.margin, rel=1e-12)
    assert set(svm.support.tolist()) <= set(np.flatnonzero(cert.active).tolist())
    assert np.all(cert.multipliers >= 0) and np.all(cert.multipliers[~cert.active] == 0)
    # <w~, w~> = sum_i lambda_i <s_i, w~> = L sum_i lambda_i m_i(w~), with ||w~|| = 1/gamma.
    m_tilde = (y * (X @ svm.direction)) / svm.margin
    assert cert.multipliers @ m_tilde == pytest.approx(1.0 / svm.margin**2, rel=1e-8)


@pytest.mark.parametrize("perturbed", [False, True])
@pytest.mark.parametrize("seed, n, d", [(0, 30, 5), (1, 40, 3), (2, 20, 8)])
def test_other_separating_direction_is_not_a_kkt_point(seed, n, d, perturbed):
    """The direction that generated the labels, or the SVM's turned by ~1e-2."""
    X, y, w_star = _separable(seed, n, d)
    if perturbed:
        noise = np.random.default_rng(10 + seed).normal(size=d)
        w_star = jm.svm_direction(X, y).direction + 0.01 * noise
    theta = w_star / np.linalg.norm(w_star)
    Z = y[:, None] * X
    q = Z @ theta
    assert q.min() > 0 and q.min() < jm.svm_direction(X, y).margin * (1 - 1e-3)
    cert = kkt_certificate(jm.linear(), (jnp.asarray(theta),), X, y)
    # Independent answer: the columns of a linear model are z_i = y_i x_i.
    w_tilde = theta / q.min()
    active = q / q.min() <= 1 + 1e-3
    lam, residual = scipy.optimize.nnls(Z[active].T, w_tilde)
    assert cert.stationarity >= 1e-2
    assert cert.stationarity == pytest.approx(residual / np.linalg.norm(w_tilde), rel=1e-9)
    assert cert.margin == pytest.approx(q.min(), rel=1e-12)
    np.testing.assert_array_equal(cert.active, active)


# --------------------------------------------------------------------------- Vardi et al. trap


def _trap_margin(w):
    u, v = w[:2], w[2:]
    return (u[0] * v[0] * 1.0 + u[1] * v[1] * 2.0) / (w @ w)


@pytest.mark.parametrize("scale", [1.0, 1e3])
def test_trap_is_kkt_but_not_max_margin(scale):
    """f = u1 v1 x1 + u2 v2 x2, x = (1, 2): u = v = (1/√2, 0) is KKT with margin 1/2 < 1."""
    predictor = jm.diagonal_linear(2)
    X, y = jnp.array([[1.0, 2.0]]), jnp.array([1.0])
    trap = jnp.array([1.0, 0.0]) / np.sqrt(2) * scale
    cert = kkt_certificate(predictor, (trap, trap), X, y)
    assert cert.stationarity <= 1e-10
    assert cert.complementary_slackness <= 1e-12
    assert cert.margin == pytest.approx(0.5, rel=1e-12)
    # Not even a local max: turning towards e2 raises the margin (cos² + 2 sin²) / 2.
    for t in [1e-3, 1e-1]:
        turned = np.array([np.cos(t), np.sin(t)]) / np.sqrt(2)
        assert _trap_margin(np.concatenate([turned, turned])) > 0.5
    best = jnp.array([0.0, 1.0]) / np.sqrt(2)
    assert float(jm.hard_margin(predictor, (best, best), X, y)) == pytest.approx(1.0, rel=1e-12)
    best_cert = kkt_certificate(predictor, (best, best), X, y)
    assert best_cert.stationarity <= 1e-10 and best_cert.margin == pytest.approx(1.0, rel=1e-12)
    # Independent: max over the unit sphere of R^4 is 1 (Rayleigh quotient of [[0, D/2], [D/2, 0]]).
    rng = np.random.default_rng(0)
    found = max(
        -scipy.optimize.minimize(lambda w: -_trap_margin(w), rng.normal(size=4), method="BFGS").fun
        for _ in range(20)
    )
    assert found == pytest.approx(1.0, abs=1e-9)
    D = np.diag([1.0, 2.0])
    assert np.linalg.eigvalsh(np.block([[0 * D, D / 2], [D / 2, 0 * D]])).max() == pytest.approx(1)


# --------------------------------------------------------------------------- ReLU


def _kink_problem():
    """f = a1 relu(w1.x) + a2 relu(w2.x) with w1 = (0, 1), w2 = (2, 0), a = (1, 2).

    x_A = (1, 0) has w1.x_A = 0 exactly; x_B = (-2, 4) and x_A both have margin 4, x_C = (1, 1)
    has 5. At w~ = w/2 (margins 1) the KKT system forces lambda = (1, 1/4, 0) and relu'(0) = 1/2
    for (A, unit 1): neither one-sided gradient works, only their convex combination.
    """
    X = jnp.array([[1.0, 0.0], [-2.0, 4.0], [1.0, 1.0]])
    params = (jnp.array([[0.0, 1.0], [2.0, 0.0]]), jnp.array([1.0, 2.0]))
    return X, jnp.ones(3), params


def test_relu_kkt_point_on_a_kink_needs_the_clarke_hull():
    X, y, params = _kink_problem()
    assert float(params[0][0] @ X[0]) == 0.0  # exactly on the kink
    predictor = jm.relu_mlp(2, 2)
    cert = kkt_certificate(predictor, params, X, y)
    assert cert.stationarity <= 1e-10
    assert cert.complementary_slackness <= 1e-12
    assert cert.margin == pytest.approx(4.0 / 10.0, rel=1e-12)  # f = 4, ||w||² = 10
    np.testing.assert_allclose(cert.multipliers, [1.0, 0.25, 0.0], atol=1e-9)
    np.testing.assert_array_equal(cert.active, [True, True, False])
    # Autodiff alone: columns s_A = (0,0, 1,0, 0,1) (relu'(0) = 0) or (1/2,0, 1,0, 0,1) (= 1)
    # and s_B = (-1,2, 0,0, 2,0) against w~ = (0,1/2, 1,0, 1/2,1): residual² / ||w~||² is
    # (5/2 - 2 - 4/9) / (5/2) = 1/45, and (5/2 - 2 * 49/40) / (5/2) = 1/50 (2x2 normal equations).
    autodiff_only = kkt_certificate(predictor, params, X, y, clarke_samples=0, gate_sweeps=0)
    assert autodiff_only.stationarity == pytest.approx(1 / np.sqrt(45), rel=1e-10)
    right_side = jm.relu_mlp(2, 2, relu_grad_at_zero=1.0)
    one_sided = kkt_certificate(right_side, params, X, y, clarke_samples=0, gate_sweeps=0)
    assert one_sided.stationarity == pytest.approx(1 / np.sqrt(50), rel=1e-10)
    # The detection does not depend on the convention autodiff happens to use.
    assert kkt_certificate(right_side, params, X, y).stationarity <= 1e-10
    # The Clarke element it needs is relu'(0) = 1/2.
    middle = jm.relu_mlp(2, 2, relu_grad_at_zero=0.5)
    assert (
        kkt_certificate(middle, params, X, y, clarke_samples=0, gate_sweeps=0).stationarity <= 1e-12
    )
    # Without sampling, the gate fit finds that element itself: the gate of (A, unit 1) is the
    # one free variable, and lambda and relu'(0) = 1/2 are the solution above.
    gated = kkt_certificate(predictor, params, X, y, clarke_samples=0)
    assert gated.stationarity <= 1e-10
    np.testing.assert_allclose(gated.multipliers, [1.0, 0.25, 0.0], atol=1e-9)


def test_relu_net_representing_the_svm_is_kkt_away_from_kinks():
    """relu(ŵ.x)/2·(1/2) - relu(-ŵ.x)/2·(1/2) = ŵ.x/4 on Soudry's data: each unit alone holds
    the SVM dual of its class (both classes have the same support z's), so it is KKT."""
    X, y = jm.soudry_dataset(1)
    svm = jm.svm_direction(X, y)
    w = jnp.asarray(svm.direction)
    params = (jnp.stack([w, -w]) / 2, jnp.array([0.5, -0.5]))
    cert = kkt_certificate(jm.relu_mlp(2, 2), params, X, y)
    assert cert.stationarity <= 1e-8 and cert.complementary_slackness <= 1e-8
    assert cert.margin == pytest.approx(svm.margin / 4, rel=1e-12)


# --------------------------------------------------------------------------- alignment


def _direct_alignment(predictor, params, X, y):
    """cos(w, -∇ℒ) by plain autodiff of ℒ = Σ exp(-m): fine at moderate ||w||."""
    loss = lambda p: jnp.sum(jnp.exp(-y * jax.vmap(predictor.apply, (None, 0))(p, X)))  # noqa: E731
    g = _flat(jax.grad(loss)(params))
    w = _flat(params)
    return -(w @ g) / (np.linalg.norm(w) * np.linalg.norm(g))


@pytest.mark.parametrize("name", ["linear", "relu2", "relu3", "deep_linear3"])
def test_alignment_matches_plain_autodiff_at_moderate_norm(name, reference_data):
    X, y = reference_data
    predictor = {
        "linear": jm.linear(),
        "relu2": jm.relu_mlp(2, 8),
        "relu3": jm.relu_mlp(3, 6),
        "deep_linear3": jm.deep_linear(3, 4),
    }[name]
    params = predictor.init(jax.random.key(3), 5)
    value = float(alignment(predictor, params, X, y))
    assert value == pytest.approx(_direct_alignment(predictor, params, X, y), abs=1e-12)
    assert value < 1 - 1e-3


@pytest.mark.parametrize("depth", [2, 5])
def test_alignment_at_huge_norm_is_that_of_the_smallest_margin(depth, reference_data):
    """At ||w|| = 1e100, softmax(-m) is one-hot on argmin q, so the alignment is
    <θ, ∇q_i*(θ)> / ||∇q_i*(θ)||, with ||w||^L = 1e500 for depth 5 (never formed)."""
    X, y = reference_data
    predictor = jm.relu_mlp(depth, 6)
    theta = predictor.init(jax.random.key(1), 5)
    norm = np.linalg.norm(_flat(theta))
    theta = tuple(layer / norm for layer in theta)
    q = np.asarray(y * jax.vmap(predictor.apply, (None, 0))(theta, X))
    star = int(np.argmin(q))
    assert np.sort(q)[1] - q[star] > 1e-8  # a unique minimizer, so the limit is one-hot
    g = _flat(jax.grad(predictor.apply)(theta, X[star])) * float(y[star])
    expected = _flat(theta) @ g / np.linalg.norm(g)
    value = float(alignment(predictor, tuple(layer * 1e100 for layer in theta), X, y))
    assert np.isfinite(value) and value == pytest.approx(expected, abs=1e-12)


def test_alignment_tends_to_one_along_the_svm_ray_when_duals_are_equal():
    """-∇ℒ/ℒ = Σ p_i z_i; along c ŵ, p → uniform on the support set, so the limit is ∝ the
    mean support z, which is ∝ ŵ when the SVM duals are equal (Soudry's data: symmetric)."""
    X, y = jm.soudry_dataset(0)
    w = jm.svm_direction(X, y).direction
    assert float(alignment(jm.linear(), (jnp.asarray(w),), X, y)) < 1 - 1e-4
    assert float(alignment(jm.linear(), (jnp.asarray(100 * w),), X, y)) >= 1 - 1e-12
    # Exact ties in float64 (integer data, w = (c, c)) keep p uniform even at c = 1e100.
    X2, y2 = np.array([[1.0, 0.0], [0.0, 1.0], [-3.0, -1.0]]), np.array([1.0, 1.0, -1.0])
    for c in [1e2, 1e100]:
        value = float(alignment(jm.linear(), (jnp.array([c, c]),), X2, y2))
        assert value == pytest.approx(1.0, abs=1e-12)


def test_alignment_with_unequal_duals_needs_the_soudry_correction():
    """z = (1, 0), (0, 2): ŵ ∝ (1, 1/2), duals α = (1, 1/4). On the ray c ŵ the margins tie,
    p = (1/2, 1/2) and cos∠(ŵ, (1/2, 1)) = 0.8 for every c. Along Soudry's asymptote
    w = T ŵ + (0, ln 2), e^{-m} ∝ α, so -∇ℒ ∝ ŵ and the alignment is cos∠(w, ŵ) → 1."""
    X, y = np.array([[1.0, 0.0], [0.0, 2.0]]), np.ones(2)
    w_hat = np.array([1.0, 0.5])
    np.testing.assert_allclose(jm.svm_direction(X, y).direction, w_hat / np.linalg.norm(w_hat))
    for c in [1.0, 2.0**40, 1e100]:
        value = float(alignment(jm.linear(), (jnp.asarray(c * w_hat),), X, y))
        assert value == pytest.approx(0.8, abs=1e-12)
    values = []
    for T in [1.0, 10.0, 1e3, 1e6]:
        w = T * w_hat + np.array([0.0, np.log(2.0)])
        expected = w @ w_hat / (np.linalg.norm(w) * np.linalg.norm(w_hat))
        values.append(float(alignment(jm.linear(), (jnp.asarray(w),), X, y)))
        assert values[-1] == pytest.approx(expected, abs=1e-10)
    assert values == sorted(values) and values[-1] > 1 - 1e-12 and values[0] < 0.99


# --------------------------------------------------------------------------- bad input


def test_bad_input():
    X, y = jm.soudry_dataset(0)
    w = jnp.asarray(jm.svm_direction(X, y).direction)
    with pytest.raises(ValueError, match="does not separate"):
        kkt_certificate(jm.linear(), (-w,), X, y)
    with pytest.raises(ValueError, match="does not separate"):
        kkt_certificate(jm.linear(), (jnp.zeros(2),), X, y)
    with pytest.raises(ValueError, match="labels"):
        kkt_certificate(jm.linear(), (w,), X, np.where(y > 0, 1.0, 0.0))
    with pytest.raises(ValueError, match="examples"):
        kkt_certificate(jm.linear(), (w,), X, y[:-1])
    with pytest.raises(ValueError, match="params do not match"):
        kkt_certificate(jm.linear(), (jnp.ones(3),), X, y)
    with pytest.raises(ValueError, match="active_tol"):
        kkt_certificate(jm.linear(), (w,), X, y, active_tol=-1e-3)
    with pytest.raises(ValueError, match="clarke_samples"):
        kkt_certificate(jm.linear(), (w,), X, y, clarke_samples=2.5)
    with pytest.raises(TypeError, match="Predictor"):
        kkt_certificate("linear", (w,), X, y)
    with pytest.raises(ValueError, match="w = 0"):
        alignment(jm.linear(), (jnp.zeros(2),), X, y)
    with pytest.raises(ValueError, match="labels"):
        alignment(jm.linear(), (w,), X, 2 * y)
