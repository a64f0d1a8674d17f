"""Lyu & Li (ICLR 2020): loss and norm rates, the norm identity and the margin sandwich.

Along the gradient flow of an L-homogeneous model on separable data (exponential loss, time t):

* rates: L(w) t (ln t)^(2-2/L) and ||w|| / (ln t)^(1/L) stay bounded (Lyu & Li, Thm 4.3:
  L = Theta(1 / (t (ln t)^(2-2/L))), ||w|| = Theta((ln t)^(1/L))). With u = -ln L ~ gamma~ ||w||^L
  and ||grad L|| ~ L L u / ||w|| once the direction has settled, du/dt ~ L^2 gamma~^(2/L)
  e^-u u^(2-2/L), whence the limits L t (ln t)^(2-2/L) -> 1 / (L^2 gamma^(2/L)) and
  ||w|| / (ln t)^(1/L) -> gamma^(-1/L) (gamma the limit margin), drawn dashed with the run's final
  soft margin (convergence to them is only logarithmic).
* identity: (1/2) d||w||^2/dt = L sum_n e^{-q_n} q_n (q_n = m_n(w)), i.e. in the seed's clock
  (1/2) d||w||^2/dtau = L sum_n p_n m_n with p = softmax(-m). The engine saves its own
  (1/2) d||w||^2/dtau (phase 1: <w, velocity>; phase 2: from d tau/ds); the right side is
  recomputed here from the saved params with jm.normalized_margins and jm.log_norm, in the log
  domain (m_n = beta q_n, beta = ||w||^L never formed). Residuals are relative to
  L sum_n p_n |m_n| (the sum can cross 0 before t0). The t-clock version multiplies both sides
  by L(w): saved ln L on the left, jm.log_loss of the saved params on the right.
* sandwich: gamma - ln(n) / ||w||^L <= gamma~ <= gamma at every saved point (exact).

Measured: before t0 the ReLU net's saved (1/2) d||w||^2/dtau = <w, velocity> misses the
identity by ~1e-5 relative. The engine's velocity there applies the sliding-mode kink
derivative alpha in (0, 1) to pre-activations that are only *near* 0 (|z| < 1e-3 x mean |z|),
where relu(z) != alpha z, so Euler's identity <g, w> = L f (Lemma 2) fails by O(alpha z). After
t0 the engine derives the saved value from d tau/ds = rho^(2-L) / (L p.q), which is the
identity itself, so the residual there only checks the saved params, s and tau agree.

Models: L = 1 the linear model (relu_mlp(1, .)), L = 2 a ReLU MLP of width 6 (same program as
theorem5's, so the compilation is shared in one process), L = 3, 4 deep linear networks of
width 6 (smooth, so the flow reaches large beta cheaply; ReLU nets of depth >= 3 crawl on
their kinks in this engine). Data: theorem5's synthetic set (n = 16, dim 6).

Most of its default-scale wall time (recorded in docs/benchmarks.md) compiles one flow program per
depth.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxmargin as jm

from ._runner import Claim, main, progress
from ._style import depth_color, figure, save_figure
from .theorem5 import Config as Theorem5Config
from .theorem5 import synthetic_data

NAME = "lyu_li_rates"
FIELDS = (
    "s",
    "tau",
    "log_t",
    "log_loss",
    "soft",
    "hard",
    "phase",
    "log_lhs",
    "sign_lhs",
    "log_rhs",
    "sign_rhs",
    "log_scale",
    "log_loss_re",
    "soft_re",
    "hard_re",
)
_T5 = Theorem5Config()


@dataclasses.dataclass(frozen=True)
class Config:
    depths: tuple[int, ...] = (1, 2, 3, 4)
    seeds: int = 3
    n: int = _T5.n
    dim: int = _T5.dim
    gap: float = _T5.synthetic_gap
    width: int = _T5.width
    init_scale: float = 1.0
    beta_max: tuple[float, ...] = (2e3, 2e4, 3e4, 5e4)  # target beta = ||w||^L per depth
    rtol: float = _T5.rtol[1]  # = theorem5's for L = 1, 2 (one shared compilation)
    max_steps: int = 20_000
    num_saves: int = _T5.num_saves
    candidates: int = _T5.candidates
    ratio_tol: float = 2.0  # "bounded": max/min over the late part of the ln t range
    residual_tol: float = 1e-9

    @classmethod
    def quick(cls) -> Config:
        quick5 = Theorem5Config.quick()
        return cls(
            depths=(1, 2),
            seeds=1,
            beta_max=(100.0, 300.0),
            max_steps=quick5.max_steps,
            num_saves=quick5.num_saves,
        )


def predictor_for(L: int, config: Config):
    if L <= 2:
        return jm.relu_mlp(L, config.width, init_scale=config.init_scale)
    return jm.deep_linear(L, config.width, init_scale=config.init_scale)


def _identity_terms(predictor, params, X, y):
    """Right side L sum_n p_n m_n of the identity from params, in logs: (log|rhs|, sign,
    log scale = ln(L sum p |m|)), and jm's own ln L, gamma~, gamma of those params."""
    L = predictor.degree
    q = jm.normalized_margins(predictor, params, X, y)
    log_beta = L * jm.log_norm(params)
    gap = q - jnp.min(q)
    beta_gap = jnp.where(gap > 0, jnp.exp(log_beta + jnp.log(jnp.where(gap > 0, gap, 1.0))), 0.0)
    p = jax.nn.softmax(-beta_gap)
    pq, pabs = p @ q, p @ jnp.abs(q)
    log_rhs = jnp.log(L) + log_beta + jnp.log(jnp.abs(pq))
    log_scale = jnp.log(L) + log_beta + jnp.log(pabs)
    return (
        log_rhs,
        jnp.sign(pq),
        log_scale,
        jm.log_loss(predictor, params, X, y),
        jm.soft_margin(predictor, params, X, y),
        jm.hard_margin(predictor, params, X, y),
    )


