"""jaxmargin experiment suite: one module per claim of the seed and of the papers it rests on.

Each module NAME defines a frozen dataclass `Config` (default = paper scale; `Config.quick()`
= test scale), `run(config) -> dict of arrays` (cached under results/NAME/), `plot(results,
config)` writing figures/NAME*.png, and `summarize(results, config) -> list[Claim]`.
`python -m experiments` runs them all and writes figures/summary.md.
"""
