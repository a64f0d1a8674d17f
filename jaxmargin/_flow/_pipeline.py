"""Run a chain of stages as separate programs, compiling the later ones while the first runs.

Why: as one program, a run traces, compiles and runs one after the other. As stages (phase 1,
the stiff stage, the limit flow, rows), each stage's compilation overlaps the tracing of the
next ones (XLA's compilation releases the GIL), two stages compile at once (D53), and the later
stages compile while phase 1 runs. Only the first stage runs during compilation: a run beside
a compilation is slowed by as much as it would gain (docs/decisions.md D40).

A chain is a function chain(call, *inputs) that runs its stages as call(stage, *args) and
returns the last stage's result (_asymptotic.chain, _explicit.chain); the stages are pure functions
stage(static, *args) of array pytrees. The same chain under one jax.jit is the single-program
form (the batched paths vmap that).
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import threading

import jax

# Compiled stage programs of the last few (config, input shapes) keys: a repeated call does not
# recompile. Bounded: every XLA:CPU executable holds memory mappings of its own (see the test
# suite's conftest), and jax.clear_caches does not reach this cache.
_CACHE_SIZE = 8
_cache: collections.OrderedDict = collections.OrderedDict()
_lock = threading.Lock()
_executor: concurrent.futures.ThreadPoolExecutor | None = None
# Stages compiled at once: on small problems the run is mostly compilation, which two compile
# threads share out over two cores (docs/decisions.md D53). `make test` sets 1: its two pytest
# processes already keep both cores busy.
COMPILE_WORKERS = int(os.environ.get("JAXMARGIN_COMPILE_THREADS", "2"))


def _compiler() -> concurrent.futures.ThreadPoolExecutor:
    global _executor
    if _executor is None:
        _executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=COMPILE_WORKERS, thread_name_prefix="jaxmargin-compile"
        )
    return _executor


def _jitted(stage):
    # One jax.jit wrapper per stage function, kept on the function itself.
    wrapper = getattr(stage, "_jaxmargin_jit", None)
    if wrapper is None:
        wrapper = jax.jit(stage, static_argnums=0)
        stage._jaxmargin_jit = wrapper
    return wrapper


def _shapes(tree):
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), tree)


def _key(static, inputs):
    leaves, structure = jax.tree.flatten(inputs)
    return static, structure, tuple((leaf.shape, str(leaf.dtype)) for leaf in leaves)


def _compile_all(static, chain, inputs):
    """{stage: future of its compiled program}: each stage is lowered here (tracing needs the
    GIL) with the output shapes of the stages before it, and compiled in the background."""
    futures = {}

    def lower(stage, *args):
        lowered = _jitted(stage).lower(static, *args)
        futures[stage] = _compiler().submit(lowered.compile)
        return lowered.out_info

    chain(lower, *_shapes(inputs))
    return futures


def run(static, chain, *inputs):
    """chain's result, its stages run as compiled programs (compiled ahead, cached)."""
    inputs = jax.tree.map(jax.numpy.asarray, inputs)
    key = _key(static, inputs)
    with _lock:
        futures = _cache.get(key)
        if futures is not None:
            _cache.move_to_end(key)
    if futures is None:
        futures = _compile_all(static, chain, inputs)
        with _lock:
            _cache[key] = futures
            while len(_cache) > _CACHE_SIZE:
                _cache.popitem(last=False)
    started = False

    def call(stage, *args):
        # The first stage runs (dispatched asynchronously) while the others compile; the later
        # ones wait for every compilation (see the module docstring).
        nonlocal started
        if started:
            concurrent.futures.wait(list(futures.values()))
        started = True
        return futures[stage].result()(*args)

    try:
        return chain(call, *inputs)
    except BaseException:
        # A failed compilation is not kept: the next call tries again (and reports its error).
        with _lock:
            if any(f.done() and f.exception() is not None for f in futures.values()):
                _cache.pop(key, None)
        raise
