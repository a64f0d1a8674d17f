"""sweep_gradient_flow on emulated CPU devices: the same numbers as gradient_flow_batch.

The four-device half runs in a subprocess, since the device count is fixed when JAX starts:
this file run as a script, `python tests/test_sweep.py {shared,per_seed} OUT.npz`, with
`jax_num_cpu_devices = 4`. It runs while the test process (one CPU device) computes the
references and the one-device sweep; the comparisons are made here. Each compilation of the
engine costs ~5-15 s of CPU, so the default test compiles three programs (reference batch,
one-device sweep, four-device sweep) and the per-seed-datasets variant on four devices is slow.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmargin as jm
from jaxmargin._sweep import sweep_gradient_flow

# The default half takes ~40 s on 2 quiet cores (measured 2026-11-28); the per-seed-datasets
# variant stays under `make test-slow`.

NUM_DEVICES = 4
OPTIONS = dict(solver="tsit5", s_max=1.2, num_saves=8, max_steps=2000, sliding=None)
FIELDS = ("s", "tau", "log_t", "soft_margin", "valid")


def _problem():
    """deep_linear(2, 3), 8 seeds, and two datasets of 8 points in R^3."""
    data_key, other_key, weight_key = jax.random.split(jax.random.key(0), 3)
    predictor = jm.deep_linear(2, 3)
    datasets = []
    for key in (data_key, other_key):
        X = jax.random.normal(key, (8, 3), dtype=jnp.float64)
        datasets.append((X, jnp.sign(X @ jnp.array([1.0, 0.5, -0.3]))))
    keys = jax.random.split(weight_key, 8)
    params = jax.vmap(lambda k: tuple(0.3 * w for w in predictor.init(k, 3)))(keys)
    return predictor, params, datasets


def _per_seed_data(datasets):
    """Seeds 0-2 on the first dataset, seeds 3-5 on the second."""
    (X, y), (X2, y2) = datasets
    return jnp.stack([X] * 3 + [X2] * 3), jnp.stack([y] * 3 + [y2] * 3)


def _take(tree, rows):
    return jax.tree.map(lambda leaf: leaf[rows], tree)


def _flatten(prefix, solution) -> dict:
    arrays = {f"{prefix}.{name}": np.asarray(getattr(solution, name)) for name in FIELDS}
    for index, leaf in enumerate(solution.params):
        arrays[f"{prefix}.params{index}"] = np.asarray(leaf)
    arrays[f"{prefix}.code"] = np.asarray(solution.status.code)
    arrays[f"{prefix}.steps"] = np.asarray(solution.status.steps)
    return arrays


def _four_devices(case, out_path):
    """The subprocess: sweeps over four devices, saved to out_path."""
    assert len(jax.devices()) == NUM_DEVICES, jax.devices()
    predictor, params, datasets = _problem()
    six = _take(params, slice(0, 6))
    if case == "per_seed":
        Xs, ys = _per_seed_data(datasets)
        solution = sweep_gradient_flow(predictor, six, Xs, ys, batched_data=True, **OPTIONS)
        np.savez(out_path, **_flatten("per_seed", solution))
        return
    X, y = datasets[0]
    arrays = _flatten("six", sweep_gradient_flow(predictor, six, X, y, **OPTIONS))
    five = sweep_gradient_flow(predictor, _take(params, slice(0, 5)), X, y, **OPTIONS)
    eight = sweep_gradient_flow(predictor, params, X, y, **OPTIONS)
    arrays |= _flatten("five", five) | _flatten("eight", eight)
    shards = sorted(eight.s.addressable_shards, key=lambda shard: shard.device.id)
    arrays["eight.shard_devices"] = np.array([shard.device.id for shard in shards])
    arrays["eight.shard_rows"] = np.array([shard.data.shape[0] for shard in shards])
    arrays["eight.shard_starts"] = np.array([shard.index[0].start or 0 for shard in shards])
    np.savez(out_path, **arrays)


def _start_four_devices(case, out_path):
    # NPROC: XLA's CPU thread pool, above the device count (see sweep_gradient_flow).
    env = dict(os.environ, JAX_PLATFORMS="cpu", NPROC=str(4 * NUM_DEVICES))
    env.pop("XLA_FLAGS", None)
    command = [sys.executable, str(Path(__file__).resolve()), case, str(out_path)]
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finish(child, out_path) -> dict:
    try:
        output, _ = child.communicate(timeout=600)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 0, output
    with np.load(out_path) as data:
        return {key: data[key] for key in data.files}


def _references(predictor, six, datasets) -> dict:
    (X, y), (X2, y2) = datasets
    arrays = _flatten("reference", jm.gradient_flow_batch(predictor, six, X, y, **OPTIONS))
    arrays |= _flatten("reference2", jm.gradient_flow_batch(predictor, six, X2, y2, **OPTIONS))
    assert arrays["reference.code"].tolist() == [0] * 6  # every run reached s_max
    assert np.all(arrays["reference.valid"][:, -1]) and np.all(arrays["reference2.valid"][:, -1])
    return arrays


def _assert_same(got: dict, want: dict, got_prefix, want_prefix, rows):
    """got[got_prefix.*][rows] equal want[want_prefix.*][rows] to 1e-12 (on valid points)."""
    valid = want[f"{want_prefix}.valid"][rows]
    for name in ("valid", "code", "steps"):
        np.testing.assert_array_equal(
            got[f"{got_prefix}.{name}"][rows],
            want[f"{want_prefix}.{name}"][rows],
            err_msg=f"{got_prefix}.{name}",
        )
    for name in [name for name in FIELDS if name != "valid"] + ["params0", "params1"]:
        np.testing.assert_allclose(
            got[f"{got_prefix}.{name}"][rows][valid],
            want[f"{want_prefix}.{name}"][rows][valid],
            rtol=1e-12,
            atol=1e-12,
            err_msg=f"{got_prefix}.{name}",
        )


def test_sweep_matches_batch(tmp_path):
    """Four devices (6, 5 and 8 seeds, shared data) and one device (a dataset per seed)."""
    child = _start_four_devices("shared", tmp_path / "four.npz")
    try:
        predictor, params, datasets = _problem()
        six = _take(params, slice(0, 6))
        here = _references(predictor, six, datasets)
        Xs, ys = _per_seed_data(datasets)
        one = sweep_gradient_flow(
            predictor, six, Xs, ys, batched_data=True, devices=jax.devices()[:1], **OPTIONS
        )
    except BaseException:
        child.kill()
        raise
    there = _finish(child, tmp_path / "four.npz")
    assert one.s.sharding.device_set == {jax.devices()[0]}
    here |= _flatten("one", one)
    _assert_same(here, here, "one", "reference", slice(0, 3))
    _assert_same(here, here, "one", "reference2", slice(3, 6))

    assert there["six.s"].shape[0] == 6 and there["five.s"].shape[0] == 5  # padding dropped
    _assert_same(there, here, "six", "reference", slice(0, 6))
    _assert_same(there, here, "five", "reference", slice(0, 5))
    _assert_same(there, here, "eight", "reference", slice(0, 6))
    # Eight seeds divide evenly and stay sharded: two rows on each of the four devices.
    assert there["eight.shard_devices"].tolist() == list(range(NUM_DEVICES))
    assert there["eight.shard_rows"].tolist() == [2] * NUM_DEVICES
    assert sorted(there["eight.shard_starts"].tolist()) == [0, 2, 4, 6]


@pytest.mark.slow
def test_sweep_per_seed_data_on_four_devices(tmp_path):
    """A dataset per seed, padded and sharded over four devices; shared data on one device."""
    child = _start_four_devices("per_seed", tmp_path / "four.npz")
    try:
        predictor, params, datasets = _problem()
        six = _take(params, slice(0, 6))
        here = _references(predictor, six, datasets)
        X, y = datasets[0]
        one = sweep_gradient_flow(predictor, six, X, y, devices=jax.devices()[:1], **OPTIONS)
    except BaseException:
        child.kill()
        raise
    there = _finish(child, tmp_path / "four.npz")
    here |= _flatten("one", one)
    _assert_same(here, here, "one", "reference", slice(0, 6))
    _assert_same(there, here, "per_seed", "reference", slice(0, 3))
    _assert_same(there, here, "per_seed", "reference2", slice(3, 6))


RELU_SLIDING_CHILD = """
import json, sys
import jax
jax.config.update("jax_num_cpu_devices", 2)
import jax.numpy as jnp, numpy as np
import jaxmargin as jm
from jaxmargin._sweep import sweep_gradient_flow
X = jax.random.normal(jax.random.key(0), (16, 3)); y = jnp.sign(X.sum(1))
predictor = jm.relu_mlp(2, 6)
params0 = jax.vmap(lambda k: predictor.init(k, 3))(jax.random.split(jax.random.key(1), 5))
options = dict(solver="tsit5", s_max=1.5, max_steps=3000, num_saves=8,
               sliding=jm.SlidingOptions(candidates=8))
