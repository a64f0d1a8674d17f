"""Ji & Telgarsky (NeurIPS 2020): alignment cos∠(w, -∇L(w)) → 1 along gradient flow.

Two measurements of the alignment at each saved point:

- "autodiff": `jm.alignment`, cos∠(w, Σ_i p_i ∇m_i(w)) with p = softmax(-m) and the autodiff
  element of each ∂m_i (relu'(0) = 0, i.e. the gradient on whichever side of each kink the point
  happens to be);
- "flow velocity": cos∠(w, g) for the velocity g the flow actually follows, the Filippov element of
  the engine's field in which every sliding kink gets the relu'(0) ∈ [0, 1] that keeps it on its
  kink (docs/background.md §4). In the polar clock this is exactly 1 / sqrt(1 + ||dθ/ds||²), since
  <θ, g> = L p·q by Lemma 2, so → 1 says the direction stops moving per unit of ln ||w||.

The two differ wherever pre-activations sit on kinks, which along the flow is the normal case
(tens of sliding pairs here): Ji & Telgarsky's statement is about the second. The flow-velocity
numbers use the engine's private field (jaxmargin._flow: make_velocity, polar_quantities).

Runs on the reference problem (`reference_problem(depth)`, docs/background.md §6: n = 50,
x ~ N(0, I_5), width-32 bias-free ReLU MLP) for depths 2 and 3:

- the flow engine from the reference init (seed 0) to beta_max, with the sliding-mode handling,
  rtol = 1e-6 (the default 1e-8 exhausted 2,000 steps before separating, in phase 1;
  docs/background.md §3-§4). This is the expensive part: on 2 CPU cores beta ~ 1e3 (L = 2) and
  ~3e2 (L = 3) is what fits the budget;
- loss-based GD (Lyu & Li schedule) for several seeds (`reference_problem(depth, seed=k)`),
  which reaches beta ~ e^10 in seconds, but whose alignment stays erratic and low by both
  measures: its steps (alpha ~ 1/beta, at the edge of stability) chatter across the kinks and
  leave the nearly tied support margins O(1/beta) apart in a way that is not the flow's balance,
  and p = softmax(-m) follows those gaps (see the comments on ties in jaxmargin/_kkt.py).

Its default-scale wall time is recorded in docs/benchmarks.md (most of it is the flow engine).
"""

from __future__ import annotations

import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import jaxmargin as jm
from jaxmargin._flow._fields import polar_quantities
from jaxmargin._flow._sliding import SlidingOptions, make_velocity

from ._runner import Claim, main, progress
from ._style import depth_color, figure, save_figure

NAME = "alignment"


@dataclasses.dataclass(frozen=True)
class Config:
    flow: bool = True  # False: loss-based GD only (quick scale: no ReLU flow compilation)
    depths: tuple[int, ...] = (2, 3)
    beta_max: tuple[float, ...] = (1e3, 1e3)  # per depth
    max_steps: tuple[int, ...] = (3_000, 1_000)  # per depth, per phase
    rtol: float = 1e-6
    num_saves: int = 48
    seeds: int = 3  # loss-based GD seeds
    gd_steps: int = 100_000
    gd_logs: int = 40
    target: float = 0.99

    @classmethod
    def quick(cls) -> Config:
        # The ReLU flow's compilation alone takes ~20 s of CPU: the quick scale runs GD only.
        return cls(
            flow=False,
            depths=(2,),
            beta_max=(3.0,),
            max_steps=(300,),
            num_saves=16,
            seeds=2,
            gd_steps=2_000,
            gd_logs=12,
        )


def _velocity_alignment_fn(predictor, params):
    """(flat w, X, y) -> cos∠(w, g) for the flow's Filippov velocity g (engine defaults for
    sliding); one compilation per predictor and shapes."""
    _, unravel = ravel_pytree(params)

    @jax.jit
    def fn(flat, X, y):
        velocity = make_velocity(predictor, unravel, X, y, SlidingOptions())
        s = jnp.log(jnp.linalg.norm(flat))
        polar = polar_quantities(velocity, predictor.degree, s, flat * jnp.exp(-s))
        return 1.0 / jnp.sqrt(1.0 + jnp.sum(polar.dtheta_ds**2))

    return fn


