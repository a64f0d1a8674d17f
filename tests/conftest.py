import os

import jax
import pytest

# The experiment package turns on a persistent compilation cache in the repository; tests that
# import it must not write there (the cache's own tests pass a temporary directory).
os.environ.setdefault("JAXMARGIN_COMPILE_CACHE", "off")

import jaxmargin  # noqa: F401  (turns on float64)

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def key():
    return jax.random.key(0)


@pytest.fixture
def reference_data():
    """The reference problem of docs/background.md §6: 50 points in R^5, y = sign(sum x)."""
    data_key, _ = jax.random.split(jax.random.key(0))
    X = jax.random.normal(data_key, (50, 5), dtype=jax.numpy.float64)
    y = jax.numpy.sign(X.sum(axis=1))
    return X, y


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test module. Without this the full suite crashed
    twice in a row with a segmentation fault inside XLA's compiler, late in the run (each module
    alone passed). Every XLA:CPU executable keeps memory mappings of its own (35k in the process
    at the busiest point of a run with this fixture, measured), and the kernel's limit is
    vm.max_map_count = 65530: the likely cause. The programs are per module: little is
    recompiled."""
    yield
    jax.clear_caches()
