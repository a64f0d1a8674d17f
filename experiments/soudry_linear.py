"""Soudry et al. (JMLR 2018), Figure 1: GD on separable data goes to the SVM direction like 1/ln t.

Data: `soudry_dataset()` (support points (0.5, 1.5), (1.5, 0.5), their negatives, 12 random
far points), linear model, w(0) = 0, exponential loss (a sum). Compared:

- constant-step GD (`gradient_descent`, schedule "constant") at lr = 1/σ_max(X)², inside the
  stability bound 2/σ_max², and at the figure's 1/σ_max (5x over it on these data);
- the flow engine (`gradient_flow`, linear model) to beta_max, whose clock reaches ln t ~ 1e4.

Derived asymptotics (n_s = 4 support vectors, margin γ̄ = √2, all driven equally): with
g = <w, ŵ>, dg/dt = n_s γ̄ e^{-γ̄ g}, so e^{γ̄ g} = n_s γ̄² t + c and

    ||w|| ≈ (ln t + ln(n_s γ̄²)) / γ̄,   ln L ≈ -ln t - 2 ln γ̄,   β (γ̄ - γ̃) → ln n_s,

the last one at an exact SVM direction (ties between the four support margins).

Its default-scale wall time is recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time

import jax.numpy as jnp
import numpy as np
from scipy.stats import linregress

import jaxmargin as jm

from ._runner import Claim, main
from ._style import figure, save_figure

NAME = "soudry_linear"


@dataclasses.dataclass(frozen=True)
class Config:
    data_seed: int = 0
    gd_steps: int = 10_000_000
    num_logs: int = 300
    fit_from_t: float = 1e3  # the late window used for the rate fits
    beta_max: float = 1e4
    max_steps: int = 20_000
    num_saves: int = 200

    @classmethod
    def quick(cls) -> Config:
        return cls(
            gd_steps=200_000,
            num_logs=60,
            fit_from_t=1e2,
            beta_max=1e3,
            max_steps=5_000,
            num_saves=40,
        )


def _angle(W, direction) -> np.ndarray:
    """Angle between each row of W (2-d) and a unit direction, accurate near 0 (arctan2)."""
    W = np.atleast_2d(W)
    cross = W[:, 0] * direction[1] - W[:, 1] * direction[0]
    return np.arctan2(np.abs(cross), W @ direction)


def run(config: Config) -> dict[str, np.ndarray]:
    X, y = jm.soudry_dataset(config.data_seed)
    svm = jm.svm_direction(X, y)
    sigma_max = float(np.linalg.svd(X, compute_uv=False)[0])
    out = dict(
        X=X,
        y=y,
        svm_direction=svm.direction,
        svm_margin=np.asarray(svm.margin),
        n_support=np.asarray(len(svm.support)),
        sigma_max=np.asarray(sigma_max),
    )
    start = time.perf_counter()
    for tag, lr in (("gd", 1.0 / sigma_max**2), ("gd_paper", 1.0 / sigma_max)):
        run_ = jm.gradient_descent(
            jm.linear(),
            (jnp.zeros(2),),
            X,
            y,
            schedule="constant",
            lr=lr,
            steps=config.gd_steps,
            num_logs=config.num_logs,
        )
        if run_.status != "ok":
            raise RuntimeError(f"GD ({tag}) stopped: {run_.status}")
        w = np.asarray(run_.params[0])
        out.update(
            {
                f"{tag}_lr": np.asarray(lr),
                f"{tag}_step": np.asarray(run_.step),
                f"{tag}_log_t": np.asarray(run_.log_time),
                f"{tag}_w": w,
                f"{tag}_rho": np.asarray(run_.rho),
                f"{tag}_log_loss": np.asarray(run_.log_loss),
                f"{tag}_soft_margin": np.asarray(run_.soft_margin),
                f"{tag}_angle": _angle(w, svm.direction),
            }
        )
        print(
            f"  soudry_linear: {tag} {config.gd_steps} steps ({time.perf_counter() - start:.1f} s)",
            flush=True,
        )
    sol = jm.gradient_flow(
        jm.linear(),
        (jnp.zeros(2),),
        X,
        y,
        beta_max=config.beta_max,
        max_steps=config.max_steps,
        num_saves=config.num_saves,
        solver="tsit5",
    )
    w = np.asarray(sol.params[0])
    out.update(
        flow_s=np.asarray(sol.s),
        flow_log_t=np.asarray(sol.log_t),
        flow_w=w,
        flow_rho=np.asarray(sol.rho),
        flow_log_loss=np.asarray(sol.log_loss),
        flow_soft_margin=np.asarray(sol.soft_margin),
        flow_phase=np.asarray(sol.phase),
        flow_angle=_angle(w, svm.direction),
        flow_status=np.asarray(int(sol.status.code)),
        flow_message=np.asarray(sol.status.message),
        flow_steps=np.asarray(sol.status.steps),
    )
    print(
        f"  soudry_linear: flow to beta = {config.beta_max:g}: {sol.status.message}, steps"
        f" {np.asarray(sol.status.steps).tolist()} ({time.perf_counter() - start:.1f} s)",
        flush=True,
    )
    return out


# --------------------------------------------------------------------------- analysis


def _fits(results, config):
    """Rate fits of constant-step GD on the late window t >= fit_from_t."""
    log_t = results["gd_log_t"]
    window = log_t >= math.log(config.fit_from_t)
    lt = log_t[window]
    return dict(
        window=window,
        rho=linregress(lt, results["gd_rho"][window]),
        loss=linregress(lt, results["gd_log_loss"][window]),
        angle=linregress(1.0 / lt, results["gd_angle"][window]),
    )


def _flow_predictions(results):
    """ln t and ln L that the asymptotics predict at the flow's final ||w||, and β(γ̄ - γ̃)."""
    gbar, n_s = float(results["svm_margin"]), float(results["n_support"])
    rho, log_t = float(results["flow_rho"][-1]), float(results["flow_log_t"][-1])
    predicted_log_t = gbar * rho - math.log(n_s * gbar**2)
    beta_gap = rho * (gbar - float(results["flow_soft_margin"][-1]))
    return predicted_log_t, log_t, beta_gap


