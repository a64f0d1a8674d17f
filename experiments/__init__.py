"""jaxmargin experiment suite: one module per claim of the seed and of the papers it rests on.

Each module NAME defines a frozen dataclass `Config` (default = paper scale; `Config.quick()`
= test scale), `run(config) -> dict of arrays` (cached under results/NAME/), `plot(results,
config)` writing figures/NAME*.png, and `summarize(results, config) -> list[Claim]`.
`python -m experiments` runs them all and writes figures/summary.md.

Importing the package turns on JAX's persistent compilation cache (<repo>/.jax_cache, or
$JAXMARGIN_COMPILE_CACHE; "off" disables it), so that a second run of the suite loads the
compiled flow programs instead of compiling them again; see _compile_cache.py. It happens
here, before any module imports jaxmargin, because it must precede equinox's import.
"""

from ._compile_cache import enable_compile_cache

COMPILE_CACHE = enable_compile_cache()
