"""Lemma 2 of the seed on exact ReLU kinks: <s, w> = L f(w) for every Clarke element s.

Points are placed exactly on kinks: integer weights and inputs make some hidden pre-activations
exactly 0 in float64 (the same construction as tests/helpers.py); points where the relu'(0)
conventions agree (no kink that matters) or where the last hidden layer is dead (f vanishes to
high order near w, the Clarke set is {0} and a relative error is meaningless) are redrawn. At
each point the Euler identity error |<s, w> - L f(w)| / (|L f(w)| + ||s|| ||w||) is measured for

- the autodiff element with relu'(0) = 0, 0.5 and 1 (`relu_mlp(..., relu_grad_at_zero=a)`);
- sampled Clarke elements (`sampled_clarke_subgradients`, extrapolated limiting gradients) and
  random convex combinations of them (the Clarke set is their convex hull);
- raw sampled gradients without extrapolation, against the sampling radius (their O(r) bias).

For bias-free ReLU nets every convention satisfies the identity, because relu(z) = relu'(z) z at
z = 0 too (docs/background.md §5); autodiff can nevertheless leave the Clarke set of other
programs: for relu(z) - relu(-z) (= z, Clarke set {1}) it returns 2 relu'(0) at z = 0 (Kakade &
Lee 2018).

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

from ._runner import Claim, main, progress
from ._style import depth_color, figure, save_figure

NAME = "lemma2"
CONVENTIONS = (0.0, 0.5, 1.0)


@dataclasses.dataclass(frozen=True)
class Config:
    depths: tuple[int, ...] = (2, 3, 4, 5)
    width: int = 6
    dim: int = 5
    seeds: int = 12  # kink points per depth
    num_samples: int = 32  # sampled Clarke elements per point
    num_combinations: int = 32  # random convex combinations per point
    radius: float = 1e-8  # sampling radius relative to ||w|| (extrapolation error O(r^2))
    radii: tuple[float, ...] = (1e-10, 1e-8, 1e-6, 1e-4, 1e-2)
    tol_autodiff: float = 1e-12
    tol_sampled: float = 1e-9

    @classmethod
    def quick(cls) -> Config:
        return cls(
            depths=(2, 3), seeds=3, num_samples=8, num_combinations=8, radii=(1e-8, 1e-4, 1e-2)
        )


# --------------------------------------------------------------------------- kink points


def integer_params_on_kinks(depth, width, x, rng, n_zero_per_layer=2):
    """Integer relu_mlp weights with n_zero_per_layer pre-activations per layer exactly 0 on x.

    Each chosen row r is replaced by h_p r - (r . h) e_p (h the layer input, p its largest entry),
    so r . h = 0 exactly; integers keep every product exact in float64.
    """
    layers, hidden = [], np.asarray(x, dtype=np.float64)
    for _ in range(depth - 1):
        W = rng.integers(-3, 4, size=(width, hidden.size)).astype(np.float64)
        pivot = int(np.argmax(np.abs(hidden)))
        for unit in range(n_zero_per_layer):
            dot = W[unit] @ hidden
            W[unit] *= hidden[pivot]
            W[unit, pivot] -= dot
        layers.append(W)
        hidden = np.maximum(W @ hidden, 0.0)
    layers.append(rng.integers(-3, 4, size=width).astype(np.float64))
    return tuple(jnp.asarray(layer) for layer in layers)


def _flat(params) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(p)) for p in params])


def _relative_error(predictor, params, x, elements) -> np.ndarray:
    """|<s, w> - L f(w)| / (|L f(w)| + ||s|| ||w||), one per row of elements."""
    elements = np.atleast_2d(np.asarray(elements))
    residual = np.abs(np.asarray(jm.euler_identity_residual(predictor, params, x, elements)))
    value = predictor.degree * abs(float(predictor.apply(params, x)))
    scale = value + np.linalg.norm(elements, axis=1) * np.linalg.norm(_flat(params))
    return residual / np.where(scale > 0, scale, 1.0)


def _kink_point(config, depth, rng, max_tries=200):
    """A point on kinks where the relu'(0) conventions give different autodiff elements and the
    last hidden layer has a unit alive."""
    for _ in range(max_tries):
        x = rng.integers(-3, 4, size=config.dim).astype(np.float64)
        x[0] = 2.0  # never the zero vector
        params = integer_params_on_kinks(depth, config.width, x, rng)
        grads = [
            np.asarray(
                jm.autodiff_subgradient(
                    jm.relu_mlp(depth, config.width, relu_grad_at_zero=a), params, x
                )
            )
            for a in CONVENTIONS
        ]
        spread = float(np.max(np.abs(grads[0] - grads[-1])))
        # Keep points where the last hidden layer is alive: then every Clarke element has
        # ||s|| >= ||h_last|| >= 1 (integers), and the relative error is well conditioned. With
        # a dead last layer f vanishes to high order near w, the Clarke set is {0}, and the
        # error relative to ||s|| ~ r^k measures nothing.
        hidden = np.asarray(x)
        for layer in params[:-1]:
            hidden = np.maximum(np.asarray(layer) @ hidden, 0.0)
        if spread > 1e-3 and hidden.max() > 0:  # a kink that matters, a live output
            return jnp.asarray(x), params, grads, spread
    raise RuntimeError(f"no point with a relevant kink found for depth {depth}")


def _relu_difference(key, num_samples):
    """relu(z) - relu(-z) at z = 0: autodiff per convention vs sampled Clarke elements."""

    def program(activation):
        return lambda w: activation(w[0]) - activation(-w[0])

    at_zero = (jnp.zeros(()),)
    autodiff = np.array(
        [float(jax.grad(program(jm.kinked_linear(0.0, a)))(at_zero)[0]) for a in CONVENTIONS]
    )
    jax_relu = float(jax.grad(program(jax.nn.relu))(at_zero)[0])
    sampled = jm.sampled_clarke_subgradients(
        program(jax.nn.relu), at_zero, key, num_samples=num_samples
    )
    return autodiff, jax_relu, np.asarray(sampled).ravel()


def run(config: Config) -> dict[str, np.ndarray]:
    key = jax.random.key(0)
    n_depth, n_seed = len(config.depths), config.seeds
    autodiff_error = np.zeros((n_depth, n_seed, len(CONVENTIONS)))
    sampled_error = np.zeros((n_depth, n_seed, config.num_samples))
    combination_error = np.zeros((n_depth, n_seed, config.num_combinations))
    distinct = np.zeros((n_depth, n_seed), dtype=np.int64)
    spread = np.zeros((n_depth, n_seed))
    raw_error = np.zeros((n_depth, len(config.radii)))
    extrapolated_error = np.zeros((n_depth, len(config.radii)))
    start = time.perf_counter()
    for i, depth in progress(enumerate(config.depths), "lemma2", total=len(config.depths)):
        rng = np.random.default_rng(1000 + depth)
        predictor = jm.relu_mlp(depth, config.width)
        for j in range(n_seed):
            x, params, grads, spread[i, j] = _kink_point(config, depth, rng)
            for k, a in enumerate(CONVENTIONS):
                convention = jm.relu_mlp(depth, config.width, relu_grad_at_zero=a)
                autodiff_error[i, j, k] = _relative_error(convention, params, x, grads[k])[0]
            key, k_sample, k_mix = jax.random.split(key, 3)
            fn = lambda w, x=x: predictor.apply(w, x)  # noqa: E731
            samples = np.asarray(
                jm.sampled_clarke_subgradients(
                    fn, params, k_sample, num_samples=config.num_samples, radius=config.radius
                )
            )
            # Normalised exponentials: Dirichlet(1, ..., 1) weights.
            mix = np.asarray(
                jax.random.exponential(k_mix, (config.num_combinations, config.num_samples))
            )
            mix = mix / mix.sum(axis=1, keepdims=True)
            sampled_error[i, j] = _relative_error(predictor, params, x, samples)
            combination_error[i, j] = _relative_error(predictor, params, x, mix @ samples)
            distinct[i, j] = np.unique(np.round(samples, 6), axis=0).shape[0]
            if j == 0:  # the sampling radius, with and without extrapolation
                for r, radius in enumerate(config.radii):
                    for extrapolate, out in ((False, raw_error), (True, extrapolated_error)):
                        elements = jm.sampled_clarke_subgradients(
                            fn,
                            params,
                            k_sample,
                            num_samples=config.num_samples,
                            radius=radius,
                            extrapolate=extrapolate,
                        )
                        out[i, r] = _relative_error(predictor, params, x, elements).max()
        print(f"  lemma2: depth {depth} done ({time.perf_counter() - start:.1f} s)", flush=True)
    key, k_diff = jax.random.split(key)
    diff_autodiff, diff_jax_relu, diff_sampled = _relu_difference(k_diff, config.num_samples)
    return dict(
        depths=np.asarray(config.depths),
        conventions=np.asarray(CONVENTIONS),
        autodiff_error=autodiff_error,
        sampled_error=sampled_error,
        combination_error=combination_error,
        distinct_elements=distinct,
        convention_spread=spread,
        radii=np.asarray(config.radii),
        raw_error=raw_error,
        extrapolated_error=extrapolated_error,
        diff_autodiff=diff_autodiff,
        diff_jax_relu=np.asarray(diff_jax_relu),
        diff_sampled=diff_sampled,
    )


# --------------------------------------------------------------------------- figure


FLOOR = 1e-18  # exact zeros are drawn here on the log axis


def plot(results, config: Config) -> None:
    fig, axes = figure(ncols=3, height=3.6)
    ax = axes[0, 0]
    depths = results["depths"]
    groups = [
        (f"autodiff, relu'(0)={a:g}", results["autodiff_error"][:, :, k])
        for k, a in enumerate(results["conventions"])
    ]
    groups += [
        ("sampled Clarke", results["sampled_error"]),
        ("convex combinations", results["combination_error"]),
    ]
    markers = ["o", "s", "^", "x", "+"]
    for g, (label, errors) in enumerate(groups):
        offset = (g - (len(groups) - 1) / 2) * 0.12
        for i, depth in enumerate(depths):
            values = np.maximum(np.ravel(errors[i]), FLOOR)
            ax.scatter(
                np.full(values.size, depth + offset),
                values,
                s=10,
                marker=markers[g],
                color=depth_color(g, len(groups)),
                label=label if i == 0 else None,
            )
    ax.axhline(config.tol_autodiff, color="k", ls="--", lw=0.8, label="1e-12 / 1e-9 bounds")
    ax.axhline(config.tol_sampled, color="k", ls="--", lw=0.8)
    ax.set_yscale("log")
    ax.set_xticks(depths)
    ax.set_xlabel("depth L of the ReLU net")
    ax.set_ylabel(r"$|\langle s,w\rangle - Lf| / (|Lf| + \|s\|\|w\|)$  (0 drawn at 1e-18)")
    ax.set_title("Euler identity on exact kinks", fontsize=9)
    ax.legend(fontsize=6, loc="center right")

    ax = axes[0, 1]
    radii = results["radii"]
    for i, depth in enumerate(depths):
        color = depth_color(i, len(depths))
        ax.loglog(
            radii,
            np.maximum(results["raw_error"][i], FLOOR),
            "o--",
            color=color,
            label=f"L={depth} raw gradient at radius r",
        )
        ax.loglog(
            radii,
            np.maximum(results["extrapolated_error"][i], FLOOR),
            "s-",
            color=color,
            label=f"L={depth} extrapolated 2g(r)-g(2r)",
        )
    ax.set_xlabel("sampling radius r / ||w||")
    ax.set_ylabel("max relative Euler error")
    ax.set_title("Gradient sampling: O(r) bias vs extrapolation", fontsize=9)
    ax.legend(fontsize=6)

    ax = axes[0, 2]
    conventions = results["conventions"]
    ax.plot(conventions, results["diff_autodiff"], "o-", label="autodiff, relu'(0) = a")
    ax.plot([0.0], [float(results["diff_jax_relu"])], "kx", ms=9, label="jax.nn.relu")
    sampled = results["diff_sampled"]
    ax.scatter(
        np.linspace(0, 1, sampled.size),
        sampled,
        s=12,
        color="C3",
        label=f"{sampled.size} sampled Clarke elements",
    )
    ax.axhline(1.0, color="C3", ls=":", lw=1, label="Clarke set {1}")
    ax.set_xlabel("relu'(0) convention a (sample index for sampled elements)")
    ax.set_ylabel("derivative of relu(z) - relu(-z) at z = 0")
    ax.set_title("Autodiff leaves the Clarke set (Kakade & Lee 2018)", fontsize=9)
    ax.legend(fontsize=7)
    fig.suptitle(
        "Lemma 2: <s, w> = L f(w) for Clarke elements of ReLU nets at exact kinks", fontsize=10
    )
    fig.tight_layout()
    save_figure(fig, NAME)


# --------------------------------------------------------------------------- claims


def summarize(results, config: Config) -> list[Claim]:
    autodiff = float(np.max(results["autodiff_error"]))
    sampled = float(max(np.max(results["sampled_error"]), np.max(results["combination_error"])))
    spread = float(np.min(results["convention_spread"]))
    jax_relu = float(results["diff_jax_relu"])
    clarke_dev = float(np.max(np.abs(results["diff_sampled"] - 1.0)))
    depths = ", ".join(str(int(d)) for d in results["depths"])
    claims = [
        Claim(
            NAME,
            f"Lemma 2, autodiff with relu'(0) in {{0, 0.5, 1}}, depths {depths}",
            "max relative Euler error",
            autodiff,
            f"<= {config.tol_autodiff:g}",
            autodiff <= config.tol_autodiff,
        ),
        Claim(
            NAME,
            "Lemma 2, sampled Clarke elements and their convex combinations",
            "max relative Euler error",
            sampled,
            f"<= {config.tol_sampled:g}",
            sampled <= config.tol_sampled,
        ),
        Claim(
            NAME,
            "the test points sit on kinks that matter",
            "min max|autodiff(relu'(0)=1) - autodiff(relu'(0)=0)|",
            spread,
            "> 1e-3",
            spread > 1e-3,
        ),
        Claim(
            NAME,
            "autodiff (jax.nn.relu) of relu(z) - relu(-z) at z = 0 leaves the Clarke set",
            "autodiff derivative at 0",
            jax_relu,
            "= 0, not in the Clarke set {1}",
            jax_relu == 0.0 and clarke_dev <= 1e-12,
        ),
        Claim(
            NAME,
            "sampled Clarke elements of relu(z) - relu(-z) at z = 0",
            "max |s - 1|",
            clarke_dev,
            "<= 1e-12",
            clarke_dev <= 1e-12,
        ),
    ]
    return [c._replace(value=float(c.value), holds=bool(c.holds)) for c in claims]


if __name__ == "__main__":
    main(sys.modules[__name__])
