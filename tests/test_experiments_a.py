"""Smoke and consistency tests of six experiment modules at their quick scale.

One module-scoped run of `python -m experiments --quick --only ...` (through `run_all`) computes
and caches every result in a temporary folder; the tests then check the figures, the cache (a
second `cached` call must load, not recompute), the claims (finite, recomputable from the saved
npz file alone, and written to figures/summary.md with the values of results/summary.json).
"""

import importlib
import json
import math

import numpy as np
import pytest
from scipy.stats import linregress

from experiments import _runner
from experiments.__main__ import run_all

# Part of `make test`: test_experiments_a and _b together take 103 s on 2 quiet cores
# (measured 2026-11-28).

MODULES = ["lemma2", "lemma4", "soudry_linear", "diagonal_l1", "kkt_trap", "alignment"]
FIGURES = {"kkt_trap": ["kkt_trap", "kkt_trap_relu"]}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    results, figures = tmp_path_factory.mktemp("results"), tmp_path_factory.mktemp("figures")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JAXMARGIN_RESULTS", str(results))
        patch.setenv("JAXMARGIN_FIGURES", str(figures))
        summary = run_all(quick=True, only=MODULES)
        yield summary, results, figures


def _module(name):
    return importlib.import_module(f"experiments.{name}")


def _saved(name):
    module = _module(name)
    config = module.Config.quick()
    with np.load(_runner.results_path(name, config)) as data:
        return module, config, {key: data[key] for key in data.files}


@pytest.mark.parametrize("name", MODULES)
def test_figures_are_written(suite, name):
    _, _, figures = suite
    for stem in FIGURES.get(name, [name]):
        path = figures / f"{stem}.png"
        assert path.exists() and path.stat().st_size > 10_000
        assert path.read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.parametrize("name", MODULES)
def test_second_call_loads_from_disk(suite, name):
    module = _module(name)
    config = module.Config.quick()
    path = _runner.results_path(name, config)
    assert path.exists() and path.with_suffix(".json").exists()
    metadata = json.loads(path.with_suffix(".json").read_text())
    assert metadata["config"] == json.loads(json.dumps(_runner.dataclasses.asdict(config)))

    def must_not_run(config):
        raise AssertionError(f"{name} was recomputed although its results are cached")

    loaded = _runner.cached(name, config, must_not_run)
    _, _, saved = _saved(name)
    assert loaded.keys() == saved.keys()
    for key in saved:
        np.testing.assert_array_equal(loaded[key], saved[key])


@pytest.mark.parametrize("name", MODULES)
def test_claims_are_finite_and_recomputable_from_the_npz(suite, name):
    summary, _, _ = suite
    module, config, saved = _saved(name)
    claims = module.summarize(saved, config)
    assert claims and all(isinstance(c, _runner.Claim) for c in claims)
    assert all(c.experiment == name and math.isfinite(c.value) for c in claims)
    assert all(isinstance(c.holds, (bool, np.bool_)) for c in claims)
    # run_all summarized the in-memory results; the npz on disk gives the same numbers.
    rows = [row for row in summary["claims"] if row["experiment"] == name]
    assert [row["claim"] for row in rows] == [c.claim for c in claims]
    for row, claim in zip(rows, claims):
        assert row["value"] == pytest.approx(float(claim.value), rel=1e-12, abs=1e-300)
        assert row["holds"] == bool(claim.holds)


def test_cli_main_of_each_module_uses_the_cache(suite):
    for name in MODULES:
        claims = _runner.main(_module(name), ["--quick"])
        assert [c.claim for c in claims] == [
            c.claim for c in _module(name).summarize(_saved(name)[2], _module(name).Config.quick())
        ]


def test_summary_markdown_lists_every_claim(suite):
    summary, results, figures = suite
    stored = json.loads((results / "summary.json").read_text())
    assert stored["scale"] == "quick" and set(stored["seconds"]) == set(MODULES)
    markdown = (figures / "summary.md").read_text()
    assert len(stored["claims"]) == len(summary["claims"]) >= 2 * len(MODULES)
    for row in stored["claims"]:
        verdict = "holds" if row["holds"] else "**fails**"
        line = (
            f"| {row['experiment']} | {row['claim']} | {row['quantity']} |"
            f" {row['value']:.6g} | {row['criterion']} | {verdict} |"
        )
        assert line in markdown
        assert row["results"].endswith(".npz")


# --------------------------------------------------------------------------- independent numbers


def _claim(claims, fragment):
    (match,) = [c for c in claims if fragment in c.claim]
    return match


