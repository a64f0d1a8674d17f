"""KKT points that are not max-margin (Vardi, Shamir & Srebro, NeurIPS 2022; docs/background.md §6).

Part A, the diagonal trap: f(x) = u1 v1 x1 + u2 v2 x2 (`diagonal_linear(2)`), one example
x = (1, 2), y = 1. From u2(0) = v2(0) = 0 the second coordinate gets zero gradient forever
(du2/dτ = p v2 x2, dv2/dτ = p u2 x2), so the flow stays in the (u1, v1) plane and its normalized
margin u1 v1 / ||w||² tends to 1/2, at a point that `kkt_certificate` certifies as KKT, while the
max margin on the sphere is 1 (along e2: the largest eigenvalue of [[0, D/2], [D/2, 0]],
D = diag(x)). The trap is not even a local maximum: turning u = v by φ towards e2 gives margin
(cos² φ + 2 sin² φ) / 2 > 1/2. A perturbation u2(0) = v2(0) = 0.05 escapes to margin 1.

Part B, a dead ReLU unit: a width-3, 2-layer bias-free ReLU net on 2-d data with a constant
input coordinate (bias folding). Negatives sit near the origin, positives in two clusters 120°
apart. Unit 0 starts dead (incoming weights (0, 0, -1/2): pre-activation -1/2 on every example),
so it gets no gradient and never moves; the two live units find the "bisector" solution (one
ramp for both clusters, one negative unit). Reviving unit 0 (the same init, its incoming weights
pointing at one cluster) gives one ramp per cluster and a larger margin; random inits of the full
net (loss-based GD) are also reported. The trapped end point is certified KKT for the remaining
width-2 net (the dead unit's weights are a vanishing part of the direction).

Its default-scale wall time is recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxmargin as jm

from ._runner import Claim, main
from ._style import figure, save_figure

NAME = "kkt_trap"


@dataclasses.dataclass(frozen=True)
class Config:
    # The polar clock's ln(t L) bookkeeping is stiff at rate ~beta even for one example, so
    # explicit steps scale like 1/beta: 1e5 takes ~2e4 steps here.
    trap_beta_max: float = 1e5
    trap_max_steps: int = 100_000
    trap_init: tuple[float, float] = (0.3, 0.1)  # (u1, v1); unbalanced on purpose
    escape_size: float = 5e-2  # u2(0) = v2(0) of the perturbed run
    relu_flow: bool = True  # False: loss-based GD stands in for the ReLU flow (quick scale)
    relu_beta_max: float = 1e4
    relu_max_steps: int = 5_000
    gd_steps: int = 100_000
    seeds: int = 4  # random inits of the full ReLU net (loss-based GD)
    num_saves: int = 60

    @classmethod
    def quick(cls) -> Config:
        # The ReLU flow's compilation alone takes ~20 s of CPU: GD stands in for it here.
        return cls(
            trap_beta_max=1e3,
            trap_max_steps=5_000,
            relu_flow=False,
            gd_steps=5_000,
            seeds=2,
            num_saves=24,
        )


# --------------------------------------------------------------------------- data


def trap_problem():
    return jm.diagonal_linear(2), np.array([[1.0, 2.0]]), np.array([1.0])


def relu_problem():
    """Negatives near 0, two positive clusters 120° apart, a constant third coordinate."""
    negatives = np.array([[0.0, 0.0], [0.3, 0.0], [-0.3, 0.0], [0.0, 0.3], [0.0, -0.3]])
    cluster = np.array([[2.0, 0.0], [2.2, 0.3], [2.2, -0.3]])
    angle = np.deg2rad(120.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    points = np.concatenate([negatives, cluster, cluster @ rotation.T])
    X = np.concatenate([points, np.ones((len(points), 1))], axis=1)
    y = np.array([-1.0] * len(negatives) + [1.0] * 2 * len(cluster))
    return X, y


def relu_inits():
    """(trapped, revived) initial params of the width-3 net: unit 0 dead, or alive."""
    bisector = np.deg2rad(60.0)
    W = np.array(
        [
            [0.0, 0.0, -0.5],  # dead: pre-activation -1/2 on every example
            [0.5 * np.cos(bisector), 0.5 * np.sin(bisector), -0.2],
            [0.0, 0.0, 0.5],
        ]
    )
    a = np.array([0.3, 0.5, -0.5])
    revived = W.copy()
    revived[0] = [0.5, -0.1, 0.1]
    return (jnp.asarray(W), jnp.asarray(a)), (jnp.asarray(revived), jnp.asarray(a))


def snap_to_kinks(W, X, rel: float = 1e-2):
    """Project each row W_j onto {W_j . x_i = 0 for i with |W_j . x_i| <= rel max_i |W_j . x_i|}
    (minimal change, least squares); returns (W', max |W' - W| / max |W|)."""
    W = np.array(W, dtype=np.float64)
    snapped = W.copy()
    for j in range(W.shape[0]):
        z = X @ W[j]
        near = np.abs(z) <= rel * np.abs(z).max()
        if near.any():
            rows = X[near]
            snapped[j] -= rows.T @ np.linalg.lstsq(rows @ rows.T, rows @ W[j], rcond=None)[0]
    return snapped, float(np.abs(snapped - W).max() / np.abs(W).max())


# --------------------------------------------------------------------------- run


def _last(params):
    return jax.tree.map(lambda leaf: leaf[-1], params)


def _flow_record(prefix, sol) -> dict:
    return {
        f"{prefix}_s": np.asarray(sol.s),
        f"{prefix}_hard_margin": np.asarray(sol.hard_margin),
        f"{prefix}_soft_margin": np.asarray(sol.soft_margin),
        f"{prefix}_code": np.asarray(int(sol.status.code)),
        f"{prefix}_steps": np.asarray(sol.status.steps),
    }


def run(config: Config) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    start = time.perf_counter()
    predictor, X, y = trap_problem()
    u1, v1 = config.trap_init
    for tag, second in (("trap", 0.0), ("escape", config.escape_size)):
        params0 = (jnp.array([u1, second]), jnp.array([v1, second]))
        sol = jm.gradient_flow(
            predictor,
            params0,
            X,
            y,
            beta_max=config.trap_beta_max,
            max_steps=config.trap_max_steps,
            num_saves=config.num_saves,
            solver="tsit5",
        )
        out.update(_flow_record(tag, sol))
        out[f"{tag}_second"] = np.abs(np.asarray(sol.params[0][:, 1])) + np.abs(
            np.asarray(sol.params[1][:, 1])
        )
        cert = jm.kkt_certificate(predictor, _last(sol.params), X, y)
        out[f"{tag}_kkt"] = np.asarray([cert.stationarity, cert.complementary_slackness])
        print(
            f"  kkt_trap: {tag} flow: {sol.status.message}, margin"
            f" {float(sol.hard_margin[-1]):.6f} ({time.perf_counter() - start:.1f} s)",
            flush=True,
        )
    # The max margin on the unit sphere of R^4: the top eigenvalue of [[0, D/2], [D/2, 0]].
    D = np.diag(X[0])
    block = np.block([[np.zeros((2, 2)), D / 2], [D / 2, np.zeros((2, 2))]])
    out["max_margin"] = np.asarray(np.linalg.eigvalsh(block).max())
    out["e2_margin"] = np.asarray(
        float(
            jm.hard_margin(
                predictor,
                (jnp.array([0.0, 1.0]) / np.sqrt(2), jnp.array([0.0, 1.0]) / np.sqrt(2)),
                X,
                y,
            )
        )
    )
    phi = np.linspace(0.0, np.pi / 2, 91)
    out["turn_phi"] = phi
    out["turn_margin"] = (np.cos(phi) ** 2 + 2 * np.sin(phi) ** 2) / 2

    # Part B: the dead ReLU unit.
    X, y = relu_problem()
    predictor = jm.relu_mlp(2, 3)
    trapped0, revived0 = relu_inits()
    out["relu_X"], out["relu_y"] = X, y
    for tag, params0 in (("relu_trapped", trapped0), ("relu_revived", revived0)):
        unit0_init = np.append(np.asarray(params0[0][0]), float(params0[1][0]))
        gd = jm.gradient_descent(
            predictor,
            params0,
            X,
            y,
            schedule="loss_based",
            steps=config.gd_steps,
            num_logs=config.num_saves,
        )
        out[f"{tag}_gd_margin"] = np.asarray(float(gd.hard_margin[-1]))
        gd_unit0 = np.append(np.asarray(gd.final_params[0][0]), float(gd.final_params[1][0]))
        out[f"{tag}_gd_unit0_change"] = np.asarray(np.abs(gd_unit0 - unit0_init).max())
        if config.relu_flow:
            sol = jm.gradient_flow(
                predictor,
                params0,
                X,
                y,
                beta_max=config.relu_beta_max,
                max_steps=config.relu_max_steps,
                num_saves=config.num_saves,
                solver="tsit5",
            )
            out.update(_flow_record(tag, sol))
            params, message = sol.params, sol.status.message
        else:  # quick scale: GD's trajectory stands in for the flow (no ReLU flow compilation)
            out.update(
                {
                    f"{tag}_s": np.asarray(gd.log_rho),
                    f"{tag}_hard_margin": np.asarray(gd.hard_margin),
                    f"{tag}_soft_margin": np.asarray(gd.soft_margin),
                    f"{tag}_code": np.asarray(0 if gd.status == "ok" else 3),
                    f"{tag}_steps": np.asarray([0, int(gd.step[-1])]),
                }
            )
            params, message = gd.params, f"loss-based GD instead of the flow: {gd.status}"
        final = _last(params)
        out[f"{tag}_W"], out[f"{tag}_a"] = np.asarray(final[0]), np.asarray(final[1])
        # Unit 0's weights along the run. In the flow's polar clock they are e^s θ_0 with θ_0
        # decaying like e^-s, so the saved values carry the integrator's relative error.
        unit0 = np.concatenate(
            [np.asarray(params[0][:, 0]), np.asarray(params[1][:, 0])[:, None]], axis=1
        )
        out[f"{tag}_unit0_change"] = np.asarray(
            np.abs(unit0 - unit0_init).max() / np.abs(unit0_init).max()
        )
        print(
            f"  kkt_trap: {tag} ReLU net: {message}, margin"
            f" {float(out[f'{tag}_hard_margin'][-1]):.5f}, GD {float(gd.hard_margin[-1]):.5f}"
            f" ({time.perf_counter() - start:.1f} s)",
            flush=True,
        )
    # KKT certificates of the end points. The support examples sit on kinks of the limit, but
    # at beta = 1e4 their pre-activations are ~1e-4 relative away from 0, far outside the 1e-9
    # band in which kkt_certificate samples Clarke elements, so the raw certificate sees only
    # one side. The "snapped" certificate first projects each unit's incoming weights onto
    # {W_j . x_i = 0} for its near-zero pre-activations (|z| <= 1e-2 max|z|; a relative move of
    # ~1e-5), then certifies that nearby point.
    W, a = out["relu_trapped_W"], out["relu_trapped_a"]
    for tag, net, params in (
        ("relu_trapped_live", jm.relu_mlp(2, 2), (W[1:], a[1:])),
        ("relu_trapped_full", predictor, (W, a)),
        ("relu_revived", predictor, (out["relu_revived_W"], out["relu_revived_a"])),
    ):
        snapped, moved = snap_to_kinks(params[0], X)
        raw = jm.kkt_certificate(net, (jnp.asarray(params[0]), jnp.asarray(params[1])), X, y)
        cert = jm.kkt_certificate(net, (jnp.asarray(snapped), jnp.asarray(params[1])), X, y)
        out[f"{tag}_kkt"] = np.asarray(
            [cert.stationarity, cert.complementary_slackness, raw.stationarity, moved]
        )
    random_margins = []
    for seed in range(config.seeds):
        params0 = predictor.init(jax.random.key(seed), 3)
        gd = jm.gradient_descent(
            predictor,
            params0,
            X,
            y,
            schedule="loss_based",
            steps=config.gd_steps,
            num_logs=config.num_saves,
        )
        random_margins.append(float(gd.hard_margin[-1]) if gd.status == "ok" else np.nan)
    out["relu_random_gd_margins"] = np.asarray(random_margins)
    print(
        f"  kkt_trap: random inits (GD): margins {np.round(random_margins, 5).tolist()}"
        f" ({time.perf_counter() - start:.1f} s)",
        flush=True,
    )
    return out


# --------------------------------------------------------------------------- figure


def plot(results, config: Config) -> None:
    fig, axes = figure(ncols=3, height=3.6)
    ax = axes[0, 0]
    for tag, label, color in (
        ("trap", "u2(0) = v2(0) = 0 (trap)", "C3"),
        ("escape", f"u2(0) = v2(0) = {config.escape_size:g}", "C0"),
    ):
        ax.plot(results[f"{tag}_s"], results[f"{tag}_hard_margin"], color=color, label=label)
    ax.axhline(float(results["max_margin"]), color="k", ls="--", lw=0.8, label="max margin 1")
    ax.axhline(0.5, color="C3", ls=":", lw=0.8, label="1/2")
    ax.set_ylim(0.0, 1.1)
    ax.set_xlabel(r"$s = \ln\|w\|$ (flow clock; phase 1 before $t_0$)")
    ax.set_ylabel(r"normalized margin $\gamma(w)$")
    ax.set_title("Diagonal trap f = u1 v1 x1 + u2 v2 x2, x = (1, 2)", fontsize=9)
    ax.legend(fontsize=7)

    ax = axes[0, 1]
    ax.plot(np.degrees(results["turn_phi"]), results["turn_margin"], "C3")
    ax.set_xlabel(r"angle $\varphi$ of u = v from $e_1$ towards $e_2$ (degrees)")
    ax.set_ylabel(r"margin $(\cos^2\varphi + 2\sin^2\varphi)/2$")
    ax.set_title("The KKT point φ = 0 is not a local max", fontsize=9)

    ax = axes[0, 2]
    X, y = results["relu_X"], results["relu_y"]
    ax.scatter(X[y > 0, 0], X[y > 0, 1], marker="+", color="C0", s=40, label="y = +1")
    ax.scatter(X[y < 0, 0], X[y < 0, 1], marker="_", color="C3", s=40, label="y = -1")
    grid = np.linspace(-2.5, 2.8, 200)
    G1, G2 = np.meshgrid(grid, grid)
    points = np.stack([G1.ravel(), G2.ravel(), np.ones(G1.size)], axis=1)
    for tag, color, label in (
        ("relu_trapped", "C3", "trapped (unit 0 dead)"),
        ("relu_revived", "C0", "revived"),
    ):
        W, a = results[f"{tag}_W"], results[f"{tag}_a"]
        f = np.maximum(points @ W.T, 0.0) @ a
        ax.contour(G1, G2, f.reshape(G1.shape), levels=[0.0], colors=color)
        ax.plot(
            [],
            [],
            color=color,
            label=f"{label}: margin {float(results[f'{tag}_hard_margin'][-1]):.4f}",
        )
    ax.set_xlabel("x1")
    ax.set_ylabel("x2")
    ax.set_aspect("equal")
    ax.set_title("Dead ReLU unit: decision boundaries f = 0", fontsize=9)
    ax.legend(fontsize=6, loc="lower left")
    fig.suptitle(
        "Gradient flow ends at KKT points that are not max-margin (Vardi et al. 2022)", fontsize=10
    )
    fig.tight_layout()
    save_figure(fig, NAME)

    fig, axes = figure(ncols=1, height=3.4)
    ax = axes[0, 0]
    for tag, color, label in (
        ("relu_trapped", "C3", "unit 0 dead (never moves)"),
        ("relu_revived", "C0", "unit 0 revived"),
    ):
        ax.plot(results[f"{tag}_s"], results[f"{tag}_hard_margin"], color=color, label=label)
    best = float(np.nanmax(results["relu_random_gd_margins"]))
    ax.axhline(best, color="k", ls=":", lw=0.8, label=f"best of random inits (GD): {best:.4f}")
    ax.set_ylim(max(-0.1, float(np.min(results["relu_trapped_hard_margin"]))), None)
    ax.set_xlabel(r"$s = \ln\|w\|$")
    ax.set_ylabel(r"normalized margin $\gamma(w)$")
    engine = "flow engine" if config.relu_flow else "loss-based GD (quick scale)"
    ax.set_title(f"Width-3 ReLU net, {engine}: the dead unit caps the margin", fontsize=9)
    ax.legend(fontsize=7)
    save_figure(fig, f"{NAME}_relu")


# --------------------------------------------------------------------------- claims


def summarize(results, config: Config) -> list[Claim]:
    trap = float(results["trap_hard_margin"][-1])
    escape = float(results["escape_hard_margin"][-1])
    stationarity = float(results["trap_kkt"][0])
    second = float(np.max(results["trap_second"]))
    max_margin = float(results["max_margin"])
    trapped = float(results["relu_trapped_hard_margin"][-1])
    revived = float(results["relu_revived_hard_margin"][-1])
    best_random = float(np.nanmax(results["relu_random_gd_margins"]))
    live_kkt, raw_kkt = (float(v) for v in results["relu_trapped_live_kkt"][[0, 2]])
    moved = float(results["relu_trapped_gd_unit0_change"])
    flow_moved = float(results["relu_trapped_unit0_change"])
    reached = all(int(results[f"{tag}_code"]) == 0 for tag in ("trap", "escape"))
    claims = [
        Claim(
            NAME,
            "diagonal trap: the flow's normalized margin tends to 1/2",
            "final margin",
            trap,
            "0.5 ± 1e-3 (flow reached its target)",
            abs(trap - 0.5) <= 1e-3 and reached,
        ),
        Claim(
            NAME,
            "diagonal trap: the second coordinate stays exactly 0",
            "max |u2| + |v2| along the flow",
            second,
            "= 0",
            second == 0.0,
        ),
        Claim(
            NAME,
            "diagonal trap: the end point is KKT (kkt_certificate)",
            "relative stationarity",
            stationarity,
            "<= 1e-6",
            stationarity <= 1e-6,
        ),
        Claim(
            NAME,
            "diagonal trap: the max margin (along e2) is 1",
            "top eigenvalue of [[0, D/2], [D/2, 0]]",
            max_margin,
            "= 1 (1e-12)",
            abs(max_margin - 1) <= 1e-12 and abs(float(results["e2_margin"]) - 1) <= 1e-12,
        ),
        Claim(
            NAME,
            f"diagonal trap: u2(0) = v2(0) = {config.escape_size:g} escapes towards the"
            " max margin 1 (slowly: 1 - γ shrinks like 1/||w||)",
            "final margin",
            escape,
            ">= 0.99",
            escape >= 0.99,
        ),
        Claim(
            NAME,
            "dead ReLU unit never moves (loss-based GD; the flow engine: relative"
            f" {flow_moved:.1e}, its polar-clock integration error)",
            "max |change| of its weights under GD",
            moved,
            "= 0",
            moved == 0.0,
        ),
        Claim(
            NAME,
            "dead ReLU unit: the trapped end point is KKT for the remaining net"
            f" (snapped to its kinks; unsnapped: {raw_kkt:.3g})",
            "relative stationarity (width-2 net)",
            live_kkt,
            "<= 1e-3",
            live_kkt <= 1e-3,
        ),
        Claim(
            NAME,
            f"dead ReLU unit: trapped margin {trapped:.4f} < revived {revived:.4f}"
            f" (best random init, GD: {best_random:.4f})",
            "trapped / revived margin",
            trapped / revived,
            "< 1",
            trapped < revived,
        ),
    ]
    return [c._replace(value=float(c.value), holds=bool(c.holds)) for c in claims]


if __name__ == "__main__":
    main(sys.modules[__name__])
