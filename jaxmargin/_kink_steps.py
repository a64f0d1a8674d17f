"""The steps of a kink plan (_kink_plan.py), which _traced_kinks.evaluate runs in order.

A step is the user's primitive itself (Bind) or a piecewise-linear one rewritten as relus of
"sites" (the others); every slot a step reads is written by an earlier step or is an input or a
constant of the program.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from jax.extend.core import JaxprEqn

from ._jaxpr_flat import FlatProgram, is_literal


class Bind(NamedTuple):  # the primitive itself
    eqn: JaxprEqn
    inputs: tuple
    outputs: tuple[int, ...]


class SignSplit(NamedTuple):  # output = P u (u > 0), N u (u < 0); one site, u
    output: int
    u: int
    positive: float
    negative: float


class Scale(NamedTuple):  # output = factor * u (a split with P = N: no kink)
    output: int
    u: int
    factor: float


class PairExtremum(NamedTuple):  # max(a, b) (sign 1) or min(a, b) (sign -1); one site, a - b
    output: int
    a: int
    b: int
    sign: int


class ReduceExtremum(NamedTuple):  # max/min over `axes`; k - 1 sites for k entries
    output: int
    operand: int
    axes: tuple[int, ...]
    sign: int


class WindowExtremum(NamedTuple):  # max/min-pooling without padding; window size - 1 sites
    output: int
    operand: int
    window: tuple[int, ...]
    strides: tuple[int, ...]
    dilation: tuple[int, ...]
    sign: int


class KinkPlan(NamedTuple):
    program: FlatProgram
    steps: tuple
    degree: int
    layer_degrees: tuple[int, ...] | None
    output: object  # the atom holding the program's value

    @property
    def has_kinks(self) -> bool:
        return any(not isinstance(step, Bind | Scale) for step in self.steps)


def _inputs_of(step) -> tuple:
    if isinstance(step, Bind):
        return step.inputs
    if isinstance(step, PairExtremum):
        return step.a, step.b
    return (step.operand,) if hasattr(step, "operand") else (step.u,)


def _outputs_of(step) -> tuple:
    return step.outputs if isinstance(step, Bind) else (step.output,)


def uniform_value(value):
    """The value of a constant whose entries are all equal (a float), else None."""
    array = np.asarray(value)
    if array.size == 0 or not np.issubdtype(array.dtype, np.number):
        return None
    first = array.reshape(-1)[0]
    return float(first) if np.all(array == first) and np.isrealobj(array) else None


def live_steps(steps, outputs) -> tuple:
    """The steps whose results reach the outputs: the rest is dead code (after the rewrites of
    _kink_plan, e.g. the relu sites of a max-pooled layer)."""
    live, kept = {a for a in outputs if not is_literal(a)}, []
    for step in reversed(steps):
        if any(out in live for out in _outputs_of(step)):
            kept.append(step)
            live.update(a for a in _inputs_of(step) if not is_literal(a))
    return tuple(reversed(kept))
