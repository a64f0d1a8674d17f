"""Margins, hard and soft, in the log domain.

For an L-homogeneous predictor write w = rho * theta with ||theta|| = 1 and beta = rho^L. Then
m_i(w) = beta * q_i with q_i = m_i(theta), and everything here is computed from (ln beta, q):

    soft margin  gamma~ = -(1/beta) ln sum_i exp(-beta q_i)
                        = q_min - (1/beta) ln sum_i exp(-beta (q_i - q_min)),

whose last logarithm lies in [0, ln n]. No exp() overflows and ||w||^L is never formed, so the
functions stay exact and finite for ||w|| from 1e-6 to 1e100 (beta up to 1e500) in float64.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ._predictors import Params, Predictor
from ._validation import check_all, check_choice

LOSSES = ("exp", "logistic")
NORMALIZATIONS = ("l2", "product")

# Above this margin, ln(1 + e^-m) = e^-m (1 + O(e^-m)): the logistic and exponential soft margins
# agree to a relative 1e-17 and the exponential formula, which never overflows, is used.
_LARGE_MARGIN = 36.0


def log_norm(params) -> jax.Array:
    """ln ||w||_2 over all leaves of a params pytree, without overflow (max-abs shifted out)."""
    leaves = [jnp.ravel(leaf) for leaf in jax.tree.leaves(params)]
    flat = jnp.concatenate(leaves)
    scale = jnp.max(jnp.abs(flat))
    safe_scale = jnp.where(scale > 0, scale, 1.0)
    log_norm_value = jnp.log(safe_scale) + 0.5 * jnp.log(jnp.sum((flat / safe_scale) ** 2))
    return jnp.where(scale > 0, log_norm_value, -jnp.inf)


def _scale_layers(params: Params, log_norms: jax.Array) -> Params:
    return tuple(
        jnp.where(jnp.isfinite(ln), layer * jnp.exp(-ln), jnp.zeros_like(layer))
        for layer, ln in zip(params, log_norms)
    )


def polar(predictor: Predictor, params: Params, normalization: str = "l2"):
    """Split params into (ln beta, theta): m_i(params) = beta * m_i(theta).

    "l2": theta = w / ||w||, beta = ||w||^L. "product": each layer W_k normalised by itself,
    beta = prod_k ||W_k||^{a_k} with a_k = predictor.layer_degrees[k] (Lyu & Li 2020, §4.4).
    """
    if normalization == "l2":
        log_rho = log_norm(params)
        theta = _scale_layers(params, jnp.full(len(params), log_rho))
        return predictor.degree * log_rho, theta
    if predictor.layer_degrees is None:
        raise ValueError(f"{predictor.name} does not declare layer_degrees; use normalization='l2'")
    layer_log_norms = jnp.stack([log_norm(layer) for layer in params])
    theta = _scale_layers(params, layer_log_norms)
    degrees = jnp.asarray(predictor.layer_degrees, dtype=jnp.float64)
    return jnp.sum(degrees * layer_log_norms), theta


def raw_margins(predictor, params, X, y):
    """y_i f(x_i; params) for every example, unchecked (the checked form is `margins`)."""
    return y * jax.vmap(predictor.apply, in_axes=(None, 0))(params, X)


def _min_and_gap_logsumexp(log_beta, q):
    """(q_min, ln sum_i exp(-beta (q_i - q_min))); the second lies in [0, ln n]."""
    q_min = jnp.min(q)
    gap = q - q_min  # >= 0
    safe_gap = jnp.where(gap > 0, gap, 1.0)
    beta_gap = jnp.where(gap > 0, jnp.exp(log_beta + jnp.log(safe_gap)), 0.0)
    return q_min, jax.nn.logsumexp(-beta_gap)


def _scaled_to_exp_soft_margin(log_beta, q):
    q_min, gap_lse = _min_and_gap_logsumexp(log_beta, q)
    return q_min - jnp.exp(-log_beta) * gap_lse


def _log_softplus_of_minus_margin(log_beta, q):
    """ln ln(1 + exp(-beta q_i)), stable for every sign and size of beta q_i."""
    log_abs = log_beta + jnp.log(jnp.where(q != 0, jnp.abs(q), 1.0))
    x = jnp.where(q != 0, -jnp.sign(q) * jnp.exp(log_abs), 0.0)  # x = -m_i, may be +-inf
    # x > 36: ln(x + ln(1 + e^-x)) = ln x + ln(1 + ln(1 + e^-x)/x), with ln x from log_abs.
    big = log_abs + jnp.log1p(jnp.log1p(jnp.exp(-jnp.abs(x))) / jnp.where(x > 1, x, 1.0))
    # x < -36: ln ln(1 + u) with u = e^x tiny: x + ln(1 - u/2 + ...).
    small = x - 0.5 * jnp.exp(x)
    middle = jnp.log(jnp.log1p(jnp.exp(jnp.clip(x, -_LARGE_MARGIN, _LARGE_MARGIN))))
    return jnp.where(x > _LARGE_MARGIN, big, jnp.where(x < -_LARGE_MARGIN, small, middle))


def _scaled_to_logistic_soft_margin(log_beta, q):
    log_summed_loss = jax.nn.logsumexp(_log_softplus_of_minus_margin(log_beta, q))
    summed_loss = jnp.exp(log_summed_loss)
    inv_beta = jnp.exp(-log_beta)
    # l^{-1}(u) = -ln(e^u - 1), in three regimes of u.
    huge_loss = -jnp.exp(log_summed_loss - log_beta)
    tiny_loss = (-log_summed_loss - 0.5 * summed_loss) * inv_beta
    middle = -jnp.log(jnp.expm1(jnp.clip(summed_loss, 1e-300, _LARGE_MARGIN))) * inv_beta
    general = jnp.where(
        summed_loss > _LARGE_MARGIN,
        huge_loss,
        jnp.where(log_summed_loss < -_LARGE_MARGIN, tiny_loss, middle),
    )
    q_min = jnp.min(q)
    all_large = (q_min > 0) & (
        log_beta + jnp.log(jnp.where(q_min > 0, q_min, 1.0)) > jnp.log(_LARGE_MARGIN)
    )
    return jnp.where(all_large, _scaled_to_exp_soft_margin(log_beta, q), general)


def soft_margin_from_scaled(log_beta, q, loss: str = "exp"):
    """gamma~ = l^{-1}(sum_i l(beta q_i)) / beta from ln beta and unit-scale margins q."""
    if loss == "exp":
        return _scaled_to_exp_soft_margin(log_beta, q)
    return _scaled_to_logistic_soft_margin(log_beta, q)


def log_exp_loss_from_scaled(log_beta, q):
    """ln sum_i exp(-beta q_i), computed as -beta q_min + ln sum_i exp(-beta (q_i - q_min))."""
    q_min, gap_lse = _min_and_gap_logsumexp(log_beta, q)
    safe = jnp.where(q_min != 0, jnp.abs(q_min), 1.0)
    beta_q_min = jnp.where(q_min != 0, jnp.sign(q_min) * jnp.exp(log_beta + jnp.log(safe)), 0.0)
    return gap_lse - beta_q_min


# --------------------------------------------------------------------------- jitted cores


@functools.partial(jax.jit, static_argnums=0)
def _margins(predictor, params, X, y):
    return raw_margins(predictor, params, X, y)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _normalized(predictor, params, X, y, normalization):
    log_beta, theta = polar(predictor, params, normalization)
    return log_beta, raw_margins(predictor, theta, X, y)


# --------------------------------------------------------------------------- public API


def margins(predictor: Predictor, params: Params, X, y) -> jax.Array:
    """Per-example margins m_i(w) = y_i f(x_i; w), shape (n,).

    These are the raw margins; for large ||w|| prefer the normalized quantities below, which
    never form ||w||^L.
    """
    predictor, params, X, y = check_all(predictor, params, X, y)
    return _margins(predictor, params, X, y)


def normalized_margins(
    predictor: Predictor, params: Params, X, y, *, normalization: str = "l2"
) -> jax.Array:
    """q_i = m_i(w) / ||w||^L (or / prod_k ||W_k||^{a_k} with normalization="product")."""
    check_choice("normalization", normalization, NORMALIZATIONS)
    predictor, params, X, y = check_all(predictor, params, X, y)
    return _normalized(predictor, params, X, y, normalization)[1]


def hard_margin(
    predictor: Predictor, params: Params, X, y, *, normalization: str = "l2"
) -> jax.Array:
    """gamma(w) = min_i m_i(w) / ||w||^L (Definition 3 of the seed)."""
    return jnp.min(normalized_margins(predictor, params, X, y, normalization=normalization))


def soft_margin(
    predictor: Predictor,
    params: Params,
    X,
    y,
    *,
    loss: str = "exp",
    normalization: str = "l2",
) -> jax.Array:
    """Soft margin gamma~(w) = l^{-1}(sum_i l(m_i(w))) / ||w||^L.

    loss="exp": -ln sum_i exp(-m_i) / ||w||^L (the seed's); loss="logistic":
    l(z) = ln(1 + e^-z), l^{-1}(u) = -ln(e^u - 1) applied to the summed loss.
    Satisfies gamma - ln(n)/||w||^L <= gamma~ <= gamma (exp loss).
    """
    check_choice("loss", loss, LOSSES)
    check_choice("normalization", normalization, NORMALIZATIONS)
    predictor, params, X, y = check_all(predictor, params, X, y)
    log_beta, q = _normalized(predictor, params, X, y, normalization)
    return soft_margin_from_scaled(log_beta, q, loss)


def log_loss(predictor: Predictor, params: Params, X, y) -> jax.Array:
    """ln L(w) = ln sum_i exp(-m_i(w)), in the log domain (finite where L underflows)."""
    predictor, params, X, y = check_all(predictor, params, X, y)
    log_beta, q = _normalized(predictor, params, X, y, "l2")
    return log_exp_loss_from_scaled(log_beta, q)