def _nanmax(values, empty=np.inf) -> float:
    """max over the finite entries (``empty`` if there are none: a failed measurement)."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    return float(np.max(finite)) if finite.size else float(empty)


def _pad(rows, length):
    out = np.full((len(rows), length), np.nan)
    for i, row in enumerate(rows):
        out[i, : row.size] = row
    return out


def run(config: Config) -> dict[str, np.ndarray]:
    X, y = synthetic_data(config.n, config.dim, config.gap)
    sliding = jm.SlidingOptions(candidates=config.candidates)
    results = {}
    for L, beta_max in progress(
        zip(config.depths, config.beta_max), NAME, total=len(config.depths)
    ):
        predictor = predictor_for(L, config)
        collected = {key: [] for key in FIELDS}
        codes, steps, log_t0, used = [], [], [], []
        # Runs that never reach t0 (a data point left with every unit dead) say nothing about
        # the rates: try up to 2 * seeds initialisations for `seeds` runs that separate.
        for seed in range(2 * config.seeds):
            if sum(code != 4 for code in codes) >= config.seeds:
                break
            params0 = predictor.init(jax.random.key(2000 * L + seed), config.dim)
            start = time.perf_counter()
            sol = jm.gradient_flow(
                predictor,
                params0,
                X,
                y,
                beta_max=beta_max,
                num_saves=config.num_saves,
                rtol=config.rtol,
                atol=config.rtol * 1e-2,
                max_steps=config.max_steps,
                sliding=sliding,
                solver="tsit5",
            )
            terms = [
                np.asarray(a)
                for a in zip(
                    *[
                        _identity_terms(
                            predictor, jax.tree.map(lambda leaf: leaf[k], sol.params), X, y
                        )
                        for k in range(sol.s.shape[0])
                    ]
                )
            ]
            row = dict(
                s=sol.s,
                tau=sol.tau,
                log_t=sol.log_t,
                log_loss=sol.log_loss,
                soft=sol.soft_margin,
                hard=sol.hard_margin,
                phase=sol.phase,
                log_lhs=sol.log_half_drho2_dtau,
                sign_lhs=sol.sign_half_drho2_dtau,
                log_rhs=terms[0],
                sign_rhs=terms[1],
                log_scale=terms[2],
                log_loss_re=terms[3],
                soft_re=terms[4],
                hard_re=terms[5],
            )
            if bool(sol.status.separated):
                for key in FIELDS:
                    collected[key].append(np.asarray(row[key], dtype=np.float64))
                used.append(seed)
            codes.append(int(sol.status.code))
            steps.append(np.asarray(sol.status.steps) + np.asarray(sol.status.rejected_steps))
            log_t0.append(float(sol.status.log_t0))
            print(
                f"{NAME}: L={L} seed {seed}: {sol.status.message} (code {codes[-1]}), steps"
                f" {np.asarray(sol.status.steps)} (+{np.asarray(sol.status.rejected_steps)}"
                f" rejected), ln t -> {float(sol.log_t[-1]):.4g}, gamma~ ->"
                f" {float(sol.soft_margin[-1]):.5g} ({time.perf_counter() - start:.1f} s)",
                flush=True,
            )
        length = max([row.size for row in collected["s"]], default=1)
        for key in FIELDS:
            results[f"L{L}_{key}"] = _pad(collected[key], length)
        results[f"L{L}_code"] = np.asarray(codes, dtype=np.float64)
        results[f"L{L}_steps"] = np.asarray(steps, dtype=np.float64)
        results[f"L{L}_log_t0"] = np.asarray(log_t0)
        results[f"L{L}_seeds_used"] = np.asarray(used, dtype=np.float64)
    return results


# --------------------------------------------------------------------------- analysis


def rate_quantities(results, L):
    """ln(L t (ln t)^(2-2/L)) and ln(||w|| / (ln t)^(1/L)) on phase-2 rows with ln t > 0."""
    log_t, phase = results[f"L{L}_log_t"], results[f"L{L}_phase"]
    ok = (phase == 2) & (log_t > 0)
    lnln = np.where(ok, np.log(np.where(ok, log_t, 1.0)), np.nan)
    loss_rate = results[f"L{L}_log_loss"] + log_t + (2.0 - 2.0 / L) * lnln
    norm_rate = results[f"L{L}_s"] - lnln / L
    return lnln, np.where(ok, loss_rate, np.nan), np.where(ok, norm_rate, np.nan)


def window_log_ratio(lnln, values, fraction):
    """Per run: max - min of a log quantity over ln t >= (1 - fraction) * max ln t (the last
    `fraction` of the ln t range, linear in ln t), and the factor by which ln t grows there."""
    spread, growth = [], []
    for x, v in zip(lnln, values):
        ok = np.isfinite(x) & np.isfinite(v)
        if np.sum(ok) < 2:
            spread.append(np.nan)
            growth.append(np.nan)
            continue
        log_t, v = np.exp(x[ok]), v[ok]
        late = log_t >= (1.0 - fraction) * log_t.max()
        spread.append(float(np.max(v[late]) - np.min(v[late])))
        growth.append(float(log_t.max() / log_t[late].min()))
    return np.asarray(spread), np.asarray(growth)


def last_finite(rows) -> np.ndarray:
    """The last finite entry of each row (NaN for a row without one)."""
    out = []
    for row in np.atleast_2d(rows):
        finite = row[np.isfinite(row)]
        out.append(finite[-1] if finite.size else np.nan)
    return np.asarray(out, dtype=np.float64)


def predicted_limits(results, L):
    """Per run: ln of the limits 1/(L^2 gamma^(2/L)) and gamma^(-1/L), with the final gamma~."""
    final = last_finite(results[f"L{L}_soft"])
    final = np.where(final > 0, final, np.nan)
    return -2.0 * np.log(L) - (2.0 / L) * np.log(final), -np.log(final) / L


def identity_residuals(results, L):
    """Relative residuals (tau clock, t clock) of (1/2) d||w||^2 = L sum p m, per row."""
    log_scale = results[f"L{L}_log_scale"]
    lhs = results[f"L{L}_sign_lhs"] * np.exp(results[f"L{L}_log_lhs"] - log_scale)
    rhs = results[f"L{L}_sign_rhs"] * np.exp(results[f"L{L}_log_rhs"] - log_scale)
    tau_clock = np.abs(lhs - rhs)
    # t clock: multiply by L(w), saved ln L on the left, jm.log_loss on the right.
    shift = results[f"L{L}_log_loss_re"]
    lhs_t = results[f"L{L}_sign_lhs"] * np.exp(
        results[f"L{L}_log_lhs"] + results[f"L{L}_log_loss"] - log_scale - shift
    )
    rhs_t = results[f"L{L}_sign_rhs"] * np.exp(results[f"L{L}_log_rhs"] - log_scale)
    return tau_clock, np.abs(lhs_t - rhs_t)


def sandwich(results, L, n):
    """(violations, position) with position = (gamma~ - lower) / (gamma - lower) in [0, 1]."""
    count, positions = 0, []
    for soft_key, hard_key in (("soft", "hard"), ("soft_re", "hard_re")):
        soft, hard = results[f"L{L}_{soft_key}"], results[f"L{L}_{hard_key}"]
        width = np.log(n) * np.exp(-L * results[f"L{L}_s"])
        lower = hard - width
        tol = 1e-12 * (np.abs(hard) + width)
        ok = np.isfinite(soft)
        count += int(np.sum(ok & ((soft > hard + tol) | (soft < lower - tol))))
        positions.append((soft - lower) / np.where(width > 0, width, np.nan))
    return count, positions[0]


# --------------------------------------------------------------------------- figures


def _model_name(L):
    return {1: "linear", 2: "ReLU MLP L=2"}.get(L, f"deep linear L={L}")


def plot(results, config: Config) -> None:
    fig, axes = figure(ncols=2, nrows=2, height=3.4)
    count = len(config.depths)
    for index, L in enumerate(config.depths):
        color = depth_color(index, count)
        lnln, loss_rate, norm_rate = rate_quantities(results, L)
        limit_loss, limit_norm = predicted_limits(results, L)
        tau_res, t_res = identity_residuals(results, L)
        _, position = sandwich(results, L, config.n)
        for i in range(lnln.shape[0]):
            label = _model_name(L) if i == 0 else None
            axes[0, 0].plot(np.exp(lnln[i]), np.exp(loss_rate[i]), color=color, label=label)
            axes[0, 1].plot(np.exp(lnln[i]), np.exp(norm_rate[i]), color=color, label=label)
            xmax = np.nanmax(np.exp(lnln[i])) if np.any(np.isfinite(lnln[i])) else 1.0
            for ax, limit in ((axes[0, 0], limit_loss[i]), (axes[0, 1], limit_norm[i])):
                ax.plot([xmax / 3, xmax * 3], [np.exp(limit)] * 2, "--", color=color, lw=0.8)
            phase2 = results[f"L{L}_phase"][i] == 2
            axes[1, 0].plot(
                results[f"L{L}_s"][i][phase2],
                np.maximum(tau_res[i][phase2], 1e-18),
                color=color,
                label=label,
            )
            axes[1, 0].plot(
                results[f"L{L}_s"][i][~phase2],
                np.maximum(tau_res[i][~phase2], 1e-18),
                ":",
                color=color,
            )
            axes[1, 1].plot(results[f"L{L}_s"][i], position[i], color=color, label=label)
    ax = axes[0, 0]
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="ln t",
        ylabel="L(w) · t · (ln t)^(2-2/L)",
        title="loss rate (dashed: 1/(L²γ̃^(2/L)), final γ̃)",
    )
    ax.legend(fontsize=7)
    ax = axes[0, 1]
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="ln t",
        ylabel="||w|| / (ln t)^(1/L)",
        title="norm rate (dashed: γ̃^(-1/L), final γ̃)",
    )
    ax = axes[1, 0]
    ax.set(
        yscale="log",
        xlabel="s = ln ||w||",
        ylabel="|saved - recomputed| / (L Σ p|m|)",
        title="½ d||w||²/dτ = L Σ p_n m_n: residual\n(dotted: phase 1, solid: after t0)",
    )
    ax = axes[1, 1]
    ax.axhline(0.0, color="k", lw=0.6)
    ax.axhline(1.0, color="k", lw=0.6)
    ax.set(
        xlabel="s = ln ||w||",
        ylabel="(γ̃ - γ + ln n/ρ^L) / (ln n/ρ^L)",
        title="sandwich γ - ln n/ρ^L ≤ γ̃ ≤ γ: position in [0, 1]",
    )
    fig.suptitle(
        f"Lyu & Li (2020) along the flow: synthetic n={config.n}, dim {config.dim},"
        f" width {config.width}, {config.seeds} seeds per depth",
        y=1.01,
    )
    fig.tight_layout()
    save_figure(fig, NAME)


# --------------------------------------------------------------------------- claims


def summarize(results, config: Config) -> list[Claim]:
    claims = []
    for L in config.depths:
        name = _model_name(L)
        codes = results[f"L{L}_code"]
        reached = int(np.sum(codes == 0))
        lnln, loss_rate, norm_rate = rate_quantities(results, L)
        for label, values in (("L·t·(ln t)^(2-2/L)", loss_rate), ("||w||/(ln t)^(1/L)", norm_rate)):
            for fraction, what in ((0.5, "last half"), (0.9, "last 90%")):
                spread, growth = window_log_ratio(lnln, values, fraction)
                ratio = float(np.exp(_nanmax(spread)))
                claims.append(
                    Claim(
                        NAME,
                        f"{name}: {label} bounded over the {what} of the ln t range (ln t"
                        f" grows x{_nanmax(growth, np.nan):.3g} there; {reached}/{codes.size} runs"
                        " reached beta_max)",
                        "max over seeds of max/min",
                        ratio,
                        f"<= {config.ratio_tol:g}",
                        bool(ratio <= config.ratio_tol),
                    )
                )
        limit_loss, _ = predicted_limits(results, L)
        gaps = np.abs(last_finite(loss_rate) - limit_loss)
        ratio = _nanmax(gaps)
        claims.append(
            Claim(
                NAME,
                f"{name}: L·t·(ln t)^(2-2/L) at the end vs 1/(L²γ̃^(2/L))",
                "max over seeds of |ln(value/limit)|",
                ratio,
                "reported (log convergence)",
                True,
            )
        )
        tau_res, t_res = identity_residuals(results, L)
        phase = results[f"L{L}_phase"]
        for label, residual in (
            ("τ clock, before t0", np.where(phase == 1, tau_res, np.nan)),
            ("τ clock, after t0", np.where(phase == 2, tau_res, np.nan)),
            ("t clock, all points", t_res),
        ):
            worst = _nanmax(residual)
            claims.append(
                Claim(
                    NAME,
                    f"{name}: ½ d||w||²/d{label[0]} = L Σ_n p_n m_n ({label}), saved vs recomputed",
                    "max relative residual over saved points",
                    worst,
                    f"<= {config.residual_tol:g}",
                    bool(worst <= config.residual_tol),
                )
            )
        violations, _ = sandwich(results, L, config.n)
        claims.append(
            Claim(
                NAME,
                f"{name}: sandwich γ - ln n/ρ^L ≤ γ̃ ≤ γ (saved and recomputed)",
                "violations",
                float(violations),
                "= 0",
                violations == 0,
            )
        )
    return claims


if __name__ == "__main__":
    main(sys.modules[__name__])
