"""How far towards beta = ||w||^L -> infinity each method gets, side by side.

    python bench/asymptotic.py [--beta-max 1e12] [--max-steps 400000] [--relu-max-steps 20000]
                               [--no-relu] [--only NAME] [--kkt-steps 20000]

Cases: the linear model on Soudry et al.'s data from w = 0; a depth-2 and depth-3 deep linear
net (width 5) on random separable data (d = 10, n = 40); a depth-2 diagonal net on data with a
unique l1 max margin (d = 8, n = 20); the reference ReLU problem of docs/background.md §6 (L = 2,
3). For each: jm.gradient_flow(solver="rosenbrock") to beta_max or its step budget (smooth models
continue on the beta -> infinity limit flow past 1e10, or where the W-method stalls past 1e8),
then loss-based-LR gradient descent (Lyu & Li's schedule) from the same start for the same wall
time. Printed: wall time (compilation included), status, beta reached by each and the ratio in
log10, final soft margins, the largest relative decrease of the soft margin after t0 (Theorem 5)
and, where an exact limit exists, the distance of the final direction to it (the SVM direction
in l2; for the diagonal net the l1 max-margin direction, both l1-normalised, in l1).

ReLU cases (no exact limit is known): after the table row, the flow's last point is continued on
jm.limit_flow until ||dtheta/ds|| < 1e-7 (or --kkt-steps), and kkt_certificate (sampled Clarke
elements and the gate fit, NNLS) is printed for the engine's last point and for the converged
one; not continued when the engine stopped before beta = 1e6 (the limit flow would not be the
flow there).
"""

from __future__ import annotations

import argparse
import os
import time

