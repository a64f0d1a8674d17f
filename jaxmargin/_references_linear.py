"""Exact numpy/scipy references for linear (bias-free) max-margin problems.

These solvers are deliberately independent of JAX and of any gradient-based or
iterative-approximate method: they are the ground truth that the gradient-flow
engine's limit directions are checked against. Both use finite active-set /
simplex methods whose answers are exact up to floating-point round-off.

* :func:`svm_direction` -- L2 hard-margin SVM without intercept (the limit
  direction of gradient descent on separable data for linear models).
* :func:`l1_max_margin` -- the l1 max-margin direction (the limit direction of
  depth-2 diagonal linear networks).
* :func:`soudry_dataset` -- the toy data of Soudry et al. (2018), Figure 1.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from scipy.optimize import OptimizeResult, linprog

from ._nnls import verified_nnls

__all__ = [
    "MaxMarginSolution",
    "svm_direction",
    "l1_max_margin",
    "l1_max_margin_is_unique",
    "soudry_dataset",
]

# Points whose normalized margin is within this relative distance of the
# minimum margin are reported as support vectors.
_SUPPORT_RTOL = 1e-8
_NOT_SEPARABLE = (
    "data are not linearly separable through the origin: no w satisfies "
    "y_i <w, x_i> > 0 for every i"
)
# HiGHS defaults to 1e-7 feasibility tolerances; 1e-10 is its tightest setting.
_HIGHS_OPTIONS = {
    "primal_feasibility_tolerance": 1e-10,
    "dual_feasibility_tolerance": 1e-10,
}


class MaxMarginSolution(NamedTuple):
    """Solution of a max-margin problem.

    Attributes:
        direction: Optimal direction, normalized in the problem's norm (L2 for
            :func:`svm_direction`, l1 for :func:`l1_max_margin`).
        margin: ``min_i y_i <direction, x_i>``, the optimal normalized margin.
        support: Sorted indices of the points attaining the margin.
    """

    direction: np.ndarray
    margin: float
    support: np.ndarray


def _validate(X: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    """Checks inputs and returns them as float64 arrays (raises ValueError)."""
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y)
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"X must be a non-empty 2-D array (n_samples, n_features); got {X.shape}")
    if not np.all(np.isfinite(X)):
        raise ValueError("X contains NaN or infinite values")
    if y.ndim != 1 or y.shape[0] != X.shape[0]:
        raise ValueError(
            f"y must be 1-D with one label per row of X; got shapes X {X.shape}, y {y.shape}"
        )
    if not (np.issubdtype(y.dtype, np.number) and np.all((y == 1) | (y == -1))):
        raise ValueError(f"labels y must be exactly -1 or +1; got values {np.unique(y)[:6]}")
    return X, y.astype(np.float64)


def _summarize(G: np.ndarray, direction: np.ndarray) -> MaxMarginSolution:
    """Packs a normalized direction with its margin and support set."""
    margins = G @ direction
    margin = float(margins.min())
    support = np.flatnonzero(margins <= margin + _SUPPORT_RTOL * abs(margin))
    return MaxMarginSolution(direction, margin, support)


def svm_direction(X: Any, y: Any) -> MaxMarginSolution:
    """Bias-free L2 hard-margin SVM: ``min ||w||_2  s.t.  y_i <w, x_i> >= 1``.

    With ``z_i = y_i x_i`` this is a Least Distance Programming (LDP) problem,
    solved exactly by Lawson & Hanson's reduction to NNLS: with
    ``E = [Z^T; 1^T]`` and ``f = (0, ..., 0, 1)``, solve ``min ||E u - f||``
    over ``u >= 0`` (scipy's active-set ``nnls``, its KKT conditions verified, with
    a textbook Lawson-Hanson fallback); the residual ``r = E u - f``
    satisfies ``||r||^2 = -r_{d+1}``, vanishing iff the constraints are
    incompatible, and otherwise ``w_j = -r_j / r_{d+1}``. The answer is then
    polished: on the support set ``S`` (margins within 1e-9 of 1) the
    equality-constrained minimum-norm solution ``w = Z_S^+ 1`` (``lstsq``) is
    accepted if it is still feasible and not longer. Duplicated points and
    degenerate supports (more support vectors than dimensions) are fine: NNLS
    and ``lstsq`` do not need the active rows to be independent. Margins below
    ~1e-7 times the data scale may be reported as non-separable.

    Args:
        X: Inputs, shape ``(n, d)``, finite.
        y: Labels in ``{-1, +1}``, shape ``(n,)``.

    Returns:
        ``MaxMarginSolution`` with the unit-L2 direction ``w / ||w||``, margin
        ``1 / ||w||`` and the support-vector indices.

    Raises:
        ValueError: On invalid input, or if the data are not linearly
            separable through the origin.
        RuntimeError: If no NNLS solver reaches a KKT point.

    References:
        C. L. Lawson and R. J. Hanson, *Solving Least Squares Problems*,
        Prentice-Hall, 1974, ch. 23 (LDP via NNLS).
    """
    X, y = _validate(X, y)
    # The direction is scale invariant; unit-scale data keep NNLS well conditioned.
    scale = np.abs(X).max()
    if scale == 0:
        raise ValueError(_NOT_SEPARABLE)
    Z = y[:, None] * X / scale
    n, d = Z.shape
    E = np.vstack([Z.T, np.ones((1, n))])
    f = np.zeros(d + 1)
    f[-1] = 1.0
    u = verified_nnls(E, f)
    r = E @ u - f
    if not r[-1] < 0:
        raise ValueError(_NOT_SEPARABLE)
    w = -r[:d] / r[-1]
    # A strictly positive margin certifies separability exactly; garbage from a
    # round-off-sized residual (the infeasible case) cannot pass this check.
    if not (np.all(np.isfinite(w)) and (Z @ w).min() >= 1 - 1e-6):
        raise ValueError(_NOT_SEPARABLE)
    active = Z @ w <= 1 + 1e-9
    polished = np.linalg.lstsq(Z[active], np.ones(int(active.sum())), rcond=None)[0]
    not_longer = np.linalg.norm(polished) <= np.linalg.norm(w) * (1 + 1e-12)
    if (Z @ polished).min() >= 1 - 1e-12 and not_longer:
        w = polished
    return _summarize(y[:, None] * X, w / np.linalg.norm(w))


def _l1_lp(
    Z: np.ndarray,
    extra_ub: tuple[np.ndarray, float] | None = None,
    cost: np.ndarray | None = None,
) -> OptimizeResult:
    """Solves ``min cost.z`` s.t. ``Z (z+ - z-) >= 1``, ``z >= 0`` with HiGHS."""
    n, d = Z.shape
    A_ub, b_ub = -np.hstack([Z, -Z]), -np.ones(n)
    if extra_ub is not None:
        A_ub, b_ub = np.vstack([A_ub, extra_ub[0]]), np.append(b_ub, extra_ub[1])
    cost = np.ones(2 * d) if cost is None else cost
    return linprog(
        cost, A_ub=A_ub, b_ub=b_ub, bounds=(0, None), method="highs", options=_HIGHS_OPTIONS
    )


def l1_max_margin(X: Any, y: Any) -> MaxMarginSolution:
    """l1 max-margin direction: ``min ||b||_1  s.t.  y_i <b, x_i> >= 1``.

    Solved as a linear program in ``b = b+ - b-`` (``b+, b- >= 0``) with
    ``scipy.optimize.linprog(method="highs")``, whose simplex answer is a
    vertex computed from a basis factorization (exact up to round-off).
    Uniqueness is not checked here (the optimum may be a whole face); use
    :func:`l1_max_margin_is_unique` for that.

    Args:
        X: Inputs, shape ``(n, d)``, finite.
        y: Labels in ``{-1, +1}``, shape ``(n,)``.

    Returns:
        ``MaxMarginSolution`` with the unit-l1 direction ``b / ||b||_1``,
        margin ``1 / ||b||_1`` and the indices attaining it.

    Raises:
        ValueError: On invalid input or non-separable data.
        RuntimeError: If HiGHS fails for another reason.

    References:
        S. Gunasekar, J. Lee, D. Soudry, N. Srebro, "Implicit Bias of Gradient
        Descent on Linear Convolutional Networks", NeurIPS 2018.
    """
    X, y = _validate(X, y)
    scale = np.abs(X).max()
    if scale == 0:
        raise ValueError(_NOT_SEPARABLE)
    Z = y[:, None] * X / scale
    result = _l1_lp(Z)
    if result.status == 2:
        raise ValueError(_NOT_SEPARABLE)
    if result.status != 0:
        raise RuntimeError(f"linprog (HiGHS) failed: {result.message}")
    d = X.shape[1]
    beta = result.x[:d] - result.x[d:]
    return _summarize(y[:, None] * X, beta / np.abs(beta).sum())


def l1_max_margin_is_unique(X: Any, y: Any, rtol: float = 1e-7) -> bool:
    """Whether the l1 max-margin direction is unique.

    Minimizes and maximizes every coordinate of ``b`` over the optimal face
    ``{b : y_i <b, x_i> >= 1, ||b||_1 <= OPT}`` (``2 d`` extra LPs).

    Args:
        X: Inputs, shape ``(n, d)``.
        y: Labels in ``{-1, +1}``, shape ``(n,)``.
        rtol: Coordinate spread, relative to ``OPT``, above which the
            optimum is declared non-unique.

    Returns:
        True if every coordinate's range over the optimal face is within tolerance.
    """
    X, y = _validate(X, y)
    solution = l1_max_margin(X, y)
    Z = y[:, None] * X / np.abs(X).max()
    d = X.shape[1]
    optimum = np.abs(solution.direction / (Z @ solution.direction).min()).sum()
    face = (np.ones(2 * d), optimum * (1 + 1e-10))
    for j in range(d):
        unit = np.zeros(2 * d)
        unit[j], unit[d + j] = 1.0, -1.0
        low, high = _l1_lp(Z, face, unit), _l1_lp(Z, face, -unit)
        if low.status != 0 or high.status != 0:
            raise RuntimeError(f"linprog (HiGHS) failed on the optimal face: {low.message}")
        if -high.fun - low.fun > rtol * optimum:
            return False
    return True


def soudry_dataset(
    key_or_seed: Any = 0, n_extra_per_class: int = 6
) -> tuple[np.ndarray, np.ndarray]:
    """Toy data of Soudry et al. (2018), Figure 1, with known max-margin answer.

    Support points ``(0.5, 1.5)``, ``(1.5, 0.5)`` (label +1) and their negatives
    (label -1), then ``n_extra_per_class`` random points per class whose margin
    along ``(1, 1)/sqrt(2)`` lies in ``[sqrt(2) + 0.5, sqrt(2) + 2.5]``, strictly
    beyond the support points. The bias-free SVM direction is ``(1, 1)/sqrt(2)``
    with margin ``sqrt(2)``, attained exactly at rows 0-3.

    Args:
        key_or_seed: Anything ``numpy.random.default_rng`` accepts: an int, a
            ``Generator``, or an array of non-negative ints such as
            ``jax.random.key_data(key)``.
        n_extra_per_class: Number of random non-support points per class.

    Returns:
        ``(X, y)`` with ``X`` of shape ``(4 + 2 n_extra_per_class, 2)``.

    References:
        D. Soudry, E. Hoffer, M. S. Nacson, S. Gunasekar, N. Srebro, "The
        Implicit Bias of Gradient Descent on Separable Data", JMLR 19, 2018.
    """
    seed_like = (int, np.integer, np.random.Generator, np.random.SeedSequence)
    if not isinstance(key_or_seed, seed_like):  # e.g. a raw JAX key: uint32 words
        key_or_seed = np.asarray(key_or_seed, dtype=np.uint64).ravel()
    rng = np.random.default_rng(key_or_seed)
    along_dir = np.array([1.0, 1.0]) / np.sqrt(2)
    across_dir = np.array([1.0, -1.0]) / np.sqrt(2)

    def far_points() -> np.ndarray:
        along = np.sqrt(2) + 0.5 + rng.uniform(0.0, 2.0, n_extra_per_class)
        across = rng.uniform(-2.0, 2.0, n_extra_per_class)
        return along[:, None] * along_dir + across[:, None] * across_dir

    support = np.array([[0.5, 1.5], [1.5, 0.5]])
    X = np.vstack([support, -support, far_points(), -far_points()])
    extra_labels = np.ones(n_extra_per_class)
    y = np.concatenate([np.ones(2), -np.ones(2), extra_labels, -extra_labels])
    return X, y
