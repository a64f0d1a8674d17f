"""Work-precision of the flow engine against fixed-step Euler (GD) and naive Tsit5.

    python bench/work_precision.py [--beta 1e4] [--depth 2]

Problem: a deep linear net (width 32, init N(0, 1/fan_in) x 0.5) on the data of the reference
problem of docs/background.md §6 (n = 50, d = 5). All methods start from the same point
w1 = w(t0), found by scipy's DOP853 on the tau-flow (tests/flow_references.py, numpy field with
analytic gradients, independent of jaxmargin._flow), and are compared at the same point of the
path: ||w||^L = beta.

- reference: scipy DOP853 (rtol 1e-10) on the polar clock from w1 (tests/flow_references.py);
  checked against the engine at its tightest tolerance (printed);
- engine: jm.gradient_flow(solver="rosenbrock") from w1 (phase 1 ends at once: polar clock
  from t0), a range of rtol (the engine's explicit Tsit5 polar phase is left out: at this beta it
  is stiff, and at rtol 1e-3 it exhausted 2,000,000 steps);
- Euler: fixed-step Euler on the seed's tau-flow dw/dtau = -grad ln L (gradient descent on
  ln L with a constant step), a range of steps, gamma~ interpolated linearly in s = ln ||w||
  between the two iterates around the target;
- naive Tsit5: diffrax Tsit5 on the tau-flow with a PID controller and an event at the target.

Error: |gamma~ - gamma~_ref| / gamma~_ref. Work: gradient evaluations, counted as evaluations
of the per-example gradients of all n examples (the cost of one full-batch gradient):
Euler 1 per step; Tsit5 6 per attempted step; the Rosenbrock-W method 7 per attempted
step (three fields: two stages and the step's end for the ln t quadrature; one JVP in s
counted as 2; two margin-only passes for the clocks counted as 1 each: an upper bound).
At each error level the script prints, per method, the fewest evaluations of a run that
reached that error, and the ratio of the best non-engine method to the best engine variant.
Saves figures/work_precision.png.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import diffrax
import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

import jaxmargin as jm  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from flow_references import DeepLinear, polar_flow, tau_flow  # noqa: E402

EVALS_PER_ATTEMPT = 7  # the Rosenbrock-W method (see the docstring)


def problem(depth):
    _, _, X, y = jm.reference_problem(2)
    predictor = jm.deep_linear(depth, 32)
    params0 = jax.tree.map(lambda w: 0.5 * w, predictor.init(jax.random.key(1), 5))
    return predictor, params0, X, y


def start_at_t0(predictor, params0, X, y):
    """w(t0) by scipy on the tau-flow (as params), and tau0."""
    flat0, unravel = ravel_pytree(params0)
    model = DeepLinear([p.shape for p in params0])
    tau0, state = tau_flow(model, np.asarray(X), np.asarray(y), np.asarray(flat0), 1e4)
    return unravel(jnp.asarray(state[:-1])), model, tau0


def reference(model, params1, X, y, s_target):
    flat1 = np.asarray(ravel_pytree(params1)[0])
    s1 = float(np.log(np.linalg.norm(flat1)))
    _, soft, _, _ = polar_flow(
        model,
        np.asarray(X),
        np.asarray(y),
        flat1 / np.exp(s1),
        s1,
        0.0,
        0.0,
        np.array([s1, s_target]),
    )
    return float(soft[-1])


def engine(predictor, params1, X, y, s_target, rtol):
    solution = jm.gradient_flow(
        predictor,
        params1,
        X,
        y,
        s_max=s_target,
        solver="rosenbrock",
        rtol=rtol,
        atol=rtol * 1e-3,
        num_saves=8,
        max_steps=2_000_000,
    )
    attempts = int(np.sum(solution.status.steps) + np.sum(solution.status.rejected_steps))
    ok = solution.status.code == 0
    return float(solution.soft_margin[-1]) if ok else np.nan, EVALS_PER_ATTEMPT * attempts


def _tau_field(predictor, unravel, X, y):
    def log_loss(w):
        return jax.nn.logsumexp(-jm.margins(predictor, unravel(w), X, y))

    return jax.grad(lambda w: -log_loss(w))


def euler(predictor, params1, X, y, s_target, step, max_steps):
    """Fixed-step Euler on the tau-flow to ln ||w|| = s_target; (gamma~ there, steps)."""
    flat1, unravel = ravel_pytree(params1)
    field = _tau_field(predictor, unravel, X, y)

    def soft(w):
        return jm.soft_margin(predictor, unravel(w), X, y)

    @jax.jit
    def run(w):
        def cond(carry):
            w, _, k = carry
            return (jm.log_norm(w) < s_target) & (k < max_steps) & jnp.all(jnp.isfinite(w))

        def body(carry):
            w, _, k = carry
            return w + step * field(w), w, k + 1

        w_end, w_prev, k = jax.lax.while_loop(cond, body, (w, w, jnp.asarray(0)))
        s0, s1 = jm.log_norm(w_prev), jm.log_norm(w_end)
        weight = (s_target - s0) / (s1 - s0)
        return (1.0 - weight) * soft(w_prev) + weight * soft(w_end), k, s1

    value, steps, s_end = run(flat1)
    reached = bool(s_end >= s_target) and bool(np.isfinite(value))
    return (float(value) if reached else np.nan), int(steps)


def tsit5_tau(predictor, params1, X, y, s_target, rtol, max_steps=2_000_000):
    flat1, unravel = ravel_pytree(params1)
    field = _tau_field(predictor, unravel, X, y)

    def at_target(t, y, args, **kwargs):  # diffrax passes y by keyword
        del t, args, kwargs
        return jm.log_norm(y) - s_target

    solve = jax.jit(
        lambda w: diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, w, args: field(w)),
            diffrax.Tsit5(),
            0.0,
            1e6,
            None,
            w,
            stepsize_controller=diffrax.PIDController(rtol=rtol, atol=rtol * 1e-3),
            event=diffrax.Event(at_target, root_finder=diffrax.VeryChord(rtol=1e-13, atol=1e-13)),
            max_steps=max_steps,
            throw=False,
        )
    )
    solution = solve(flat1)
    attempts = int(solution.stats["num_accepted_steps"]) + int(solution.stats["num_rejected_steps"])
    if solution.result != diffrax.RESULTS.event_occurred:
        return np.nan, 6 * attempts
    w_end = solution.ys[-1]
    return float(jm.soft_margin(predictor, unravel(w_end), X, y)), 6 * attempts


def cheapest(runs, level):
    """Fewest evaluations among runs whose error is <= level (None if none)."""
    ok = [evals for error, evals in runs if np.isfinite(error) and error <= level]
    return min(ok) if ok else None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--beta", type=float, default=1e4, help="target beta = ||w||^L")
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--max-euler-steps", type=int, default=20_000_000)
    parser.add_argument("--figure", default=str(ROOT / "figures" / "work_precision.png"))
    args = parser.parse_args()
    start = time.perf_counter()
    predictor, params0, X, y = problem(args.depth)
    params1, model, tau0 = start_at_t0(predictor, params0, X, y)
    s1 = float(jm.log_norm(params1))
    s_target = float(np.log(args.beta)) / args.depth
    ref = reference(model, params1, X, y, s_target)
    print(
        f"deep linear L={args.depth}, width 32, reference data (n=50, d=5); start w(t0): "
        f"tau0 = {tau0:.6f}, beta = {np.exp(args.depth * s1):.4g}; target beta = {args.beta:.3g}"
        f" (s = {s_target:.4f}); reference gamma~ = {ref:.12f} (scipy DOP853, rtol 1e-10)"
    )
    runs = {}

    def record(name, soft, evals, note=""):
        error = abs(soft - ref) / abs(ref) if np.isfinite(soft) else np.nan
        runs.setdefault(name, []).append((error, evals))
        print(
            f"  {name:24s} {note:16s} evals {evals:>10d}  gamma~ {soft:.12f}  error {error:.2e}",
            flush=True,
        )

    for rtol in (1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10):
        soft, evals = engine(predictor, params1, X, y, s_target, rtol)
        record("engine (rosenbrock)", soft, evals, f"rtol {rtol:.0e}")
    for rtol in (1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10):
        soft, evals = tsit5_tau(predictor, params1, X, y, s_target, rtol)
        record("naive Tsit5 (tau)", soft, evals, f"rtol {rtol:.0e}")
    # Fixed-step Euler: the largest steps are unstable at this beta (they stop non-finite).
    for step in np.geomspace(1e-2, 1e-6, 9):
        soft, steps = euler(predictor, params1, X, y, s_target, float(step), args.max_euler_steps)
        record("Euler / GD (tau)", soft, steps, f"step {step:.1e}")

    print(
        "\nfewest gradient evaluations reaching each relative error"
        f" (wall {time.perf_counter() - start:.0f} s)"
    )
    levels = (1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10)
    names = list(runs)
    print(f"{'error <=':>9s} " + " ".join(f"{n:>22s}" for n in names) + f" {'others/engine':>14s}")
    for level in levels:
        best = {n: cheapest(runs[n], level) for n in names}
        engine_best = min(
            [v for n, v in best.items() if n.startswith("engine") and v], default=None
        )
        other = [v for n, v in best.items() if not n.startswith("engine") and v]
        if engine_best is None:
            ratio = "engine: none"
        elif not other:
            tried = max(e for n in names if not n.startswith("engine") for _, e in runs[n])
            ratio = f"> {tried / engine_best:.0f}"
        else:
            ratio = f"{min(other) / engine_best:.1f}"
        cells = " ".join(f"{(str(best[n]) if best[n] else '-'):>22s}" for n in names)
        print(f"{level:9.0e} {cells} {ratio:>14s}")

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, points in runs.items():
        points = sorted((e, err) for err, e in points if np.isfinite(err))
        if points:
            evals, errors = zip(*points)
            ax.loglog(evals, np.maximum(errors, 1e-16), "o-", label=name)
    ax.set_xlabel("gradient evaluations (full batch)")
    ax.set_ylabel(r"relative error of $\tilde\gamma$ at $\beta$ = " + f"{args.beta:.0e}")
    ax.set_title(f"work-precision, deep linear L={args.depth}, from w(t0)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.figure, dpi=120)
    print(f"saved {args.figure}")


if __name__ == "__main__":
    main()
