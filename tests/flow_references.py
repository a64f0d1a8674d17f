"""Independent references for the flow tests: numpy fields for scipy, and a projected Euler.

Nothing here imports jaxmargin._flow: the equations of docs/background.md §2 are re-derived in numpy
(linear and deep linear models, analytic gradients) and integrated by scipy's DOP853, and the Euler
reference uses only jax.grad of the model's margins (the autodiff element, relu'(0) = 0).
"""

import jax
import jax.numpy as jnp
import numpy as np
import scipy.integrate
from scipy.special import logsumexp, softmax


class DeepLinear:
    """f(x) = w_L^T W_{L-1} ... W_1 x on flat params, with analytic per-example gradients."""

    def __init__(self, shapes):
        self.shapes = shapes
        self.sizes = [int(np.prod(s)) for s in shapes]
        self.degree = len(shapes)

    def layers(self, flat):
        out, offset = [], 0
        for shape, size in zip(self.shapes, self.sizes):
            out.append(flat[offset : offset + size].reshape(shape))
            offset += size
        return out

    def margins_and_gradients(self, flat, X, y):
        layers = self.layers(flat)
        # forward products: h_0 = x, h_l = W_l h_{l-1}; backward: r_L = w_L, r_l = r_{l+1} W_{l+1}
        if self.degree == 1:
            return y * (X @ layers[0]), y[:, None] * X
        forward = [X.T]
        for W in layers[:-1]:
            forward.append(W @ forward[-1])
        backward = [layers[-1]]
        for W in reversed(layers[1:-1]):
            backward.insert(0, backward[0] @ W)
        margins = y * (layers[-1] @ forward[-1])
        grads = []
        for k in range(self.degree - 1):
            grads.append(np.einsum("a,bn->nab", backward[k], forward[k]).reshape(len(y), -1))
        grads.append(forward[-1].T)
        return margins, y[:, None] * np.concatenate(grads, axis=1)


def tau_flow(model, X, y, w0, tau_max):
    """scipy DOP853 on dw/dtau = sum_i p_i grad m_i, with an event at -ln L = 0 (t0)."""

    def field(tau, state):
        w = state[:-1]
        m, G = model.margins_and_gradients(w, X, y)
        return np.concatenate([softmax(-m) @ G, [np.exp(-logsumexp(-m))]])

    def separated(tau, state):
        m, _ = model.margins_and_gradients(state[:-1], X, y)
        return -logsumexp(-m)

    separated.terminal, separated.direction = True, 1
    solution = scipy.integrate.solve_ivp(
        field,
        (0.0, tau_max),
        np.append(w0, 0.0),
        method="DOP853",
        rtol=1e-10,
        atol=1e-12,
        events=separated,
    )
    return solution.t_events[0][0], solution.y_events[0][0]


def polar_flow(model, X, y, theta0, s0, tau0, log_t_loss0, s_eval):
    """scipy DOP853 on the polar clock: state (theta, tau, ln(t L))."""
    L = model.degree

    def field(s, state):
        theta = state[:-2] / np.linalg.norm(state[:-2])
        q, G = model.margins_and_gradients(theta, X, y)
        beta = np.exp(L * s)
        p = softmax(-beta * (q - q.min()))
        g = p @ G
        pq = p @ q
        dtheta = (g - (theta @ g) * theta) / (L * pq)
        dtau = np.exp(-(L - 2) * s) / (L * pq)
        d_log_t_loss = dtau * np.exp(-state[-1]) - beta * (g @ g) / (L * pq)
        return np.concatenate([dtheta, [dtau, d_log_t_loss]])

    state0 = np.concatenate([theta0, [tau0, log_t_loss0]])
    solution = scipy.integrate.solve_ivp(
        field, (s0, s_eval[-1]), state0, method="DOP853", rtol=1e-10, atol=1e-12, t_eval=s_eval
    )
    thetas = solution.y[:-2].T / np.linalg.norm(solution.y[:-2].T, axis=1, keepdims=True)
    soft = []
    for s, theta in zip(s_eval, thetas):
        q, _ = model.margins_and_gradients(theta, X, y)
        beta = np.exp(L * s)
        soft.append(-logsumexp(-beta * q) / beta)
    return thetas, np.array(soft), solution.y[-2], solution.y[-1]


def projected_euler_soft_margin(predictor, theta0, X, y, s0, s1, step):
    """Explicit Euler in the polar clock with the autodiff element, renormalising theta.

    Converges to the Filippov solution as step -> 0 (first order, docs/background.md §4).
    """
    from jax.flatten_util import ravel_pytree

    flat0, unravel = ravel_pytree(theta0)
    L = predictor.degree

    def margins(flat):
        return y * jax.vmap(predictor.apply, in_axes=(None, 0))(unravel(flat), X)

    def euler_step(carry, _):
        theta, s = carry
        q = margins(theta)
        beta = jnp.exp(L * s)
        p = jax.lax.stop_gradient(jax.nn.softmax(-beta * (q - jnp.min(q))))
        g = jax.grad(lambda th: p @ margins(th))(theta)
        dtheta = (g - (theta @ g) * theta) / (L * (p @ q))
        theta = theta + step * dtheta
        return (theta / jnp.linalg.norm(theta), s + step), None

    count = int(round((s1 - s0) / step))
    (theta, s), _ = jax.lax.scan(euler_step, (flat0, jnp.asarray(s0)), None, length=count)
    q = margins(theta)
    beta = jnp.exp(L * s)
    return float(-jax.nn.logsumexp(-beta * q) / beta)
