"""A small box-constrained convex QP, the min-norm element of a Clarke set of kink derivatives."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# FISTA stops once an iteration moves b by less than this fraction of the box.
STALL = 1e-13
# The default cap on FISTA's iterations (the flows' qp_iterations): FISTA only finds a start for
# the exact active-set finish, which reaches the same optimum from fewer (docs/decisions.md D15).
FISTA_ITERATIONS = 30


def box_qp(H, c, lo, hi, free, iterations):
    """argmin_b  b^T H b + 2 c^T b  over lo <= b <= hi; entries with free = False stay at 0.

    H is symmetric positive semidefinite (a Gram matrix). Accelerated projected gradient (FISTA,
    Beck & Teboulle 2009) with a Gershgorin bound on the Lipschitz constant (no eigenvalue
    routine: LAPACK eigen-solvers deadlocked under shard_map on emulated CPU devices) for a
    start, then the primal active-set method to the exact optimum (_active_set_finish).
    """
    lo = jnp.where(free, lo, 0.0)
    hi = jnp.where(free, hi, 0.0)
    lipschitz = jnp.maximum(2.0 * jnp.max(jnp.sum(jnp.abs(H), axis=1)), 1e-300)

    def project(b):
        return jnp.clip(b, lo, hi)

    def accelerated_step(state):
        i, b, v, t, _ = state
        b_next = project(v - 2.0 * (H @ v + c) / lipschitz)
        t_next = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t * t))
        return (
            i + 1,
            b_next,
            b_next + ((t - 1.0) / t_next) * (b_next - b),
            t_next,
            jnp.max(jnp.abs(b_next - b)),
        )

    # Stops early once an iteration moves b by less than `STALL` of the box: the active-set
    # finish then solves exactly from the set it found (most QPs of a flow are small and easy).
    stall = STALL * jnp.max(hi - lo)

    def moving(state):
        return (state[0] < iterations) & (state[4] > stall)

    start = 0.5 * (lo + hi)
    state = (0, start, start, jnp.ones((), H.dtype), jnp.asarray(jnp.inf, H.dtype))
    _, b, _, _, _ = jax.lax.while_loop(moving, accelerated_step, state)
    return _active_set_finish(H, c, lo, hi, free, b)


# Iterations of the active-set finish (each one k x k solve; a few are the rule).
ACTIVE_SET_ITERATIONS = 200


def _active_set_finish(H, c, lo, hi, free, b):
    """The primal active-set method for a convex box QP (Nocedal & Wright, Numerical
    Optimization, §16.5), from FISTA's point: minimise exactly on the free entries; if that
    point leaves the box, step to the first bound and fix that entry there; else release the
    fixed entry whose gradient points most into the box, or stop when none does (KKT). The
    objective never rises. Why not FISTA alone: on ill-conditioned Grams (column scales spread
    over e^+-6) 300 iterations and the 4 fixed polish steps used before stopped 6e-2 (relative)
    above scipy's bounded least-squares optimum."""
    k = H.shape[0]
    width = hi - lo
    movable = free & (width > 0)
    # Relative to each diagonal entry: the Gram's columns may differ in scale by 1e8.
    ridge = jnp.diag(1e-13 * jnp.diagonal(H) + 1e-300)
    snapped_lo = movable & (b <= lo + 1e-12 * width)
    snapped_hi = movable & (b >= hi - 1e-12 * width)
    b = jnp.where(snapped_lo, lo, jnp.where(snapped_hi, hi, b))

    def step(state):
        i, b, fixed, _ = state
        inner = movable & ~fixed
        system = jnp.where(inner[:, None] & inner[None, :], H + ridge, jnp.eye(k, dtype=H.dtype))
        target = jnp.linalg.solve(
            system, jnp.where(inner, -(c + H @ jnp.where(inner, 0.0, b)), 0.0)
        )
        direction = jnp.where(inner, target - b, 0.0)
        to_bound = jnp.where(
            direction < 0,
            (lo - b) / jnp.where(direction < 0, direction, 1.0),
            jnp.where(direction > 0, (hi - b) / jnp.where(direction > 0, direction, 1.0), jnp.inf),
        )
        to_bound = jnp.where(inner, jnp.maximum(to_bound, 0.0), jnp.inf)
        blocking = jnp.argmin(to_bound)
        blocked = to_bound[blocking] < 1.0
        length = jnp.where(blocked, to_bound[blocking], 1.0)
        moved = jnp.clip(b + length * direction, lo, hi)
        # Blocked: the entry that hit its bound is fixed exactly there.
        bound = jnp.where(direction[blocking] < 0, lo[blocking], hi[blocking])
        moved = jnp.where(blocked, moved.at[blocking].set(bound), moved)
        # Not blocked: a KKT check of the fixed entries (at lo the gradient must be >= 0, at hi
        # <= 0); the most violated one is released.
        gradient = H @ moved + c
        scale = jnp.abs(c) + jnp.abs(H) @ jnp.abs(moved) + 1e-300  # of each gradient entry
        violation = jnp.where(
            movable & fixed, jnp.where(moved <= lo, -gradient, gradient) / scale, -jnp.inf
        )
        worst = jnp.argmax(violation)
        release = ~blocked & (violation[worst] > 1e-12)
        fixed = jnp.where(
            blocked,
            fixed.at[blocking].set(True),
            jnp.where(release, fixed.at[worst].set(False), fixed),
        )
        return i + 1, moved, fixed, blocked | release

    def going(state):
        return (state[0] < ACTIVE_SET_ITERATIONS) & state[3]

    fixed = snapped_lo | snapped_hi
    _, b, _, _ = jax.lax.while_loop(going, step, (0, b, fixed, jnp.asarray(True)))
    return b
