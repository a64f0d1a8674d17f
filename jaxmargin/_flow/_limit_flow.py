"""limit_flow: the beta -> infinity limit flow on its own, run to the direction's convergence.

Why a separate entry point: along gradient flow on ReLU nets the direction converges slowly in
s = ln ||w|| (on the reference problem of docs/background.md §6 only far beyond beta = 1e12:
`python bench/asymptotic.py`), i.e. at beta = e^(L s) far beyond float64, where FlowSolution's
beta-valued fields (rho, params, the loss) overflow. The limit flow itself does not involve
beta (it is the flow at beta = infinity, O(1/beta) from the flow at finite beta), so it runs
there; this function returns what stays
finite: s, the unit direction, the minimum margin, and at the end the flow's speed
||dtheta/ds|| (= the relative stationarity residual of the min-norm Clarke element, which
kkt_certificate measures independently) and the multipliers lambda.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from .._margins import log_norm
from .._validation import check_all
from .._wolfe import WEIGHT_FLOOR
from . import _limit_stage as limit_stage
from . import _solution as solution
from ._kink_geometry import kink_geometry, per_example_margins
from ._limit_field import LimitOptions, choose_kinks
from ._options import ROSENBROCK, FlowOptions, with_flow_options
from ._rows import STATUS_OF_OUTCOME

# The FlowOptions that apply to limit_flow; setting another one raises.
_LIMIT_FLOW_OPTIONS = ("direction_tol", "num_saves", "max_steps", "rtol", "limit_kink_slots")


class LimitFlowSolution(NamedTuple):
    """Saved points of the limit flow: the start, the points of the save grid (even in s) it
    reached, and the last point if it stopped off the grid.

    Attributes:
        s: ln ||w|| of the flow at finite beta that this point stands for (beta = e^(L s)).
        directions: the unit direction theta at each point (a params pytree, leading save axis).
        margin: min_i q_i(theta), the hard margin of the direction (never decreases).
        speed: ||dtheta/ds|| at the last point: the relative KKT stationarity residual of the
            direction (tangential over radial part of the min-norm Clarke element).
        multipliers: lambda at the last point (on the simplex; zero off the minimum margin).
        code: a status code of FlowStatus (REACHED_TARGET, DIRECTION_CONVERGED, MAX_STEPS,
            SOLVER_FAILED). steps, rejected_steps: the integrator's step counts.
    """

    s: np.ndarray
    directions: tuple
    margin: np.ndarray
    speed: float
    multipliers: np.ndarray
    code: int
    steps: int
    rejected_steps: int

    @property
    def message(self) -> str:
        return solution.STATUS_MESSAGES[self.code]


@with_flow_options(_LIMIT_FLOW_OPTIONS)
def limit_flow(
    predictor,
    params,
    X,
    y,
    *,
    s_max: float,
    options: FlowOptions | None = None,
    **option_values,
):
    """Integrate the beta -> infinity limit flow from the direction of `params` to s = s_max, or
    until ||dtheta/ds|| < direction_tol.

    `params` should be a point of gradient flow at large beta = ||params||^L (for instance the
    last point of gradient_flow(..., solver="rosenbrock")): the examples within 40 / beta of the
    minimum margin (at most 4e-5: 40 / max(beta, 1e6)) start on it, with the min-norm point of
    their Clarke gradients as weights (the entry of _limit_stage.integrate). From there the flow
    is autonomous in s: the direction moves along the min-norm element of the Clarke
    subdifferential of the minimum margin (tangent part), the margins on the minimum rise
    together, sliding ReLU kinks are held (see _limit_field.py).

    Args:
        predictor: an L-homogeneous Predictor. params: the start (its scale sets s0 and beta).
        X, y: the data, y in {-1, +1}; the direction must separate it.
        s_max: the target s (any finite value: beta = e^(L s) need not be a float64 number).
        options: a FlowOptions whose direction_tol, num_saves, max_steps and rtol apply (the
            keywords after it replace them); its other fields must keep their defaults.
        direction_tol: stop when ||dtheta/ds|| falls below it.
        num_saves: saved points (evenly spaced in s). max_steps: integrator step budget.
        rtol: the local error tolerance on theta per step.
        limit_kink_slots: how many pairs can be held on their kinks at once (ReLU-type nets).

    Returns:
        A LimitFlowSolution.

    Raises:
        ValueError: on invalid input, a non-separating direction, or s_max <= ln ||params||.
    """
    unknown = sorted(set(option_values) - set(_LIMIT_FLOW_OPTIONS))
    if unknown:
        raise TypeError(f"limit_flow takes the options {_LIMIT_FLOW_OPTIONS}, not {unknown}")
    # The limit flow is the asymptotic engine's last stage: its options are that solver's.
    options = FlowOptions.merge(options or FlowOptions(solver=ROSENBROCK), option_values)
    for field in dataclasses.fields(FlowOptions):
        if field.name in _LIMIT_FLOW_OPTIONS or field.name == "solver":
            continue
        if getattr(options, field.name) != field.default:
            raise ValueError(f"limit_flow does not take the option {field.name}")
    direction_tol, num_saves = options.direction_tol, options.num_saves
    max_steps, rtol = options.max_steps, options.rtol
    predictor, params, X, y = check_all(predictor, params, X, y)
    if not math.isfinite(s_max):
        raise ValueError(f"s_max must be finite, got {s_max}")
    if direction_tol is not None and not direction_tol > 0:
        raise ValueError(f"direction_tol must be positive, got {direction_tol}")
    if num_saves < 2 or max_steps < 1 or not rtol > 0:
        raise ValueError(
            f"need num_saves >= 2, max_steps >= 1, rtol > 0; got {num_saves}, {max_steps}, {rtol}"
        )
    w, unravel = ravel_pytree(tuple(jnp.asarray(leaf, jnp.float64) for leaf in params))
    s0 = float(log_norm(w))
    if not s_max > s0:
        raise ValueError(f"s_max = {s_max} must exceed ln ||params|| = {s0}")
    theta = w / jnp.linalg.norm(w)
    q = np.asarray(y * jax.vmap(predictor.apply, in_axes=(None, 0))(unravel(theta), X))
    if not np.min(q) > 0:
        raise ValueError(
            f"the direction of params does not separate the data (min normalized "
            f"margin {np.min(q)})"
        )
    tol = 0.0 if direction_tol is None else float(direction_tol)
    out, field = _run(
        predictor,
        int(num_saves),
        int(max_steps),
        float(rtol),
        int(options.limit_kink_slots),
        X,
        y,
        unravel(theta),
        s0,
        float(s_max),
        tol,
    )
    # The saved rows: the first is the entry point at s0 (see _limit_stage.integrate).
    saved = np.asarray(out.saved)
    thetas = np.asarray(out.ys)[saved]
    ss = np.asarray(out.xs)[saved]
    directions = jax.vmap(unravel)(jnp.asarray(thetas))
    margins = jax.vmap(
        lambda t: jnp.min(y * jax.vmap(predictor.apply, in_axes=(None, 0))(unravel(t), X))
    )(jnp.asarray(thetas))
    return LimitFlowSolution(
        ss,
        directions,
        np.asarray(margins),
        float(jnp.linalg.norm(field.dtheta)),
        np.asarray(field.weights),
        STATUS_OF_OUTCOME.get(int(out.outcome), solution.SOLVER_FAILED),
        int(out.steps),
        int(out.rejected),
    )


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _run(
    predictor, num_saves, max_steps, rtol, kink_slots, X, y, unit_params, s0, s_max, direction_tol
):
    theta, unravel = ravel_pytree(unit_params)
    degree = predictor.degree
    geometry = kink_geometry(predictor, unravel, X, y, theta)
    # With kinks the limit flow freezes the activation pattern within a step (branch values).
    margins_and_grads = per_example_margins(predictor, unravel, X, y, branch=geometry is not None)
    options = LimitOptions(tol=rtol, candidates=kink_slots)
    # Examples within 40 / beta of the minimum start on it: at most 4e-5 (beta >= 1e6), a start
    # far from the limit (small beta) begins with the examples nearest the minimum only.
    s_enter = jnp.maximum(s0, math.log(1e6) / degree)
    save_ss = jnp.linspace(s0, s_max, num_saves)
    out = limit_stage.integrate(
        margins_and_grads,
        degree,
        options,
        s0,
        theta,
        jnp.zeros(()),
        s_max,
        save_ss,
        max_steps,
        direction_tol=direction_tol,
        geometry=geometry,
        s_enter=s_enter,
    )

    # The field at the last point, E chosen afresh among the examples on the minimum.
    def on_minimum(q):
        return (q - jnp.min(q)) <= options.touching * jnp.abs(jnp.min(q))

    q, _ = margins_and_grads(out.y, None)
    start = jnp.zeros_like(q).at[jnp.argmin(q)].set(1.0)
    field, _ = choose_kinks(margins_and_grads, degree, options, out.y, on_minimum, start, geometry)
    weights = jnp.where(field.weights > WEIGHT_FLOOR, field.weights, 0.0)
    return out, field._replace(weights=weights)