def plot(results, config: Config) -> None:
    gbar, n_s = float(results["svm_margin"]), float(results["n_support"])
    fits = _fits(results, config)
    fig, axes = figure(ncols=2, nrows=2, height=3.3)
    runs = [
        ("gd", r"GD, $\eta = 1/\sigma_{max}^2$", "C0"),
        ("gd_paper", r"GD, $\eta = 1/\sigma_{max}$ (Soudry's figure)", "C1"),
    ]
    flow_mask = results["flow_log_t"] > 0

    ax = axes[0, 0]
    for tag, label, color in runs:
        keep = results[f"{tag}_log_t"] > 0
        ax.loglog(
            results[f"{tag}_log_t"][keep],
            np.maximum(results[f"{tag}_angle"][keep], 1e-17),
            color=color,
            label=label,
        )
    ax.loglog(
        results["flow_log_t"][flow_mask],
        np.maximum(results["flow_angle"][flow_mask], 1e-17),
        "C2",
        label="flow engine",
    )
    lt = np.geomspace(1.0, results["flow_log_t"][-1], 50)
    ax.loglog(lt, 1.0 / lt, "k:", lw=0.8, label=r"$1/\ln t$")
    ax.set_xlabel(r"$\ln t$  (exponential-loss time)")
    ax.set_ylabel("angle to the SVM direction (rad, 0 at 1e-17)")
    ax.set_title("Direction: GD is slow (~1/ln t); the flow clock gets there", fontsize=9)
    ax.legend(fontsize=7)

    ax = axes[0, 1]
    window = fits["window"]
    inv = 1.0 / results["gd_log_t"][window]
    ax.plot(inv, results["gd_angle"][window], "C0o", ms=3, label=runs[0][1])
    fit = fits["angle"]
    ax.plot(
        inv,
        fit.intercept + fit.slope * inv,
        "k--",
        lw=0.8,
        label=f"fit: slope {fit.slope:.3g}, r² = {fit.rvalue**2:.5f}",
    )
    ax.set_xlabel(r"$1/\ln t$  (late window $t \geq$" + f" {config.fit_from_t:g})")
    ax.set_ylabel("angle to the SVM direction (rad)")
    ax.set_title("GD angle vs 1/ln t", fontsize=9)
    ax.legend(fontsize=7)

    ax = axes[1, 0]
    for tag, label, color in runs:
        keep = results[f"{tag}_log_t"] > 0
        ax.loglog(
            results[f"{tag}_log_t"][keep], results[f"{tag}_rho"][keep], color=color, label=label
        )
    ax.loglog(
        results["flow_log_t"][flow_mask],
        results["flow_rho"][flow_mask],
        "C2--",
        label="flow engine",
    )
    ax.loglog(
        lt,
        (lt + math.log(n_s * gbar**2)) / gbar,
        "k:",
        lw=0.8,
        label=r"$(\ln t + \ln(n_s\bar\gamma^2))/\bar\gamma$",
    )
    ax.set_xlabel(r"$\ln t$")
    ax.set_ylabel(r"$\|w\|$")
    ax.set_title(f"Norm: GD slope {fits['rho'].slope:.4g} vs 1/γ̄ = {1 / gbar:.4g}", fontsize=9)
    ax.legend(fontsize=7)

    ax = axes[1, 1]
    for tag, label, color in runs:
        keep = results[f"{tag}_log_t"] > 0
        ax.loglog(
            np.exp(results[f"{tag}_log_t"][keep]),
            np.exp(results[f"{tag}_log_loss"][keep]),
            color=color,
            label=label,
        )
    t = np.exp(results["gd_log_t"][results["gd_log_t"] > 0])
    ax.loglog(t, 1.0 / (gbar**2 * t), "k:", lw=0.8, label=r"$1/(\bar\gamma^2 t)$")
    ax.set_xlabel("t")
    ax.set_ylabel(r"loss $\mathcal{L}(w)$")
    ax.set_title(f"Loss: fitted slope of ln L vs ln t = {fits['loss'].slope:.4f}", fontsize=9)
    ax.legend(fontsize=7)
    fig.suptitle(
        "Soudry et al. (2018) Fig. 1 data, linear model, w(0) = 0: GD vs the flow engine",
        fontsize=10,
    )
    fig.tight_layout()
    save_figure(fig, NAME)


