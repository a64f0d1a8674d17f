"""One figure style for the whole suite, and the single place figures are written."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from ._runner import figures_dir  # noqa: E402

WIDTH = 6.4  # inches, one column
COLORS = plt.get_cmap("viridis")


def figure(ncols: int = 1, nrows: int = 1, height: float = 3.6):
    plt.rcParams.update(
        {
            "font.size": 9,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "figure.dpi": 110,
            "savefig.bbox": "tight",
        }
    )
    return plt.subplots(
        nrows, ncols, figsize=(WIDTH * max(1, ncols / 1.6), height * nrows), squeeze=False
    )


def depth_color(index: int, count: int):
    return COLORS(index / max(1, count - 1) * 0.9)


def save_figure(fig, name: str) -> str:
    folder = figures_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    fig.savefig(path)
    plt.close(fig)
    return str(path)
