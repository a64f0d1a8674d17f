"""Per-example margins, gradients and ReLU kink geometry of a predictor on a dataset.

The flow's kinks are the pairs (example i, hidden unit k) with pre-activation z_ik(w) = 0. Each
pair is a constraint z_ik(w) = 0 when the flow slides on it; its gradient a_ik = grad z_ik(w) is
computed from example i alone. The Clarke interval of the pair's activation derivative moves the
velocity g = sum_i p_i grad m_i along a_ik by (1 - slope) p_i delta_ik alpha, alpha in [0, 1],
with delta_ik = d m_i / d h_ik the back-propagated signal at the unit's output. In deeper nets
delta_ik depends on the Clarke elements chosen above unit k and a_ik on those below it: both take
the step's gates (the element is found by a few rounds, see _kinks.clarke_pairs).
Pairs are indexed example-major: flat index = i * H + k, H = hidden units per example.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class KinkGeometry(NamedTuple):
    num_pairs: int
    hidden_layers: int
    slope: float
    preactivations: object  # w -> (n * H,)
    rows: object  # (w, flat indices (K,), gates=None) -> (K, d) gradients of those pre-activations
    gates: object  # (mask (n*H,), alpha (n*H,)) -> gates for gated_apply, vmapped over examples
    signal: object  # (w, gates, weights (n,)) -> (n * H,) of weights_i * d m_i / d h_ik
    num_examples: int


def unit_scale(z, n):
    """Per pair, the largest |z| of its unit over the n examples (pairs are example-major): the
    scale against which a pair counts as on its kink. Not the mean over all pairs: units decay
    at their own rates (those no support example uses like e^-s in theta, D34), and the layers
    of a deep net scale with ||w|| to the powers 1, 2, ...: in phase 1 of an L = 5 net at
    ||w|| = 8 fourth-layer pairs 2e-3 of their layer's |z| from their kinks counted as on them
    against the global mean (docs/decisions.md D54)."""
    return jnp.tile(jnp.max(jnp.abs(z.reshape(n, -1)), axis=0), n)


def per_example_margins(predictor, unravel, X, y, branch=False):
    """(w, gates or None) -> (margins (n,), per-example gradients (n, d)); with `branch` the
    gated units take the value of the linear piece their gate selects (see Kinks)."""

    def one(w, x, label, gate):
        if gate is None:
            return label * predictor.apply(unravel(w), x)
        return label * predictor.kinks.gated_apply(unravel(w), x, gate, branch=branch)

    def margins_and_grads(w, gates):
        axes = None if gates is None else 0
        return jax.vmap(jax.value_and_grad(one), in_axes=(None, 0, 0, axes))(w, X, y, gates)

    return margins_and_grads


def kink_geometry(predictor, unravel, X, y, w_example) -> KinkGeometry | None:
    kinks = predictor.kinks
    if kinks is None:
        return None
    n = X.shape[0]

    def one_z(w, x, gate=None):
        return jnp.concatenate([z.ravel() for z in kinks.preactivations(unravel(w), x, gate)])

    widths = [
        s.shape[0]
        for s in jax.eval_shape(lambda w: kinks.preactivations(unravel(w), X[0]), w_example)
    ]
    per_example = sum(widths)

    def preactivations(w):
        return jax.vmap(one_z, in_axes=(None, 0))(w, X).ravel()

    def rows(w, index, gates=None):
        example, unit = index // per_example, index % per_example

        def row(i, k):
            gate = None if gates is None else jax.tree.map(lambda a: a[i], gates)
            return jax.grad(lambda v: one_z(v, X[i], gate)[k])(w)

        return jax.vmap(row)(example, unit)

    def gates(mask, alpha):
        mask, alpha = mask.reshape(n, per_example), alpha.reshape(n, per_example)
        out, offset = [], 0
        for width in widths:
            out.append((mask[:, offset : offset + width], alpha[:, offset : offset + width]))
            offset += width
        return tuple(out)

    def signal(w, gate, weights):
        def weighted(offsets):
            f = jax.vmap(kinks.gated_apply, in_axes=(None, 0, 0, 0))(unravel(w), X, gate, offsets)
            return jnp.sum(weights * y * f)

        zeros = tuple(jnp.zeros((n, width), w.dtype) for width in widths)
        return jnp.concatenate(jax.grad(weighted)(zeros), axis=1).ravel()

    return KinkGeometry(
        n * per_example,
        len(widths),
        float(kinks.slope),
        preactivations,
        rows,
        gates,
        signal,
        n,
    )
