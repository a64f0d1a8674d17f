"""One Rosenbrock-W step of the polar flow: its stiff low-rank part linearly implicit.

Why (docs/background.md §3): the polar field's Jacobian has a stiff part
-c (I - theta theta^T) G^T (diag p - p p^T) G, c = beta / (L p.q), of rank <= n and size ~ beta,
so explicit steps must shrink like 1/beta, and dense implicit solvers are far too slow on ~1e3
parameters. A W-method is of its order for ANY matrix A in W = I - gamma h A; here A = -V V^T
is that low-rank part, and W^-1 is applied by Woodbury with an n x n Cholesky factor.

- ROS2 (Verwer, Spee, Blom & Hundsdorfer, SIAM J. Sci. Comput. 1999): 2 stages, order 2,
  embedded order 1.
- ROS34PW2 (Rang & Angermann, BIT 2005): 4 stages, order 3, embedded order 2.
Both are L-stable when A is the stiff part. The field is evaluated with the step's kink gates
and its tangent projector (the sliding pairs), which _kinks.kink_step chooses.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ._fields import softmax_of_scaled

# ROS2 (Verwer, Spee, Blom & Hundsdorfer 1999): gamma of W = I - gamma h A.
GAMMA = 1.0 + 1.0 / math.sqrt(2.0)
# ROS34PW2 (Rang & Angermann, BIT 45, 2005, Table 4.1): four stages, order 3 for ANY matrix A
# in W = I - gamma h A (a W-method), L-stable and stiffly accurate, embedded order 2. In the form
# (I - gamma h A) k_i = F(x + c_i h, y + h sum_j alpha_ij k_j) + h A sum_j gamma_ij k_j
# + gamma_i h dF/dx, y_new = y + h sum_i b_i k_i, with gamma_i = gamma + sum_j gamma_ij.
GAMMA_34 = 4.3586652150845900e-01
_ALPHA = (
    (),
    (8.7173304301691801e-01,),
    (8.4457060015369423e-01, -1.1299064236484185e-01),
    (0.0, 0.0, 1.0),
)
_GAMMAS = (
    (),
    (-8.7173304301691801e-01,),
    (-9.0338057013044082e-01, 5.4180672388095326e-02),
    (2.4212380706095346e-01, -1.2232505839045147e00, 5.4526025533510214e-01),
)
_B = (2.4212380706095346e-01, -1.2232505839045147e00, 1.5452602553351020e00, 4.3586652150845900e-01)
_B_EMBEDDED = (3.7810903145819369e-01, -9.6042292212423178e-02, 0.5, 2.1793326075422950e-01)
_C = tuple(sum(row) for row in _ALPHA)
_GAMMA_SUMS = tuple(GAMMA_34 + sum(row) for row in _GAMMAS)


class PolarField(NamedTuple):
    """The polar field at (s, theta) and what the step builds from it."""

    dy: jax.Array  # dtheta/ds
    log_loss_rate: jax.Array  # ln d(-ln L)/ds
    y_unit: jax.Array
    margins: jax.Array
    grads: jax.Array  # per-example gradients (n, d) at y_unit, under the step's gates
    weights: jax.Array  # p = softmax(-beta q)
    stiff_scale: jax.Array  # c = beta / (L p.q)


def evaluate(degree, margins_and_grads, projector, s, theta, gates) -> PolarField:
    """The polar field at (s, theta), with the step's kink gates and tangent projector."""
    L = degree
    y_unit = theta / jnp.linalg.norm(theta)
    m, G = margins_and_grads(y_unit, gates)
    p = softmax_of_scaled(L * s, m)
    g = projector(G.T @ p)
    # p.q > 0 after t0 (Lemma 4); the guard only keeps padding runs finite.
    pq = p @ m
    pq = jnp.where(pq > 0, pq, 1.0)
    tangent = g - (y_unit @ g) * y_unit
    # d(-ln L)/ds = beta ||g||^2 / (L p.q) (Euler's identity: <theta, g> = L p.q).
    log_loss_rate = L * s + 2.0 * jnp.log(jnp.linalg.norm(g)) - jnp.log(L * pq)
    scale = jnp.exp(L * s) / (L * pq)
    return PolarField(tangent / (L * pq), log_loss_rate, y_unit, m, G, p, scale)


