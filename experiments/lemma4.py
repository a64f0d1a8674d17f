"""Lemma 4 of the seed: <v, w> + L ln sum_i exp(-m_i(w)) >= 0, and it equals L H(p) exactly.

For v = sum_i p_i v_i with p = softmax(-m) and v_i in the Clarke subdifferential of m_i (the
chain-rule element of -∂ ln L), Lemma 2 gives <v_i, w> = L m_i, so

    slack = <v, w> + L ln L(w) = L sum_i p_i (m_i + ln L) = -L sum_i p_i ln p_i = L H(p),

the entropy of p times the degree: in [0, L ln n], 0 when one example carries all the weight.
The proof's inequality is therefore exact up to this entropy term. Measured over random models of
the predictor zoo, random data (labels need not be separable), random scales ||w|| x 10^[-2, 2]
and v built from autodiff margin subgradients or from sampled Clarke elements (random convex
combinations of extrapolated limiting gradients, `sampled_clarke_subgradients`).

Its default-scale wall time is recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxmargin as jm

from ._runner import Claim, main, progress
from ._style import depth_color, figure, save_figure

NAME = "lemma4"


def _models():
    """(label, predictor, input shape) of the zoo used here."""
    return [
        ("linear", jm.linear(), (5,)),
        ("deep linear L=3", jm.deep_linear(3, 6), (5,)),
        ("diagonal L=2", jm.diagonal_linear(2), (5,)),
        ("diagonal L=4", jm.diagonal_linear(4), (5,)),
        ("ReLU MLP L=2", jm.relu_mlp(2, 16), (5,)),
        ("ReLU MLP L=3", jm.relu_mlp(3, 8), (5,)),
        ("ReLU MLP L=5", jm.relu_mlp(5, 6), (5,)),
        ("leaky ReLU L=3", jm.leaky_relu_mlp(3, 8, 0.2), (5,)),
        ("ReLU CNN L=2", jm.relu_cnn((4,), 3, 2), (6, 6)),
    ]


@dataclasses.dataclass(frozen=True)
class Config:
    seeds: int = 40  # random (data, w, scale) draws per model
    n: int = 8
    num_samples: int = 4  # sampled Clarke elements mixed per example
    log10_scale: tuple[float, float] = (-2.0, 2.0)
    tol: float = 1e-9  # relative to L (max_i |m_i| + ln n)
    models: tuple[str, ...] | None = None  # labels of _models() to use; None = all

    @classmethod
    def quick(cls) -> Config:
        # Each model costs one compilation (~2-3 s of CPU); three keep the test short.
        return cls(seeds=4, models=("linear", "diagonal L=4", "ReLU MLP L=3"))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _trial(predictor, num_samples, params, X, y, key):
    """Slack of Lemma 4 for the autodiff and the sampled-Clarke v, and L H(p)."""
    n = X.shape[0]

    def sampled_row(x, label, k):
        k1, k2 = jax.random.split(k)
        samples = jm.sampled_clarke_subgradients(
            lambda w: label * predictor.apply(w, x), params, k1, num_samples=num_samples
        )
        mix = jax.random.exponential(k2, (num_samples,))  # normalised: Dirichlet(1, ..., 1)
        return (mix / jnp.sum(mix)) @ samples

    rows = {
        "autodiff": jm.margin_jacobian(predictor, params, X, y),
        "sampled": jax.vmap(sampled_row)(X, y, jax.random.split(key, n)),
    }
    slacks = {
        name: jm.lemma4_slack(
            predictor, params, X, y, jm.chain_rule_element(predictor, params, X, y, G)
        )
        for name, G in rows.items()
    }
    m = jm.margins(predictor, params, X, y)
    p = jax.nn.softmax(-m)
    entropy = -jnp.sum(p * jnp.log(jnp.where(p > 0, p, 1.0)))
    scale = predictor.degree * (jnp.max(jnp.abs(m)) + jnp.log(n))
    return slacks["autodiff"], slacks["sampled"], predictor.degree * entropy, scale


def run(config: Config) -> dict[str, np.ndarray]:
    models = [m for m in _models() if config.models is None or m[0] in config.models]
    shape = (len(models), config.seeds)
    names = ("slack_autodiff", "slack_sampled", "degree_entropy", "scale", "log10_scale")
    out = {name: np.zeros(shape) for name in names}
    degrees = np.zeros(len(models), dtype=np.int64)
    start = time.perf_counter()
    for i, (label, predictor, in_shape) in progress(enumerate(models), "lemma4", total=len(models)):
        degrees[i] = predictor.degree
        for j in range(config.seeds):
            key = jax.random.fold_in(jax.random.key(i), j)
            k_data, k_label, k_w, k_scale, k_trial = jax.random.split(key, 5)
            X = jax.random.normal(k_data, (config.n, *in_shape), dtype=jnp.float64)
            y = jnp.where(jax.random.bernoulli(k_label, 0.5, (config.n,)), 1.0, -1.0)
            log10_scale = float(
                jax.random.uniform(
                    k_scale, minval=config.log10_scale[0], maxval=config.log10_scale[1]
                )
            )
            init = predictor.init(k_w, in_shape[0] if len(in_shape) == 1 else in_shape)
            params = tuple(layer * 10.0**log10_scale for layer in init)
            values = _trial(predictor, config.num_samples, params, X, y, k_trial)
            for name, value in zip(
                ("slack_autodiff", "slack_sampled", "degree_entropy", "scale"), values
            ):
                out[name][i, j] = float(value)
            out["log10_scale"][i, j] = log10_scale
        print(f"  lemma4: {label} done ({time.perf_counter() - start:.1f} s)", flush=True)
    return dict(
        out, degrees=degrees, labels=np.asarray([m[0] for m in models]), n=np.asarray(config.n)
    )


def plot(results, config: Config) -> None:
    fig, axes = figure(ncols=2, height=3.8)
    labels = results["labels"]
    left, right = axes[0]
    for i, label in enumerate(labels):
        color = depth_color(i, len(labels))
        for name, marker in (("slack_autodiff", "o"), ("slack_sampled", "x")):
            left.scatter(
                results["degree_entropy"][i],
                results[name][i],
                s=12,
                marker=marker,
                color=color,
                label=label if name == "slack_autodiff" else None,
            )
            error = np.abs(results[name][i] - results["degree_entropy"][i]) / results["scale"][i]
            right.scatter(
                10.0 ** results["log10_scale"][i],
                np.maximum(error, 1e-18),
                s=12,
                marker=marker,
                color=color,
            )
    top = float(np.max(results["degrees"]) * np.log(float(results["n"])))
    left.plot([0, top], [0, top], "k--", lw=0.8, label="slack = L H(p)")
    left.set_xlabel("L H(p),  p = softmax(-m)")
    left.set_ylabel(r"slack $\langle v, w\rangle + L \ln \mathcal{L}(w)$")
    left.set_title("Slack vs L H(p)  (o: autodiff v, x: sampled Clarke v)", fontsize=9)
    left.legend(fontsize=6, ncol=2)
    right.axhline(config.tol, color="k", ls="--", lw=0.8, label=f"{config.tol:g}")
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("scale factor applied to a random init (||w|| ~ factor)")
    right.set_ylabel("|slack - L H(p)| / (L (max|m| + ln n))  (0 at 1e-18)")
    right.set_title("Relative deviation from the exact identity", fontsize=9)
    right.legend(fontsize=7)
    fig.suptitle(
        "Lemma 4: slack = L H(p) >= 0 over the predictor zoo, random data and scales", fontsize=10
    )
    fig.tight_layout()
    save_figure(fig, NAME)


def summarize(results, config: Config) -> list[Claim]:
    slacks = np.stack([results["slack_autodiff"], results["slack_sampled"]])
    relative_min = float(np.min(slacks / results["scale"]))
    deviation = float(np.max(np.abs(slacks - results["degree_entropy"]) / results["scale"]))
    upper = results["degrees"][:, None] * np.log(float(results["n"]))
    above = float(np.max(slacks / upper))
    count = slacks.size
    claims = [
        Claim(
            NAME,
            f"Lemma 4: slack >= 0 ({count} evaluations, {len(results['labels'])} models)",
            "min slack / (L (max|m| + ln n))",
            relative_min,
            f">= -{config.tol:g}",
            relative_min >= -config.tol,
        ),
        Claim(
            NAME,
            "slack = L H(p) exactly (autodiff and sampled Clarke v)",
            "max |slack - L H(p)| / (L (max|m| + ln n))",
            deviation,
            f"<= {config.tol:g}",
            deviation <= config.tol,
        ),
        Claim(
            NAME,
            "slack <= L ln n (entropy bound)",
            "max slack / (L ln n)",
            above,
            f"<= 1 + {config.tol:g}",
            above <= 1 + config.tol,
        ),
    ]
    return [c._replace(value=float(c.value), holds=bool(c.holds)) for c in claims]


if __name__ == "__main__":
    main(sys.modules[__name__])
