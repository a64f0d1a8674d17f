"""Flow engine vs naive diffrax vs gradient descent on the reference problem.

    python bench/flow_engine.py [--depths 2 3] [--max-steps 4000] [--ds 1.5]

On jm.reference_problem (docs/background.md §6), for each depth, side by side in one process:
- engine: jm.gradient_flow (tau clock to t0, polar clock after, Filippov velocities on kinks),
  run from params0 to s0 + ds;
- naive: diffrax Tsit5 on the seed's tau-flow with the autodiff element, same step budget;
- GD: constant-step and loss-based gradient descent, run for the engine's wall time.
Printed: solver steps, field/gradient evaluations, wall time (compilation included), the clock
reached and the soft margin, and the ratios against the engine.
"""

from __future__ import annotations

import argparse
import time

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import jaxmargin as jm

TSIT5_STAGES = 6  # evaluations per step (FSAL saves the seventh)


def naive_tau_flow(predictor, params0, X, y, max_steps, tau_max=1e3):
    flat0, unravel = ravel_pytree(params0)

    def field(tau, w, args):
        del tau, args
        return jax.grad(lambda v: -jax.nn.logsumexp(-jm.margins(predictor, unravel(v), X, y)))(w)

    def separated(t, y, args, **kwargs):
        del t, args, kwargs
        return -jax.nn.logsumexp(-jm.margins(predictor, unravel(y), X, y_labels))

    y_labels = y
    solve = jax.jit(
        lambda w: diffrax.diffeqsolve(
            diffrax.ODETerm(field),
            diffrax.Tsit5(),
            0.0,
            tau_max,
            None,
            w,
            stepsize_controller=diffrax.PIDController(rtol=1e-6, atol=1e-9),
            event=diffrax.Event(separated, direction=True),
            max_steps=max_steps,
            throw=False,
        )
    )
    start = time.perf_counter()
    solution = solve(flat0)
    w_end = jax.block_until_ready(solution.ys)[-1]
    wall = time.perf_counter() - start
    steps = int(solution.stats["num_accepted_steps"]) + int(solution.stats["num_rejected_steps"])
    params = unravel(w_end)
    return {
        "steps": steps,
        "evaluations": TSIT5_STAGES * steps,
        "wall": wall,
        "reached": f"tau={float(solution.ts[-1]):.3g}",
        "rho": float(jnp.exp(jm.log_norm(params))),
        "soft": float(jm.soft_margin(predictor, params, X, y)),
        "note": "t0 reached"
        if solution.result == diffrax.RESULTS.event_occurred
        else "stalled before t0",
    }


def engine(predictor, params0, X, y, s_target, max_steps):
    start = time.perf_counter()
    solution = jm.gradient_flow(
        predictor,
        params0,
        X,
        y,
        s_max=s_target,
        max_steps=max_steps,
        rtol=1e-6,
        atol=1e-9,
        num_saves=60,
        solver="tsit5",
    )
    wall = time.perf_counter() - start
    steps = int(np.sum(solution.status.steps) + np.sum(solution.status.rejected_steps))
    return {
        "steps": steps,
        "evaluations": TSIT5_STAGES * steps,
        "wall": wall,
        "reached": f"s={float(solution.s[-1]):.3f}",
        "rho": float(solution.rho[-1]),
        "soft": float(solution.soft_margin[-1]),
        "note": solution.status.message[:40],
    }


def gd(predictor, params0, X, y, schedule, wall_budget):
    lr = 0.5 if schedule == "constant" else None
    steps = 2000
    while True:
        start = time.perf_counter()
        trajectory = jm.gradient_descent(
            predictor, params0, X, y, schedule=schedule, lr=lr, steps=steps, num_logs=20
        )
        wall = time.perf_counter() - start
        if wall > wall_budget or steps >= 2_000_000:
            break
        steps = int(steps * min(8.0, max(1.5, wall_budget / max(wall, 1e-3))))
    return {
        "steps": steps,
        "evaluations": steps,
        "wall": wall,
        "reached": f"ln t={float(trajectory.log_time[-1]):.3g}",
        "rho": float(trajectory.rho[-1]),
        "soft": float(trajectory.soft_margin[-1]),
        "note": trajectory.status,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--max-steps", type=int, default=4000)
    parser.add_argument("--ds", type=float, default=1.5, help="engine target: s0 + ds")
    args = parser.parse_args()
    print(f"devices: {jax.devices()}; reference problem (n=50, d=5, width 32)")
    for depth in args.depths:
        predictor, params0, X, y = jm.reference_problem(depth)
        to_t0 = jm.gradient_flow(
            predictor, params0, X, y, s_max=-50.0, rtol=1e-6, atol=1e-9, solver="tsit5"
        )
        s_target = float(to_t0.status.s0) + args.ds
        rows = {"engine": engine(predictor, params0, X, y, s_target, args.max_steps)}
        rows["naive Tsit5 (tau)"] = naive_tau_flow(predictor, params0, X, y, args.max_steps)
        budget = rows["engine"]["wall"]
        rows["GD constant lr=0.5"] = gd(predictor, params0, X, y, "constant", budget)
        rows["GD loss-based"] = gd(predictor, params0, X, y, "loss_based", budget)
        base = rows["engine"]
        print(
            f"\nL = {depth}: t0 at s0 = {float(to_t0.status.s0):.4f}, engine target s = "
            f"{s_target:.4f} (beta = {np.exp(depth * s_target):.3g})"
        )
        print(
            f"{'method':<20}{'steps':>9}{'grad evals':>12}{'wall s':>9}{'evals/engine':>13}"
            f"{'reached':>14}{'rho':>10}{'log10 beta':>11}{'soft margin':>13}  note"
        )
        for name, row in rows.items():
            print(
                f"{name:<20}{row['steps']:>9}{row['evaluations']:>12}{row['wall']:>9.1f}"
                f"{row['evaluations'] / base['evaluations']:>13.2f}{row['reached']:>14}"
                f"{row['rho']:>10.3g}{depth * np.log10(row['rho']):>11.2f}"
                f"{row['soft']:>13.6f}  {row['note']}"
            )


if __name__ == "__main__":
    main()