# One thread in XLA:CPU's pool (read when JAX starts its CPU backend; an explicit PJRT_NPROC
# wins): the engine's programs are thousands of small operations in while loops, whose hand-offs
# to a second thread cost more than they gain on 2 cores (measured: docs/decisions.md D41).
os.environ.setdefault("PJRT_NPROC", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxmargin as jm  # noqa: E402
from jaxmargin._checks import theorem5_max_decrease  # noqa: E402


def _cases(relu):
    X, y = jm.soudry_dataset(0)
    yield (
        "linear, Soudry data",
        jm.linear(),
        (jnp.zeros(2),),
        jnp.asarray(X),
        jnp.asarray(y),
        1e-8,
    )
    rng = np.random.default_rng(0)
    Xr = rng.normal(size=(40, 10))
    yr = np.sign(Xr @ rng.normal(size=10))
    for depth in (2, 3):
        predictor = jm.deep_linear(depth, 5)
        yield (
            f"deep linear L={depth}",
            predictor,
            predictor.init(jax.random.key(1), 10),
            jnp.asarray(Xr),
            jnp.asarray(yr),
            1e-6,
        )
    rng = np.random.default_rng(3)
    Xd = rng.standard_normal((20, 8))
    yd = np.sign(Xd[:, 0] - 0.7 * Xd[:, 1])
    predictor = jm.diagonal_linear(2)
    yield (
        "diagonal L=2 (l1)",
        predictor,
        predictor.init(jax.random.key(0), 8),
        jnp.asarray(Xd),
        jnp.asarray(yd),
        1e-6,
    )
    if not relu:
        return
    for depth in (2, 3):
        predictor, params, X, y = jm.reference_problem(depth)
        yield f"ReLU reference L={depth}", predictor, params, X, y, 1e-6


def _distance_to_limit(predictor, params, X, y):
    if predictor.end_to_end is None:
        return float("nan")
    beta = np.asarray(predictor.end_to_end(params), dtype=float)
    beta = beta / np.max(np.abs(beta))  # beta reaches 1e300: scale before squaring
    if predictor.name.startswith("diagonal_linear(depth=2"):
        return float(np.abs(beta / np.abs(beta).sum() - jm.l1_max_margin(X, y).direction).sum())
    return float(np.linalg.norm(beta / np.linalg.norm(beta) - jm.svm_direction(X, y).direction))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--beta-max", type=float, default=1e12)
    parser.add_argument("--max-steps", type=int, default=400_000)
    parser.add_argument(
        "--relu-max-steps",
        type=int,
        default=20_000,
        help="phase-2 budget of the ReLU cases (the W-method crawls there)",
    )
    parser.add_argument("--no-relu", action="store_true", help="skip the ReLU cases")
    parser.add_argument(
        "--kkt-steps",
        type=int,
        default=20_000,
        help="step budget of the limit flow that continues the ReLU cases",
    )
    parser.add_argument(
        "--only", default="", help="run only the cases whose name contains this (e.g. 'ReLU')"
    )
    args = parser.parse_args()
    header = (
        f"{'case':24s} {'engine s':>9s} {'status':28s} {'log10 beta':>10s} "
        f"{'GD log10 beta':>13s} {'ratio log10':>11s} {'soft margin':>12s} "
        f"{'GD soft':>9s} {'thm5 max decr':>13s} {'dist to lim':>11s}"
    )
    print(f"PJRT_NPROC={os.environ['PJRT_NPROC']}")
    print(header)
    for name, predictor, params, X, y, rtol in _cases(not args.no_relu):
        if args.only not in name:
            continue
        start = time.perf_counter()
        solution = jm.gradient_flow(
            predictor,
            params,
            X,
            y,
            beta_max=args.beta_max,
            solver="rosenbrock",
            rtol=rtol,
            max_steps=args.relu_max_steps if predictor.kinks else args.max_steps,
        )
        wall = time.perf_counter() - start
        L = predictor.degree
        log10_beta = L * float(solution.s[-1]) / np.log(10)
        last = jax.tree.map(lambda a: a[-1], solution.params)
        # Loss-based GD for the same wall time: calibrate its speed, then run.
        probe = 20_000
        t = time.perf_counter()
        jm.gradient_descent(predictor, params, X, y, schedule="loss_based", steps=probe, num_logs=2)
        per_step = (time.perf_counter() - t) / probe
        gd = jm.gradient_descent(
            predictor,
            params,
            X,
            y,
            schedule="loss_based",
            steps=max(int(wall / per_step), probe),
            num_logs=10,
        )
        # GD's last finite log (its status says when an update went non-finite).
        finite = np.isfinite(np.asarray(gd.soft_margin)) & np.isfinite(np.asarray(gd.rho))
        k = int(np.flatnonzero(finite)[-1])
        gd_log10_beta = L * float(np.log(gd.rho[k])) / np.log(10)
        gd_soft = float(gd.soft_margin[k])
        print(
            f"{name:24s} {wall:9.1f} {solution.status.message[:28]:28s} {log10_beta:10.2f} "
            f"{gd_log10_beta:13.2f} {log10_beta - gd_log10_beta:11.2f} "
            f"{float(solution.soft_margin[-1]):12.7f} {gd_soft:9.6f} "
            f"{theorem5_max_decrease(solution):13.1e} "
            f"{_distance_to_limit(predictor, last, X, y):11.1e}  GD: {gd.status}",
            flush=True,
        )
        if predictor.kinks is not None and log10_beta >= 6.0:
            _continue_to_a_kkt_point(predictor, last, X, y, args.kkt_steps)
        elif predictor.kinks is not None:
            # Below beta ~ 1e6 the limit flow is not the flow (O(1/beta)): not run.
            print(
                f"{'':24s} KKT stationarity "
                f"{jm.kkt_certificate(predictor, last, X, y, clarke_samples=512).stationarity:.1e}"
                " at the engine's end; not continued (the engine stopped before beta = 1e6, "
                "where the limit flow takes over)",
                flush=True,
            )


def _continue_to_a_kkt_point(predictor, last, X, y, max_steps):
    """The KKT certificate at the engine's last point, then at the end of the limit flow run
    from there until the direction converges (||dtheta/ds|| < 1e-7)."""
    start = time.perf_counter()
    limit = jm.limit_flow(predictor, last, X, y, s_max=1e5, direction_tol=1e-7, max_steps=max_steps)
    wall = time.perf_counter() - start
    end = jax.tree.map(lambda a: a[-1], limit.directions)
    before, after = (
        jm.kkt_certificate(predictor, params, X, y, clarke_samples=512) for params in (last, end)
    )
    print(
        f"{'':24s} KKT stationarity {before.stationarity:.1e} at the engine's end; limit_flow "
        f"{wall:.1f} s, {limit.steps} steps, to s = {limit.s[-1]:.0f} (beta = 10^"
        f"{predictor.degree * limit.s[-1] / np.log(10):.0f}): {limit.message[:22]}, speed "
        f"{limit.speed:.1e}, KKT stationarity {after.stationarity:.1e}, margin "
        f"{limit.margin[-1]:.7f}",
        flush=True,
    )


if __name__ == "__main__":
    main()
