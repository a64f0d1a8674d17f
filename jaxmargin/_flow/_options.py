"""FlowOptions: the options of a gradient-flow run, with their defaults, validated once.

`gradient_flow`, `gradient_flow_batch` and `sweep_gradient_flow` take them as keywords (their
signatures list them, from this one definition) or as one `options=FlowOptions(...)` object;
`limit_flow` takes the ones that apply to it. `StaticConfig` is what of them (with the
predictor and the target) fixes the compiled program: one compilation per value.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from typing import NamedTuple

from ._sliding import SlidingOptions

# The explicit diffrax solvers (the reference path), and the engine that reaches the asymptotic
# regime: phase 1 by Dormand-Prince, the stiff stage by Rosenbrock-W steps, the limit flow.
EXPLICIT_SOLVERS = ("bosh3", "dopri5", "dopri8", "heun", "tsit5")
ROSENBROCK = "rosenbrock"
# limit_beta="auto": where the limit flow takes over, for models without and with ReLU kinks.
AUTO_LIMIT_BETA, AUTO_LIMIT_BETA_KINKS = 1e10, 1e6
# The stiff stage hands over to the limit flow when its step falls below STALL_STEP past
# beta = STALL_BETA (its linearised softmax flips between minimum-margin examples there).
STALL_BETA, STALL_STEP = 1e8, 1e-5


@dataclasses.dataclass(frozen=True)
class FlowOptions:
    """How a gradient-flow run integrates (the target, beta_max or s_max, is given apart).

    Attributes:
        tau_max: phase-1 budget in the seed's clock tau.
        max_steps: solver-step budget of each phase.
        direction_tol: stop when ||dtheta/ds|| < direction_tol (the direction converged).
        num_saves: saved points, 1/4 in phase 1 (log-spaced tau), 3/4 after t0 (even in s).
        solver: "rosenbrock" (the default), the engine that reaches the asymptotic regime:
            phase 1 by Dormand-Prince 5(4) to t0, then linearly implicit Rosenbrock-W steps
            (the stiff part implicit, ReLU kinks as constraints), then the beta -> infinity
            limit flow; or an explicit diffrax solver for reference checks: "tsit5", "dopri5",
            "dopri8", "bosh3", "heun".
        rtol, atol: step-size controller tolerances (rosenbrock after t0: rtol is the local
            error tolerance on the unit direction).
        sliding: how the explicit solvers handle ReLU kinks (the Filippov equivalent control
            on sliding kinks, see SlidingOptions), or None for autodiff's element.
            solver="rosenbrock" freezes the activation pattern per step from the start (kinks
            at their Clarke element, crossings landed on: docs/decisions.md D54); there
            sliding=None runs phase 1 with autodiff's element instead, for reference checks.
        limit_beta: solver="rosenbrock": from beta = limit_beta on, the run follows the
            beta -> infinity limit flow (the min-norm point of the minimum-margin examples'
            Clarke gradients, an active-set flow; O(1/beta) from the flow at finite beta), or
            from beta = 1e8 on if the W-method's steps stall there. "auto": 1e10 for models
            without kinks, 1e6 for ReLU-type models (where the W-method's steps shrink past
            ~1e6). None: the W-method all the way.
        kink_slots: solver="rosenbrock", ReLU-type models: how many (example, unit) pairs
            phase 1 and the stiff stage can hold on their kinks at once; more stops the run with
            TOO_MANY_KINKS.
        limit_kink_slots: the same for the limit flow.

    Options that apply only to solver="rosenbrock" (limit_beta, kink_slots, limit_kink_slots)
    raise a ValueError when set with an explicit solver.
    """

    tau_max: float = 1e4
    max_steps: int = 100_000
    direction_tol: float | None = None
    num_saves: int = 200
    solver: str = ROSENBROCK
    rtol: float = 1e-8
    atol: float = 1e-10
    sliding: SlidingOptions | None = SlidingOptions()
    limit_beta: float | str | None = "auto"
    kink_slots: int = 128
    limit_kink_slots: int = 256

    def __post_init__(self):
        if self.solver not in EXPLICIT_SOLVERS + (ROSENBROCK,):
            raise ValueError(
                f"solver must be one of {sorted(EXPLICIT_SOLVERS + (ROSENBROCK,))}, "
                f"got {self.solver!r}"
            )
        if not self.tau_max > 0:
            raise ValueError(f"tau_max must be positive, got {self.tau_max}")
        if self.num_saves < 8:
            raise ValueError(f"num_saves must be at least 8, got {self.num_saves}")
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be positive, got {self.max_steps}")
        if self.direction_tol is not None and not self.direction_tol > 0:
            raise ValueError(f"direction_tol must be positive, got {self.direction_tol}")
        if not (self.rtol > 0 and self.atol > 0):
            raise ValueError(f"rtol and atol must be positive, got {self.rtol}, {self.atol}")
        if self.sliding is not None and not isinstance(self.sliding, SlidingOptions):
            raise TypeError(f"sliding must be a SlidingOptions or None, got {self.sliding!r}")
        for name in ("kink_slots", "limit_kink_slots"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.solver != ROSENBROCK:
            for name in _ROSENBROCK_ONLY:
                if getattr(self, name) != _DEFAULTS[name]:
                    raise ValueError(
                        f"the option {name} applies to solver={ROSENBROCK!r} only, not to "
                        f"solver={self.solver!r}"
                    )
        if self.solver == ROSENBROCK and self.sliding not in (None, _DEFAULTS["sliding"]):
            raise ValueError(
                f"sliding={self.sliding!r} applies to the explicit solvers only: "
                f"solver={ROSENBROCK!r} holds kinks at their Clarke element in every step (use "
                "sliding=None for autodiff's element in its phase 1)"
            )
        limit_beta = self.limit_beta
        if limit_beta != "auto" and limit_beta is not None:
            if not (isinstance(limit_beta, (int, float)) and 1e6 <= limit_beta < math.inf):
                # Below ~1e6 the O(1/beta) error of the limit flow is no longer negligible (and
                # its quasi-steady clock ln(t L) assumes d(-ln L)/ds >> 1).
                raise ValueError(
                    f'limit_beta must be "auto", None or a finite number >= 1e6, got {limit_beta!r}'
                )

    @classmethod
    def merge(cls, options: FlowOptions | None, values: dict) -> FlowOptions:
        """`options` (default FlowOptions()) with the keyword `values` replacing its fields."""
        unknown = sorted(set(values) - {field.name for field in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"unknown options {unknown}: see jaxmargin.FlowOptions")
        if options is not None and not isinstance(options, FlowOptions):
            raise TypeError(f"options must be a FlowOptions, got {type(options)}")
        return dataclasses.replace(options or cls(), **values)


def with_flow_options(names=None):
    """A decorator that lists FlowOptions' fields (or those in `names`; keyword-only, with their
    defaults) in the signature of a function that takes them as **option_values: help() and
    IDEs show them, and their defaults are written once, in FlowOptions."""

    def decorate(function):
        signature = inspect.signature(function)
        own = [p for p in signature.parameters.values() if p.kind != p.VAR_KEYWORD]
        extra = [
            inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=field.default)
            for field in dataclasses.fields(FlowOptions)
            if names is None or field.name in names
        ]

        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            return function(*args, **kwargs)

        wrapper.__signature__ = signature.replace(parameters=own + extra)
        return wrapper

    return decorate


# Options of the asymptotic engine only, and every option's default.
_ROSENBROCK_ONLY = ("limit_beta", "kink_slots", "limit_kink_slots")
_DEFAULTS = {field.name: field.default for field in dataclasses.fields(FlowOptions)}


class StaticConfig(NamedTuple):
    """What fixes the shape of the compiled program (one compilation per value)."""

    predictor: object
    saves_phase1: int
    saves_phase2: int
    max_steps: int
    solver: str
    rtol: float
    atol: float
    stop_on_direction: bool
    sliding: SlidingOptions | None
    limit_beta: float | None  # None: no limit-flow stage
    kink_slots: int
    limit_kink_slots: int

    @property
    def asymptotic(self) -> bool:
        return self.solver == ROSENBROCK


def static_config(options: FlowOptions, predictor, s_target) -> StaticConfig:
    limit_beta = options.limit_beta
    if limit_beta == "auto":
        limit_beta = AUTO_LIMIT_BETA_KINKS if predictor.kinks is not None else AUTO_LIMIT_BETA
    if options.solver != ROSENBROCK or (
        limit_beta is not None
        and predictor.degree * s_target <= math.log(min(limit_beta, STALL_BETA))
    ):
        # No limit flow for this solver, or the target is below any switch: leave it out of the
        # compiled program (and out of the static key, so runs to other targets share one).
        limit_beta = None
    phase1 = max(options.num_saves // 4, 2)
    return StaticConfig(
        predictor,
        phase1,
        options.num_saves - phase1,
        int(options.max_steps),
        options.solver,
        float(options.rtol),
        float(options.atol),
        options.direction_tol is not None,
        options.sliding,
        None if limit_beta is None else float(limit_beta),
        int(options.kink_slots),
        int(options.limit_kink_slots),
    )
