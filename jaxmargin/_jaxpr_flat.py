"""A jaxpr flattened into one list of primitive applications, its calls inlined.

`jax.make_jaxpr` nests the program of a user's network: `jax.nn.relu` is a `custom_jvp_call`
around a `jit`, flax and equinox add `jit`s and checkpoints of their own. The kink analysis
(_kink_plan.py) looks at the primitives themselves, so every call is inlined here, and every
value gets an integer slot. A custom derivative rule (custom_jvp/custom_vjp) is dropped with its
call: the gated evaluation sets the derivative of every kink itself, and away from the kinks the
derivative of a piecewise-linear primal is the primal's own.
"""

from __future__ import annotations

import itertools
from typing import Any, NamedTuple

from jax.extend.core import ClosedJaxpr, Jaxpr, JaxprEqn, Literal

# Primitives that only call a sub-program; the parameter holding it is found by _callee.
_CALLS = {
    "jit",
    "pjit",
    "closed_call",
    "core_call",
    "custom_jvp_call",
    "custom_vjp_call",
    "custom_vjp_call_jaxpr",
    "remat",
    "remat2",
    "checkpoint",
}
_CALLEE_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr")

Atom = Any  # an int slot or a jax Literal


class Operation(NamedTuple):
    """One primitive application: `eqn` holds the primitive and its parameters, `source` the
    top-level equation it came from (whose source line is the user's, for error messages)."""

    eqn: JaxprEqn
    inputs: tuple  # Atoms
    outputs: tuple[int, ...]
    source: JaxprEqn


class FlatProgram(NamedTuple):
    inputs: tuple[int, ...]
    consts: dict[int, Any]  # slot -> concrete value closed over by the program
    operations: tuple[Operation, ...]
    outputs: tuple  # Atoms
    avals: dict[int, Any]  # slot -> abstract value (shape, dtype)


def source_line(op: Operation) -> str:
    """' (at file:line (function))' of the user's code that applied `op`, or ''."""
    try:
        from jax._src import source_info_util

        where = source_info_util.summarize(op.source.source_info)
    except Exception:  # a private helper: the messages are clear without it
        return ""
    return f" (at {where})" if where else ""


def is_literal(atom) -> bool:
    return isinstance(atom, Literal)


def _callee(eqn: JaxprEqn):
    if eqn.primitive.name not in _CALLS:
        return None
    for key in _CALLEE_PARAMS:
        sub = eqn.params.get(key)
        if isinstance(sub, ClosedJaxpr):
            return sub.jaxpr, sub.consts
        if isinstance(sub, Jaxpr):
            return sub, ()
    return None


def flatten(closed: ClosedJaxpr) -> FlatProgram:
    slots = itertools.count()
    avals: dict[int, Any] = {}
    consts: dict[int, Any] = {}
    operations: list[Operation] = []

    def new_slot(aval) -> int:
        slot = next(slots)
        avals[slot] = aval
        return slot

    def inline(jaxpr: Jaxpr, const_values, args, source=None) -> tuple:
        env: dict = {}
        for var, value in zip(jaxpr.constvars, const_values):
            env[var] = new_slot(var.aval)
            consts[env[var]] = value
        env.update(zip(jaxpr.invars, args))

        def read(atom):
            return atom if is_literal(atom) else env[atom]

        for eqn in jaxpr.eqns:
            inputs = tuple(read(atom) for atom in eqn.invars)
            callee = _callee(eqn)
            if callee is not None:
                outputs = inline(*callee, inputs, source or eqn)
            else:
                outputs = tuple(new_slot(var.aval) for var in eqn.outvars)
                operations.append(Operation(eqn, inputs, outputs, source or eqn))
            env.update(zip(eqn.outvars, outputs))
        return tuple(read(atom) for atom in jaxpr.outvars)

    inputs = tuple(new_slot(var.aval) for var in closed.jaxpr.invars)
    outputs = inline(closed.jaxpr, closed.consts, inputs)
    return FlatProgram(inputs, consts, tuple(operations), outputs, avals)
