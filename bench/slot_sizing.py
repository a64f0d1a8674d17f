"""Wall time of a first run (compilation included) with the kink work sized by the pairs on
kinks (two loops per stage, D49) and at the capacity alone (one loop), against the default rule.

    python bench/slot_sizing.py [NAME ...]

For each problem of bench/family.py named, the default engine to beta = 1e12 at rtol 1e-6, each
run in a fresh process (so that it compiles every stage): with one slot size per stage (the
capacity), with the smaller size too (docs/decisions.md D49), and as the default rule picks
(the smaller size only where the capacity's kink work per step, slots^2 x parameters, reaches
_stepping.SIZED_SLOTS_MIN_WORK: D55). Prints the three wall times, the rule's pick, and each
run's steps and end.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys

DEFAULT = ("syn02", "iris02-L5w12", "syn24", "syn18", "syn05", "syn09", "syn03")
MODES = {"one": math.inf, "sized": 0.0, "rule": None}


def _one(name, mode):
    os.environ.setdefault("PJRT_NPROC", "1")  # as bench/asymptotic.py (docs/decisions.md D41)
    sys.path.insert(0, os.path.dirname(__file__))
    import family
    import jax
    import numpy as np

    import jaxmargin as jm
    from jaxmargin._flow import _stepping

    if MODES[mode] is not None:
        _stepping.SIZED_SLOTS_MIN_WORK = MODES[mode]
    wall, solution, params = family.timed_run(name)
    steps = "+".join(str(int(k)) for k in np.asarray(solution.status.steps))
    d = sum(np.size(leaf) for leaf in jax.tree.leaves(params))
    sized = 128**2 * d >= _stepping.SIZED_SLOTS_MIN_WORK
    print(
        f"{wall:.2f} {float(solution.soft_margin[-1]):.6e} {steps} "
        f"{jm.Status(int(solution.status.code)).name} {'sized' if sized else 'one'}"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=DEFAULT)
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # (name, mode): a child
    args = parser.parse_args()
    if args.one:
        _one(*args.one)
        return
    print(f"{'problem':16} {'one s':>7} {'sized s':>8} {'rule s':>7} {'rule':>6}  end per mode")
    for name in args.names:
        results = {}
        for mode in MODES:
            child = subprocess.run(
                [sys.executable, __file__, "--one", name, mode],
                capture_output=True,
                text=True,
            )
            out = child.stdout.split()
            results[mode] = (
                out if child.returncode == 0 and out else ["nan", "-", "-", "FAILED", "-"]
            )
        walls = " ".join(f"{float(results[m][0]):7.1f}" for m in ("one", "sized"))
        ends = "; ".join(f"{m}: {r[1]} {r[2]} {r[3]}" for m, r in results.items())
        print(f"{name:16} {walls} {float(results['rule'][0]):7.1f} {results['rule'][4]:>6}  {ends}")


if __name__ == "__main__":
    main()
