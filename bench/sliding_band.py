"""Accuracy and cost of the sliding kink band (SlidingOptions.threshold), side by side.

    python bench/sliding_band.py [--bands 1e-3 1e-4 1e-5] [--reference]

ReLU L = 2, width 6, on theorem5's synthetic data (n = 16, d = 6), three seeds, beta_max = 2e4,
rtol 1e-6: the largest relative residual of the Lyu & Li identity (1/2) d||w||^2/dtau =
L sum_n p_n m_n, the engine's saved velocity against the right side recomputed from the saved
params, before and after t0, with the solver steps. --reference adds the reference problem of
docs/background.md §6 (L = 2) to beta = 1e3 with the default candidates and 20,000 steps per phase.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

import jaxmargin as jm
from experiments.lyu_li_rates import _identity_terms
from experiments.theorem5 import synthetic_data


def identity_residuals(predictor, solution, X, y):
    terms = jax.vmap(lambda params: _identity_terms(predictor, params, X, y)[:3])
    log_rhs, sign_rhs, log_scale = (np.asarray(a) for a in terms(solution.params))
    left = np.asarray(solution.sign_half_drho2_dtau) * np.exp(
        np.asarray(solution.log_half_drho2_dtau) - log_scale
    )
    residual = np.abs(left - sign_rhs * np.exp(log_rhs - log_scale))
    phase, ok = np.asarray(solution.phase), np.isfinite(residual)
    return [float(np.max(residual[ok & (phase == k)], initial=-np.inf)) for k in (1, 2)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bands", type=float, nargs="*", default=[1e-3, 1e-4, 1e-5])
    parser.add_argument("--reference", action="store_true")
    args = parser.parse_args()
    X, y = synthetic_data(16, 6, 0.5)
    predictor = jm.relu_mlp(2, 6)
    print("band    seed  steps (phase 1, 2)  rejected        identity before t0  after t0   wall s")
    for band in args.bands:
        sliding = jm.SlidingOptions(candidates=8, threshold=band)
        for seed in range(3):
            start = time.perf_counter()
            params0 = predictor.init(jax.random.key(4000 + seed), 6)
            solution = jm.gradient_flow(
                predictor,
                params0,
                X,
                y,
                beta_max=2e4,
                rtol=1e-6,
                atol=1e-8,
                max_steps=20_000,
                num_saves=128,
                sliding=sliding,
                solver="tsit5",
            )
            before, after = identity_residuals(predictor, solution, X, y)
            print(
                f"{band:<7.0e} {seed:>4}  {str(np.asarray(solution.status.steps)):<18}"
                f"  {str(np.asarray(solution.status.rejected_steps)):<14}  {before:>18.2e}"
                f"  {after:>8.2e}  {time.perf_counter() - start:>7.1f}",
                flush=True,
            )
    if args.reference:
        predictor, params0, X, y = jm.reference_problem(2)
        print(
            "\nreference problem L = 2 to beta = 1e3 (default candidates, 20,000 steps per phase)"
        )
        for band in args.bands:
            start = time.perf_counter()
            solution = jm.gradient_flow(
                predictor,
                params0,
                X,
                y,
                beta_max=1e3,
                rtol=1e-6,
                atol=1e-8,
                max_steps=20_000,
                num_saves=48,
                sliding=jm.SlidingOptions(threshold=band),
                solver="tsit5",
            )
            print(
                f"{band:<7.0e} {solution.status.message}: steps"
                f" {np.asarray(solution.status.steps)}, rejected"
                f" {np.asarray(solution.status.rejected_steps)}"
                f" ({time.perf_counter() - start:.1f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
