"""Wall time of a first run (compilation included) with one and with two compile threads.

    python bench/compile_workers.py [NAME ...]

For each problem of bench/family.py named (default: four of L = 2 and 3, small to medium), the
default engine to beta = 1e12 at rtol 1e-6, each run in a fresh process (so that it compiles
every stage), once with `_pipeline.COMPILE_WORKERS = 1` and once with 2 (docs/decisions.md
D53). Prints both wall times side by side, their ratio, and both runs' end (the same program:
gamma~ equal to the last digit).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

DEFAULT = ("syn21", "iris01-L3w16", "wine01-L2w32", "syn05")


def _one(name, workers):
    os.environ.setdefault("PJRT_NPROC", "1")  # as bench/asymptotic.py (docs/decisions.md D41)
    sys.path.insert(0, os.path.dirname(__file__))
    import family

    import jaxmargin as jm
    from jaxmargin._flow import _pipeline

    _pipeline.COMPILE_WORKERS = workers
    wall, solution, _ = family.timed_run(name)
    gamma = float(solution.soft_margin[-1])
    print(f"{wall:.2f} {gamma!r} {jm.Status(int(solution.status.code)).name}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=DEFAULT)
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # (name, workers): a child
    args = parser.parse_args()
    if args.one:
        _one(args.one[0], int(args.one[1]))
        return
    print(
        f"{'problem':16} {'1 thread s':>10} {'2 threads s':>11} {'ratio':>6}  end (gamma~, status)"
    )
    for name in args.names:
        results = []
        for workers in (1, 2):
            child = subprocess.run(
                [sys.executable, __file__, "--one", name, str(workers)],
                capture_output=True,
                text=True,
                check=True,
            )
            results.append(child.stdout.split())
        (t1, g1, s1), (t2, g2, s2) = results
        same = "same" if (g1, s1) == (g2, s2) else f"DIFFERENT: {g2} {s2}"
        ratio = float(t1) / float(t2)
        print(f"{name:16} {float(t1):10.1f} {float(t2):11.1f} {ratio:6.2f}  {g1} {s1} ({same})")


if __name__ == "__main__":
    main()
