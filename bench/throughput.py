"""Runs per second of the flow against the number of seeds and of (emulated) devices.

    python bench/throughput.py [--max-seeds 256] [--devices 1 2 4] [--sweep-seeds 64]

A small fixed problem: deep_linear(2, 4) on 16 points in R^4, every seed run to the same
s = ln ||w|| target. Compilation is excluded: each shape is run once to compile, then timed
(best of --repeats). Printed:
- one device: gradient_flow_batch on 1, 2, 4, ..., --max-seeds seeds, against gradient_flow in
  a Python loop over the same seeds (compiled once); "vmap gain" = loop time / batch time;
- devices: sweep_gradient_flow on --sweep-seeds seeds in a fresh process per device count,
  with `jax_num_cpu_devices` = 1, 2, 4 emulated CPU devices. Emulated devices share the
  machine's cores: beyond the number of free cores they cannot be faster.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax

OPTIONS = dict(solver="tsit5", s_max=3.0, num_saves=16, max_steps=10_000, sliding=None)


def problem(num_seeds: int):
    import jax.numpy as jnp

    import jaxmargin as jm

    data_key, weight_key = jax.random.split(jax.random.key(0))
    X = jax.random.normal(data_key, (16, 4), dtype=jnp.float64)
    y = jnp.sign(X @ jnp.array([1.0, -0.5, 0.25, 0.8]))
    predictor = jm.deep_linear(2, 4)
    keys = jax.random.split(weight_key, num_seeds)
    params = jax.vmap(lambda key: tuple(0.3 * w for w in predictor.init(key, 4)))(keys)
    return predictor, params, X, y


def timed(function, repeats: int) -> tuple[float, float, object]:
    """(first call, best of `repeats` further calls, last result), results ready each time."""
    start = time.perf_counter()
    result = jax.block_until_ready(function())
    first = time.perf_counter() - start
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = jax.block_until_ready(function())
        best = min(best, time.perf_counter() - start)
    return first, best, result


def one_device(max_seeds: int, repeats: int) -> list[dict]:
    import numpy as np

    import jaxmargin as jm

    predictor, params, X, y = problem(max_seeds)
    # One by one: gradient_flow on each seed, compiled by the first call.
    seeds = [jax.tree.map(lambda leaf, i=i: leaf[i], params) for i in range(max_seeds)]
    jax.block_until_ready(jm.gradient_flow(predictor, seeds[0], X, y, **OPTIONS))
    single = []
    for seed in seeds:
        start = time.perf_counter()
        jax.block_until_ready(jm.gradient_flow(predictor, seed, X, y, **OPTIONS))
        single.append(time.perf_counter() - start)
    rows, count = [], 1
    while count <= max_seeds:
        batch = jax.tree.map(lambda leaf, count=count: leaf[:count], params)
        run = lambda batch=batch: jm.gradient_flow_batch(predictor, batch, X, y, **OPTIONS)  # noqa: E731
        first, best, out = timed(run, repeats)
        codes = np.asarray(out.status.code)
        loop = float(np.sum(single[:count]))
        rows.append(
            dict(
                seeds=count, compile=first - best, batch=best, loop=loop, ok=int(np.sum(codes == 0))
            )
        )
        count *= 2
    return rows


def sweep_worker(num_devices: int, num_seeds: int, repeats: int) -> dict:
    """In a fresh process with `num_devices` emulated CPU devices."""
    import numpy as np

    from jaxmargin._sweep import sweep_gradient_flow

    assert len(jax.devices()) == num_devices, jax.devices()
    predictor, params, X, y = problem(num_seeds)
    first, best, out = timed(
        lambda: sweep_gradient_flow(predictor, params, X, y, **OPTIONS), repeats
    )
    return dict(
        devices=num_devices,
        seeds=num_seeds,
        compile=first - best,
        sweep=best,
        ok=int(np.sum(np.asarray(out.status.code) == 0)),
    )


def run_worker(num_devices: int, num_seeds: int, repeats: int) -> dict:
    # NPROC: XLA's CPU thread pool above the device count, a precaution kept from the eigvalsh
    # deadlock (docs/decisions.md D16; not needed by the current sliding QP).
    env = dict(os.environ, JAX_PLATFORMS="cpu", NPROC=str(max(16, 4 * num_devices)))
    env.pop("XLA_FLAGS", None)
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        str(num_devices),
        "--sweep-seeds",
        str(num_seeds),
        "--repeats",
        str(repeats),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker with {num_devices} devices failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max-seeds", type=int, default=256, help="largest batch (one device)")
    parser.add_argument(
        "--devices",
        type=int,
        nargs="*",
        default=[1, 2, 4],
        help="emulated device counts (none: skip)",
    )
    parser.add_argument("--sweep-seeds", type=int, default=64, help="seeds of the device runs")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls (best is kept)")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        jax.config.update("jax_num_cpu_devices", args.worker)
        print(json.dumps(sweep_worker(args.worker, args.sweep_seeds, args.repeats)))
        return

    start = time.perf_counter()
    print(
        "throughput of the flow: deep_linear(2, 4), 16 points in R^4, "
        f"{', '.join(f'{k}={v}' for k, v in OPTIONS.items())}, tsit5"
    )
    print(
        f"machine: {os.cpu_count()} CPU cores, jax {jax.__version__}, "
        f"{jax.devices()[0].platform}; compile times excluded (best of {args.repeats})\n"
    )
    print("one device: gradient_flow_batch (vmap) vs gradient_flow one seed at a time")
    print(
        f"{'seeds':>6} {'compile s':>10} {'batch s':>9} {'runs/s':>9} {'loop s':>9} "
        f"{'loop runs/s':>12} {'vmap gain':>10} {'reached':>8}"
    )
    for row in one_device(args.max_seeds, args.repeats):
        print(
            f"{row['seeds']:>6} {row['compile']:>10.2f} {row['batch']:>9.4f} "
            f"{row['seeds'] / row['batch']:>9.1f} {row['loop']:>9.4f} "
            f"{row['seeds'] / row['loop']:>12.1f} {row['loop'] / row['batch']:>9.2f}x "
            f"{row['ok']:>4}/{row['seeds']}",
            flush=True,
        )
    if args.devices:
        print(
            f"\nemulated CPU devices: sweep_gradient_flow on {args.sweep_seeds} seeds "
            "(one fresh process per device count)"
        )
        print(
            f"{'devices':>8} {'compile s':>10} {'sweep s':>9} {'runs/s':>9} {'vs 1st':>8} "
            f"{'reached':>8}"
        )
        base = None
        for count in args.devices:
            row = run_worker(count, args.sweep_seeds, args.repeats)
            base = base or row["sweep"]
            print(
                f"{count:>8} {row['compile']:>10.2f} {row['sweep']:>9.4f} "
                f"{row['seeds'] / row['sweep']:>9.1f} {base / row['sweep']:>7.2f}x "
                f"{row['ok']:>4}/{row['seeds']}",
                flush=True,
            )
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