swept = sweep_gradient_flow(predictor, params0, X, y, **options)
batch = jm.gradient_flow_batch(predictor, params0, X, y, **options)
soft = [np.asarray(a.soft_margin) for a in (swept, batch)]
print(json.dumps(dict(devices=len(jax.devices()), codes=np.asarray(swept.status.code).tolist(),
                      diff=float(np.nanmax(np.abs(soft[0] - soft[1]))))))
"""


@pytest.mark.slow
def test_relu_sliding_sweep_on_two_devices():
    """ReLU with sliding (the box QP inside the solver loop) on 2 emulated devices of a machine
    that may have only 2 cores: once a deadlock in the batched eigvalsh, now it must finish and
    equal the one-device batch; 5 seeds (one padded)."""
    done = subprocess.run(
        [sys.executable, "-c", RELU_SLIDING_CHILD],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["devices"] == 2 and result["codes"] == [0] * 5
    assert result["diff"] <= 1e-12


def test_bad_arguments():
    predictor, params, [(X, y), _] = _problem()
    with pytest.raises(ValueError, match="one dataset per seed"):
        sweep_gradient_flow(predictor, params, X, y, batched_data=True, s_max=1.0, solver="tsit5")
    with pytest.raises(ValueError, match="leading"):
        sweep_gradient_flow(predictor, (params[0], params[1][:2]), X, y, s_max=1.0, solver="tsit5")
    with pytest.raises(TypeError, match="unknown options"):
        sweep_gradient_flow(predictor, params, X, y, s_max=1.0, colour="red", solver="tsit5")
    with pytest.raises(ValueError, match="devices"):
        sweep_gradient_flow(predictor, params, X, y, s_max=1.0, devices=[], solver="tsit5")
    with pytest.raises(ValueError, match="target"):
        sweep_gradient_flow(predictor, params, X, y, solver="tsit5")


if __name__ == "__main__":
    jax.config.update("jax_num_cpu_devices", NUM_DEVICES)
    jax.config.update("jax_numpy_rank_promotion", "raise")
    _four_devices(sys.argv[1], sys.argv[2])
