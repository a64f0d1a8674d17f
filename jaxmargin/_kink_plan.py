"""The kinks of a traced network and its degree of homogeneity, read off its flattened jaxpr.

Every value is either independent of the parameters (the input x, constants: any primitive may
compute it) or homogeneous of a degree in them. Linear primitives keep the degree, multilinear
ones (mul, dot_general, conv) add degrees, sums need equal degrees (a bias after a hidden layer
breaks this: a ValueError says where), and the piecewise-linear ones (relu, leaky relu, abs,
max, min, max-pooling) become relus of "sites" (_kink_rewrites.py). Any other primitive applied
to a parameter-dependent value raises a ValueError naming it and the line that applied it.
The degree is exact (no evaluation), in all params together and in each array alone.
"""

from __future__ import annotations

import itertools

import numpy as np

from ._jaxpr_flat import FlatProgram, Operation, is_literal, source_line
from ._kink_rewrites import PiecewiseLinearRules, SignTest
from ._kink_steps import Bind, KinkPlan, live_steps, uniform_value

_LINEAR = {"neg", "reshape", "broadcast_in_dim", "transpose", "squeeze", "expand_dims", "rev"}
_LINEAR |= {"copy", "copy_p", "slice", "convert_element_type", "sharding_constraint", "gather"}
_LINEAR |= {"dynamic_slice", "reduce_sum", "cumsum", "reduce_window_sum", "split"}
# Rearrangements of entries: an elementwise activation commutes with them.
_REARRANGING = _LINEAR - {"neg", "reduce_sum", "cumsum", "reduce_window_sum", "split"}
_SCALING = {"neg": -1.0, "convert_element_type": 1.0, "copy": 1.0, "copy_p": 1.0}
# Sums: (positions of the summed operands; the other operands must not depend on params).
_SUMS = {"add": (0, 1), "sub": (0, 1), "add_any": (0, 1), "pad": (0, 1)}
_SUMS |= {"dynamic_update_slice": (0, 1), "scatter-add": (0, 2), "scatter_add": (0, 2)}
_SUMS |= {"scatter": (0, 2)}
_PRODUCTS = {"mul", "dot_general", "conv_general_dilated"}
_IDENTITIES = {"device_put", "optimization_barrier"}
_COMPARISONS = {"gt": True, "ge": True, "lt": False, "le": False}  # True: pred <=> left > right
_EXTREMA = {"max": 1, "min": -1, "reduce_max": 1, "reduce_min": -1}
_EXTREMA |= {"reduce_window_max": 1, "reduce_window_min": -1}
_REPEATABLE = _LINEAR | set(_SUMS) | _PRODUCTS | set(_COMPARISONS)


