"""The asymptotic engine on a fixed family of problems chosen before tuning, against GD.

    python bench/family.py [--timeout 120] [--only NAME] [--first N] [--no-gd] [--solver S]
                           [--shard K/N]

The family (fixed by the seed below, not tuned on): 30 synthetic problems, bias-free ReLU MLPs
with n in {20, 50, 100, 200, 400}, d in {2, 4, 8, 16, 64}, width in {8, 16, 32, 64, 128},
L in {2, 3, 4, 5}, init scale in {0.1, 0.3, 0.5, 1.0} and labels, in turn, from a linear rule,
an XOR-like product rule or a random bias-free ReLU teacher (width 8, output weights four +1 and
four -1); and 12 real ones that scikit-learn ships (iris, wine and breast cancer standardised,
digit pairs at full size), with L and width varied. Each problem runs gradient_flow(solver=...)
to beta = 1e12 from its initial point in a process of its own, stopped after --timeout seconds
(compilation included). Then loss-based GD (Lyu & Li's schedule) runs from the same point for
the same wall time.

Printed per problem: status, log10 beta reached, wall time, steps (accepted + rejected) of
phase 1 and after t0, where the limit flow took over, gamma~ at the end, the largest decrease of
gamma~ between saved points after t0 relative to the final gamma~ (negative: it rose between
every pair; "max decr"), and GD's log10 beta and gamma~ in the same time. Then the share that
reached beta = 1e12, and the median and worst wall time of those.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import queue
import time

import numpy as np

SEED = 20261205  # fixed before any tuning on the family
TARGET = 1e12


def _family():
    rng = np.random.default_rng(SEED)
    problems = []
    for index in range(30):
        problems.append(
            dict(
                name=f"syn{index:02d}",
                kind="synthetic",
                labels=("linear", "xor", "teacher")[index % 3],
                n=int(rng.choice([20, 50, 100, 200, 400])),
                d=int(rng.choice([2, 4, 8, 16, 64])),
                width=int(rng.choice([8, 16, 32, 64, 128])),
                depth=int(rng.choice([2, 3, 4, 5])),
                scale=float(rng.choice([0.1, 0.3, 0.5, 1.0])),
                seed=index,
            )
        )
    real = [
        ("iris", (0, 1), 3, 16),
        ("iris", (0, 2), 2, 32),
        ("iris", (0, 2), 5, 12),
        ("wine", (0, 1), 2, 32),
        ("wine", (0, 2), 3, 16),
        ("wine", (1, 2), 2, 32),
        ("cancer", (0, 1), 2, 32),
        ("cancer", (0, 1), 3, 16),
        ("digits", (3, 8), 2, 32),
        ("digits", (1, 7), 3, 16),
        ("digits", (4, 9), 2, 64),
        ("digits", (0, 6), 4, 16),
    ]
    for index, (data, classes, depth, width) in enumerate(real):
        problems.append(
            dict(
                name=f"{data}{classes[0]}{classes[1]}-L{depth}w{width}",
                kind=data,
                classes=classes,
                depth=depth,
                width=width,
                scale=0.5,
                seed=100 + index,
            )
        )
    return problems


def _standardised(X):
    X = np.asarray(X, float)
    return (X - X.mean(axis=0)) / np.where(X.std(axis=0) > 0, X.std(axis=0), 1.0)


def _data(problem):
    """(X, y) of a problem, y in {-1, +1}."""
    import sklearn.datasets as datasets

    kind = problem["kind"]
    if kind == "synthetic":
        rng = np.random.default_rng(problem["seed"])
        X = rng.standard_normal((problem["n"], problem["d"]))
        if problem["labels"] == "linear":
            score = X @ rng.standard_normal(problem["d"])
        elif problem["labels"] == "xor":
            score = X[:, 0] * X[:, 1 % problem["d"]] if problem["d"] > 1 else X[:, 0]
        else:  # a bias-free ReLU teacher of width 8, output weights +1 x 4 and -1 x 4
            W = rng.standard_normal((8, problem["d"]))
            score = np.maximum(X @ W.T, 0.0) @ np.repeat([1.0, -1.0], 4)
        return X, np.where(score >= 0, 1.0, -1.0)
    if kind == "digits":
        import jaxmargin as jm

        X, y = jm.digits_pair(*problem["classes"])
        return np.asarray(X), np.asarray(y)
    load = {"iris": datasets.load_iris, "wine": datasets.load_wine}.get(kind)
    bunch = datasets.load_breast_cancer() if kind == "cancer" else load()
    keep = np.isin(bunch.target, problem["classes"])
    y = np.where(bunch.target[keep] == problem["classes"][0], 1.0, -1.0)
    return _standardised(bunch.data[keep]), y


def _setup(problem):
    import jax

    import jaxmargin as jm

    X, y = _data(problem)
    predictor = jm.relu_mlp(problem["depth"], problem["width"], init_scale=problem["scale"])
    params = predictor.init(jax.random.key(problem["seed"]), X.shape[1])
    return predictor, params, X, y


def timed_run(name):
    """(wall seconds, solution, params) of the engine on the named problem to TARGET at rtol
    1e-6, timed from the call (a first call in a fresh process: compilation included)."""
    import jaxmargin as jm

    problem = {p["name"]: p for p in _family()}[name]
    predictor, params, X, y = _setup(problem)
    start = time.perf_counter()
    solution = jm.gradient_flow(predictor, params, X, y, beta_max=TARGET, rtol=1e-6)
    np.asarray(solution.soft_margin)  # the run is asynchronous until its output is read
    return time.perf_counter() - start, solution, params


def _run_flow(problem, solver, results):
    import jaxmargin as jm
    from jaxmargin._flow._options import ROSENBROCK

    predictor, params, X, y = _setup(problem)
    start = time.perf_counter()
    options = {"solver": solver} if solver != ROSENBROCK else {"solver": ROSENBROCK, "rtol": 1e-6}
    solution = jm.gradient_flow(predictor, params, X, y, beta_max=TARGET, **options)
    wall = time.perf_counter() - start
    status = solution.status
    soft = np.asarray(solution.soft_margin)
    after = soft[np.asarray(solution.phase) == 2]
    final = float(soft[-1])
    decrease = float(np.max(after[:-1] - after[1:])) / abs(final) if after.size > 1 else np.nan
    results.put(
        dict(
            status=status.message.split(" (")[0].split(";")[0],
            code=int(status.code),
            log10_beta=problem["depth"] * float(solution.s[-1]) / np.log(10),
            wall=wall,
            steps=np.asarray(status.steps).tolist(),
            rejected=np.asarray(status.rejected_steps).tolist(),
            log10_beta_limit=problem["depth"] * float(status.s_limit) / np.log(10),
            soft=final,
            decrease=decrease,
        )
    )


def _run_gd(problem, seconds, results):
    import jaxmargin as jm

    predictor, params, X, y = _setup(problem)
    probe = 2000
    start = time.perf_counter()
    jm.gradient_descent(predictor, params, X, y, schedule="loss_based", steps=probe, num_logs=2)
    per_step = (time.perf_counter() - start) / probe  # compilation included, as for the flow
    steps = max(int(seconds / per_step), probe)
    gd = jm.gradient_descent(
        predictor, params, X, y, schedule="loss_based", steps=steps, num_logs=10
    )
    log_rho, soft = np.asarray(gd.log_rho), np.asarray(gd.soft_margin)
    finite = np.flatnonzero(np.isfinite(log_rho) & np.isfinite(soft))
    k = int(finite[-1])
    results.put(
        dict(log10_beta=problem["depth"] * float(log_rho[k]) / np.log(10), soft=float(soft[k]))
    )


def _in_process(target, args, timeout):
    """target(*args, results) in a fresh process, stopped after `timeout` s: its result or None."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=target, args=args + (results,))
    process.start()
    try:
        return results.get(timeout=timeout)
    except queue.Empty:
        return None
    finally:
        process.kill()
        process.join()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per flow run")
    parser.add_argument("--only", default="", help="only problems whose name contains this")
    parser.add_argument("--first", type=int, default=None, help="only the first N problems")
    parser.add_argument("--no-gd", action="store_true", help="skip the GD comparison")
    parser.add_argument("--solver", default="rosenbrock")
    parser.add_argument(
        "--shard", default="0/1", help="K/N: every N-th problem from the K-th (N runs side by side)"
    )
    args = parser.parse_args()
    os.environ.setdefault("PJRT_NPROC", "1")  # as bench/asymptotic.py (docs/decisions.md D41)
    shard, shards = (int(part) for part in args.shard.split("/"))
    problems = [p for p in _family() if args.only in p["name"]][: args.first][shard::shards]
    rtol = "1e-6" if args.solver == "rosenbrock" else "the default"
    print(
        f"solver={args.solver}, rtol {rtol}, target beta = {TARGET:.0e}, "
        f"timeout {args.timeout:.0f} s"
    )
    header = (
        f"{'problem':20s} {'size':>22s} {'status':26s} {'lg beta':>7s} {'wall s':>6s} "
        f"{'steps phase1':>13s} {'steps after':>13s} {'lg b lim':>8s} {'gamma~':>10s} "
        f"{'max decr':>9s} {'GD lg b':>7s} {'GD gamma~':>10s}"
    )
    print(header, flush=True)
    reached = []
    for problem in problems:
        size = (
            f"n{problem['n']} d{problem['d']} w{problem['width']} L{problem['depth']}"
            f" {problem['labels'][:3]} x{problem['scale']}"
            if problem["kind"] == "synthetic"
            else f"w{problem['width']} L{problem['depth']}"
        )
        start = time.perf_counter()
        flow = _in_process(_run_flow, (problem, args.solver), args.timeout)
        wall = time.perf_counter() - start
        if flow is None:
            flow = dict(status=f"TIMEOUT (> {args.timeout:.0f} s)", wall=wall)
        gd = None
        if not args.no_gd:
            gd = _in_process(_run_gd, (problem, flow["wall"]), 10 * flow["wall"] + 60)
        row = f"{problem['name']:20s} {size:>22s} {flow['status'][:26]:26s} "
        if "code" in flow:
            steps = f"{flow['steps'][0]}+{flow['rejected'][0]}"
            after = f"{flow['steps'][1]}+{flow['rejected'][1]}"
            row += (
                f"{flow['log10_beta']:7.2f} {flow['wall']:6.1f} {steps:>13s} {after:>13s} "
                f"{flow['log10_beta_limit']:8.2f} {flow['soft']:10.3e} {flow['decrease']:9.1e} "
            )
            if flow["code"] == 0 and flow["log10_beta"] >= np.log10(TARGET) - 1e-9:
                reached.append(flow["wall"])
        else:
            row += f"{'':7s} {flow['wall']:6.1f} {'':13s} {'':13s} {'':8s} {'':10s} {'':9s} "
        if gd is not None:
            row += f"{gd['log10_beta']:7.2f} {gd['soft']:10.3e}"
        print(row, flush=True)
    share = len(reached) / max(len(problems), 1)
    print(
        f"\nreached beta = {TARGET:.0e}: {len(reached)} of {len(problems)} ({100 * share:.0f}%)"
        + (
            f"; wall time of those: median {np.median(reached):.1f} s, worst {max(reached):.1f} s"
            if reached
            else ""
        )
    )


if __name__ == "__main__":
    main()
