"""The piecewise-linear primitives of a traced network rewritten as relus of "sites".

A mixin of _kink_plan._Analysis (whose state it uses: degrees, known multiples, sign tests and
steps). Each rewrite leaves one value = base + coef * relu(u) per site u:

- a split of u by its sign, P u for u > 0 and N u for u < 0, = N u + (P - N) relu(u): relu
  (max(z, 0), jax.nn.relu), leaky relu (max(z, a z), jnp.where(z > 0, z, a z)), abs (P = 1,
  N = -1), any max/min/where between multiples of one value;
- max(a, b) = b + relu(a - b) and min(a, b) = a - relu(a - b) of two different values, and
  max/min over axes or windows (max-pooling) as pairwise trees of them: a tie of k entries is
  then the convex hull of their gradients (the Clarke set) through the nested relus.

A max over the outputs of one monotone activation g (P > 0, N >= 0: relu, leaky relu) is taken
over its pre-activations, with g after it (max(g(a), g(b)) = g(max(a, b)), and g commutes with
reshapes, transposes, slices and zero padding on the way): max-pooling a relu layer then has no
site comparing two dead units, which are identically zero (no kink at all, but "on their kink"
for the flow engine forever). The relu sites whose outputs are no longer used are dead code.
"""

from __future__ import annotations

from typing import NamedTuple

from ._jaxpr_flat import Operation
from ._kink_steps import Bind, PairExtremum, ReduceExtremum, Scale, SignSplit, WindowExtremum


class SignTest(NamedTuple):  # a comparison of parameter-dependent values, used by select_n
    left: object
    right: object
    true_if_left_greater: bool
    op: Operation


class PiecewiseLinearRules:
    """The rewrites; `shadow` maps g(z) to (z, P, N) for the monotone activations g, `splits`
    (u, P, N) to the slot of that split."""

    def rearrange_shadow(self, op, operand, inputs):
        """The same rearrangement of the activation's pre-activations (see the docstring)."""
        z, positive, negative = self.shadow[operand]
        out = op.outputs[0]
        moved = self.new_slot(out, self.degree[out])
        self.steps.append(Bind(op.eqn, tuple(z if a == operand else a for a in inputs), (moved,)))
        self.shadow[out] = (moved, positive, negative)

    def select(self, op):
        """jnp.where: by a predicate that does not depend on params (linear in the cases), or
        by a comparison of parameter-dependent values (a split, a max or a min)."""
        eqn, (predicate, *cases), out = op.eqn, op.inputs, op.outputs[0]
        self.degree[out] = self.common_degree(op, cases)
        test = self.sign_test[predicate] if self.is_sign_test(predicate) else None
        if test is None:
            if self.dependent(predicate):
                raise self.error(op, "selects by a parameter-dependent index: not supported")
            self.steps.append(Bind(eqn, op.inputs, op.outputs))
            return
        false_case, true_case = cases
        bases = [self.multiple_of(a) for a in (test.left, test.right, false_case, true_case)]
        nonzero = {base for base, _ in bases if base is not None} if all(bases) else ()
        if len(nonzero) == 1 and bases[0][1] != bases[1][1]:
            # All four are multiples of one value z: the predicate is the sign of z.
            (_, left), (_, right), (_, if_false), (_, if_true) = bases
            true_if_positive = (left > right) == test.true_if_left_greater
            positive, negative = (if_true, if_false) if true_if_positive else (if_false, if_true)
            self.split(out, nonzero.pop(), positive, negative)
            return
        greater, smaller = (test.left, test.right)[:: 1 if test.true_if_left_greater else -1]
        if (true_case, false_case) in ((greater, smaller), (smaller, greater)):
            self.pair(out, true_case, false_case, 1 if true_case == greater else -1)
            return
        raise self.error(
            op,
            "chooses by a comparison of parameter-dependent values between values other than"
            " the compared ones (max, min) or multiples of one value (relu, leaky relu)",
        )

    def extremum(self, op, sign):
        """max/min of two values (sign 1/-1), over axes, or over pooling windows."""
        eqn, name, operand, out = op.eqn, op.eqn.primitive.name, op.inputs[0], op.outputs[0]
        if name in ("max", "min"):
            self.degree[out] = self.common_degree(op, op.inputs)
            return self.pair(out, *op.inputs, sign)
        self.degree[out] = self.degree[operand]
        params = eqn.params
        if name.startswith("reduce_window"):
            padded = any(p != (0, 0) for p in params["padding"])
            if padded or any(d != 1 for d in params["base_dilation"]):
                raise self.error(
                    op,
                    "with padding or base dilation is not supported; pad the input explicitly"
                    " (with zeros after a relu) instead",
                    NotImplementedError,
                )
            window = (params["window_dimensions"], params["window_strides"])
            make = lambda o, z: WindowExtremum(o, z, *window, params["window_dilation"], sign)  # noqa: E731
        else:
            make = lambda o, z: ReduceExtremum(o, z, tuple(params["axes"]), sign)  # noqa: E731
        if operand in self.shadow:
            z, positive, negative = self.shadow[operand]
            extreme = self.new_slot(out, self.degree[out])
            self.steps.append(make(extreme, z))
            return self.split(out, extreme, positive, negative)
        self.steps.append(make(out, operand))

    def pair(self, out, a, b, sign):
        """out = max(a, b) (sign 1) or min(a, b) (sign -1)."""
        (base_a, factor_a), (base_b, factor_b) = self.multiple_of(a), self.multiple_of(b)
        if base_a is None or base_b is None or base_a == base_b:
            # Multiples of one value z: max(c_a z, c_b z) splits z by its sign.
            extremes = (max(factor_a, factor_b), min(factor_a, factor_b))[::sign]
            return self.split(out, base_a if base_b is None else base_b, *extremes)
        if a in self.shadow and b in self.shadow and self.shadow[a][1:] == self.shadow[b][1:]:
            (z_a, positive, negative), (z_b, *_) = self.shadow[a], self.shadow[b]
            extreme = z_a
            if z_a != z_b:
                extreme = self.new_slot(out, self.degree[out])
                self.steps.append(PairExtremum(extreme, z_a, z_b, sign))
            return self.split(out, extreme, positive, negative)
        self.steps.append(PairExtremum(out, a, b, sign))

    def split(self, out, u, positive, negative):
        """out = positive * u where u > 0, negative * u where u < 0."""
        if u in self.shadow:  # g2(g1(z)) for g1 sign-preserving: one split of z
            z, p1, n1 = self.shadow[u]
            u, positive, negative = z, p1 * positive, n1 * negative
        if positive == negative:
            self.steps.append(Scale(out, u, positive))
            base, factor = self.multiple.get(u, (u, 1.0))
            self.multiple[out] = (base, factor * positive)
            return
        key = (u, float(positive), float(negative))
        if key in self.splits:  # the same split again (jax.nn.relu(z) written twice)
            self.same[out] = self.splits[key]
            return
        self.splits[key] = out
        self.steps.append(SignSplit(out, *key))
        if positive > 0 and negative >= 0:
            self.shadow[out] = (u, positive, negative)
