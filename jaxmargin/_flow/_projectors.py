"""Orthogonal projections off the gradients of the kinks that a step holds (sliding pairs).

A pair (example i, unit k) that slides stays on its kink z_ik = 0: the step moves in the tangent
space of {z_ik = 0}, i.e. its velocity is projected off span{grad z_ik} (for a sliding mode this
projection is Filippov's equivalent control).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def tangent_projector(rows, active):
    """v -> v minus its component in span{rows[k] : active[k]} (rows need not be orthogonal)."""
    return projector_from_factor(projector_factor(rows, active))


def projector_factor(rows, active):
    """(normalised active rows, Cholesky factor of their Gram): what tangent_projector builds,
    to be kept where one projector serves many evaluations (a step's stages, its end and its
    redos)."""
    norms = jnp.linalg.norm(rows, axis=1, keepdims=True)
    R = jnp.where(active[:, None], rows / jnp.where(norms > 0, norms, 1.0), 0.0)
    gram = R @ R.T + jnp.diag(jnp.where(active, 1e-14, 1.0))
    return R, jax.scipy.linalg.cho_factor(gram)[0]


def projector_from_factor(factor):
    R, cholesky = factor

    def project(v):
        coefficients = jax.scipy.linalg.cho_solve((cholesky, False), R @ v)
        return v - R.T @ coefficients

    return project


def projected_in_row_space(gram, active):
    """u -> rows P v from u = rows v, P = tangent_projector(rows, active), all from the Gram
    rows rows^T (k x k): rows @ P v needs no vector of the parameter space. Why: projecting the
    k rows themselves through tangent_projector is a triangular solve with d right-hand sides;
    here it has k (docs/decisions.md D24)."""
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
    inverse = jnp.where(active & (norms > 0), 1.0 / jnp.where(norms > 0, norms, 1.0), 0.0)
    cross = gram * inverse[None, :]  # rows R^T, R the active rows normalised as in the projector
    normalised = inverse[:, None] * cross + jnp.diag(jnp.where(active, 1e-14, 1.0))
    factor = jax.scipy.linalg.cho_factor(normalised)

    def project(u):
        scaled = inverse[:, None] * u if u.ndim == 2 else inverse * u
        return u - cross @ jax.scipy.linalg.cho_solve(factor, scaled)

    return project
