"""sweep_gradient_flow: many seeds (and datasets) at once, vmapped per device, sharded over devices.

Each device runs `jax.vmap` of the engine's jitted core on its block of seeds, inside a
`jax.shard_map` over a one-axis mesh ("seeds") of the given devices. The per-device while loops
of diffrax are independent: nothing inside the solver loop communicates across devices (a jit
with NamedSharding inputs instead would partition one batched while loop, whose stopping test
"any seed still running" is an all-reduce on every step).
"""

from __future__ import annotations

import functools

import jax
import jax.extend
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from ._flow._engine import check_not_rest_point, direction_tolerance, prepare, solve
from ._flow._options import FlowOptions, static_config, with_flow_options
from ._flow._solution import FlowSolution
from ._validation import check_data

AXIS = "seeds"


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _sweep(static, mesh, batched_data, params0, X, y, tau_max, s_target, direction_tol):
    seeds, shared = PartitionSpec(AXIS), PartitionSpec()
    data_spec = seeds if batched_data else shared
    in_specs = (seeds, data_spec, data_spec, shared, shared, shared)
    args = (params0, X, y, tau_max, s_target, direction_tol)
    data_axis = 0 if batched_data else None
    solve_batch = jax.vmap(
        functools.partial(solve, static), in_axes=(0, data_axis, data_axis, None, None, None)
    )

    # The block of one device is traced here, outside shard_map, and only evaluated inside it:
    # equinox's closure conversion (lineax/optimistix, e.g. a Newton event root finder) rejects
    # the manual-mesh shardings that tracing inside shard_map gives its arguments.
    def local(arg, spec):
        def shape(leaf):
            if spec == seeds:
                return (leaf.shape[0] // mesh.size,) + leaf.shape[1:]
            return leaf.shape

        return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(shape(leaf), leaf.dtype), arg)

    block_args = tuple(local(arg, spec) for arg, spec in zip(args, in_specs, strict=True))
    program, out_shape = jax.make_jaxpr(solve_batch, return_shape=True)(*block_args)

    def block(*args):
        outs = jax.extend.core.jaxpr_as_fun(program)(*jax.tree.leaves(args))
        return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

    # check_vma=False: diffrax's loops do not carry shard_map's varying-axis types (diffrax
    # issues 735 and 738). No collective is used, so there is nothing for it to check.
    sharded = jax.shard_map(block, mesh=mesh, in_specs=in_specs, out_specs=seeds, check_vma=False)
    return sharded(*args)


def _pad(leaf: np.ndarray, total: int) -> np.ndarray:
    """Repeat the last entry of the leading axis up to `total` rows."""
    extra = total - leaf.shape[0]
    return np.concatenate([leaf, np.repeat(leaf[-1:], extra, axis=0)]) if extra else leaf


def _global(array, mesh: Mesh, spec: PartitionSpec) -> jax.Array:
    """A global jax.Array from a host array that every process holds in full."""
    array = np.asarray(array)
    sharding = NamedSharding(mesh, spec)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


