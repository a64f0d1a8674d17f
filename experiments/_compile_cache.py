"""JAX's persistent compilation cache, on for the experiments.

The flow engine compiles one program per predictor, shape and static option (5-30 s each on a
CPU); the cache keeps compiled programs on disk, so a later run of an experiment, in a fresh
process, loads them instead of compiling again. The directory is the argument, else
$JAXMARGIN_COMPILE_CACHE, else <repo>/.jax_cache (git-ignored); JAXMARGIN_COMPILE_CACHE=off
leaves JAX's settings alone (no cache, unless JAX was given one some other way).

JAX never writes a program with host callbacks to the cache, and equinox's runtime checks
(`eqx.error_if`, used by diffrax and optimistix inside every flow program) are host callbacks
under its default EQX_ON_ERROR=raise. With EQX_ON_ERROR=nan they are not: a failed check makes
the outputs NaN instead of raising (the engine then reports SOLVER_FAILED). So
`enable_compile_cache` sets EQX_ON_ERROR=nan when equinox is not imported yet and the variable
is unset; call it before `import jaxmargin` (or set EQX_ON_ERROR yourself) for the flow
programs to be cached. JAX trusts the cache's contents: keep the directory private.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache

ROOT = Path(__file__).resolve().parent.parent
ENV = "JAXMARGIN_COMPILE_CACHE"
OFF = frozenset({"off", "0", "false", "no", "none"})


def enable_compile_cache(directory: str | os.PathLike | None = None) -> Path | None:
    """Turn on the persistent compilation cache for every program, however small or quick.

    Call it before the first compilation that should be cached, and before equinox (any of
    jaxmargin, diffrax) is imported for the flow programs to be cacheable (module docstring).
    Calling it again with another directory switches to that one.

    Args:
        directory: the cache directory (created if missing); default $JAXMARGIN_COMPILE_CACHE,
            else <repo>/.jax_cache. "off" (as the argument or the variable) turns nothing on.

    Returns:
        The directory in use, or None when the cache was left off.
    """
    if directory is None:
        directory = os.environ.get(ENV) or ROOT / ".jax_cache"
    if str(directory).strip().lower() in OFF:
        return None
    if "equinox" not in sys.modules:
        os.environ.setdefault("EQX_ON_ERROR", "nan")
    path = Path(directory).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    current = jax.config.jax_compilation_cache_dir
    if current is not None and Path(current).expanduser().resolve() != path:
        compilation_cache.reset_cache()  # the old directory may already be open
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_enable_compilation_cache", True)
    # By default only programs that took >= 1 s to compile are written; cache them all.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return path
