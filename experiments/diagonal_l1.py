"""Gunasekar et al. (NeurIPS 2018): diagonal linear nets and the l_{2/L} max margin.

f(x) = <u_1 ⊙ ... ⊙ u_L, x> (`diagonal_linear(L, init_scale)`), effective β = u_1 ⊙ ... ⊙ u_L.
The limit directions of gradient flow are KKT points of min ||w||² s.t. y_n <x_n, β(w)> ≥ 1,
i.e. stationary points of min ||β||_{2/L} s.t. y_n <x_n, β> ≥ 1: for L = 2 the l1 max-margin
linear program (`l1_max_margin`, unique here by `l1_max_margin_is_unique`), for L = 3, 4
sparser directions. The best network margin that represents β (balanced factors
|u_kj| = |β_j|^{1/L}) is

    γ_net(β) = min_n y_n <x_n, β> / (L Σ_j |β_j|^{2/L})^{L/2},

so γ_net(β) / γ_net(β_LP) is the l1 margin ratio for L = 2 (≤ 1, = 1 at the LP direction), and
for L ≥ 3 it says whether the flow's direction beats the LP direction in the l_{2/L} problem.

Runs: Gaussian data (n = 12, d = 8, labels from a 3-sparse teacher) for several data seeds; the
flow engine (`gradient_flow`, polar clock; no kinks here) to beta_max, and loss-based GD
(Lyu & Li schedule) for comparison, from the same small init. Measured finding: convergence to
the LP direction is data dependent and can be very slow. A coordinate whose factors are small
grows only at the rate its correlation with the weighted data exceeds the others'; until then
the flow sits near a KKT point of the network problem (a coordinate ~0: the trap of
`kkt_trap`, in a milder form) that is not the l1 optimum.

Its default-scale wall time is recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import jax
import numpy as np

import jaxmargin as jm

from ._runner import Claim, main, progress
from ._style import depth_color, figure, save_figure

NAME = "diagonal_l1"


@dataclasses.dataclass(frozen=True)
class Config:
    depths: tuple[int, ...] = (2, 3, 4)
    seeds: int = 3  # data seeds
    n: int = 12
    dim: int = 8
    teacher_sparsity: int = 3
    init_scale: float = 0.3
    beta_max: float = 1e6
    max_steps: int = 30_000
    num_saves: int = 80
    gd_steps: int = 200_000
    gd_logs: int = 60
    close: float = 0.05  # l1 distance counted as "at the LP direction"

    @classmethod
    def quick(cls) -> Config:
        # One depth: each depth costs a flow compilation (~10 s of CPU).
        return cls(
            depths=(2,),
            seeds=1,
            beta_max=1e3,
            max_steps=4_000,
            num_saves=24,
            gd_steps=5_000,
            gd_logs=20,
        )


def dataset(seed: int, n: int, dim: int, sparsity: int):
    """Gaussian inputs, labels y = sign(<x, β*>) of a sparse teacher."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, dim))
    teacher = np.zeros(dim)
    teacher[:sparsity] = rng.normal(size=sparsity)
    return X, np.sign(X @ teacher)


def network_margin(B, X, y, depth) -> np.ndarray:
    """γ_net(β) for each row of B: the best normalized margin of a depth-L diagonal net with
    end-to-end vector β (balanced factors)."""
    B = np.atleast_2d(B)
    margins = (B @ (y[:, None] * X).T).min(axis=1)
    quasi = np.sum(np.abs(B) ** (2.0 / depth), axis=1)
    return margins / (depth * quasi) ** (depth / 2.0)


def _metrics(B, X, y, depth, lp_direction, lp_net_margin):
    # Only the direction matters (every metric is scale invariant); rescale before any power.
    peak = np.max(np.abs(B), axis=1, keepdims=True)
    B = B / np.where(peak > 0, peak, 1.0)
    l1 = np.abs(B).sum(axis=1, keepdims=True)
    directions = B / np.where(l1 > 0, l1, 1.0)
    return dict(
        distance=np.abs(directions - lp_direction).sum(axis=1),
        margin_ratio=network_margin(B, X, y, depth) / lp_net_margin,
        sparsity=np.abs(B).sum(axis=1) / np.maximum(np.linalg.norm(B, axis=1), 1e-300),
    )