class _Analysis(PiecewiseLinearRules):
    """One pass over the program: degrees, the steps to evaluate, errors where it is not
    positively homogeneous (in the slots `param_slots`)."""

    def __init__(self, program: FlatProgram, param_slots, name: str):
        self.program, self.name = program, name
        self.avals = dict(program.avals)
        self.degree = {slot: 1 for slot in param_slots}  # the parameter-dependent slots
        self.scalar = {
            s: uniform_value(v) for s, v in program.consts.items() if uniform_value(v) is not None
        }
        self.multiple: dict = {}  # slot -> (base slot, factor): slot = factor * base
        self.sign_test: dict = {}
        self.shadow: dict = {}  # slot g(z) of a monotone activation -> (z, P, N)
        self.steps: list = []
        self.same: dict = {}  # slot -> the slot already holding the same value
        self.splits: dict = {}
        self.computed: dict = {}  # repeat_key -> outputs
        self.slots = itertools.count(max(self.avals, default=0) + 1)
        for op in program.operations:
            self.visit(op)

    # ----------------------------------------------------------------------- queries

    def error(self, op: Operation, message, kind=ValueError):
        return kind(f"{self.name}: `{op.eqn.primitive.name}`{source_line(op)} {message}")

    def dependent(self, atom) -> bool:
        return not is_literal(atom) and atom in self.degree

    def degree_of(self, atom) -> int:
        return self.degree[atom] if self.dependent(atom) else 0

    def is_sign_test(self, atom) -> bool:
        return not is_literal(atom) and atom in self.sign_test

    def known(self, atom):
        """The value of a constant whose entries are all equal, else None."""
        return uniform_value(atom.val) if is_literal(atom) else self.scalar.get(atom)

    def multiple_of(self, atom):
        """(base slot, factor) with atom = factor * base; (None, 0.) for zero; False if atom
        is a nonzero value independent of params."""
        if self.known(atom) == 0.0:
            return None, 0.0  # zero is a multiple of every value
        if not self.dependent(atom):
            return False
        base, factor = self.multiple.get(atom, (atom, 1.0))
        return (None, 0.0) if factor == 0.0 else (base, factor)

    def common_degree(self, op, atoms) -> int:
        degrees = {self.degree_of(a) for a in atoms if self.dependent(a) or self.known(a) != 0}
        if len(degrees) > 1:
            raise self.error(
                op,
                f"combines terms of degrees {sorted(degrees)} in the parameters: the network is"
                " not positively homogeneous (a bias, or a constant added to a"
                " parameter-dependent value?)",
            )
        return degrees.pop() if degrees else 0

    def new_slot(self, like: int, degree: int) -> int:
        slot = next(self.slots)
        self.avals[slot], self.degree[slot] = self.avals[like], degree
        return slot

    # ----------------------------------------------------------------------- rules

    def repeat_key(self, op: Operation):
        """A key equal for two applications of one primitive to the same values, for those
        compared by identity later (jnp.where(a > b, a, b) computes a and b twice)."""
        name = op.eqn.primitive.name
        if name not in _REPEATABLE:
            return None
        atoms = tuple(
            (str(a.aval), np.asarray(a.val).tobytes()) if is_literal(a) else a for a in op.inputs
        )
        key = (name, atoms, tuple(sorted(op.eqn.params.items())))
        try:
            hash(key)
        except TypeError:  # parameters that cannot be compared: computed again
            return None
        return key

    def visit(self, op: Operation):
        op = op._replace(
            inputs=tuple(a if is_literal(a) else self.same.get(a, a) for a in op.inputs)
        )
        key = self.repeat_key(op)
        if key is not None and key in self.computed:
            self.same.update(zip(op.outputs, self.computed[key]))
            return
        if key is not None:
            self.computed[key] = op.outputs
        name = op.eqn.primitive.name
        for position, atom in enumerate(op.inputs):
            if self.is_sign_test(atom) and not (name == "select_n" and position == 0):
                raise self.error(
                    self.sign_test[atom].op,
                    f"compares parameter-dependent values and `{name}` uses the result: only"
                    " jnp.where(comparison, ...) choosing between the compared values (max,"
                    " min) or multiples of one value (relu, leaky relu) is supported",
                )
        if not any(self.dependent(a) or self.is_sign_test(a) for a in op.inputs):
            self.constant(op)
        elif name in _LINEAR:
            self.linear(op)
        elif name in _SUMS or name in _PRODUCTS or name in _IDENTITIES:
            self.multilinear(op)
        elif name in _COMPARISONS:
            left, right = op.inputs
            self.common_degree(op, op.inputs)
            self.sign_test[op.outputs[0]] = SignTest(left, right, _COMPARISONS[name], op)
        elif name == "select_n":
            self.select(op)
        elif name in _EXTREMA:
            self.extremum(op, _EXTREMA[name])
        elif name == "abs":
            self.degree[op.outputs[0]] = self.degree[op.inputs[0]]
            self.split(op.outputs[0], op.inputs[0], 1.0, -1.0)
        elif name in ("div", "integer_pow", "square"):
            self.power(op)
        else:
            hint = (
                " (control flow over parameter-dependent values: unroll it in Python)"
                if name in ("while", "scan", "cond")
                else ""
            )
            raise self.error(
                op,
                "is applied to a parameter-dependent value; it is not piecewise linear or"
                " multilinear, so the network is not positively homogeneous in its parameters"
                f" (or not supported by jaxmargin's kink tracing){hint}. Supported: linear and"
                " multilinear primitives (dot_general, conv, add, mul, reshape, ...), relu,"
                " leaky relu, abs, max, min and max-pooling",
            )

    def constant(self, op):
        eqn, name = op.eqn, op.eqn.primitive.name
        self.steps.append(Bind(eqn, op.inputs, op.outputs))
        values = [self.known(a) for a in op.inputs]
        if len(op.outputs) != 1 or not values or values[0] is None:
            return
        if name in ("broadcast_in_dim", "convert_element_type", "reshape", "squeeze", "copy"):
            self.scalar[op.outputs[0]] = values[0]
        elif name == "neg":
            self.scalar[op.outputs[0]] = -values[0]
        elif name == "mul" and values[1] is not None:
            self.scalar[op.outputs[0]] = values[0] * values[1]

    def linear(self, op):
        eqn, name, (operand, *rest) = op.eqn, op.eqn.primitive.name, op.inputs
        if not self.dependent(operand) or any(self.dependent(a) for a in rest):
            raise self.error(op, "takes a parameter-dependent index or shape: not supported")
        if name == "convert_element_type" and not np.issubdtype(
            eqn.params["new_dtype"], np.inexact
        ):
            raise self.error(op, "casts a parameter-dependent value to a non-float type")
        for out in op.outputs:
            self.degree[out] = self.degree[operand]
        self.steps.append(Bind(eqn, op.inputs, op.outputs))
        (out, *_) = op.outputs
        if name in _SCALING:
            base, factor = self.multiple.get(operand, (operand, 1.0))
            self.multiple[out] = (base, factor * _SCALING[name])
        if name in _REARRANGING and operand in self.shadow:
            self.rearrange_shadow(op, operand, op.inputs)

    def multilinear(self, op):
        eqn, name = op.eqn, op.eqn.primitive.name
        if name in _IDENTITIES:
            for atom, out in zip(op.inputs, op.outputs):
                if self.dependent(atom):
                    self.degree[out] = self.degree[atom]
        elif name in _PRODUCTS:
            self.degree[op.outputs[0]] = sum(self.degree_of(a) for a in op.inputs)
            (a, b), out = op.inputs, op.outputs[0]
            for this, other in ((a, b), (b, a)):
                factor = self.known(other)
                if name != "mul" or not self.dependent(this) or factor is None:
                    continue
                if self.avals[out].shape == self.avals[this].shape:
                    base, old = self.multiple.get(this, (this, 1.0))
                    self.multiple[out] = (base, old * factor)
        else:
            summed = [op.inputs[i] for i in _SUMS[name]]
            if any(self.dependent(a) for i, a in enumerate(op.inputs) if i not in _SUMS[name]):
                raise self.error(op, "takes a parameter-dependent index: not supported")
            self.degree[op.outputs[0]] = self.common_degree(op, summed)
            shadowed = self.dependent(summed[0]) and summed[0] in self.shadow
            if name == "pad" and shadowed and self.known(summed[1]) == 0.0:
                self.rearrange_shadow(op, summed[0], op.inputs)
        self.steps.append(Bind(eqn, op.inputs, op.outputs))

    def power(self, op):
        eqn, name, operand, out = op.eqn, op.eqn.primitive.name, op.inputs[0], op.outputs[0]
        if name == "div":
            if self.dependent(op.inputs[1]):
                raise self.error(op, "divides by a parameter-dependent value: not supported")
            self.degree[out] = self.degree[operand]
            if self.known(op.inputs[1]) not in (None, 0.0):
                base, factor = self.multiple.get(operand, (operand, 1.0))
                self.multiple[out] = (base, factor / self.known(op.inputs[1]))
        else:
            power = 2 if name == "square" else eqn.params["y"]
            if power < 1:
                raise self.error(op, f"raises a parameter-dependent value to the power {power}")
            self.degree[out] = power * self.degree[operand]
        self.steps.append(Bind(eqn, op.inputs, op.outputs))