def _alignments(predictor, params, X, y, velocity_alignment) -> tuple[np.ndarray, np.ndarray]:
    count = jax.tree.leaves(params)[0].shape[0]
    X, y = jnp.asarray(X, jnp.float64), jnp.asarray(y, jnp.float64)
    autodiff, flow = np.zeros(count), np.zeros(count)
    for i in range(count):
        point = jax.tree.map(lambda a: a[i], params)
        autodiff[i] = float(jm.alignment(predictor, point, X, y))
        flow[i] = float(velocity_alignment(ravel_pytree(point)[0], X, y))
    return autodiff, flow


def run(config: Config) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    start = time.perf_counter()
    runs = zip(config.depths, config.beta_max, config.max_steps)
    for depth, beta_max, max_steps in progress(runs, "alignment", total=len(config.depths)):
        predictor, params0, _, _ = jm.reference_problem(depth)
        velocity_alignment = _velocity_alignment_fn(predictor, params0)
        if config.flow:
            predictor, params0, X, y = jm.reference_problem(depth)
            sol = jm.gradient_flow(
                predictor,
                params0,
                X,
                y,
                beta_max=beta_max,
                max_steps=max_steps,
                num_saves=config.num_saves,
                rtol=config.rtol,
                atol=config.rtol * 1e-2,
                solver="tsit5",
            )
            tag = f"L{depth}_flow"
            autodiff, flow = _alignments(predictor, sol.params, X, y, velocity_alignment)
            out.update(
                {
                    f"{tag}_log_beta": depth * np.asarray(sol.s),
                    f"{tag}_soft_margin": np.asarray(sol.soft_margin),
                    f"{tag}_phase": np.asarray(sol.phase),
                    f"{tag}_alignment": autodiff,
                    f"{tag}_velocity_alignment": flow,
                    f"{tag}_code": np.asarray(int(sol.status.code)),
                    f"{tag}_message": np.asarray(sol.status.message),
                    f"{tag}_steps": np.asarray(sol.status.steps),
                    f"{tag}_rejected": np.asarray(sol.status.rejected_steps),
                }
            )
            print(
                f"  alignment: L={depth} flow: {sol.status.message}, ln β ="
                f" {depth * float(sol.s[-1]):.2f}, alignment {autodiff[-1]:.4f} (autodiff),"
                f" {flow[-1]:.4f} (flow velocity) ({time.perf_counter() - start:.1f} s)",
                flush=True,
            )
        for seed in range(config.seeds):
            predictor, params0, X, y = jm.reference_problem(depth, seed=seed)
            gd = jm.gradient_descent(
                predictor,
                params0,
                X,
                y,
                schedule="loss_based",
                steps=config.gd_steps,
                num_logs=config.gd_logs,
            )
            tag = f"L{depth}_gd{seed}"
            autodiff, flow = _alignments(predictor, gd.params, X, y, velocity_alignment)
            out.update(
                {
                    f"{tag}_log_beta": depth * np.asarray(gd.log_rho),
                    f"{tag}_soft_margin": np.asarray(gd.soft_margin),
                    f"{tag}_alignment": autodiff,
                    f"{tag}_velocity_alignment": flow,
                    f"{tag}_ok": np.asarray(gd.status == "ok"),
                }
            )
        print(
            f"  alignment: L={depth} GD, {config.seeds} seeds"
            f" ({time.perf_counter() - start:.1f} s)",
            flush=True,
        )
    return out