def stiff_factor(field: PolarField, projector):
    """V with A = -V V^T the stiff part of the field's Jacobian in theta (d x n)."""
    U = projector(field.grads.T)
    U = U - jnp.outer(field.y_unit, field.y_unit @ U)
    root_p = jnp.sqrt(field.weights)
    scaled = U * root_p[None, :]
    # G^T (diag p - p p^T) G = (G^T D^1/2 (I - r r^T)) (...)^T with r = sqrt(p), ||r|| = 1.
    V = scaled - jnp.outer(scaled @ root_p, root_p)
    return jnp.sqrt(field.stiff_scale) * V


def w_solver(V, h, gamma=GAMMA, gram=None):
    """b -> W^{-1} b for W = I - gamma h A, A = -V V^T (Woodbury). `gram`: V^T V, where the
    caller keeps it for several step sizes (it costs n^2 d, the rest of the solve n^3 + n d)."""
    a = gamma * h
    n = V.shape[1]
    gram = V.T @ V if gram is None else gram
    # M's eigenvalues are >= 1 (no diagonal scaling: scaled, its near-null directions, the
    # softmax's sum-to-one direction, made Cholesky break down at beta ~ 1e11).
    M = jnp.eye(n, dtype=V.dtype) + a * gram
    factor = jax.scipy.linalg.cho_factor(M)

    def solve_m(r):
        return jax.scipy.linalg.cho_solve(factor, r)

    def solve(b):
        r = V.T @ b
        z = solve_m(r)
        z = z + solve_m(r - M @ z)  # one step of iterative refinement
        return b - a * (V @ z)

    return solve


def ros2_step(field_at, V, field_rate, x, y, h, field0, gram=None):
    """One ROS2 step of size h from (x, y): (first stage k_1, y_new, embedded first-order error
    estimate). field_at(x, y) is the field, field0 = field_at(x, y), A = -V V^T its stiff part,
    field_rate = dF/dx at (x, y) (the non-autonomous column); gram = V^T V if known."""
    solve = w_solver(V, h, GAMMA, gram)
    k1 = solve(field0 + GAMMA * h * field_rate)
    k2 = solve(field_at(x + h, y + h * k1) - 2.0 * k1 - GAMMA * h * field_rate)
    return k1, y + h * (1.5 * k1 + 0.5 * k2), 0.5 * h * (k1 + k2)


def ros34pw2_step(field_at, V, field_rate, x, y, h, field0, gram=None):
    """One ROS34PW2 step, as ros2_step (embedded estimate of second order)."""
    solve = w_solver(V, h, GAMMA_34, gram)
    stages = []
    for i in range(len(_B)):
        if i == 0:
            F = field0
        else:
            F = field_at(
                x + _C[i] * h, y + h * sum(a * k for a, k in zip(_ALPHA[i], stages) if a != 0.0)
            )
        rhs = F + _GAMMA_SUMS[i] * h * field_rate
        if i > 0:  # + h A sum_j gamma_ij k_j, A = -V V^T
            rhs = rhs - h * (V @ (V.T @ sum(g * k for g, k in zip(_GAMMAS[i], stages))))
        stages.append(solve(rhs))
    y_new = y + h * sum(b * k for b, k in zip(_B, stages))
    error = h * sum((b - e) * k for b, e, k in zip(_B, _B_EMBEDDED, stages))
    return stages[0], y_new, error


# The step functions by name -> (step, order).
METHODS = {"ros2": (ros2_step, 2), "ros34pw2": (ros34pw2_step, 3)}
