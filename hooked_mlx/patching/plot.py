"""``plot_patching``: a patching result as a PNG heatmap (matplotlib: ``pip install 'hooked-mlx[plot]'``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..outputs import check_output_file, write_file_atomic


def _require_matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError(
            "plot_patching needs matplotlib, an optional extra of hooked-mlx. Install it with "
            "`pip install 'hooked-mlx[plot]'` (or `pip install matplotlib`)."
        ) from e
    return plt


def plot_patching(result, path: str | os.PathLike = "patching.png", labels: Sequence[str] | None = None,
                  ylabels: Sequence[str] | None = None, title: str | None = None, xlabel: str = "position",
                  ylabel: str = "layer", center: float | None = 0.0, cmap: str = "RdBu_r", dpi: int = 120,
                  overwrite: bool = False) -> Path:
    """Write a heatmap of a 2-D result (e.g. [layers, pos] or [layers, heads]) to ``path`` (PNG).

    labels: x tick labels (e.g. ``model.to_str_tokens(tokens)``; defaults to indices); ylabels: y tick
    labels (default "0".."L-1"). ``center``: the colour scale is symmetric around it (None: min..max).
    NaN cells (unpaired positions) are drawn grey. A 3-D result [L, P, H] must be reduced first (e.g.
    ``result[:, :, h]`` or ``result.sum(-1)``). Returns the path. The file is written atomically; an existing
    file is refused unless ``overwrite=True``."""
    check_output_file(path, overwrite=overwrite, what="plot_patching")
    a = np.array(result, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"plot_patching draws a 2-D grid; got shape {a.shape}. Select or reduce an axis first "
                         f"(e.g. result[:, :, head] or result.sum(-1)).")
    if labels is not None and len(labels) != a.shape[1]:
        raise ValueError(f"{len(labels)} labels for {a.shape[1]} columns.")
    if ylabels is not None and len(ylabels) != a.shape[0]:
        raise ValueError(f"{len(ylabels)} ylabels for {a.shape[0]} rows.")
    plt = _require_matplotlib()
    finite = a[np.isfinite(a)]
    vmin: float | None
    vmax: float | None
    if center is not None and finite.size:
        r = max(float(np.abs(finite - center).max()), 1e-12)
        vmin, vmax = center - r, center + r
    else:
        vmin = vmax = None  # matplotlib autoscales
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * a.shape[1] + 2), max(2.5, 0.4 * a.shape[0] + 1.5)))
    cm = plt.get_cmap(cmap).with_extremes(bad="#bbbbbb")
    im = ax.imshow(np.ma.masked_invalid(a), cmap=cm, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(a.shape[1]))
    ax.set_xticklabels([repr(s)[1:-1] if isinstance(s, str) else str(s) for s in labels] if labels is not None
                       else [str(i) for i in range(a.shape[1])], rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(a.shape[0]))
    ax.set_yticklabels(list(ylabels) if ylabels is not None else [str(i) for i in range(a.shape[0])], fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    try:
        path = write_file_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi), overwrite=overwrite,
                                 what="plot_patching", suffix=".png")
    finally:
        plt.close(fig)
    return path
