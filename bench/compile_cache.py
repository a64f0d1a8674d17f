"""Does a second run of an experiment compile anything? Counts JAX's persistent-cache hits and
compilations while experiments run in this process.

    python bench/compile_cache.py [NAME ...]      (default: kkt_trap theorem5)

Results and figures go to a temporary folder, so every run computes; the compile cache is the
experiments' own (<repo>/.jax_cache or $JAXMARGIN_COMPILE_CACHE). Run it twice: the first run
of a fresh cache compiles, the second should show 0 compilations.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import tempfile
import time


class CompileLog(logging.Handler):
    """Counts the compiler's DEBUG records: cache hits, and compilations (which are logged with
    their compile time whether or not they are then written to the cache)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.hits = self.compiled = 0

    def emit(self, record):
        text = record.getMessage()
        if "cache hit" in text:
            self.hits += 1
        elif "seconds to compile" in text or "Not writing persistent cache entry" in text:
            self.compiled += 1


def main(names) -> None:
    scratch = tempfile.mkdtemp(prefix="jaxmargin-cache-bench-")
    os.environ["JAXMARGIN_RESULTS"] = os.path.join(scratch, "results")
    os.environ["JAXMARGIN_FIGURES"] = os.path.join(scratch, "figures")
    import experiments  # turns the compile cache on before jaxmargin is imported
    from experiments._runner import cached

    counter = CompileLog()
    logger = logging.getLogger("jax._src.compiler")
    logger.setLevel(logging.DEBUG)
    logger.addHandler(counter)
    print(f"compile cache: {experiments.COMPILE_CACHE}")
    for name in names:
        module = importlib.import_module(f"experiments.{name}")
        counter.hits = counter.compiled = 0
        start = time.perf_counter()
        cached(name, module.Config(), module.run)
        print(
            f"{name}: {counter.hits} cache hits, {counter.compiled} compilations,"
            f" {time.perf_counter() - start:.1f} s",
            flush=True,
        )


if __name__ == "__main__":
    main(sys.argv[1:] or ["kkt_trap", "theorem5"])