def run(config: Config) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    start = time.perf_counter()
    for seed in progress(range(config.seeds), "diagonal_l1"):
        X, y = dataset(seed, config.n, config.dim, config.teacher_sparsity)
        lp = jm.l1_max_margin(X, y)
        out[f"seed{seed}_X"], out[f"seed{seed}_y"] = X, y
        out[f"seed{seed}_lp_direction"] = lp.direction
        out[f"seed{seed}_lp_unique"] = np.asarray(jm.l1_max_margin_is_unique(X, y))
        for depth in config.depths:
            tag = f"seed{seed}_L{depth}"
            predictor = jm.diagonal_linear(depth, init_scale=config.init_scale)
            params0 = predictor.init(jax.random.key(100 + seed), config.dim)
            lp_net = float(network_margin(lp.direction, X, y, depth)[0])
            sol = jm.gradient_flow(
                predictor,
                params0,
                X,
                y,
                beta_max=config.beta_max,
                max_steps=config.max_steps,
                num_saves=config.num_saves,
                tau_max=1e6,
                solver="tsit5",
            )
            B = np.asarray(jax.vmap(predictor.end_to_end)(sol.params))
            final = jax.tree.map(lambda leaf: leaf[-1], sol.params)
            cert = jm.kkt_certificate(predictor, final, X, y, clarke_samples=0)
            metrics = _metrics(B, X, y, depth, lp.direction, lp_net)
            out.update(
                {
                    f"{tag}_flow_log_beta": depth * np.asarray(sol.s),
                    f"{tag}_flow_beta": B / np.max(np.abs(B), axis=1, keepdims=True),
                    f"{tag}_flow_hard_margin": np.asarray(sol.hard_margin),
                    f"{tag}_flow_code": np.asarray(int(sol.status.code)),
                    f"{tag}_flow_steps": np.asarray(sol.status.steps),
                    f"{tag}_flow_kkt": np.asarray(cert.stationarity),
                    f"{tag}_lp_net_margin": np.asarray(lp_net),
                }
            )
            out.update({f"{tag}_flow_{k}": v for k, v in metrics.items()})
            print(
                f"  diagonal_l1: data seed {seed}, L={depth}: flow {sol.status.message}, ln β ="
                f" {depth * float(sol.s[-1]):.2f}, distance to LP {metrics['distance'][-1]:.4f}"
                f" ({time.perf_counter() - start:.1f} s)",
                flush=True,
            )
            # Loss-based GD can take a step whose values are non-finite (alpha grows until a step
            # fails): GD then stops before it and the run is kept up to there, marked not ok.
            gd = jm.gradient_descent(
                predictor,
                params0,
                X,
                y,
                schedule="loss_based",
                steps=config.gd_steps,
                num_logs=config.gd_logs,
            )
            B = np.asarray(jax.vmap(predictor.end_to_end)(gd.params))
            metrics = _metrics(B, X, y, depth, lp.direction, lp_net)
            out.update(
                {
                    f"{tag}_gd_log_beta": depth * np.asarray(gd.log_rho),
                    f"{tag}_gd_beta": B / np.max(np.abs(B), axis=1, keepdims=True),
                    f"{tag}_gd_ok": np.asarray(gd.status == "ok"),
                }
            )
            out.update({f"{tag}_gd_{k}": v for k, v in metrics.items()})
    return out


# --------------------------------------------------------------------------- figure


