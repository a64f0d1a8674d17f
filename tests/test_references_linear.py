"""Tests for the exact linear max-margin references.

Every check compares against an independently computed answer: a planted
optimum, the KKT conditions (certified with a separate NNLS), scikit-learn's
libsvm, or brute-force enumeration of LP vertices.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.optimize import nnls
from sklearn.svm import SVC

from jaxmargin._nnls import _lawson_hanson_nnls
from jaxmargin._references_linear import (
    l1_max_margin,
    l1_max_margin_is_unique,
    soudry_dataset,
    svm_direction,
)

SQRT2 = np.sqrt(2.0)


def planted_separable(rng: np.random.Generator, n: int, d: int, gap: float = 0.05):
    """Gaussian inputs labelled by a random hyperplane through the origin, minus a slab."""
    normal = rng.normal(size=d)
    X = rng.normal(size=(n, d))
    scores = X @ normal / np.linalg.norm(normal)
    keep = np.abs(scores) > gap
    return X[keep], np.sign(scores[keep])


def planted_degenerate(rng: np.random.Generator, d: int, n_pairs: int):
    """Data whose SVM optimum is a known unit vector u with 2*n_pairs (> d) support vectors.

    Support points z = u +- v with v orthogonal to u all have margin exactly 1, and
    u = (z_plus + z_minus) / 2 lies in their cone, so u satisfies the KKT conditions.
    The remaining points have margin >= 1.5; some support points are duplicated.
    """
    u = rng.normal(size=d)
    u /= np.linalg.norm(u)
    offsets = rng.normal(size=(n_pairs, d)) @ (np.eye(d) - np.outer(u, u))
    far = rng.normal(size=(20, d))
    far += (1.5 + np.abs(far @ u) - far @ u)[:, None] * u
    Z = np.vstack([u + offsets, u - offsets, far, u + offsets[:2]])
    y = rng.choice([-1.0, 1.0], size=len(Z))
    return y[:, None] * Z, y, u


def assert_svm_kkt(X: np.ndarray, y: np.ndarray, solution) -> float:
    """Checks feasibility and stationarity of w = direction / margin; returns the residual."""
    Z = y[:, None] * X
    w = solution.direction / solution.margin
    margins = Z @ w
    assert np.linalg.norm(solution.direction) == pytest.approx(1.0, abs=1e-12)
    assert margins.min() == pytest.approx(1.0, abs=1e-10)
    active = np.flatnonzero(margins <= 1 + 1e-8)
    np.testing.assert_array_equal(solution.support, active)
    # Stationarity: w must be a nonnegative combination of the active z_i.
    _, residual = nnls(Z[active].T, w)
    assert residual <= 1e-9 * np.linalg.norm(w)
    return residual / np.linalg.norm(w)


def test_soudry_dataset_svm_matches_known_answer():
    X, y = soudry_dataset(0)
    assert X.shape == (16, 2) and set(y) == {-1.0, 1.0}
    solution = svm_direction(X, y)
    np.testing.assert_allclose(solution.direction, np.ones(2) / SQRT2, rtol=0, atol=1e-9)
    assert solution.margin == pytest.approx(SQRT2, abs=1e-9)
    np.testing.assert_array_equal(solution.support, [0, 1, 2, 3])
    # The random points are strictly farther than the support points.
    assert (y[4:] * (X[4:] @ np.ones(2)) / SQRT2).min() > SQRT2 + 0.5 - 1e-12


def test_soudry_dataset_seeding_and_size():
    X, y = soudry_dataset(np.int64(5), n_extra_per_class=10)
    assert X.shape == (24, 2) and y.shape == (24,)
    np.testing.assert_array_equal(X, soudry_dataset(5, n_extra_per_class=10)[0])
    key_words = np.array([0, 42], dtype=np.uint32)  # the layout of a raw JAX PRNG key
    np.testing.assert_array_equal(soudry_dataset(key_words)[0], soudry_dataset(key_words)[0])
    assert not np.array_equal(soudry_dataset(1)[0], soudry_dataset(2)[0])
    solution = svm_direction(X, y)
    np.testing.assert_allclose(solution.direction, np.ones(2) / SQRT2, rtol=0, atol=1e-9)


@pytest.mark.parametrize("d", [2, 5, 20, 50])
@pytest.mark.parametrize("n", [10, 60, 200])
def test_svm_kkt_on_random_separable_data(d: int, n: int):
    rng = np.random.default_rng(1000 * d + n)
    X, y = planted_separable(rng, n, d)
    X, y = np.vstack([X, X[:3]]), np.concatenate([y, y[:3]])  # duplicated points
    assert_svm_kkt(X, y, svm_direction(X, y))


# Seeds (10, 18) ... (30, 15) are instances where scipy 1.17's nnls stops at a
# non-KKT point, exercising the verified Lawson-Hanson fallback.
@pytest.mark.parametrize(
    "d,seed",
    [(2, 0), (3, 1), (5, 2), (10, 18), (10, 21), (20, 11), (20, 20), (30, 0), (30, 15), (50, 3)],
)
def test_svm_degenerate_support_recovers_planted_direction(d: int, seed: int):
    X, y, u = planted_degenerate(np.random.default_rng(seed), d, n_pairs=d + 3)
    solution = svm_direction(X, y)
    assert len(solution.support) > d
    np.testing.assert_allclose(solution.direction, u, rtol=0, atol=1e-9)
    assert solution.margin == pytest.approx(1.0, abs=1e-9)
    assert_svm_kkt(X, y, solution)


@pytest.mark.parametrize("seed", range(5))
def test_textbook_nnls_satisfies_kkt_and_matches_scipy(seed: int):
    rng = np.random.default_rng(seed)
    A, b = rng.normal(size=(30, 12)), rng.normal(size=30)
    x = _lawson_hanson_nnls(A, b)
    descent = A.T @ (b - A @ x)
    assert x.min() >= 0 and descent.max() <= 1e-10
    np.testing.assert_allclose(descent[x > 0], 0.0, atol=1e-10)
    np.testing.assert_allclose(x, nnls(A, b)[0], rtol=0, atol=1e-10)


def test_svm_is_scale_invariant():
    X, y = planted_separable(np.random.default_rng(7), 50, 4)
    base, scaled = svm_direction(X, y), svm_direction(1e6 * X, y)
    np.testing.assert_allclose(scaled.direction, base.direction, rtol=0, atol=1e-9)
    assert scaled.margin == pytest.approx(1e6 * base.margin, rel=1e-9)


@pytest.mark.parametrize("d", [2, 5, 20, 50])
def test_svm_agrees_with_sklearn_on_symmetrized_data(d: int):
    X, y = planted_separable(np.random.default_rng(d + 1), 60, d)
    # Adding (-x, -y) leaves the bias-free problem unchanged and makes b = 0 optimal.
    X_sym, y_sym = np.vstack([X, -X]), np.concatenate([y, -y])
    clf = SVC(kernel="linear", C=1e10, tol=1e-10).fit(X_sym, y_sym)
    coef = clf.coef_[0] / np.linalg.norm(clf.coef_[0])
    solution = svm_direction(X, y)
    angle = 2 * np.arcsin(np.linalg.norm(coef - solution.direction) / 2)
    # libsvm caches kernel values in float32, so ~1e-6 is the best it reaches.
    assert angle <= 1e-5
    assert abs(clf.intercept_[0]) <= 1e-8 * np.linalg.norm(clf.coef_[0])
    np.testing.assert_array_equal(np.unique(clf.support_ % len(y)), solution.support)


NOT_SEPARABLE_CASES = {
    "x_and_minus_x_same_label": (np.array([[1.0, 2.0], [-1.0, -2.0]]), np.array([1, 1])),
    "needs_intercept_1d": (np.array([[1.0], [2.0]]), np.array([1, -1])),
    "zero_point": (np.array([[0.0, 0.0], [1.0, 0.0]]), np.array([1, 1])),
}


@pytest.mark.parametrize("solver", [svm_direction, l1_max_margin])
@pytest.mark.parametrize("case", sorted(NOT_SEPARABLE_CASES))
def test_non_separable_raises(solver, case: str):
    with pytest.raises(ValueError, match="separable"):
        solver(*NOT_SEPARABLE_CASES[case])


def brute_force_l1(X: np.ndarray, y: np.ndarray):
    """Enumerates basic solutions of min 1.z s.t. [Z, -Z] z >= 1, z >= 0.

    Returns the optimal value and the distinct optimal beta = z+ - z-; the optimal
    face is a bounded polytope, so the optimum is unique iff only one beta remains.
    """
    Z = y[:, None] * X
    n, d = Z.shape
    rows = np.vstack([np.hstack([Z, -Z]), np.eye(2 * d)])
    rhs = np.concatenate([np.ones(n), np.zeros(2 * d)])
    vertices = []
    for chosen in itertools.combinations(range(n + 2 * d), 2 * d):
        A = rows[list(chosen)]
        if abs(np.linalg.det(A)) < 1e-10:
            continue
        z = np.linalg.solve(A, rhs[list(chosen)])
        if np.all(rows @ z >= rhs - 1e-10):
            vertices.append(z)
    vertices = np.array(vertices)
    values = vertices.sum(axis=1)
    best = values.min()
    betas = vertices[values <= best + 1e-9 * best]
    betas = betas[:, :d] - betas[:, d:]
    distinct = [
        b for i, b in enumerate(betas) if not any(np.allclose(b, c, atol=1e-9) for c in betas[:i])
    ]
    return best, distinct


def assert_l1_matches_brute_force(X: np.ndarray, y: np.ndarray) -> None:
    best, optimal_betas = brute_force_l1(X, y)
    solution = l1_max_margin(X, y)
    assert 1.0 / solution.margin == pytest.approx(best, rel=1e-9)
    assert np.abs(solution.direction).sum() == pytest.approx(1.0, abs=1e-12)
    assert l1_max_margin_is_unique(X, y) == (len(optimal_betas) == 1)
    if len(optimal_betas) == 1:
        np.testing.assert_allclose(solution.direction, optimal_betas[0] / best, rtol=0, atol=1e-9)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("d,n", [(2, 5), (2, 8), (3, 6), (3, 8)])
def test_l1_lp_matches_vertex_enumeration(seed: int, d: int, n: int):
    X, y = planted_separable(np.random.default_rng(seed), 3 * n, d, gap=0.1)
    assert_l1_matches_brute_force(X[:n], y[:n])


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("d", [2, 3])
def test_l1_lp_matches_vertex_enumeration_on_integer_data(seed: int, d: int):
    # Small integer data often have a whole optimal face (several seeds here do).
    rng = np.random.default_rng(100 + seed)
    X = rng.integers(-3, 4, size=(40, d)).astype(float)
    scores = X @ np.concatenate([[1], rng.integers(-2, 3, size=d - 1)])
    keep = scores != 0
    assert_l1_matches_brute_force(X[keep][:6], np.sign(scores[keep])[:6])


def test_l1_known_unique_and_non_unique_answers():
    X, y = soudry_dataset(3)
    solution = l1_max_margin(X, y)
    np.testing.assert_allclose(solution.direction, [0.5, 0.5], rtol=0, atol=1e-12)
    assert solution.margin == pytest.approx(1.0, abs=1e-12)
    assert l1_max_margin_is_unique(X, y)
    # b1 + b2 >= 1 and 2 b1 + b2 >= 1: every (t, 1 - t), t in [0, 1], is optimal.
    X_flat, y_flat = np.array([[1.0, 1.0], [2.0, 1.0]]), np.array([1, 1])
    assert l1_max_margin(X_flat, y_flat).margin == pytest.approx(1.0, abs=1e-12)
    assert not l1_max_margin_is_unique(X_flat, y_flat)
    assert len(brute_force_l1(X_flat, y_flat)[1]) > 1


BAD_INPUTS = {
    "labels": (np.ones((3, 2)), np.array([0, 1, 1])),
    "NaN": (np.array([[1.0, np.nan], [1.0, 1.0]]), np.array([1, -1])),
    "shape": (np.ones((3, 2)), np.array([1, -1])),
    "2-D": (np.ones(3), np.array([1, -1, 1])),
}


@pytest.mark.parametrize("solver", [svm_direction, l1_max_margin])
@pytest.mark.parametrize("problem", sorted(BAD_INPUTS))
def test_bad_input_raises_naming_problem(solver, problem: str):
    with pytest.raises(ValueError, match=problem):
        solver(*BAD_INPUTS[problem])
