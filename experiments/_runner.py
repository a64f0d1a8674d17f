"""Config -> cached results, with a metadata record, and the command line of every module.

Results live in results/NAME/<key>.npz with a sidecar <key>.json (config, package versions, git
commit, device, wall time). The key is a hash of the config, so only missing configs compute,
and writes are atomic (temporary file + os.replace), so an interrupted run resumes cleanly.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parent.parent


def results_dir() -> Path:
    """results/ (or $JAXMARGIN_RESULTS, which tests point at a temporary folder)."""
    return Path(os.environ.get("JAXMARGIN_RESULTS", ROOT / "results"))


def figures_dir() -> Path:
    """figures/ (or $JAXMARGIN_FIGURES)."""
    return Path(os.environ.get("JAXMARGIN_FIGURES", ROOT / "figures"))


def progress(iterable: Iterable, label: str, total: int | None = None) -> Iterable:
    """A progress bar over the long loops of an experiment (shown only on a terminal).

    The per-run lines the modules print stay the record in logs; the bar adds the count and an
    estimate of the time left while someone watches.
    """
    return tqdm(iterable, desc=label, total=total, leave=False, disable=None, dynamic_ncols=True)


class Claim(NamedTuple):
    """One row of figures/summary.md: a measured number and whether the claim holds."""

    experiment: str
    claim: str
    quantity: str
    value: float
    criterion: str
    holds: bool


def config_key(config) -> str:
    text = json.dumps(dataclasses.asdict(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _metadata(config, wall_time: float) -> dict:
    versions = {}
    for package in ("jax", "jaxlib", "diffrax", "optax", "numpy", "scipy", "jaxmargin"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
            ).stdout.strip()
            or None
        )
    except OSError:
        commit = None
    return {
        "config": dataclasses.asdict(config),
        "versions": versions,
        "git_commit": commit,
        "device": str(jax.devices()[0]),
        "platform": platform.platform(),
        "wall_time_s": wall_time,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(temporary)
    os.replace(temporary, path)


def results_path(name: str, config) -> Path:
    return results_dir() / name / f"{config_key(config)}.npz"


def cached(name: str, config, compute: Callable[[object], dict], *, force: bool = False) -> dict:
    """Load results/NAME/<key>.npz, or compute, save (atomically) and return it."""
    path = results_path(name, config)
    if path.exists() and not force:
        with np.load(path) as data:
            return {key: data[key] for key in data.files}
    start = time.perf_counter()
    results = {key: np.asarray(value) for key, value in compute(config).items()}
    wall_time = time.perf_counter() - start

    def write_npz(target: Path) -> None:
        with open(target, "wb") as handle:
            np.savez(handle, **results)

    _atomic_write(path, write_npz)
    _atomic_write(
        path.with_suffix(".json"),
        lambda target: target.write_text(json.dumps(_metadata(config, wall_time), indent=2)),
    )
    return results


def main(module, argv=None) -> list[Claim]:
    """Command line shared by every experiment: python -m experiments.NAME [--quick] ..."""
    # Under `python -m experiments.NAME` the module is named "__main__": use its spec.
    name = module.__spec__.name.rsplit(".", 1)[-1] if module.__spec__ else module.__name__
    parser = argparse.ArgumentParser(
        prog=f"python -m experiments.{name}", description=module.__doc__
    )
    parser.add_argument("--quick", action="store_true", help="test-sized configuration")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds, if used")
    parser.add_argument("--force", action="store_true", help="recompute even if cached")
    args = parser.parse_args(argv)
    config = module.Config.quick() if args.quick else module.Config()
    if args.seeds is not None:
        if not hasattr(config, "seeds"):
            parser.error(f"{name} has no seeds option")
        config = dataclasses.replace(config, seeds=args.seeds)
    results = cached(name, config, module.run, force=args.force)
    module.plot(results, config)
    claims = module.summarize(results, config)
    for claim in claims:
        mark = "holds" if claim.holds else "FAILS"
        print(f"[{mark}] {claim.claim}: {claim.quantity} = {claim.value:.6g} ({claim.criterion})")
    return claims
