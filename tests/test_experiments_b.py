"""Smoke tests of experiments theorem5, lyu_li_rates, gd_vs_flow and width at quick scale.

Each module runs its quick config with results and figures in a temporary folder: figures are
non-empty PNGs, every claim has a finite value, a second `cached` call loads from disk without
computing, and the claims computed from the saved npz equal those from the fresh results.
The quick configs share the flow programs of theorem5 (same predictors, shapes and options),
so the modules run in the order below, in one process, compile them once.
"""

import importlib
import math

import numpy as np
import pytest

from experiments._runner import Claim, cached, results_path

# Part of `make test`: test_experiments_a and _b together take 103 s on 2 quiet cores
# (measured 2026-11-28).

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIGURES = {
    "theorem5": ("theorem5", "theorem5_decrease"),
    "lyu_li_rates": ("lyu_li_rates",),
    "gd_vs_flow": ("gd_vs_flow",),
    "width": ("width",),
}


def _refuse(config):
    raise AssertionError(f"recomputed {config} although its results were cached")


def _independent_check(name, module, results, config, claims):
    """One claimed number recomputed here from the raw saved arrays, without the module."""
    by_quantity = [c for c in claims if c.quantity.startswith("max over seeds of the largest")]
    if name == "theorem5":
        L = config.depths[0]
        soft, phase = results[f"synthetic_L{L}_soft"], results[f"synthetic_L{L}_phase"]
        worst = -np.inf
        for row, ph in zip(soft, phase):
            g = row[(ph == 2) & np.isfinite(row)]
            if g.size > 1:
                scale = np.maximum(np.abs(g[:-1]), np.abs(g[1:]))
                worst = max(worst, float(np.max((g[:-1] - g[1:]) / scale)))
        assert by_quantity[0].value == pytest.approx(worst, rel=1e-12, abs=0.0)
    elif name == "lyu_li_rates":
        L = config.depths[0]
        n = config.n
        soft, hard, s = results[f"L{L}_soft"], results[f"L{L}_hard"], results[f"L{L}_s"]
        ok = np.isfinite(soft)
        lower = hard - np.log(n) * np.exp(-L * s)
        assert np.all(soft[ok] <= hard[ok] + 1e-12) and np.all(soft[ok] >= lower[ok] - 1e-12)
        assert [c for c in claims if c.quantity == "violations"][0].value == 0
    elif name == "gd_vs_flow":
        lrs = results["lrs"]
        assert np.all(np.diff(lrs) > 0)
        dec = module.decreases(results)
        for row, value in zip(results["gd_soft"], dec):
            pos = np.flatnonzero(row > 0)
            if pos.size > 1:
                g = row[pos[0] :]
                scale = np.maximum(np.abs(g[:-1]), np.abs(g[1:]))
                assert value == pytest.approx(float(np.max((g[:-1] - g[1:]) / scale)), rel=1e-12)
    elif name == "width":
        median = float(np.median(results["product"][-1]))
        claim = [c for c in claims if c.claim.startswith("widest net")][0]
        assert claim.value == pytest.approx(median, rel=1e-12)


@pytest.mark.parametrize("name", list(FIGURES))
def test_experiment_quick(name, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXMARGIN_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("JAXMARGIN_FIGURES", str(tmp_path / "figures"))
    module = importlib.import_module(f"experiments.{name}")
    config = module.Config.quick()
    assert config != module.Config()

    results = cached(name, config, module.run)
    assert results_path(name, config).exists()
    module.plot(results, config)
    for figure in FIGURES[name]:
        path = tmp_path / "figures" / f"{figure}.png"
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, path

    claims = module.summarize(results, config)
    assert claims and all(isinstance(c, Claim) for c in claims)
    for claim in claims:
        assert claim.experiment == name
        assert math.isfinite(float(claim.value)), claim
        assert isinstance(claim.holds, bool | np.bool_), claim

    loaded = cached(name, config, _refuse)
    assert sorted(loaded) == sorted(results)
    for key in results:
        np.testing.assert_array_equal(loaded[key], results[key], err_msg=key)
    again = module.summarize(loaded, config)
    assert [(c.claim, c.quantity, c.criterion, bool(c.holds)) for c in again] == [
        (c.claim, c.quantity, c.criterion, bool(c.holds)) for c in claims
    ]
    np.testing.assert_array_equal([c.value for c in again], [c.value for c in claims])
    _independent_check(name, module, loaded, config, again)