@with_flow_options()
def sweep_gradient_flow(
    predictor,
    params0_batch,
    X,
    y,
    *,
    devices=None,
    batched_data: bool = False,
    beta_max: float | None = None,
    s_max: float | None = None,
    options: FlowOptions | None = None,
    **option_values,
) -> FlowSolution:
    """gradient_flow_batch for a batch of seeds, vmapped per device and sharded over devices.

    The batch (leading axis of every leaf of `params0_batch`) is padded to a multiple of the
    number of devices by repeating its last seed, split into equal blocks, one per device, and
    each device integrates its block with `jax.vmap` of the engine's core (the program of
    `gradient_flow_batch`); the padding rows are dropped from the outputs. Runs never
    communicate: a device's solver loop stops when its own block is done.

    Multi-host (optional): start one process per host and make the same call, with the same
    inputs (seeds drawn from the same key), in each; `jax.devices()` then lists the devices of
    every host, each host integrates the blocks of its own devices, and every process gets the
    whole result. With `sweep.py`:

        import sys
        import jax
        jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                                   process_id=int(sys.argv[2]))  # before any other JAX call
        import jaxmargin as jm
        ...
        solution = jm.sweep_gradient_flow(predictor, params0_batch, X, y, s_max=5.0)

    run `python sweep.py 10.0.0.1:1234 0` on host 0 (the coordinator, at 10.0.0.1:1234) and
    `python sweep.py 10.0.0.1:1234 1` on host 1. A cluster manager that jax.distributed
    detects (SLURM, ...) needs only `jax.distributed.initialize()`. On CPU-only hosts, also run
    `jax.config.update("jax_cpu_collectives_implementation", "gloo")` before initializing (the
    final gather is a collective).

    Several CPU devices (`jax.config.update("jax_num_cpu_devices", 4)` before JAX starts): an
    earlier version deadlocked XLA's CPU thread pool in the batched `eigvalsh` of ReLU sliding
    when there were as many devices as cores; the sliding QP no longer calls LAPACK
    (docs/decisions.md D16, tests/test_sweep.py). If a LAPACK-heavy predictor ever hangs there,
    raise the pool size with the environment variable NPROC before JAX starts.

    Args:
        predictor: an L-homogeneous Predictor.
        params0_batch: initial params with a leading seed axis on every leaf.
        X, y: the data, shared by all seeds; with `batched_data=True`, one dataset per seed,
            X of shape (seeds, n, ...) and y of shape (seeds, n), all of equal shape.
        devices: the devices to shard over (default `jax.devices()`, every device of every
            process).
        batched_data: whether X and y carry a leading seed axis.
        beta_max, s_max: the target, as in `gradient_flow`.
        options, **option_values: a FlowOptions and keywords replacing its fields, as in
            `gradient_flow`.

    Returns:
        A FlowSolution with a leading seed axis on every leaf, rows not trimmed (`valid` marks
        the saved points of each run), as from `gradient_flow_batch`. In one process the
        arrays stay on the devices: sharded along the seed axis when the batch divides evenly,
        otherwise (an uneven sharding is not representable) gathered on the first device,
        padding dropped. With several processes they are numpy arrays, on every process.
    """
    options = FlowOptions.merge(options, option_values)
    leaves = [np.asarray(leaf, np.float64) for leaf in jax.tree.leaves(params0_batch)]
    if not leaves or any(leaf.ndim == 0 for leaf in leaves):
        raise ValueError("params0_batch needs a leading seed axis on every leaf")
    num_seeds = leaves[0].shape[0]
    if num_seeds == 0 or any(leaf.shape[0] != num_seeds for leaf in leaves):
        raise ValueError(
            f"every leaf of params0_batch needs the same, nonzero leading (seed) axis; got "
            f"{[leaf.shape for leaf in leaves]}"
        )
    params0_batch = jax.tree.unflatten(jax.tree.structure(params0_batch), leaves)
    if batched_data:
        X, y = np.asarray(X, np.float64), np.asarray(y, np.float64)
        if X.ndim < 3 or y.ndim != 2 or X.shape[0] != num_seeds or y.shape[0] != num_seeds:
            raise ValueError(
                f"batched_data=True needs X of shape ({num_seeds}, n, ...) and y of shape "
                f"({num_seeds}, n), one dataset per seed; got {X.shape} and {y.shape}"
            )
        for index in range(num_seeds):  # value checks (finite X, labels +-1) on every dataset
            check_data(X[index], y[index])
        predictor, _, _, s_target = prepare(
            predictor, params0_batch, X[0], y[0], beta_max, s_max, True
        )
    else:
        predictor, X, y, s_target = prepare(predictor, params0_batch, X, y, beta_max, s_max, True)
    check_not_rest_point(predictor, params0_batch, batched=True)
    static = static_config(options, predictor, s_target)

    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("devices is empty")
    mesh = Mesh(np.asarray(devices, dtype=object), (AXIS,))
    total = -(-num_seeds // len(devices)) * len(devices)
    seeds, shared = PartitionSpec(AXIS), PartitionSpec()
    params = jax.tree.unflatten(
        jax.tree.structure(params0_batch),
        [_global(_pad(leaf, total), mesh, seeds) for leaf in leaves],
    )
    data_spec = seeds if batched_data else shared
    if batched_data:
        X, y = _pad(X, total), _pad(y, total)
    out = _sweep(
        static,
        mesh,
        batched_data,
        params,
        _global(X, mesh, data_spec),
        _global(y, mesh, data_spec),
        _global(np.float64(options.tau_max), mesh, shared),
        _global(np.float64(s_target), mesh, shared),
        _global(direction_tolerance(options), mesh, shared),
    )
    if not NamedSharding(mesh, shared).is_fully_addressable:  # several processes: gather all
        from jax.experimental import multihost_utils

        out = multihost_utils.process_allgather(out, tiled=True)
        return jax.tree.map(lambda leaf: leaf[:num_seeds], out)
    if total != num_seeds:
        # An uneven sharding is not representable: gather the real rows on the first device.
        out = _strip(jax.device_put(out, SingleDeviceSharding(devices[0])), num_seeds)
    return out


@functools.partial(jax.jit, static_argnums=1)
def _strip(out, num_seeds: int):
    return jax.tree.map(lambda leaf: leaf[:num_seeds], out)
