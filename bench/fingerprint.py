"""The engine's reference runs, their steps and results printed to the last digit.

    python bench/fingerprint.py [--only NAME]

For checking that a change meant to leave the engine's numerics alone (a restructure, a
refactor) does so: run it before and after and diff the outputs (the wall times aside). Cases:
bench/asymptotic.py's (linear on Soudry's data, deep linear L = 2, 3, diagonal L = 2, the
reference ReLU problem L = 2, 3) by gradient_flow(solver="rosenbrock") to beta = 1e12, the ReLU
ones continued by limit_flow for 3000 steps; a Tsit5 run (ReLU L = 2 to beta = 1e3) and a
gradient_flow_batch of two deep-linear seeds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("PJRT_NPROC", "1")  # as bench/asymptotic.py (docs/decisions.md D41)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxmargin as jm  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from asymptotic import _cases  # noqa: E402


def _show(name, sol, wall):
    st = sol.status
    print(
        f"{name:24s} {wall:6.1f}s code={int(st.code)} steps={np.asarray(st.steps).tolist()} "
        f"rej={np.asarray(st.rejected_steps).tolist()} s0={float(st.s0)!r} "
        f"tau0={float(st.tau0)!r} log_t0={float(st.log_t0)!r} rows={sol.s.shape[0]} "
        f"s_end={float(sol.s[-1])!r} soft={float(sol.soft_margin[-1])!r} "
        f"hard={float(sol.hard_margin[-1])!r} tau={float(sol.tau[-1])!r} "
        f"log_t={float(sol.log_t[-1])!r} sum_soft={float(np.sum(np.asarray(sol.soft_margin)))!r}",
        flush=True,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run only the cases whose name contains this")
    only = parser.parse_args().only
    for name, predictor, params, X, y, rtol in _cases(True):
        if only not in name:
            continue
        start = time.perf_counter()
        sol = jm.gradient_flow(
            predictor,
            params,
            X,
            y,
            beta_max=1e12,
            solver="rosenbrock",
            rtol=rtol,
            max_steps=20_000 if predictor.kinks else 400_000,
        )
        _show(name, sol, time.perf_counter() - start)
        if predictor.kinks is not None:
            last = jax.tree.map(lambda a: a[-1], sol.params)
            start = time.perf_counter()
            lim = jm.limit_flow(
                predictor, last, X, y, s_max=1e5, direction_tol=1e-7, max_steps=3000
            )
            print(
                f"{'  limit_flow':24s} {time.perf_counter() - start:6.1f}s steps={lim.steps} "
                f"s_end={float(lim.s[-1])!r} margin={float(lim.margin[-1])!r} "
                f"speed={float(lim.speed)!r} msg={lim.message}",
                flush=True,
            )
    if only:
        return
    predictor, params, X, y = jm.reference_problem(2)
    start = time.perf_counter()
    sol = jm.gradient_flow(predictor, params, X, y, beta_max=1e3, solver="tsit5")
    _show("tsit5 ReLU L=2 1e3", sol, time.perf_counter() - start)
    predictor = jm.deep_linear(2, 5)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 10))
    y = np.sign(X @ rng.normal(size=10))
    params = jax.vmap(lambda k: predictor.init(k, 10))(jax.random.split(jax.random.key(1), 2))
    start = time.perf_counter()
    batch = jm.gradient_flow_batch(
        predictor,
        params,
        jnp.asarray(X),
        jnp.asarray(y),
        beta_max=1e12,
        solver="rosenbrock",
        rtol=1e-6,
    )
    print(
        f"batch deep linear {time.perf_counter() - start:.1f}s "
        f"{np.asarray(batch.status.code).tolist()} {np.asarray(batch.status.steps).tolist()} "
        f"{[repr(float(v)) for v in np.asarray(batch.status.best_soft_margin)]}",
        flush=True,
    )


if __name__ == "__main__":
    main()
