"""The kinks of any traced network: its jaxpr evaluated with every kink site gated.

`TracedNetwork(apply)` traces `apply(params, x)` (params a tuple of arrays) to a jaxpr once per
shape of its arguments, plans its kinks (_kink_plan.py) and evaluates the plan with the `Kinks`
contract of _predictors.py: every site is a relu of a pre-activation u, so `Kinks.slope` is 0,
and `preactivations` returns the sites' u, each flattened to one dimension, in the order the
evaluation meets them (a site's u depends on the gates of the sites before it only).

At a site the value is exact (the primitive's own, by the stop_gradient construction of
_relu_nets._leaky_mlp) and the derivative in u is the chosen element of the Clarke interval
[0, 1] of relu: the gate's alpha where masked, else 1 / 0 by the sign of u and
`relu_grad_at_zero` at u = 0.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
from jax import lax

from ._jaxpr_flat import flatten, is_literal
from ._kink_plan import kink_plan
from ._kink_steps import (
    Bind,
    KinkPlan,
    PairExtremum,
    ReduceExtremum,
    Scale,
    SignSplit,
    WindowExtremum,
)
from ._predictors import Kinks


class _Sites:
    """The kink sites of one evaluation: out = base + coef * relu(u), gated."""

    def __init__(self, gates, offsets, branch, grad_at_zero):
        self.gates, self.offsets, self.branch = gates, offsets, branch
        self.grad_at_zero = grad_at_zero
        self.preactivations = []

    def relu(self, u, base, coef, exact):
        """base + coef * relu(u) with value `exact` (the primitive's own) and the next site's
        gate on relu's derivative; its offset, if any, is added to relu(u)."""
        site = len(self.preactivations)
        self.preactivations.append(u.reshape(-1))
        u_value = lax.stop_gradient(u)
        derivative = jnp.where(u_value > 0, 1.0, jnp.where(u_value < 0, 0.0, self.grad_at_zero))
        relu_value = jnp.maximum(u_value, 0.0)
        branch_taken = None
        if self.gates is not None:
            mask, alpha = (jnp.reshape(g, u.shape) for g in self.gates[site])
            derivative = jnp.where(mask, alpha, derivative)
            if self.branch:  # the linear piece the derivative selects: a smooth frozen field
                branch_taken = mask
                relu_value = jnp.where(mask, derivative * u_value, relu_value)
        h = relu_value + (u - u_value) * derivative
        value = exact
        if self.offsets is not None:
            offset = jnp.reshape(self.offsets[site], u.shape)
            h = h + offset
            value = value + coef * lax.stop_gradient(offset)
        out = base + coef * h
        if branch_taken is not None:
            value = jnp.where(branch_taken, lax.stop_gradient(out), value)
        # Value exactly `value`, derivative exactly that of `out`.
        return lax.stop_gradient(value) + (out - lax.stop_gradient(out))

    def extremum(self, a, b, sign):
        """max(a, b) = b + relu(a - b) (sign 1), min(a, b) = a - relu(a - b) (sign -1)."""
        a_value, b_value = lax.stop_gradient(a), lax.stop_gradient(b)
        if sign > 0:
            return self.relu(a - b, b, 1.0, jnp.maximum(a_value, b_value))
        return self.relu(a - b, a, -1.0, jnp.minimum(a_value, b_value))

    def tree(self, entries, sign):
        """The max (min) of the entries, pairwise: a tie is the hull of the tied gradients."""
        while len(entries) > 1:
            paired = [self.extremum(a, b, sign) for a, b in zip(entries[::2], entries[1::2])]
            entries = paired + entries[len(paired) * 2 :]
        return entries[0]


def _window_entries(operand, step: WindowExtremum):
    """The entries of each pooling window, as arrays of the output's shape (strided slices)."""
    starts = itertools.product(*(range(w) for w in step.window))
    out_shape = [
        (size - (w - 1) * d - 1) // s + 1
        for size, w, s, d in zip(operand.shape, step.window, step.strides, step.dilation)
    ]
    entries = []
    for offset in starts:
        start = [o * d for o, d in zip(offset, step.dilation)]
        limit = [b + (n - 1) * s + 1 for b, n, s in zip(start, out_shape, step.strides)]
        entries.append(lax.slice(operand, start, limit, step.strides))
    return entries


def _reduce_entries(operand, axes):
    moved = jnp.moveaxis(operand, axes, tuple(range(len(axes))))
    stacked = moved.reshape((-1, *moved.shape[len(axes) :]))
    return [stacked[i] for i in range(stacked.shape[0])]


def evaluate(plan: KinkPlan, params, x, sites: _Sites):
    program = plan.program
    env = dict(program.consts)
    env.update(zip(program.inputs, (*params, x)))

    def read(atom):
        return atom.val if is_literal(atom) else env[atom]

    for step in plan.steps:
        if isinstance(step, Bind):
            eqn = step.eqn
            with eqn.ctx.manager:  # as jax.core.eval_jaxpr binds (calls were inlined)
                outs = eqn.primitive.bind(*map(read, step.inputs), **eqn.params)
            env.update(zip(step.outputs, outs if eqn.primitive.multiple_results else (outs,)))
        elif isinstance(step, SignSplit):
            u = env[step.u]
            u_value = lax.stop_gradient(u)
            exact = jnp.where(u_value > 0, step.positive * u_value, step.negative * u_value)
            coef = step.positive - step.negative
            env[step.output] = sites.relu(u, step.negative * u, coef, exact)
        elif isinstance(step, Scale):
            env[step.output] = step.factor * env[step.u]
        elif isinstance(step, PairExtremum):
            env[step.output] = sites.extremum(env[step.a], env[step.b], step.sign)
        elif isinstance(step, ReduceExtremum):
            env[step.output] = sites.tree(_reduce_entries(env[step.operand], step.axes), step.sign)
        else:
            env[step.output] = sites.tree(_window_entries(env[step.operand], step), step.sign)
    return read(plan.output)


class TracedNetwork:
    """`apply(params, x) -> scalar` (params a tuple of arrays) with its kinks found by tracing.

    Its `apply`, `preactivations` and `gated_apply` follow Predictor.apply and the Kinks
    contract; `plan(params, x)` traces and plans once per shape and dtype of the arguments and
    raises a ValueError for a network that is not positively homogeneous in params.
    """

    def __init__(self, apply, relu_grad_at_zero: float = 0.0, name: str = "network"):
        self._apply, self.relu_grad_at_zero, self.name = apply, relu_grad_at_zero, name
        self._plans: dict = {}

    def plan(self, params, x) -> KinkPlan:
        arguments = (tuple(params), x)
        specs = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), arguments
        )
        key = tuple((s.shape, s.dtype) for s in jax.tree.leaves(specs))
        if key not in self._plans:
            program = flatten(jax.make_jaxpr(self._apply)(*specs))
            if len(program.outputs) != 1:
                raise ValueError(f"{self.name}: apply must return one scalar")
            self._plans[key] = kink_plan(program, len(arguments[0]), self.name)
        return self._plans[key]

    def _run(self, params, x, gates=None, offsets=None, branch=False):
        params = tuple(params)
        sites = _Sites(gates, offsets, branch, self.relu_grad_at_zero)
        value = evaluate(self.plan(params, x), params, x, sites)
        return tuple(sites.preactivations), value

    def apply(self, params, x):
        return self._run(params, x)[1]

    def preactivations(self, params, x, gates=None):
        return self._run(params, x, gates)[0]

    def gated_apply(self, params, x, gates, offsets=None, branch=False):
        return self._run(params, x, gates, offsets, branch)[1]

    def kinks(self) -> Kinks:
        return Kinks(self.preactivations, self.gated_apply, 0.0)
