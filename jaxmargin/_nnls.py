"""Non-negative least squares and relatives, by finite active-set methods (Lawson & Hanson 1974).

- `best_nnls`: min ||A x - b|| over x >= 0 (scipy, checked, with a textbook fallback).
- `verified_nnls`: the same, raising when no candidate meets the KKT conditions (references).
- `least_squares_with_inequalities`: min ||A x - b|| subject to G x >= h (LSI -> LDP -> NNLS).
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import solve_triangular
from scipy.optimize import nnls


def _nnls_is_optimal(A: np.ndarray, b: np.ndarray, x: np.ndarray, tol: float = 1e-9) -> bool:
    """NNLS KKT: the negative gradient A^T (b - A x) is <= 0, and 0 where x > 0."""
    descent = A.T @ (b - A @ x)
    return bool(np.all(x >= 0) and np.all(descent <= tol) and np.all(np.abs(descent[x > 0]) <= tol))


def _lawson_hanson_nnls(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Textbook Lawson & Hanson (1974, ch. 23) active-set NNLS, with lstsq subproblems."""
    n = A.shape[1]
    tol = 10 * np.finfo(float).eps * max(A.shape) * max(np.abs(A).sum(axis=0).max(), 1.0)
    x, passive = np.zeros(n), np.zeros(n, dtype=bool)
    for _ in range(10 * n + 100):
        descent = np.where(passive, -np.inf, A.T @ (b - A @ x))
        entering = int(np.argmax(descent))
        if passive.all() or descent[entering] <= tol:
            return x
        passive[entering] = True
        while True:  # Inner loop: step back towards x until the LS solution is positive.
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(A[:, passive], b, rcond=None)[0]
            if np.all(z[passive] > tol):
                x = z
                break
            blocking = passive & (z <= tol)
            x = x + np.min(x[blocking] / (x[blocking] - z[blocking])) * (z - x)
            passive &= x > tol
            x[~passive] = 0.0
    raise RuntimeError("Lawson-Hanson NNLS did not converge")


def best_nnls(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    """min ||A x - b|| over x >= 0: scipy's NNLS, checked against its KKT conditions, with the
    textbook Lawson-Hanson as fallback (scipy >= 1.12 can stop early on degenerate columns;
    observed on 1.17 with many tied support vectors, cf. scipy issues #21140, #25389). Where
    neither meets the KKT conditions the one with the smaller residual is returned: any x >= 0
    still gives a valid (if loose) certificate."""
    candidates = []
    try:
        candidates.append(nnls(A, b, maxiter=max(100, 20 * A.shape[1]))[0])
        if _nnls_is_optimal(A, b, candidates[0]):
            return candidates[0]
    except (RuntimeError, np.linalg.LinAlgError):  # iteration limit; singular subproblem
        pass
    try:
        candidates.append(_lawson_hanson_nnls(A, b))
    except RuntimeError:
        if not candidates:
            raise
    return min(candidates, key=lambda x: np.linalg.norm(A @ x - b))


def verified_nnls(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    """`best_nnls`, raising RuntimeError where its answer does not meet the KKT conditions
    (for the exact references, which must not return a loose answer)."""
    x = best_nnls(A, b)
    if not _nnls_is_optimal(A, b, x):
        raise RuntimeError("NNLS did not reach a KKT point; the SVM reference is unreliable here")
    return x


def least_squares_with_inequalities(
    A, b, G, h=None, ridge: float = 1e-14, strict: bool = True
) -> np.ndarray:
    """min ||A x - b|| subject to G x >= h (h = 0 by default), A of shape (m, n): Lawson & Hanson
    (1974, ch. 23). A QR factorisation of A (with ridge rows sqrt(ridge) I) turns it into least
    distance programming in y = R x - Q^T b (||A x - b||^2 = ||y||^2 + const), and that into
    NNLS on [G R^-1, h~]^T. The ridge (relative to A's columns, which should be of unit size)
    keeps R invertible when columns are dependent: the answer is then the minimiser of the
    ridged problem, which can be far from a minimiser of the original one in the dependent
    directions (its value is close: the gate fit, the caller here, re-evaluates it anyway).
    Returns x. Raises ValueError where the constraints are infeasible, and with `strict` also
    where x violates them by more than 1e-8 relative (an ill-conditioned R; a caller that
    projects x back onto the constraints, as the gate fit does, passes strict=False)."""
    n = A.shape[1]
    h = np.zeros(G.shape[0]) if h is None else np.asarray(h, float)
    # R alone (Q is never formed): the factor of [A; sqrt(ridge) I | b; 0] holds Q^T b in its last
    # column.
    augmented = np.column_stack(
        [np.vstack([A, np.sqrt(ridge) * np.eye(n)]), np.concatenate([b, np.zeros(n)])]
    )
    factor = np.linalg.qr(augmented, mode="r")
    R, Qb = factor[:n, :n], factor[:n, n]
    G_tilde = solve_triangular(R, G.T, trans="T").T  # G R^-1
    h_tilde = h - G_tilde @ Qb
    E = np.vstack([G_tilde.T, h_tilde[None, :]])
    f = np.zeros(n + 1)
    f[-1] = 1.0
    # Feasible: r = E u - f has r[-1] = -1 / (1 + ||y||^2) < 0 at the optimum; infeasible: r = 0.
    r = E @ best_nnls(E, f) - f
    if not r[-1] < 0.0:
        raise ValueError("least_squares_with_inequalities: the constraints are infeasible")
    x = solve_triangular(R, Qb - r[:n] / r[-1])
    slack = 1e-8 * (np.abs(G) @ np.abs(x) + np.abs(h) + 1e-300)
    if strict and np.any(G @ x - h < -slack):
        raise ValueError(
            "least_squares_with_inequalities: the constraints are infeasible (or "
            "too ill-conditioned to meet)"
        )
    return x
