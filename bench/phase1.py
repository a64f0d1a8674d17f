"""Phase 1 on the family's ReLU problems: the activation pattern frozen per step against the
live pattern, side by side.

    python bench/phase1.py [--timeout 120] [--only NAME] [--first N] [--rtol 1e-6]

Each problem of bench/family.py runs to t0 (s_max = -50: the run stops where the soft margin
first exceeds 0) twice in a process of its own:
- "frozen": solver="rosenbrock", whose phase 1 freezes the activation pattern per step, lands
  on kink crossings and holds sliding pairs at their Clarke element (docs/decisions.md D54);
- "live": solver="dopri5" with the default sliding band, Dormand-Prince 5(4) on the field with
  the live pattern (the Clarke element within the band): the engine's phase 1 before D54.
Printed per problem and integrator: status, accepted + rejected steps, wall time of a second
call (compilation excluded) and of the first (included), tau0 and s0; then the ratio of the
live wall time to the frozen one, and the relative differences of tau0 and s0.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import family  # noqa: E402

INTEGRATORS = {"frozen": {"solver": "rosenbrock"}, "live": {"solver": "dopri5"}}


def _run(problem, name, rtol, results):
    import jaxmargin as jm

    predictor, params, X, y = family._setup(problem)
    options = dict(INTEGRATORS[name], rtol=rtol, s_max=-50.0, num_saves=8)
    walls = []
    for _ in range(2):
        start = time.perf_counter()
        solution = jm.gradient_flow(predictor, params, X, y, **options)
        status = solution.status
        np.asarray(status.code)
        walls.append(time.perf_counter() - start)
    results.put(
        dict(
            status=status.message.split(" (")[0].split(";")[0][:24],
            steps=int(np.asarray(status.steps)[0]),
            rejected=int(np.asarray(status.rejected_steps)[0]),
            wall=walls[1],
            first=walls[0],
            tau0=float(status.tau0),
            s0=float(status.s0),
        )
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per run")
    parser.add_argument("--only", default="", help="only problems whose name contains this")
    parser.add_argument("--first", type=int, default=None, help="only the first N problems")
    parser.add_argument("--rtol", type=float, default=1e-6)
    args = parser.parse_args()
    os.environ.setdefault("PJRT_NPROC", "1")
    problems = [p for p in family._family() if args.only in p["name"]][: args.first]
    print(f"phase 1 to t0, rtol {args.rtol:g}, timeout {args.timeout:g} s per run")
    header = f"{'problem':<16}{'integrator':<11}{'status':<26}{'steps':>14}{'wall s':>8}"
    print(header + f"{'first s':>9}{'tau0':>12}{'s0':>10}")
    for problem in problems:
        outcomes = {}
        for name in INTEGRATORS:
            out = family._in_process(_run, (problem, name, args.rtol), args.timeout)
            outcomes[name] = out
            if out is None:
                print(f"{problem['name']:<16}{name:<11}TIMEOUT (> {args.timeout:g} s)")
                continue
            steps = f"{out['steps']}+{out['rejected']}"
            print(
                f"{problem['name']:<16}{name:<11}{out['status']:<26}{steps:>14}"
                f"{out['wall']:>8.1f}{out['first']:>9.1f}{out['tau0']:>12.6g}{out['s0']:>10.6g}"
            )
        frozen, live = outcomes["frozen"], outcomes["live"]
        if frozen is not None and live is not None:
            print(
                f"{'':<16}live / frozen wall {live['wall'] / frozen['wall']:.1f}x; "
                f"tau0 differs by {abs(live['tau0'] / frozen['tau0'] - 1):.1e}, "
                f"s0 by {abs(live['s0'] / frozen['s0'] - 1):.1e}",
                flush=True,
            )


if __name__ == "__main__":
    main()