def plot(results, config: Config) -> None:
    fig, axes = figure(ncols=2, nrows=2, height=3.3)
    styles = ["-", "--", ":", "-."]
    ax = axes[0, 0]
    for seed in range(config.seeds):
        tag = f"seed{seed}_L2"
        if f"{tag}_flow_distance" not in results:
            continue
        color = f"C{seed}"
        ax.semilogy(
            results[f"{tag}_flow_log_beta"],
            results[f"{tag}_flow_distance"],
            color=color,
            label=f"data seed {seed}, flow",
        )
        keep = results[f"{tag}_gd_log_beta"] > 0
        ax.semilogy(
            results[f"{tag}_gd_log_beta"][keep],
            results[f"{tag}_gd_distance"][keep],
            "--",
            color=color,
            label=f"data seed {seed}, loss-based GD",
        )
    ax.axhline(config.close, color="k", lw=0.8, ls=":", label=f"{config.close:g}")
    ax.set_xlabel(r"$\ln \beta = L \ln\|w\|$")
    ax.set_ylabel(r"$\|\beta/\|\beta\|_1 - b_{LP}\|_1$")
    ax.set_title("L = 2: distance to the l1 max-margin (LP) direction", fontsize=9)
    ax.legend(fontsize=6)

    ax = axes[0, 1]
    for i, depth in enumerate(config.depths):
        for seed in range(config.seeds):
            tag = f"seed{seed}_L{depth}"
            ax.plot(
                results[f"{tag}_flow_log_beta"],
                results[f"{tag}_flow_margin_ratio"],
                styles[seed % 4],
                color=depth_color(i, len(config.depths)),
                label=f"L={depth}" if seed == 0 else None,
            )
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylim(0.0, None)
    ax.set_xlabel(r"$\ln \beta$")
    ax.set_ylabel(r"$\gamma_{net}(\beta) / \gamma_{net}(\beta_{LP})$")
    ax.set_title("Network margin relative to the LP direction (line style = data seed)", fontsize=9)
    ax.legend(fontsize=7)

    ax = axes[1, 0]
    for i, depth in enumerate(config.depths):
        for seed in range(config.seeds):
            tag = f"seed{seed}_L{depth}"
            ax.plot(
                results[f"{tag}_flow_log_beta"],
                results[f"{tag}_flow_sparsity"],
                styles[seed % 4],
                color=depth_color(i, len(config.depths)),
                label=f"L={depth}" if seed == 0 else None,
            )
    for seed in range(config.seeds):
        lp = results[f"seed{seed}_lp_direction"]
        ax.axhline(
            np.abs(lp).sum() / np.linalg.norm(lp),
            color="gray",
            lw=0.8,
            ls=styles[seed % 4],
            label="LP solution" if seed == 0 else None,
        )
    ax.set_xlabel(r"$\ln \beta$")
    ax.set_ylabel(r"$\|\beta\|_1 / \|\beta\|_2$  (lower = sparser)")
    ax.set_title("Effective sparsity along the flow", fontsize=9)
    ax.legend(fontsize=7)

    ax = axes[1, 1]
    lp = results["seed0_lp_direction"]
    width = 0.8 / (len(config.depths) + 1)
    index = np.arange(lp.size)
    ax.bar(index - 0.4 + width / 2, np.abs(lp), width, color="gray", label="LP (l1) solution")
    for i, depth in enumerate(config.depths):
        beta = results[f"seed0_L{depth}_flow_beta"][-1]
        ax.bar(
            index - 0.4 + (i + 1.5) * width,
            np.abs(beta) / np.abs(beta).sum(),
            width,
            color=depth_color(i, len(config.depths)),
            label=f"flow, L={depth}",
        )
    ax.set_xlabel("coordinate j")
    ax.set_ylabel(r"$|\beta_j| / \|\beta\|_1$ at the end")
    ax.set_title("Data seed 0: final directions", fontsize=9)
    ax.legend(fontsize=7)
    fig.suptitle(
        "Diagonal linear nets (Gunasekar et al. 2018): L = 2 → l1 max margin, deeper → sparser",
        fontsize=10,
    )
    fig.tight_layout()
    save_figure(fig, NAME)


# --------------------------------------------------------------------------- claims


