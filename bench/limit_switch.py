"""What the switch to the limit flow does to the margins of the minimum-margin set E.

    python bench/limit_switch.py [NAME ...]

For problems of bench/family.py (default: iris 0 vs 2, L = 2, and syn01): the engine to
beta = 1e6 (the switch with kinks), then the limit flow's entry from that point
(`jm.limit_flow`, a few steps). Prints, on E (the limit weights lambda > 1e-12), beta (q_i -
q_min) at the stiff stage's last point against -ln(lambda_i / lambda_max) (the spread at which
the softmax weights p of the flow at finite beta equal lambda), the same at the limit flow's
entry (all 0: its margins on E are equal), and the fall of the soft margin between the two
points times beta (docs/benchmarks.md, the family after D49).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("PJRT_NPROC", "1")  # as bench/asymptotic.py (docs/decisions.md D41)
sys.path.insert(0, os.path.dirname(__file__))

import family  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

import jaxmargin as jm  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=("iris02-L2w32", "syn01"))
    args = parser.parse_args()
    problems = {p["name"]: p for p in family._family()}
    np.set_printoptions(precision=4, suppress=True)
    for name in args.names:
        predictor, params, X, y = family._setup(problems[name])
        sol = jm.gradient_flow(
            predictor, params, X, y, beta_max=1e6, solver="rosenbrock", rtol=1e-6
        )
        last = jax.tree.map(lambda a: a[-1], sol.params)
        w, unravel = ravel_pytree(last)
        s = float(jm.log_norm(w))
        beta = np.exp(predictor.degree * s)

        def margins(theta, unravel=unravel):
            per_example = jax.vmap(lambda x: predictor.apply(unravel(theta), x))
            return np.asarray(y * per_example(jnp.asarray(X)))

        def soft(q, beta=beta):
            return q.min() - np.log(np.sum(np.exp(-beta * (q - q.min())))) / beta

        q_stiff = margins(w / np.linalg.norm(w))
        entry = jm.limit_flow(predictor, last, X, y, s_max=s + 1e-6, max_steps=3)
        q_entry = margins(ravel_pytree(jax.tree.map(lambda a: a[0], entry.directions))[0])
        lam = np.asarray(entry.multipliers)
        on_e = lam > 1e-12
        spread_stiff = (q_stiff - q_stiff.min())[on_e] * beta
        spread_entry = (q_entry - q_entry.min())[on_e] * beta
        fall = (soft(q_stiff) - soft(q_entry)) * beta
        print(f"{name}: beta = {beta:.3e}, |E| = {int(on_e.sum())}, lambda on E {lam[on_e]}")
        print(f"  stiff stage's last point, beta (q_i - q_min) on E: {spread_stiff}")
        print(
            f"  -ln(lambda_i / lambda_max):                        {-np.log(lam[on_e] / lam.max())}"
        )
        print(f"  limit flow's entry, beta (q_i - q_min) on E:       {spread_entry}")
        before, after = float(soft(q_stiff)), float(soft(q_entry))
        print(f"  soft margin {before!r} -> {after!r}, fall x beta {fall:.4f}")


if __name__ == "__main__":
    main()
