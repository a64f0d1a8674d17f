"""Theorem 5 of the seed: once the soft margin is positive (t0), it never decreases.

Along the seed's flow dw/dtau in -∂ ln sum_i exp(-m_i(w)), the soft margin
gamma~(w) = -ln L(w) / ||w||^L is non-decreasing for t >= t0, for every L-homogeneous predictor.
Measured here with `jm.gradient_flow` for bias-free ReLU MLPs of depth L = 1..5 (L = 1 is the
linear model) on two data sets, and for a ReLU CNN on 8x8 digit images:

* synthetic: n points x ~ N(0, I_dim), y = sign(sum_j x_j) (the reference problem of
  docs/background.md §6, smaller so that the budget holds);
* digits: scikit-learn's 0-vs-1 digits, the first n/2 of each class, centred and projected on
  their first `dim` principal components (fitted on all 360 images of the pair), rescaled to a
  mean norm sqrt(dim). Same shapes as the synthetic set, so one compilation serves both.

Each run has two calls of the engine: phase 1 alone (to t0, target s_max below ||w||), then a
continuation from w(t0) (times 1 + 1e-9, so that it starts strictly separated) to
beta = ||w||^L = gain_L * beta(t0), which skips re-integrating phase 1; tau and ln t of the
continuation are offset by their values at t0. The reported quantity per run is the largest
relative decrease of gamma~ between consecutive saved points after t0,
max_k (g_k - g_{k+1}) / max(|g_k|, |g_{k+1}|): Theorem 5 says it is <= 0; numerical error
allows a little above.

Per-seed `gradient_flow` calls, not `gradient_flow_batch`: the batch steps every seed until the
slowest is done, and the sliding-mode `lax.cond` runs both branches under vmap (measured:
docs/decisions.md D43).

The CNN's kinks have no sliding-mode handling in the engine (MLPs only), so the autodiff element
relu'(0) = 0 is integrated as is; at rtol 1e-6 its phase 1 exhausted 1,500 steps without
separating (chattering on kinks), so the CNN runs at a looser rtol (cnn_rtol).

About half of its default-scale wall time (recorded in docs/benchmarks.md) compiles one flow program
per depth (and the CNN); the rest is mostly deep-net runs that crawl on kinks until max_steps. Deep
ReLU nets (L >= 3) run at rtol 1e-4: at 1e-6 most synthetic runs exhausted 1,500 steps in phase 1
without reaching t0.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxmargin as jm

from ._runner import Claim, main, progress
from ._style import depth_color, figure, save_figure

NAME = "theorem5"
DATASETS = ("synthetic", "digits")
LINEAR_TOL = 1e-9  # criterion on the largest relative decrease, linear model (L = 1)
RELU_TOL = 1e-6  # criterion on the largest relative decrease, ReLU networks
NUDGE = 1e-9  # relative scaling of w(t0) before the continuation (far below rtol)


@dataclasses.dataclass(frozen=True)
class Config:
    depths: tuple[int, ...] = (1, 2, 3, 4, 5)
    seeds: int = 16
    n: int = 16  # points per data set (digits: n // 2 per class)
    dim: int = 6  # synthetic dimension = number of principal components of the digits
    width: int = 6
    init_scale: float = 1.0
    # beta(end) / beta(t0) per depth (same order as depths): the target after t0.
    beta_gain: tuple[float, ...] = (100.0, 300.0, 10.0, 10.0, 10.0)
    # rtol per depth (atol = rtol / 100): deep ReLU nets crawl on their kinks at 1e-6.
    rtol: tuple[float, ...] = (1e-6, 1e-6, 1e-4, 1e-4, 1e-4)
    max_steps: int = 1000  # solver steps (accepted + rejected) per phase and call
    synthetic_gap: float = 0.5  # keep points with |sum_j x_j| / sqrt(dim) >= gap
    num_saves: int = 128  # 3/4 of them after t0
    candidates: int = 8  # SlidingOptions.candidates (kink pre-activations examined per step)
    cnn_channels: tuple[int, ...] = (4, 8)
    cnn_seeds: int = 3
    cnn_per_class: int = 8
    cnn_beta_gain: float = 10.0
    cnn_rtol: float = 1e-4
    cnn_init_scale: float = 1.0

    @classmethod
    def quick(cls) -> Config:
        return cls(
            depths=(1, 2),
            seeds=2,
            beta_gain=(100.0, 10.0),
            rtol=(1e-6, 1e-6),
            max_steps=600,
            num_saves=48,
            cnn_seeds=0,
        )


# --------------------------------------------------------------------------- data


def synthetic_data(n: int, dim: int, gap: float = 0.0, seed: int = 0):
    """x ~ N(0, I_dim), y = sign(sum_j x_j) (the reference problem's data, docs/background.md
    §6), keeping the first n draws with |sum_j x_j| / sqrt(dim) >= gap (a data margin)."""
    draws = np.asarray(jax.random.normal(jax.random.key(seed), (50 * n, dim), jnp.float64))
    keep = np.abs(draws.sum(axis=1)) / math.sqrt(dim) >= gap
    if np.sum(keep) < n:
        raise ValueError(f"gap {gap} too large: {np.sum(keep)} of {50 * n} draws kept")
    X = jnp.asarray(draws[keep][:n])
    return X, jnp.sign(X.sum(axis=1))


def digits_data(n: int, dim: int):
    """Digits 0 vs 1, n // 2 per class, centred, first `dim` principal components, mean norm
    sqrt(dim) (PCA fitted on the whole pair)."""
    X_all, y_all = (np.asarray(a) for a in jm.digits_pair(0, 1))
    mean = X_all.mean(axis=0)
    _, _, vt = np.linalg.svd(X_all - mean, full_matrices=False)
    index = np.concatenate([np.flatnonzero(y_all == label)[: n // 2] for label in (1.0, -1.0)])
    Z = (X_all[index] - mean) @ vt[:dim].T
    Z *= math.sqrt(dim) / np.mean(np.linalg.norm(Z, axis=1))
    return jnp.asarray(Z), jnp.asarray(y_all[index])


def dataset(name: str, config: Config):
    if name == "synthetic":
        return synthetic_data(config.n, config.dim, config.synthetic_gap)
    return digits_data(config.n, config.dim)


# --------------------------------------------------------------------------- flows


def largest_relative_decrease(values) -> float:
    """max_k (g_k - g_{k+1}) / max(|g_k|, |g_{k+1}|) over consecutive finite values (-inf if <2)."""
    g = np.asarray(values, dtype=np.float64)
    g = g[np.isfinite(g)]
    if g.size < 2:
        return -np.inf
    scale = np.maximum(np.maximum(np.abs(g[:-1]), np.abs(g[1:])), 1e-300)
    return float(np.max((g[:-1] - g[1:]) / scale))


def flow_through_t0(predictor, params0, X, y, *, gain, rtol, max_steps, num_saves, sliding):
    """Phase 1 to t0, then a continuation from w(t0) to beta = gain * beta(t0).

    Returns (rows, info): rows = dict of 1-D arrays (s, tau, log_t, soft, hard, phase) over
    both calls; info = dict of scalars (code, separated, s0, tau0, steps, rejected).
    """
    options = dict(
        solver="tsit5",
        num_saves=num_saves,
        rtol=rtol,
        atol=rtol * 1e-2,
        max_steps=max_steps,
        sliding=sliding,
    )
    probe = jm.gradient_flow(predictor, params0, X, y, s_max=-1e3, **options)
    status = probe.status
    steps = np.asarray(status.steps).sum()
    rejected = np.asarray(status.rejected_steps).sum()
    rows = dict(
        s=np.asarray(probe.s),
        tau=np.asarray(probe.tau),
        log_t=np.asarray(probe.log_t),
        soft=np.asarray(probe.soft_margin),
        hard=np.asarray(probe.hard_margin),
        phase=np.asarray(probe.phase, dtype=np.float64),
    )
    info = dict(
        code=int(status.code),
        separated=bool(status.separated),
        s0=float(status.s0),
        tau0=float(status.tau0),
        steps=int(steps),
        rejected=int(rejected),
    )
    if not info["separated"]:
        return rows, info
    # The t0 record (last row of phase 1), scaled by 1 + 1e-9 so that the continuation starts
    # strictly separated: started exactly at ln L = +1e-13 the engine re-finds t0 at t ~ 1e-12,
    # where its ln(t L) equation is stiff, and its phase 2 stalls (see the report).
    w0 = jax.tree.map(lambda leaf: leaf[-1] * (1.0 + NUDGE), probe.params)
    s_target = info["s0"] + math.log(gain) / predictor.degree
    more = jm.gradient_flow(predictor, w0, X, y, s_max=s_target, **options)
    keep = np.asarray(more.phase) == 2
    # t = t0 + (t of the continuation - its start), in logs (its clock starts at an offset).
    log_t_more, log_t_start = np.asarray(more.log_t), float(more.status.log_t0)
    gap = np.minimum(log_t_start - log_t_more, 0.0)
    elapsed = np.full(gap.shape, -np.inf)
    positive = gap < 0
    elapsed[positive] = log_t_more[positive] + np.log(-np.expm1(gap[positive]))
    tail = dict(
        s=np.asarray(more.s),
        tau=info["tau0"] + np.asarray(more.tau),
        log_t=np.logaddexp(float(status.log_t0), elapsed),
        soft=np.asarray(more.soft_margin),
        hard=np.asarray(more.hard_margin),
        phase=np.asarray(more.phase, dtype=np.float64),
    )
    rows = {key: np.concatenate([rows[key], tail[key][keep]]) for key in rows}
    info.update(
        code=int(more.status.code),
        separated=bool(more.status.separated),
        steps=info["steps"] + int(np.asarray(more.status.steps).sum()),
        rejected=info["rejected"] + int(np.asarray(more.status.rejected_steps).sum()),
    )
    return rows, info


def _pad(rows: list[np.ndarray], length: int) -> np.ndarray:
    out = np.full((len(rows), length), np.nan)
    for i, row in enumerate(rows):
        out[i, : min(length, row.size)] = row[:length]
    return out


def run_group(label, predictor, X, y, params_list, *, gain, rtol, max_steps, num_saves, sliding):
    """Runs of one predictor on one data set over a list of initial params: padded arrays."""
    fields = ("s", "tau", "log_t", "soft", "hard", "phase")
    collected = {key: [] for key in fields}
    scalars = {
        key: []
        for key in ("code", "separated", "s0", "tau0", "steps", "rejected", "decrease", "seconds")
    }
    for seed, params0 in enumerate(params_list):
        start = time.perf_counter()
        rows, info = flow_through_t0(
            predictor,
            params0,
            X,
            y,
            gain=gain,
            rtol=rtol,
            max_steps=max_steps,
            num_saves=num_saves,
            sliding=sliding,
        )
        seconds = time.perf_counter() - start
        after = rows["soft"][rows["phase"] == 2]
        info["decrease"] = largest_relative_decrease(after)
        info["seconds"] = seconds
        for key in fields:
            collected[key].append(rows[key])
        for key in scalars:
            scalars[key].append(info[key])
        print(
            f"  {label} seed {seed}: code {info['code']}, steps {info['steps']}"
            f" (+{info['rejected']} rejected), s0 {info['s0']:.3f} -> s {rows['s'][-1]:.3f},"
            f" gamma~ {rows['soft'][-1]:.5g}, largest rel. decrease {info['decrease']:.3g}"
            f" ({seconds:.1f} s)",
            flush=True,
        )
    length = max(row.size for row in collected["s"])
    out = {f"{label}_{key}": _pad(collected[key], length) for key in fields}
    out.update(
        {f"{label}_{key}": np.asarray(value, dtype=np.float64) for key, value in scalars.items()}
    )
    return out


def run(config: Config) -> dict[str, np.ndarray]:
    results = {}
    sliding = jm.SlidingOptions(candidates=config.candidates)
    for L, gain, rtol in progress(
        zip(config.depths, config.beta_gain, config.rtol), NAME, total=len(config.depths)
    ):
        predictor = jm.relu_mlp(L, config.width, init_scale=config.init_scale)
        params_list = [
            predictor.init(jax.random.key(1000 * L + seed), config.dim)
            for seed in range(config.seeds)
        ]
        for name in DATASETS:
            X, y = dataset(name, config)
            print(
                f"{NAME}: {name}, ReLU MLP L={L}, width {config.width}, {config.seeds} seeds",
                flush=True,
            )
            results.update(
                run_group(
                    f"{name}_L{L}",
                    predictor,
                    X,
                    y,
                    params_list,
                    gain=gain,
                    rtol=rtol,
                    max_steps=config.max_steps,
                    num_saves=config.num_saves,
                    sliding=sliding,
                )
            )
    if config.cnn_seeds > 0:
        X, y = jm.digits_pair(0, 1, images=True, max_per_class=config.cnn_per_class)
        predictor = jm.relu_cnn(config.cnn_channels, init_scale=config.cnn_init_scale)
        params_list = [
            predictor.init(jax.random.key(7000 + seed), (8, 8)) for seed in range(config.cnn_seeds)
        ]
        print(f"{NAME}: digits 8x8, {predictor.name}, {config.cnn_seeds} seeds", flush=True)
        results.update(
            run_group(
                "cnn",
                predictor,
                X,
                y,
                params_list,
                gain=config.cnn_beta_gain,
                rtol=config.cnn_rtol,
                max_steps=config.max_steps,
                num_saves=config.num_saves,
                sliding=None,
            )
        )
    return results


# --------------------------------------------------------------------------- figures


def _title(name: str, config: Config) -> str:
    if name == "synthetic":
        return (
            f"synthetic: n={config.n}, x~N(0,I_{config.dim}), y=sign(Σx),\n"
            f"|Σx|/√{config.dim} ≥ {config.synthetic_gap:g}"
        )
    return f"digits 0 vs 1: {config.n // 2}/class, PCA → {config.dim} dims"


def _draw_runs(ax, results, label, color_of_seed=None):
    s, soft, phase = (results[f"{label}_{key}"] for key in ("s", "soft", "phase"))
    s0 = results[f"{label}_s0"]
    for i in range(s.shape[0]):
        color = color_of_seed(i) if color_of_seed else "C0"
        before, after = phase[i] == 1, phase[i] == 2
        ax.plot(s[i][before], soft[i][before], ":", color=color, lw=0.8, alpha=0.6)
        ax.plot(s[i][after], soft[i][after], "-", color=color, lw=1.0, alpha=0.8)
        if np.isfinite(s0[i]):
            ax.plot([s0[i]], [0.0], "o", color="k", ms=3)
    finite = soft[(phase == 2) & np.isfinite(soft)]
    top = float(np.max(finite)) if finite.size else 1.0
    ax.set_ylim(-0.6 * abs(top), 1.15 * abs(top))
    ax.axhline(0.0, color="k", lw=0.6)


def plot(results, config: Config) -> None:
    depths = config.depths
    fig, axes = figure(ncols=len(depths), nrows=2, height=3.0)
    for row, name in enumerate(DATASETS):
        for col, L in enumerate(depths):
            ax = axes[row, col]
            label = f"{name}_L{L}"
            _draw_runs(ax, results, label, lambda i: depth_color(i, config.seeds))
            worst = np.max(results[f"{label}_decrease"])
            kind = "linear" if L == 1 else f"ReLU MLP L={L}"
            rtol = config.rtol[config.depths.index(L)]
            ax.set_title(
                f"{kind} (rtol {rtol:g})\nlargest rel. decrease after t0: {worst:.1e}", fontsize=8
            )
            ax.set_xlabel("s = ln ||w||")
            if col == 0:
                ax.set_ylabel(f"{_title(name, config)}\nsoft margin γ̃", fontsize=8)
    fig.suptitle(
        f"Theorem 5: γ̃ along the flow, {config.seeds} seeds per panel (width"
        f" {config.width}); dotted: before t0, solid: after, •: t0",
        y=1.0,
    )
    fig.tight_layout()
    save_figure(fig, NAME)

    fig, axes = figure(ncols=2, nrows=1, height=3.6)
    ax = axes[0, 0]
    labels = [f"{name}_L{L}" for name in DATASETS for L in depths]
    if config.cnn_seeds > 0:
        labels.append("cnn")
    for k, label in enumerate(labels):
        values = results[f"{label}_decrease"]
        values = np.where(np.isfinite(values), values, np.nan)
        jitter = np.linspace(-0.2, 0.2, values.size) if values.size > 1 else np.zeros(1)
        ax.plot(k + jitter, values, "o", ms=3, color="C0" if label.startswith("s") else "C1")
    ax.set_yscale("symlog", linthresh=1e-10)
    ax.axhline(RELU_TOL, color="C3", ls="--", lw=0.8, label=f"ReLU criterion {RELU_TOL:g}")
    ax.axhline(LINEAR_TOL, color="C2", ls="--", lw=0.8, label=f"linear criterion {LINEAR_TOL:g}")
    ax.axhline(0.0, color="k", lw=0.6)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(
        [lab.replace("synthetic_", "syn ").replace("digits_", "dig ") for lab in labels],
        rotation=60,
        fontsize=7,
    )
    ax.set_ylabel("largest relative decrease of γ̃ after t0\n(< 0: γ̃ only increased)")
    ax.set_title("per run, between consecutive saved points (symlog)")
    ax.legend(fontsize=7, loc="lower left")
    ax = axes[0, 1]
    if config.cnn_seeds > 0:
        _draw_runs(ax, results, "cnn", lambda i: depth_color(i, config.cnn_seeds))
        ax.set_title(
            f"ReLU CNN channels {config.cnn_channels} (L={len(config.cnn_channels) + 1}),"
            f" digits 0 vs 1 8x8,\n{config.cnn_per_class}/class, autodiff element,"
            f" rtol {config.cnn_rtol:g}",
            fontsize=8,
        )
        ax.set_xlabel("s = ln ||w||")
        ax.set_ylabel("soft margin γ̃")
    fig.tight_layout()
    save_figure(fig, f"{NAME}_decrease")


# --------------------------------------------------------------------------- claims


def summarize(results, config: Config) -> list[Claim]:
    claims = []
    for name in DATASETS:
        for L in config.depths:
            label = f"{name}_L{L}"
            decrease = results[f"{label}_decrease"]
            separated = results[f"{label}_separated"]
            codes = results[f"{label}_code"]
            tol = LINEAR_TOL if L == 1 else RELU_TOL
            worst = float(np.max(decrease[separated > 0])) if np.any(separated > 0) else np.inf
            kind = "linear" if L == 1 else f"ReLU MLP L={L}"
            kind += f" (rtol {config.rtol[config.depths.index(L)]:g})"
            reached = int(np.sum(codes == 0))
            claims.append(
                Claim(
                    NAME,
                    f"{name}, {kind}: γ̃ non-decreasing after t0 ({reached}/{codes.size} runs"
                    f" reached the target)",
                    "max over seeds of the largest relative decrease",
                    worst,
                    f"<= {tol:g}",
                    bool(worst <= tol),
                )
            )
            fraction = float(np.mean(separated))
            claims.append(
                Claim(
                    NAME,
                    f"{name}, {kind}: runs that reached t0 within max_steps (Theorem 5 is"
                    " tested on those)",
                    "fraction of seeds",
                    fraction,
                    "> 0 (1 ideally)",
                    bool(fraction > 0),
                )
            )
    if config.cnn_seeds > 0:
        decrease, separated = results["cnn_decrease"], results["cnn_separated"]
        worst = float(np.max(decrease[separated > 0])) if np.any(separated > 0) else np.inf
        claims.append(
            Claim(
                NAME,
                f"digits 8x8, ReLU CNN {config.cnn_channels} (autodiff element, rtol"
                f" {config.cnn_rtol:g}): γ̃ non-decreasing after t0",
                "max over seeds of the largest relative decrease",
                worst,
                f"<= {RELU_TOL:g}",
                bool(worst <= RELU_TOL),
            )
        )
        fraction = float(np.mean(separated))
        claims.append(
            Claim(
                NAME,
                "digits 8x8, ReLU CNN: runs that reached t0",
                "fraction of seeds",
                fraction,
                "> 0 (1 ideally)",
                bool(fraction > 0),
            )
        )
    return claims


if __name__ == "__main__":
    main(sys.modules[__name__])
