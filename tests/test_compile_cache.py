"""The experiments' persistent compilation cache: a second process loads, it does not compile.

Each half runs in a fresh interpreter (the cache directory is read when JAX compiles, and the
EQX_ON_ERROR default must be set before equinox is imported). A logging handler on JAX's
compiler counts cache hits and compilations of the one jitted function.
"""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import json, logging, os, sys
from experiments._compile_cache import enable_compile_cache
directory = enable_compile_cache(sys.argv[1])
import jax, jax.numpy as jnp
import jaxmargin  # noqa: F401  (equinox imported after the cache was turned on)

counts = {"hits": 0, "compiled": 0}
class Count(logging.Handler):
    def emit(self, record):
        text = record.getMessage()
        if "jit_margin_program" not in text:
            return
        if "cache hit" in text:
            counts["hits"] += 1
        elif "seconds to compile" in text:
            counts["compiled"] += 1
logger = logging.getLogger("jax._src.compiler")
logger.setLevel(logging.DEBUG)
logger.addHandler(Count())

def margin_program(w):
    return jnp.min(jnp.tanh(w) @ jnp.arange(3.0))
jax.jit(margin_program)(jnp.ones((4, 3))).block_until_ready()
print(json.dumps(dict(counts, directory=str(directory), eqx=os.environ.get("EQX_ON_ERROR"))))
"""


def _child(directory, env=None):
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(directory)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_second_process_loads_from_the_cache(tmp_path):
    directory = tmp_path / "cache"
    first = _child(directory, env={"PATH": "/usr/bin:/bin"})
    assert first["directory"] == str(directory.resolve())
    assert first["eqx"] == "nan"  # equinox's checks as NaNs: host callbacks are not cacheable
    assert first["compiled"] == 1 and first["hits"] == 0
    assert any(directory.iterdir())
    second = _child(directory, env={"PATH": "/usr/bin:/bin"})
    assert second["hits"] == 1 and second["compiled"] == 0


def test_off_leaves_jax_alone(monkeypatch):
    from experiments._compile_cache import enable_compile_cache

    assert enable_compile_cache("off") is None
    monkeypatch.setenv("JAXMARGIN_COMPILE_CACHE", "OFF")
    assert enable_compile_cache() is None
