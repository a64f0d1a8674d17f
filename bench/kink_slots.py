"""The stiff stage's cost per step attempt with kink work sized by the pairs on kinks, against
sized by the capacity (kink_slots).

    python bench/kink_slots.py [NAME ...] [--attempts 300]

For each problem of bench/family.py named (default: four, L = 2, 3, 5, n = 50 to 357): phase 1
to t0, then the stiff stage for --attempts step attempts, compiled ahead and timed without
compilation, twice: with every step's kink work (Clarke element, projection onto the kinks) at
the capacity's 128 slots (SLOT_SIZES = ()), and with the default slot sizes (a smaller size while
the pairs on kinks fit it; docs/decisions.md D49). Prints ms per attempt side by side, their
ratio, the stage's compilation time each way (the sized stage compiles a loop per size), and
both runs' steps and end point (the steps take the same path up to rounding).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("PJRT_NPROC", "1")  # as bench/asymptotic.py (docs/decisions.md D41)
sys.path.insert(0, os.path.dirname(__file__))

import family  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxmargin._flow import _asymptotic, _engine  # noqa: E402
from jaxmargin._flow import _stepping as stepping  # noqa: E402

DEFAULT = ("syn15", "iris02-L5w12", "digits38-L2w32", "wine02-L3w16")


def _stiff_run(static, params0, X, y, first, slot_sizes):
    stepping.SLOT_SIZES = slot_sizes
    stepping.SIZED_SLOTS_MIN_WORK = 0  # sized wherever SLOT_SIZES has a size below the capacity

    def stage(p0, X, y, first):
        return _asymptotic.stage_stiff(static, p0, X, y, first, jnp.asarray(0.0))

    start = time.perf_counter()
    compiled = jax.jit(stage).lower(params0, X, y, first).compile()
    compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    out = jax.block_until_ready(compiled(params0, X, y, first))
    return out.run, time.perf_counter() - start, compile_seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=DEFAULT)
    parser.add_argument("--attempts", type=int, default=300)
    args = parser.parse_args()
    problems = {p["name"]: p for p in family._family()}
    default_sizes = stepping.SLOT_SIZES
    print(
        f"{'problem':16s} {'d':>6s} {'n':>4s} | ms/attempt: capacity  sized  ratio "
        "| compile s: capacity  sized | steps, s"
    )
    for name in args.names:
        problem = problems[name]
        predictor, params, X, y = family._setup(problem)
        options = dict(solver="rosenbrock", rtol=1e-6, max_steps=args.attempts)
        _, static, params0, X, y, s_target = _engine._setup(
            predictor, params, X, y, 1e12, None, None, options, False
        )
        first = jax.jit(
            lambda p0, X, y: _asymptotic.stage_phase1(
                static._replace(max_steps=100_000), p0, X, y, 1e4, s_target
            )
        )(params0, X, y)
        runs = [_stiff_run(static, params0, X, y, first, sizes) for sizes in ((), default_sizes)]
        stepping.SLOT_SIZES = default_sizes
        cost = [1e3 * wall / int(run.steps + run.rejected) for run, wall, _ in runs]
        paths = "  ".join(
            f"{int(run.steps)}+{int(run.rejected)} s={float(run.x):.4f}" for run, _, _ in runs
        )
        d = sum(np.size(leaf) for leaf in params0)
        print(
            f"{name:16s} {d:6d} {X.shape[0]:4d} | {cost[0]:19.1f} {cost[1]:6.1f} "
            f"{cost[0] / cost[1]:6.2f} | {runs[0][2]:18.1f} {runs[1][2]:6.1f} | {paths}",
            flush=True,
        )


if __name__ == "__main__":
    main()