def summarize(results, config: Config) -> list[Claim]:
    seeds = range(config.seeds)
    claims = []
    if 2 in config.depths:
        distances = np.array([results[f"seed{s}_L2_flow_distance"][-1] for s in seeds])
        gd_distances = np.array([results[f"seed{s}_L2_gd_distance"][-1] for s in seeds])
        ratios = np.array([results[f"seed{s}_L2_flow_margin_ratio"][-1] for s in seeds])
        log_beta = min(float(results[f"seed{s}_L2_flow_log_beta"][-1]) for s in seeds)
        close = int(np.sum(np.minimum(distances, gd_distances) <= config.close))
        claims += [
            Claim(
                NAME,
                f"L=2 flow → l1 max-margin LP direction (best of {config.seeds} data"
                f" seeds, ln β ≥ {log_beta:.1f})",
                "min ||β/||β||_1 - b_LP||_1",
                float(distances.min()),
                "<= 0.01",
                float(distances.min()) <= 0.01,
            ),
            Claim(
                NAME,
                f"L=2: data seeds within {config.close:g} of the LP direction at the end"
                " (flow or GD)",
                "count",
                float(close),
                f"= {config.seeds} (all)",
                close == config.seeds,
            ),
            Claim(
                NAME,
                "L=2: l1-normalized margin of the flow's β / LP margin (worst data seed)",
                "min γ_l1(β) / γ_LP",
                float(ratios.min()),
                ">= 0.98",
                ratios.min() >= 0.98,
            ),
        ]
    if len(config.depths) >= 2:
        sparsity = np.array(
            [[results[f"seed{s}_L{d}_flow_sparsity"][-1] for d in config.depths] for s in seeds]
        ).mean(axis=0)
        trend = bool(np.all(np.diff(sparsity) < 0))
        values = " > ".join(f"{v:.3f}" for v in sparsity)
        claims.append(
            Claim(
                NAME,
                "sparser with depth: mean ||β||_1/||β||_2 over data seeds for"
                f" L = {config.depths} is {values}",
                "mean ratio at the largest L / at L = 2",
                float(sparsity[-1] / sparsity[0]),
                "strictly decreasing in L",
                trend,
            )
        )
    deep = [d for d in config.depths if d >= 3]
    if deep:
        ratios = np.array(
            [results[f"seed{s}_L{d}_flow_margin_ratio"][-1] for s in seeds for d in deep]
        )
        claims.append(
            Claim(
                NAME,
                f"L = {deep}: the flow's direction beats the LP direction in the l_(2/L) problem"
                f" (min ratio {ratios.min():.3f}, max {ratios.max():.3f})",
                "runs with γ_net(β) / γ_net(β_LP) > 1",
                float(np.sum(ratios > 1)),
                f"= {ratios.size} (all)",
                bool(np.all(ratios > 1)),
            )
        )
    kkt = max(float(results[f"seed{s}_L{d}_flow_kkt"]) for s in seeds for d in config.depths)
    claims.append(
        Claim(
            NAME,
            "final flow directions are near KKT points of the network problem",
            "max relative KKT stationarity",
            kkt,
            "<= 1e-2",
            kkt <= 1e-2,
        )
    )
    runs = [(s, d) for s in seeds for d in config.depths]
    finite = [(s, d) for s, d in runs if bool(results[f"seed{s}_L{d}_gd_ok"])]
    agree = sum(
        float(
            np.abs(
                _unit_l1(results[f"seed{s}_L{d}_flow_beta"][-1])
                - _unit_l1(results[f"seed{s}_L{d}_gd_beta"][-1])
            ).sum()
        )
        <= config.close
        for s, d in finite
    )
    claims.append(
        Claim(
            NAME,
            f"loss-based GD ends at the flow's direction (l1 distance <= {config.close:g});"
            f" {len(runs) - len(finite)} of {len(runs)} GD runs hit non-finite values",
            "runs that agree",
            float(agree),
            f"= {len(runs)} (all)",
            agree == len(runs),
        )
    )
    return [c._replace(value=float(c.value), holds=bool(c.holds)) for c in claims]


def _unit_l1(beta):
    return beta / np.abs(beta).sum()


if __name__ == "__main__":
    main(sys.modules[__name__])