def test_lemma2_numbers(suite):
    module, config, saved = _saved("lemma2")
    claims = module.summarize(saved, config)
    assert claims[0].value == np.max(saved["autodiff_error"])
    sampled = max(saved["sampled_error"].max(), saved["combination_error"].max())
    assert claims[1].value == sampled
    assert claims[0].holds and claims[1].holds  # the lemma itself, at quick scale too
    np.testing.assert_array_equal(saved["diff_autodiff"], 2 * saved["conventions"])
    assert float(saved["diff_jax_relu"]) == 0.0
    assert np.all(saved["distinct_elements"] >= 2)  # genuine kinks


def test_lemma4_numbers(suite):
    module, config, saved = _saved("lemma4")
    claims = module.summarize(saved, config)
    slacks = np.concatenate([saved["slack_autodiff"].ravel(), saved["slack_sampled"].ravel()])
    scale = np.tile(saved["scale"].ravel(), 2)
    assert claims[0].value == pytest.approx(np.min(slacks / scale), rel=1e-12)
    entropy = np.tile(saved["degree_entropy"].ravel(), 2)
    assert claims[1].value == pytest.approx(np.max(np.abs(slacks - entropy) / scale), rel=1e-12)
    assert all(c.holds for c in claims)


def test_soudry_linear_numbers(suite):
    module, config, saved = _saved("soudry_linear")
    claims = module.summarize(saved, config)
    window = saved["gd_log_t"] >= math.log(config.fit_from_t)
    slope = linregress(saved["gd_log_t"][window], saved["gd_rho"][window]).slope
    assert _claim(claims, "||w|| grows").value == pytest.approx(slope * np.sqrt(2), rel=1e-9)
    w = saved["flow_w"][-1]
    angle = abs(math.atan2(w[0] - w[1], w[0] + w[1]))  # SVM direction (1, 1)/√2
    assert _claim(claims, "final angle").value == pytest.approx(angle, abs=1e-15)
    np.testing.assert_allclose(saved["svm_direction"], np.ones(2) / np.sqrt(2), atol=1e-12)


def test_diagonal_l1_numbers(suite):
    module, config, saved = _saved("diagonal_l1")
    claims = module.summarize(saved, config)
    best = min(
        np.abs(
            saved[f"seed{s}_L2_flow_beta"][-1] / np.abs(saved[f"seed{s}_L2_flow_beta"][-1]).sum()
            - saved[f"seed{s}_lp_direction"]
        ).sum()
        for s in range(config.seeds)
    )
    assert _claim(claims, "L=2 flow").value == pytest.approx(best, rel=1e-9)
    assert all(bool(saved[f"seed{s}_lp_unique"]) for s in range(config.seeds))


def test_kkt_trap_numbers(suite):
    module, config, saved = _saved("kkt_trap")
    claims = module.summarize(saved, config)
    X, y = saved["relu_X"], saved["relu_y"]
    for tag in ("relu_trapped", "relu_revived"):
        W, a = saved[f"{tag}_W"], saved[f"{tag}_a"]
        margin = np.min(y * (np.maximum(X @ W.T, 0.0) @ a)) / (np.sum(W**2) + np.sum(a**2))
        assert margin == pytest.approx(float(saved[f"{tag}_hard_margin"][-1]), rel=1e-9)
    assert _claim(claims, "second coordinate").value == 0.0
    assert _claim(claims, "the max margin (along e2)").value == pytest.approx(1.0, abs=1e-12)
    assert float(saved["relu_trapped_gd_unit0_change"]) == 0.0  # the dead unit, exactly


def test_alignment_numbers(suite):
    module, config, saved = _saved("alignment")
    claims = module.summarize(saved, config)
    for depth in config.depths:
        if config.flow:
            flow = _claim(claims, f"L={depth}: alignment of the flow's velocity")
            assert flow.value == saved[f"L{depth}_flow_velocity_alignment"][-1]
        gd = _claim(claims, f"L={depth}: alignment along loss-based GD")
        finals = [np.median(saved[f"L{depth}_gd{s}_alignment"][-5:]) for s in range(config.seeds)]
        assert gd.value == pytest.approx(np.median(finals), rel=1e-12)
        values = np.concatenate(
            [
                saved[f"L{depth}_gd{s}_{kind}"]
                for s in range(config.seeds)
                for kind in ("alignment", "velocity_alignment")
            ]
        )
        assert np.all(np.abs(values) <= 1 + 1e-12)
