"""A small box-constrained convex QP, the min-norm element of a Clarke set of kink derivatives."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def box_qp(H, c, lo, hi, free, iterations):
    """argmin_b  b^T H b + 2 c^T b  over lo <= b <= hi; entries with free = False stay at 0.

    H is symmetric positive semidefinite (a Gram matrix). Accelerated projected gradient (FISTA,
    Beck & Teboulle 2009) with a Gershgorin bound on the Lipschitz constant (no eigenvalue
    routine: LAPACK eigen-solvers deadlocked under shard_map on emulated CPU devices), then a
    polish: the normal equations solved exactly on the interior set it found, kept when it
    lowers the objective.
    """
    lo = jnp.where(free, lo, 0.0)
    hi = jnp.where(free, hi, 0.0)
    k = H.shape[0]
    lipschitz = jnp.maximum(2.0 * jnp.max(jnp.sum(jnp.abs(H), axis=1)), 1e-300)

    def project(b):
        return jnp.clip(b, lo, hi)

    def accelerated_step(_, state):
        b, v, t = state
        b_next = project(v - 2.0 * (H @ v + c) / lipschitz)
        t_next = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t * t))
        return b_next, b_next + ((t - 1.0) / t_next) * (b_next - b), t_next

    start = 0.5 * (lo + hi)
    b, _, _ = jax.lax.fori_loop(0, iterations, accelerated_step, (start, start, 1.0))

    def objective(x):
        return x @ (H @ x) + 2.0 * (c @ x)

    def active_set_step(_, b):
        # Free the interior entries and the bound ones whose gradient points inwards (a KKT
        # violation), solve the normal equations on them exactly, keep it if it lowers the
        # objective. FISTA alone left sliding kinks at a bound: their field then chattered.
        width = hi - lo
        gradient = H @ b + c
        tolerance = 1e-12 * (jnp.max(jnp.abs(gradient)) + 1e-300)
        at_lo = b <= lo + 1e-12 * width
        at_hi = b >= hi - 1e-12 * width
        inward = (at_lo & (gradient < -tolerance)) | (at_hi & (gradient > tolerance))
        interior = free & (width > 0) & ((~at_lo & ~at_hi) | inward)
        fixed = jnp.where(interior, 0.0, b)
        ridge = 1e-13 * jnp.trace(H) * jnp.eye(k, dtype=H.dtype)
        system = jnp.where(interior[:, None] & interior[None, :], H + ridge,
                           jnp.eye(k, dtype=H.dtype))  # fmt: skip
        exact = jnp.linalg.solve(system, jnp.where(interior, -(c + H @ fixed), 0.0))
        candidate = jnp.where(interior, project(exact), b)
        return jnp.where(objective(candidate) <= objective(b), candidate, b)

    return jax.lax.fori_loop(0, 4, active_set_step, b)
