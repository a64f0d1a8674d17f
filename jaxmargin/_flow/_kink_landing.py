"""Kink crossings within a step: detection, landing, and the projection back onto held kinks.

A pair that crosses its kink during a step is located like an event: the step is redone (or
cut) so that it ends within a band past the kink, and the pair is put on it; the next step's
start decides whether it slides or goes through (_kinks.kink_step). Pairs held on their kinks
drift off them by O(h^2) during a step: project_onto_kinks puts them back.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._kink_geometry import KinkGeometry

# project_onto_kinks keeps the near-support margins only while that costs at most this many times
# the plain min-norm correction onto the kinks.
KEEP_GAIN = 10.0


def landing_band(floor, rate, speed, tol):
    """Per pair, how far from its kink (in z) a step may end and count as landed on it: the
    pair is then projected onto the kink, which moves the state by about |z| / |dz/dx| x
    |dy/dx|; the band keeps that below the local error tolerance `tol`, and is at least
    `floor`. Why: with only the floor (1e-9 of mean |z|) a landing redone from the quadratic
    guess often ended short of the kink by more than that (the redone step's own error is ~tol)
    and took more steps (docs/decisions.md D25)."""
    return jnp.maximum(floor, tol * jnp.abs(rate) / jnp.maximum(speed, 1e-300))


def kink_crossings(z0, z1, free, landing, h, rate0=None):
    """Pairs among `free` that cross their kink within a step from pre-activations z0 to z1:
    (crossed, too_far, h_land); `landing` is a scalar or one per pair (landing_band). too_far:
    ended more than `landing` past it (the step is redone with h_land, a guess that ends
    landing / 2 past it); crossed also holds the pairs that ended
    within `landing` short of a kink they head for (else the next steps would approach it
    geometrically, a Zeno sequence). The guess is linear in z, or with `rate0` (dz/dx at the
    start) quadratic: a linear guess undershoots a pair whose rate grows along the step, each
    redo then ends short and the kink is approached geometrically."""
    free = free & (z0 != 0)
    crossed = free & (jnp.sign(z1) != jnp.sign(z0))
    too_far = crossed & (jnp.abs(z1) > landing)
    crossed = crossed | (free & (jnp.abs(z1) <= landing) & (jnp.abs(z1) < jnp.abs(z0)))
    fraction = (jnp.abs(z0) + 0.5 * landing) / (jnp.abs(z0) + jnp.abs(z1))
    if rate0 is not None:
        fraction = _first_root(
            z0 + 0.5 * landing * jnp.sign(z0), rate0 * h, z1 - z0 - rate0 * h, fraction
        )
    return crossed, too_far, jnp.min(jnp.where(too_far, h * fraction, jnp.inf))


def _first_root(c, b, a, fallback):
    """The smallest root in (0, 1] of a u^2 + b u + c (elementwise), else `fallback`."""
    disc = b * b - 4.0 * a * c
    root = jnp.sqrt(jnp.maximum(disc, 0.0))
    q = -0.5 * (b + jnp.where(b >= 0, root, -root))
    safe = jnp.where(q != 0, q, 1.0)
    candidates = jnp.stack(
        [
            jnp.where(a != 0, q / jnp.where(a != 0, a, 1.0), jnp.inf),
            jnp.where(q != 0, c / safe, jnp.inf),
        ]
    )
    inside = (disc >= 0)[None] & (candidates > 0) & (candidates <= 1)
    best = jnp.min(jnp.where(inside, candidates, jnp.inf), axis=0)
    return jnp.where(jnp.isfinite(best), best, fallback)


def project_onto_kinks(
    geometry: KinkGeometry, candidates, y, hold, keep, keep_mask, gates, sweeps=2
):
    """Newton (min-norm) corrections putting the pairs in `hold` back on z = 0 while leaving the
    margins of the examples in `keep_mask` unchanged to first order (`keep`: their gradients).

    Why keep margins: a W-step moves in the tangent space of the sliding manifolds at its start
    and drifts off them by O(h^2); a plain min-norm correction moves the margins by as much, and
    at beta ~ 1e6 a change of 1e-6 in the margins of the near-support examples already
    reshuffles p = softmax(-beta q) (docs/decisions.md D22). The stiff part of the step keeps those
    margins at their quasi-static values; the correction must not undo it. `gates`: the step's
    (the kinks' gradients in deeper nets depend on the Clarke elements chosen below them).
    """
    k = min(candidates, geometry.num_pairs)
    keep = jnp.where(
        keep_mask[:, None],
        keep / jnp.maximum(jnp.linalg.norm(keep, axis=1, keepdims=True), 1e-300),
        0.0,
    )

    keep_gram = keep @ keep.T  # the same in every sweep (n^2 d: the dearest product here)

    def sweep(_, y):
        y_unit = y / jnp.linalg.norm(y)
        slots = jnp.nonzero(hold, size=k, fill_value=0)[0]
        active = jnp.arange(k) < jnp.sum(hold)
        z = geometry.preactivations(y_unit)[slots]
        rows = geometry.rows(y_unit, slots, gates)
        norms = jnp.maximum(jnp.linalg.norm(rows, axis=1), 1e-300)
        R = jnp.where(active[:, None], rows / norms[:, None], 0.0)
        A = jnp.concatenate([R, keep])
        on = jnp.concatenate([active, keep_mask])
        cross = R @ keep.T
        gram = jnp.block([[R @ R.T, cross], [cross.T, keep_gram]])
        gram = gram + jnp.diag(jnp.where(on, 1e-13, 1.0))
        factor = jax.scipy.linalg.cho_factor(gram)
        targets = jnp.concatenate(
            [jnp.where(active, z / norms, 0.0), jnp.zeros(keep.shape[0], y.dtype)]
        )
        kept = A.T @ jax.scipy.linalg.cho_solve(factor, targets)
        # The plain min-norm correction onto the kinks alone. Where a held kink's gradient lies
        # (nearly) in the span of the kept margins' gradients, keeping those margins forces a
        # move of ~|z| / (its distance to that span), far beyond the step's tolerance, and
        # gamma~ falls (docs/decisions.md D48, tests/test_kink_projection.py). The margins
        # cannot be kept there; the kinks are put back by the plain correction.
        plain = R.T @ jax.scipy.linalg.cho_solve(
            jax.scipy.linalg.cho_factor(gram[:k, :k]), targets[:k]
        )
        compatible = jnp.linalg.norm(kept) <= KEEP_GAIN * jnp.linalg.norm(plain)
        return y_unit - jnp.where(compatible, kept, plain)

    # A loop, not unrolled: one copy in the compiled program.
    y = jax.lax.fori_loop(0, sweeps, sweep, y)
    return y / jnp.linalg.norm(y)
