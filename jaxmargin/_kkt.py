"""KKT certificates for the limit directions of gradient flow, and the alignment of w with -∇ℒ.

Lyu & Li (2020, Thm 4.4): the limit direction θ of gradient flow on the exponential loss is, after
rescaling, a KKT point of

    min ½ ||w||²   s.t.   m_i(w) = y_i f(x_i; w) ≥ 1  for all i,

i.e. w = Σ_i λ_i s_i with s_i ∈ ∂m_i(w) (Clarke), λ ≥ 0 and λ_i (m_i(w) - 1) = 0. A KKT point
need not be a (local) max-margin direction (Vardi, Shamir & Srebro 2022).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from ._clarke import chain_rule_element, margin_jacobian, sampled_clarke_subgradients
from ._clarke_gates import fit_gates, kinked_units
from ._margins import polar
from ._nnls import best_nnls
from ._predictors import Params, Predictor
from ._validation import check_all

# Gradient-sampling radius relative to ||w~||: pre-activations within about this relative
# distance of 0 count as kinks; extrapolated samples are exact to O(radius²) elsewhere.
_KINK_RADIUS = 1e-9
# Sampled elements that differ from the autodiff one by more than this (relative) are not
# round-off: the example sits on a kink, or autodiff left the Clarke set (Kakade & Lee 2018).
_KINK_RTOL = 1e-7


class KKTCertificate(NamedTuple):
    """Result of `kkt_certificate` (all quantities at the rescaled point w~, min_i m_i(w~) = 1).

    Attributes:
        stationarity: ε = ||w~ - Σ_i λ_i s_i|| / ||w~||, relative; the absolute ε of Lyu & Li
            is this times ||w~|| = q_min^{-1/L}.
        complementary_slackness: δ = Σ_i λ_i (m_i(w~) - 1) >= 0.
        margin: q_min = min_i m_i(w / ||w||), the normalized hard margin of the direction.
        multipliers: λ, shape (n,), zero off the active set.
        active: boolean mask (n,) of the near-active examples, m_i(w~) <= 1 + active_tol.
    """

    stationarity: float
    complementary_slackness: float
    margin: float
    multipliers: np.ndarray
    active: np.ndarray


def _distinct(rows: np.ndarray, tol: float) -> np.ndarray:
    """Rows that differ from every earlier kept row by more than tol (near-duplicate samples
    only make the NNLS subproblems ill-conditioned)."""
    kept = [rows[0]]
    for row in rows[1:]:
        if min(np.linalg.norm(row - k) for k in kept) > tol:
            kept.append(row)
    return np.stack(kept)


def _subgradient_columns(predictor, params, x, label, autodiff, key, num_samples):
    """Clarke elements of m(w) = label * f(x; w) used for one example: the autodiff element,
    or, where sampled limiting gradients disagree with it, the distinct samples (their convex
    hull lies in the Clarke set; the autodiff element may not, see docs/background.md §5)."""
    if num_samples == 0:
        return autodiff[None, :]
    samples = np.asarray(
        sampled_clarke_subgradients(
            lambda w: label * predictor.apply(w, x),
            params,
            key,
            num_samples=num_samples,
            radius=_KINK_RADIUS,
        )
    )
    tol = _KINK_RTOL * max(np.linalg.norm(autodiff), np.max(np.linalg.norm(samples, axis=1)))
    if np.max(np.linalg.norm(samples - autodiff, axis=1)) <= tol:
        return autodiff[None, :]
    return _distinct(samples, tol)


def kkt_certificate(
    predictor: Predictor,
    params: Params,
    X,
    y,
    *,
    active_tol: float = 1e-3,
    key=None,
    clarke_samples: int = 16,
    gate_sweeps: int = 100,
) -> KKTCertificate:
    """How far the direction of `params` is from a KKT point of the max-margin problem.

    The direction θ = w/||w|| is rescaled to w~ = θ / q_min^{1/L}, so that min_i m_i(w~) = 1.
    λ >= 0 is fitted by non-negative least squares of w~ on the subgradients of the near-active
    margins. Following Lyu & Li's (ε, δ)-KKT points, ε = ||w~ - Σ λ_i s_i|| (reported relative
    to ||w~||, so it does not depend on the scale of the data) and δ = Σ λ_i (m_i(w~) - 1).
    An example on a kink (a pre-activation within about 1e-9 ||w~|| of 0) contributes all its
    distinct sampled Clarke elements as columns (the cone over their convex hull); its λ_i is
    the sum of their weights. Any λ >= 0 bounds ε from above, so sampled elements that miss
    part of the Clarke set can only make the certificate conservative, never falsely small.
    ε jumps with the active set: an example just beyond 1 + active_tol carries no multiplier.

    ReLU-type networks (`predictor.kinks`): sampling cannot resolve an example with dozens of
    units on kinks (2^K pieces). There the Clarke elements are also chosen through the kinked
    units' activation derivatives ("gates" in [0, 1], `_clarke_gates.py`): the least-squares
    fit over multipliers and gates, exact for one hidden layer and block coordinate descent
    over the layers for deeper nets; the smaller of the two residuals is reported (both are
    upper bounds). Units within a first-order distance of about 1e-9 ||w~|| of their kink
    count as on it.

    Args:
        predictor: an L-homogeneous `Predictor`.
        params: the point w (only its direction matters).
        X: inputs, shape (n, ...). y: labels in {-1, +1}, shape (n,).
        active_tol: examples with m_i(w~) <= 1 + active_tol may carry a multiplier.
        key: jax.random key for gradient sampling (default key 0).
        clarke_samples: rays sampled per active example to detect kinks; 0 uses the autodiff
            element only (relu'(0) as the predictor sets it).
        gate_sweeps: ReLU-type networks: passes over the hidden layers of the gate fit (it
            stops earlier when a pass improves ε by less than 0.1%); 0 turns the fit off.

    Returns:
        KKTCertificate(stationarity, complementary_slackness, margin, multipliers, active).

    Raises:
        ValueError: on invalid input, or if min_i m_i(θ) <= 0.

    References:
        K. Lyu, J. Li, "Gradient descent maximizes the margin of homogeneous neural networks",
        ICLR 2020, Definition of (ε, δ)-KKT points and Theorem 4.4.
    """
    predictor, params, X, y = check_all(predictor, params, X, y)
    if not (np.isfinite(active_tol) and active_tol >= 0):
        raise ValueError(f"active_tol must be finite and >= 0, got {active_tol}")
    is_count = isinstance(clarke_samples, int) and not isinstance(clarke_samples, bool)
    if not is_count or clarke_samples < 0:
        raise ValueError(f"clarke_samples must be an integer >= 0, got {clarke_samples!r}")
    if not isinstance(gate_sweeps, int) or isinstance(gate_sweeps, bool) or gate_sweeps < 0:
        raise ValueError(f"gate_sweeps must be an integer >= 0, got {gate_sweeps!r}")
    _, theta = polar(predictor, params)
    q = np.asarray(y * jax.vmap(predictor.apply, in_axes=(None, 0))(theta, X))
    q_min = float(np.min(q))
    if not q_min > 0:
        raise ValueError(f"direction does not separate the data (min normalized margin = {q_min})")
    params_tilde = tuple(layer * q_min ** (-1.0 / predictor.degree) for layer in theta)
    m_tilde = q / q_min  # homogeneity: m_i(w~) = q_i / q_min
    active = m_tilde <= 1.0 + active_tol
    index = np.flatnonzero(active)
    jacobian = np.asarray(margin_jacobian(predictor, params_tilde, X[index], y[index]))
    key = jax.random.key(0) if key is None else key
    blocks = [
        _subgradient_columns(
            predictor,
            params_tilde,
            X[i],
            y[i],
            row,
            jax.random.fold_in(key, int(i)),
            clarke_samples,
        )
        for i, row in zip(index, jacobian)
    ]
    columns = np.concatenate(blocks)
    owner = np.repeat(index, [len(block) for block in blocks])
    # Unit-norm target and columns keep NNLS well scaled; λ is mapped back afterwards.
    w = np.asarray(ravel_pytree(params_tilde)[0])
    w_norm = np.linalg.norm(w)
    col_norms = np.linalg.norm(columns, axis=1)
    usable = col_norms > 0
    unit_columns = columns[usable] / col_norms[usable, None]
    weights = best_nnls(unit_columns.T, w / w_norm)
    stationarity = np.linalg.norm(w / w_norm - weights @ unit_columns)
    multipliers = np.zeros(q.shape[0])
    np.add.at(multipliers, owner[usable], weights * w_norm / col_norms[usable])
    if predictor.kinks is not None and gate_sweeps > 0:
        kinked = kinked_units(predictor, params_tilde, X[index], _KINK_RADIUS)
        if any(mask.any() for mask in kinked):
            fit = fit_gates(
                predictor, params_tilde, X[index], y[index], w / w_norm, kinked, sweeps=gate_sweeps
            )
            if fit.residual < stationarity:
                stationarity = fit.residual
                multipliers = np.zeros(q.shape[0])
                multipliers[index] = fit.weights * w_norm
    slackness = float(multipliers @ (m_tilde - 1.0))
    return KKTCertificate(float(stationarity), slackness, q_min, multipliers, active)


def alignment(predictor: Predictor, params: Params, X, y) -> jax.Array:
    """cos∠(w, -∇ℒ(w)) for the exponential loss ℒ = Σ_i exp(-m_i(w)), scale-free.

    -∇ℒ/ℒ = Σ_i p_i ∇m_i(w), p = softmax(-m), and ∇m_i(w) = ||w||^{L-1} ∇q_i(θ) (autodiff
    elements), so the direction is that of Σ_i p_i ∇q_i(θ); p comes from the normalized
    margins and ln ||w||^L (`chain_rule_element`), never from exp(-m). Finite for ||w|| up to
    1e100 and beyond; there, margins that tie in exact arithmetic but not after round-off
    (gap ~1e-16 times ||w||^L >> 1) make p one-hot on one of them.

    Args:
        predictor: an L-homogeneous `Predictor`.
        params: the point w != 0.
        X: inputs, shape (n, ...). y: labels in {-1, +1}, shape (n,).

    Returns:
        A scalar in [-1, 1] (NaN where ∇ℒ = 0).

    Raises:
        ValueError: on invalid input or w = 0.

    References:
        Z. Ji, M. Telgarsky, "Directional convergence and alignment in deep learning",
        NeurIPS 2020.
    """
    predictor, params, X, y = check_all(predictor, params, X, y)
    _, theta = polar(predictor, params)
    theta_flat = ravel_pytree(theta)[0]
    if not float(jnp.linalg.norm(theta_flat)) > 0:
        raise ValueError("alignment is undefined at w = 0")
    v = chain_rule_element(predictor, params, X, y, margin_jacobian(predictor, theta, X, y))
    return theta_flat @ v / jnp.linalg.norm(v)
