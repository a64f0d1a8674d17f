"""The Filippov velocity of phase 1 on ReLU kinks (_sliding.py) against a brute-force reference:
the Clarke set's Jacobian by jacfwd over the whole batch and the bounded least-squares problem by
scipy, not by the library's per-example columns and box QP."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from scipy.optimize import lsq_linear

import jaxmargin as jm
from jaxmargin._flow._sliding import SlidingOptions, make_velocity


def _gated_velocity(predictor, unravel, X, y, w, weights_fn, near_index, shapes, size):
    """alpha (near pairs) -> g = sum_i p_i grad m_i with those pairs' kink derivatives alpha."""

    def g_of(alpha_near):
        mask = jnp.zeros(size, bool).at[near_index].set(True)
        alpha = jnp.zeros(size).at[near_index].set(alpha_near)
        gates, offset = [], 0
        for n, width in shapes:  # the pre-activations are flattened layer by layer
            gates.append(
                (
                    mask[offset : offset + n * width].reshape(n, width),
                    alpha[offset : offset + n * width].reshape(n, width),
                )
            )
            offset += n * width

        def margins(flat):
            apply = jax.vmap(predictor.kinks.gated_apply, in_axes=(None, 0, 0))
            return y * apply(unravel(flat), X, gates)

        m, pullback = jax.vjp(margins, w)
        return pullback(weights_fn(m))[0]

    return g_of


@pytest.mark.parametrize("depth, threshold", [(2, 0.1), (3, 0.05)])
def test_sliding_velocity_is_the_min_norm_clarke_element(depth, threshold):
    predictor, params, X, y = jm.reference_problem(depth, width=8, n=12)
    w, unravel = ravel_pytree(params)

    def weights_fn(m):
        return jax.nn.softmax(-3.0 * m)

    options = SlidingOptions(candidates=64, threshold=threshold)
    velocity = jax.jit(lambda w: make_velocity(predictor, unravel, X, y, options)(w, weights_fn))(w)

    layers = jax.vmap(predictor.kinks.preactivations, in_axes=(None, 0))(unravel(w), X)
    z = np.concatenate([np.asarray(a).ravel() for a in layers])
    near = np.flatnonzero(np.abs(z) / np.abs(z).mean() < threshold)
    assert 6 <= near.size <= options.candidates  # a wide band: many pairs count as on a kink
    g_of = _gated_velocity(
        predictor, unravel, X, y, w, weights_fn, near, [a.shape for a in layers], z.size
    )
    start = (z[near] > 0).astype(float)
    C = np.asarray(jax.jacfwd(g_of)(jnp.asarray(start)))
    d = np.asarray(g_of(jnp.asarray(start))) - C @ start
    alpha = lsq_linear(C, -d, bounds=(0.0, 1.0), method="bvls", tol=1e-15).x
    reference = np.asarray(g_of(jnp.asarray(alpha)))
    interior = int(np.sum((alpha > 1e-9) & (alpha < 1 - 1e-9)))
    assert interior >= 1  # some pairs slide: the element is not the autodiff one
    assert int(velocity.num_sliding) == interior
    np.testing.assert_allclose(
        np.asarray(velocity.g), reference, atol=1e-9 * np.abs(reference).max()
    )
