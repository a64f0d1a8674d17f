"""Chizat & Bach (COLT 2020): the normalized margin of two-layer ReLU nets vs their width.

Wide two-layer ReLU networks trained on the exponential (or logistic) loss converge to a
max-margin classifier in the variation (F1) norm, and the attained margin grows with the width
to the infinite-width value. Here: their cluster data (`jm.chizat_bach_clusters`: a 4x4 grid of
clusters with random +-1 labels in the first two coordinates, uniform noise in the others, a
constant coordinate 1 folded in as a bias), bias-free `jm.relu_mlp(2, width)`, trained by Lyu &
Li's loss-based gradient descent (`jm.gradient_descent(schedule="loss_based")`: eta = alpha/L,
alpha adapted), from N(0, 1/fan_in) weights, a few seeds per width.

Reported at the end of training: the hard margin with the product normalization
min_i m_i / (||W_1|| ||w_2||) (Lyu & Li §4.4; for a balanced net it equals the margin in the
path norm sum_j |a_j| ||w_j||, Chizat & Bach's F1 margin, up to Cauchy-Schwarz) and with the l2
normalization min_i m_i / ||w||^2 (half of it for a balanced net). The margins are not converged:
the normalized margin still creeps up as beta = ||w||^2 grows; the final beta is reported.

Its default-scale wall time (recorded in docs/benchmarks.md) is mostly one GD compilation per width.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import jax
import numpy as np
from scipy.stats import spearmanr

import jaxmargin as jm

from ._runner import Claim, main, progress
from ._style import depth_color, figure, save_figure

NAME = "width"


@dataclasses.dataclass(frozen=True)
class Config:
    widths: tuple[int, ...] = (4, 8, 16, 32, 64, 128, 256)
    seeds: int = 3
    n: int = 200
    dim: int = 10
    grid: int = 4  # 16 clusters: with 3x3 and data seed 0, 4 neurons already reached the margin
    data_seed: int = 0
    init_scale: float = 1.0
    steps: int = 6000  # loss-based GD attempts
    alpha0: float = 0.1
    num_logs: int = 60
    saturation_tol: float = 0.1  # relative change of the margin between the two widest nets

    @classmethod
    def quick(cls) -> Config:
        return cls(widths=(4, 32), seeds=1, n=60, steps=300, num_logs=20)


def run(config: Config) -> dict[str, np.ndarray]:
    X, y = jm.chizat_bach_clusters(
        jax.random.key(config.data_seed), n=config.n, dim=config.dim, grid=config.grid
    )
    shape = (len(config.widths), config.seeds)
    out = {key: np.full(shape, np.nan) for key in ("product", "l2", "soft", "log_beta")}
    curves = {
        key: np.full(shape + (config.num_logs + 1,), np.nan)
        for key in ("curve_soft", "curve_log_rho", "curve_step")
    }
    for i, width in progress(enumerate(config.widths), NAME, total=len(config.widths)):
        predictor = jm.relu_mlp(2, width, init_scale=config.init_scale)
        for seed in range(config.seeds):
            start = time.perf_counter()
            params0 = predictor.init(jax.random.key(100 * width + seed), X.shape[1])
            gd = jm.gradient_descent(
                predictor,
                params0,
                X,
                y,
                schedule="loss_based",
                alpha0=config.alpha0,
                steps=config.steps,
                num_logs=config.num_logs,
            )
            final = gd.final_params
            out["product"][i, seed] = float(
                jm.hard_margin(predictor, final, X, y, normalization="product")
            )
            out["l2"][i, seed] = float(jm.hard_margin(predictor, final, X, y))
            out["soft"][i, seed] = float(jm.soft_margin(predictor, final, X, y))
            out["log_beta"][i, seed] = 2.0 * float(jm.log_norm(final))
            k = np.asarray(gd.soft_margin).size
            curves["curve_soft"][i, seed, :k] = np.asarray(gd.soft_margin)
            curves["curve_log_rho"][i, seed, :k] = np.asarray(gd.log_rho)
            curves["curve_step"][i, seed, :k] = np.asarray(gd.attempts)
            print(
                f"{NAME}: width {width} seed {seed}: {gd.status}, product margin"
                f" {out['product'][i, seed]:.5g}, l2 margin {out['l2'][i, seed]:.5g},"
                f" ln beta {out['log_beta'][i, seed]:.3g}"
                f" ({time.perf_counter() - start:.1f} s)",
                flush=True,
            )
    return {
        "widths": np.asarray(config.widths, dtype=np.float64),
        **out,
        **curves,
        "X": np.asarray(X),
        "y": np.asarray(y),
    }


def medians(results):
    return {key: np.median(results[key], axis=1) for key in ("product", "l2", "soft")}


def plot(results, config: Config) -> None:
    widths = results["widths"]
    med = medians(results)
    fig, axes = figure(ncols=3, nrows=1, height=3.6)
    ax = axes[0, 0]
    for key, marker, label in (
        ("product", "o", "product: min m / (||W₁|| ||w₂||)"),
        ("l2", "s", "ℓ2: min m / ||w||²"),
    ):
        values = results[key]
        for j in range(values.shape[1]):
            ax.plot(
                widths,
                values[:, j],
                marker,
                color="C0" if key == "product" else "C1",
                ms=3,
                alpha=0.5,
            )
        ax.plot(
            widths,
            med[key],
            "-" + marker,
            color="C0" if key == "product" else "C1",
            label=label + " (median)",
        )
    ax.axhline(0.0, color="k", lw=0.6)
    ax.set(
        xscale="log",
        xlabel="width m",
        ylabel="normalized hard margin",
        title=f"end of loss-based GD ({config.steps} attempts)",
    )
    ax.legend(fontsize=7)
    ax = axes[0, 1]
    count = len(widths)
    for i in range(count):
        for j in range(results["curve_soft"].shape[1]):
            ax.plot(
                2.0 * results["curve_log_rho"][i, j],
                results["curve_soft"][i, j],
                color=depth_color(i, count),
                lw=1,
                label=f"m={int(widths[i])}" if j == 0 else None,
            )
    top = float(np.nanmax(results["curve_soft"]))
    ax.set(
        ylim=(-0.5 * abs(top), 1.15 * abs(top)),
        xlabel="ln β = 2 ln ||w||",
        ylabel="soft margin γ̃ (ℓ2)",
        title="along training",
    )
    ax.legend(fontsize=6, ncol=2)
    ax = axes[0, 2]
    X, y = results["X"], results["y"]
    ax.scatter(X[:, 0], X[:, 1], c=y, cmap="coolwarm", s=8)
    ax.set(
        xlabel="x₁",
        ylabel="x₂",
        title=f"data: {config.grid}x{config.grid} clusters, n={config.n}, dim {config.dim}",
    )
    fig.suptitle("Chizat & Bach (2020): margin of two-layer ReLU nets vs width", y=1.0)
    fig.tight_layout()
    save_figure(fig, NAME)


def summarize(results, config: Config) -> list[Claim]:
    widths = results["widths"]
    med = medians(results)
    claims = []
    for key, label in (("product", "product-normalized"), ("l2", "ℓ2-normalized")):
        rho = float(spearmanr(widths, med[key]).statistic) if widths.size > 1 else np.nan
        claims.append(
            Claim(
                NAME,
                f"{label} margin grows with width (median over seeds)",
                "Spearman rank correlation with width",
                rho,
                ">= 0.8",
                bool(rho >= 0.8),
            )
        )
        last, previous = med[key][-1], med[key][-2] if widths.size > 1 else np.nan
        change = float(abs(last - previous) / abs(last)) if last != 0 else np.inf
        claims.append(
            Claim(
                NAME,
                f"{label} margin saturates: widths {int(widths[-2])} -> {int(widths[-1])}"
                f" (median {previous:.4g} -> {last:.4g})",
                "relative change",
                change,
                f"<= {config.saturation_tol:g}",
                bool(change <= config.saturation_tol),
            )
        )
    claims.append(
        Claim(
            NAME,
            f"widest net (m = {int(widths[-1])}): product-normalized margin",
            "median over seeds",
            float(med["product"][-1]),
            "reported (> 0)",
            bool(med["product"][-1] > 0),
        )
    )
    claims.append(
        Claim(
            NAME,
            f"narrowest net (m = {int(widths[0])}): product-normalized margin",
            "median over seeds",
            float(med["product"][0]),
            "reported",
            True,
        )
    )
    return claims


if __name__ == "__main__":
    main(sys.modules[__name__])