def plot(results, config: Config) -> None:
    fig, axes = figure(ncols=3, height=3.8)
    flow_ax, gd_ax, margin_ax = axes[0]
    for i, depth in enumerate(config.depths):
        color = depth_color(i, max(2, len(config.depths)))
        tag = f"L{depth}_flow"
        if config.flow:
            x = results[f"{tag}_log_beta"]
            flow_ax.plot(
                x,
                results[f"{tag}_velocity_alignment"],
                "-",
                color=color,
                lw=2,
                label=f"L={depth}: its velocity (Filippov)",
            )
            flow_ax.plot(
                x,
                results[f"{tag}_alignment"],
                "--",
                color=color,
                lw=1.5,
                label=f"L={depth}: autodiff gradient",
            )
            margin_ax.plot(
                x,
                results[f"{tag}_soft_margin"],
                "-",
                color=color,
                lw=2,
                label=f"L={depth}, flow engine",
            )
        for seed in range(config.seeds):
            tag = f"L{depth}_gd{seed}"
            first = seed == 0
            gd_ax.plot(
                results[f"{tag}_log_beta"],
                results[f"{tag}_alignment"],
                "-",
                marker=".",
                ms=3,
                lw=0.6,
                color=color,
                label=f"L={depth}" if first else None,
            )
            label = f"L={depth}, loss-based GD ({config.seeds} seeds)" if first else None
            margin_ax.plot(
                results[f"{tag}_log_beta"],
                results[f"{tag}_soft_margin"],
                ":",
                color=color,
                label=label,
            )
    for ax, title in (
        (flow_ax, "Along the flow engine (seed 0)"),
        (gd_ax, f"Along loss-based GD ({config.seeds} seeds, autodiff gradient)"),
    ):
        ax.axhline(config.target, color="k", ls="--", lw=0.8, label=f"{config.target:g}")
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel(r"$\ln \beta = L \ln\|w\|$")
        ax.set_ylabel(r"alignment $\cos\angle(w, -\nabla\mathcal{L}(w))$")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    margin_ax.set_ylim(-0.2, None)
    margin_ax.set_xlabel(r"$\ln \beta$")
    margin_ax.set_ylabel(r"soft margin $\tilde\gamma$")
    margin_ax.set_title("Soft margin (progress of each run)", fontsize=9)
    margin_ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(
        "Ji & Telgarsky (2020) alignment on the reference problem (ReLU MLP, width 32, n = 50)",
        fontsize=10,
    )
    fig.tight_layout()
    save_figure(fig, NAME)


def summarize(results, config: Config) -> list[Claim]:
    claims = []
    for depth in config.depths:
        tag = f"L{depth}_flow"
        if config.flow:
            velocity = float(results[f"{tag}_velocity_alignment"][-1])
            autodiff = float(results[f"{tag}_alignment"][-1])
            log_beta = float(results[f"{tag}_log_beta"][-1])
            status = str(results[f"{tag}_message"])
            claims += [
                Claim(
                    NAME,
                    f"L={depth}: alignment of the flow's velocity at the end of the flow"
                    f" (ln β = {log_beta:.2f}; {status})",
                    "cos∠(w, g_flow)",
                    velocity,
                    f">= {config.target:g}",
                    velocity >= config.target,
                ),
                Claim(
                    NAME,
                    f"L={depth}: the same point with the autodiff gradient (jm.alignment;"
                    " relu'(0) = 0 on the sliding kinks)",
                    "cos∠(w, -∇L) (autodiff)",
                    autodiff,
                    f">= {config.target:g}",
                    autodiff >= config.target,
                ),
            ]
        finals = [
            float(np.median(results[f"L{depth}_gd{s}_alignment"][-5:])) for s in range(config.seeds)
        ]
        value = float(np.median(finals))
        log_beta = float(
            np.median([results[f"L{depth}_gd{s}_log_beta"][-1] for s in range(config.seeds)])
        )
        claims.append(
            Claim(
                NAME,
                f"L={depth}: alignment along loss-based GD at ln β ≈ {log_beta:.1f} (median of"
                f" the last 5 log points, median over {config.seeds} seeds)",
                "cos∠(w, -∇L)",
                value,
                f">= {config.target:g}",
                value >= config.target,
            )
        )
    return [c._replace(value=float(c.value), holds=bool(c.holds)) for c in claims]


if __name__ == "__main__":
    main(sys.modules[__name__])
