"""gradient_flow: the seed's flow from params0, through t0, to a target beta or s.

A run is a chain of stages (the modules of this package, in the order a run uses them):

- phase 1 (_phase1.py): the seed's clock tau until the soft margin first exceeds 0 (t0);
- after t0, the polar clock s = ln ||w|| (||w|| cannot blow up in finite "time" when it is
  the clock: docs/background.md §2), integrated by
  - solver="rosenbrock" (the default), the asymptotic chain (_asymptotic.py): linearly
    implicit Rosenbrock-W steps (_stiff_stage.py), then the beta -> infinity limit flow
    (_limit_stage.py);
  - an explicit diffrax solver, the reference chain (_explicit.py), for reference checks;
- the rows and the status (_rows.py).

gradient_flow compiles the stages as separate programs, the later ones while the first runs
(_pipeline.py); gradient_flow_batch and sweep_gradient_flow jit the whole chain as one program
and vmap it over seeds.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from .._validation import check_all
from . import _asymptotic, _explicit, _pipeline
from . import _solution as solution
from ._options import FlowOptions, StaticConfig, static_config, with_flow_options


def chain_of(static: StaticConfig):
    """The chain of stages that runs `static`'s solver."""
    return _asymptotic.chain if static.asymptotic else _explicit.chain


@functools.partial(jax.jit, static_argnums=0)
def solve(static: StaticConfig, params0, X, y, tau_max, s_target, direction_tol):
    """The whole run as one program (vmapped by gradient_flow_batch and the sweep)."""

    def call(stage, *args):
        return stage(static, *args)

    return chain_of(static)(static, call, params0, X, y, tau_max, s_target, direction_tol)


def prepare(predictor, params0, X, y, beta_max, s_max, batched):
    """(predictor, X, y, s_target) checked; s_target = ln ||w|| at the nearer target."""
    if beta_max is None and s_max is None:
        raise ValueError("give a target: beta_max (for beta = ||w||^L) or s_max (for ln ||w||)")
    if beta_max is not None and not (beta_max > 0 and math.isfinite(beta_max)):
        raise ValueError(f"beta_max must be positive and finite, got {beta_max}")
    example = jax.tree.map(lambda leaf: leaf[0], params0) if batched else params0
    predictor, _, X, y = check_all(predictor, example, X, y)
    targets = []
    if beta_max is not None:
        targets.append(math.log(beta_max) / predictor.degree)
    if s_max is not None:
        targets.append(float(s_max))
    return predictor, X, y, min(targets)


def check_not_rest_point(predictor, params0, batched):
    leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(params0)]
    if batched:
        norms2 = sum(np.sum(leaf.reshape(leaf.shape[0], -1) ** 2, axis=1) for leaf in leaves)
    else:
        norms2 = sum(np.sum(leaf**2) for leaf in leaves)
    if np.any(np.asarray(norms2) == 0.0) and predictor.degree >= 2:
        raise ValueError(
            f"params0 = 0 is a rest point of the flow for degree L = {predictor.degree} >= 2"
            " (every gradient vanishes there): start from a small random w(0) instead"
        )


def _setup(predictor, params0, X, y, beta_max, s_max, options, option_values, batched):
    """(options, static config, params0, X, y, s_target), all checked."""
    options = FlowOptions.merge(options, option_values)
    predictor, X, y, s_target = prepare(predictor, params0, X, y, beta_max, s_max, batched)
    check_not_rest_point(predictor, params0, batched=batched)
    static = static_config(options, predictor, s_target)
    params0 = tuple(jnp.asarray(leaf, jnp.float64) for leaf in params0)
    return options, static, params0, X, y, s_target


def direction_tolerance(options: FlowOptions):
    """direction_tol as the run's array argument (0: no such stop)."""
    tol = options.direction_tol
    return jnp.asarray(0.0 if tol is None else tol, jnp.float64)


@with_flow_options()
def gradient_flow(
    predictor,
    params0,
    X,
    y,
    *,
    beta_max: float | None = None,
    s_max: float | None = None,
    options: FlowOptions | None = None,
    **option_values,
) -> solution.FlowSolution:
    """Integrate dw/dtau in -d ln sum_i exp(-m_i(w)) from params0, through t0, to a target.

    Args:
        predictor: an L-homogeneous Predictor.
        params0: initial params; params0 = 0 is allowed only for L = 1.
        X, y: the data, y in {-1, +1}.
        beta_max: stop when beta = ||w||^L reaches this.
        s_max: stop when s = ln ||w|| reaches this (the smaller target wins).
        options: a FlowOptions; the keywords after it (its fields: tau_max, max_steps,
            direction_tol, num_saves, solver, rtol, atol, sliding, limit_beta) replace its
            values. See FlowOptions for each.

    Returns:
        A FlowSolution trimmed to its valid rows; `status` says how the run ended.
    """
    options, static, params0, X, y, s_target = _setup(
        predictor, params0, X, y, beta_max, s_max, options, option_values, batched=False
    )
    out = _pipeline.run(
        static,
        functools.partial(chain_of(static), static),
        params0,
        X,
        y,
        options.tau_max,
        s_target,
        direction_tolerance(options),
    )
    keep = np.asarray(out.valid)
    rows = jax.tree.map(lambda a: a[keep], out._replace(status=None))
    return rows._replace(status=out.status)


@with_flow_options()
def gradient_flow_batch(
    predictor,
    params0,
    X,
    y,
    *,
    beta_max: float | None = None,
    s_max: float | None = None,
    options: FlowOptions | None = None,
    **option_values,
) -> solution.FlowSolution:
    """gradient_flow vmapped over a leading axis of params0 (seeds); one compilation per shape.

    Rows are not trimmed: `valid` marks the saved points of each run.
    """
    options, static, params0, X, y, s_target = _setup(
        predictor, params0, X, y, beta_max, s_max, options, option_values, batched=True
    )
    run = jax.vmap(solve, in_axes=(None, 0, None, None, None, None, None))
    return run(static, params0, X, y, options.tau_max, s_target, direction_tolerance(options))