def _output(analysis: _Analysis):
    (out,) = analysis.program.outputs
    return out if is_literal(out) else analysis.same.get(out, out)


def _output_degree(analysis: _Analysis) -> int:
    out = _output(analysis)
    if analysis.is_sign_test(out):
        raise ValueError(f"{analysis.name}: apply returns a comparison, not a number")
    return analysis.degree.get(out, 0) if analysis.dependent(out) else 0


def kink_plan(program: FlatProgram, num_params: int, name: str) -> KinkPlan:
    """The plan of `program`, whose first `num_params` inputs are the parameter arrays."""
    params = program.inputs[:num_params]
    analysis = _Analysis(program, params, name)
    degree = _output_degree(analysis)
    if degree < 1:
        raise ValueError(f"{name}: apply does not depend on its parameters")
    layer_degrees = []
    for slot in params:  # the degree in each array alone (product normalisation)
        try:
            layer_degrees.append(_output_degree(_Analysis(program, (slot,), name)))
        except (ValueError, NotImplementedError):  # not homogeneous in that array alone
            layer_degrees = None
            break
    if layer_degrees is not None and sum(layer_degrees) != degree:
        layer_degrees = None
    output = _output(analysis)
    steps = live_steps(analysis.steps, (output,))
    layer_degrees = None if layer_degrees is None else tuple(layer_degrees)
    return KinkPlan(program, steps, degree, layer_degrees, output)