def summarize(results, config: Config) -> list[Claim]:
    gbar = float(results["svm_margin"])
    fits = _fits(results, config)
    rho_ratio = float(fits["rho"].slope * gbar)
    loss_slope = float(fits["loss"].slope)
    gd_angle = float(results["gd_angle"][-1])
    gd_log_t = float(results["gd_log_t"][-1])
    flow_angle = float(results["flow_angle"][-1])
    predicted_log_t, flow_log_t, beta_gap = _flow_predictions(results)
    n_s = int(results["n_support"])
    clock_error = abs(flow_log_t - predicted_log_t) / abs(predicted_log_t)
    reached = int(results["flow_status"]) == 0
    message = str(results["flow_message"])
    claims = [
        Claim(
            NAME,
            "constant-step GD: ||w|| grows like ln t / γ̄ (fitted slope x γ̄)",
            "slope(||w|| vs ln t) * γ̄",
            rho_ratio,
            "within 5% of 1",
            abs(rho_ratio - 1) <= 0.05,
        ),
        Claim(
            NAME,
            "constant-step GD: the loss decays like 1/t",
            "slope(ln L vs ln t)",
            loss_slope,
            "within 5% of -1",
            abs(loss_slope + 1) <= 0.05,
        ),
        Claim(
            NAME,
            f"constant-step GD angle to the SVM at t = e^{gd_log_t:.2f} (Soudry: O(1/ln t))",
            "angle (rad)",
            gd_angle,
            "angle * ln t <= 0.1",
            gd_angle * gd_log_t <= 0.1,
        ),
        Claim(
            NAME,
            "GD angle vs 1/ln t is a straight line (late window)",
            "r² of angle vs 1/ln t",
            float(fits["angle"].rvalue ** 2),
            ">= 0.999",
            fits["angle"].rvalue ** 2 >= 0.999,
        ),
        Claim(
            NAME,
            f"flow engine to ||w|| = {float(results['flow_rho'][-1]):.4g} ({message}):"
            " final angle to the SVM",
            "angle (rad)",
            flow_angle,
            "<= 1e-6 and target reached",
            flow_angle <= 1e-6 and reached,
        ),
        Claim(
            NAME,
            "flow clock: ln t at the end vs γ̄ ||w|| - ln(n_s γ̄²)",
            "relative difference of ln t",
            clock_error,
            "<= 1e-3",
            clock_error <= 1e-3,
        ),
        Claim(
            NAME,
            f"flow soft-margin gap at the end: β (γ̄ - γ̃) → ln n_s = ln {n_s}",
            "β (γ̄ - γ̃) / ln n_s",
            beta_gap / math.log(n_s),
            "within 1e-3 of 1",
            abs(beta_gap / math.log(n_s) - 1) <= 1e-3,
        ),
    ]
    return [c._replace(value=float(c.value), holds=bool(c.holds)) for c in claims]


if __name__ == "__main__":
    main(sys.modules[__name__])
