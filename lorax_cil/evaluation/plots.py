"""Paper-ready figures of accuracy matrices (matplotlib, rendered off-screen).

Every function builds a ``matplotlib.figure.Figure`` attached to an explicit Agg canvas, so it
never needs a display, never imports ``pyplot`` and never changes the process-wide backend a
notebook or GUI may have chosen. matplotlib is imported inside the functions. Each function
writes one image (format from the file suffix, PNG recommended) and returns its path; captions
are printed under the figure.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lorax_cil.evaluation.metrics import average_accuracy_per_step

__all__ = [
    "plot_accuracy_matrix",
    "plot_accuracy_over_steps",
    "plot_average_accuracy_curves",
    "plot_matrices_side_by_side",
]


def _figure(width: float, height: float):
    """A Figure bound to an Agg canvas (no pyplot, no global backend switch)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike, title: str | None, caption: str | None, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if title:
        fig.suptitle(title)
    if caption:
        fig.canvas.draw()  # settle the constrained layout before adding text outside it
        fig.set_layout_engine("none")
        width_chars = max(40, int(fig.get_figwidth() * 14))
        text = "\n".join(textwrap.wrap(" ".join(str(caption).split()), width_chars))
        fig.text(0.5, -0.01, text, ha="center", va="top", fontsize=9, wrap=False)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def _matrix(R: Any) -> np.ndarray:
    m = np.asarray(R, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"accuracy matrix must be square T x T, got shape {m.shape}")
    return m


def _names(names: Sequence[str] | None, t: int) -> list[str]:
    if names is None or len(names) < t:
        if names is not None and len(names) != 0:
            raise ValueError(f"{len(names)} task names for a matrix with {t} tasks")
        return [f"task{i}" for i in range(t)]
    return [str(n) for n in names[:t]]


def _value_range(mats: Sequence[np.ndarray]) -> tuple[float, float]:
    finite = [m[np.isfinite(m)] for m in mats]
    top = max((float(v.max()) for v in finite if v.size), default=1.0)
    return 0.0, (1.0 if top <= 1.0 else 100.0)


def _heatmap(ax, m: np.ndarray, names: list[str], vmin: float, vmax: float, fmt: str):
    import matplotlib

    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    image = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, vmin=vmin, vmax=vmax)
    t = m.shape[0]
    size = max(5.0, 10.0 - 0.35 * t)
    for (j, i), v in np.ndenumerate(m):
        if math.isfinite(v):
            dark = (v - vmin) / (vmax - vmin or 1.0) < 0.55
            ax.text(i, j, format(v, fmt), ha="center", va="center", fontsize=size,
                    color="white" if dark else "black")
    ax.set_xticks(range(t), names, rotation=45, ha="right")
    ax.set_yticks(range(t), [f"after {n}" for n in names])
    ax.set_xlabel("evaluated task")
    ax.set_ylabel("training step")
    return image


def plot_accuracy_matrix(
    R: Any,
    names: Sequence[str] | None,
    path: str | os.PathLike,
    title: str | None = None,
    caption: str | None = None,
    *,
    fmt: str = ".2f",
    dpi: int = 150,
) -> Path:
    """Heatmap of ``R[j, i]`` with the values written in the cells; NaN cells stay blank."""
    m = _matrix(R)
    t = m.shape[0]
    labels = _names(names, t)
    side = max(3.5, 0.6 * t + 2.0)
    fig = _figure(side + 1.0, side)
    ax = fig.add_subplot(1, 1, 1)
    vmin, vmax = _value_range([m])
    image = _heatmap(ax, m, labels, vmin, vmax, fmt)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="accuracy")
    return _save(fig, path, title, caption, dpi)


def plot_accuracy_over_steps(
    R: Any,
    names: Sequence[str] | None,
    path: str | os.PathLike,
    title: str | None = None,
    caption: str | None = None,
    *,
    dpi: int = 150,
) -> Path:
    """One curve per task (``R[j, i]`` for ``j >= i``) plus the running average over seen tasks."""
    m = _matrix(R)
    t = m.shape[0]
    labels = _names(names, t)
    fig = _figure(max(5.0, 0.5 * t + 3.5), 3.8)
    ax = fig.add_subplot(1, 1, 1)
    steps = np.arange(t)
    for i in range(t):
        ys = m[i:, i]
        if np.isfinite(ys).any():
            ax.plot(steps[i:], ys, marker="o", markersize=3, linewidth=1.2, label=labels[i])
    avg = average_accuracy_per_step(m)
    ax.plot(steps[: avg.size], avg, color="black", linestyle="--", linewidth=2.2, marker="s",
            markersize=4, label="average over seen tasks")
    ax.set_xticks(steps, [f"after {n}" for n in labels], rotation=45, ha="right")
    ax.set_ylabel("accuracy")
    ax.set_ylim(*_padded_range([m]))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return _save(fig, path, title, caption, dpi)


def _padded_range(mats: Sequence[np.ndarray]) -> tuple[float, float]:
    lo, hi = _value_range(mats)
    pad = 0.03 * (hi - lo)
    return lo - pad, hi + pad


def plot_average_accuracy_curves(
    curves: Mapping[str, Any],
    path: str | os.PathLike,
    *,
    names: Sequence[str] | None = None,
    title: str | None = None,
    caption: str | None = None,
    dpi: int = 150,
) -> Path:
    """Average accuracy over seen tasks after each step, one line per strategy.

    Args:
        curves: ``{label: R}``; matrices may differ in size (shorter runs end earlier).
        names: task names for the x ticks (default ``task<i>``).
    """
    if not curves:
        raise ValueError("plot_average_accuracy_curves needs at least one matrix")
    mats = {str(k): _matrix(v) for k, v in curves.items()}
    t = max(m.shape[0] for m in mats.values())
    labels = _names(names, t)
    fig = _figure(max(5.0, 0.5 * t + 3.5), 3.8)
    ax = fig.add_subplot(1, 1, 1)
    import matplotlib

    # More than 10 lines: tab20 colours and alternating dashes keep every line distinct.
    cmap = matplotlib.colormaps["tab10" if len(mats) <= 10 else "tab20"]
    for k, (label, m) in enumerate(mats.items()):
        avg = average_accuracy_per_step(m)
        last = f" (AA {avg[-1]:.3f})" if avg.size and math.isfinite(avg[-1]) else ""
        single = int(np.isfinite(avg).sum()) == 1  # e.g. joint training: one final point
        ax.plot(np.arange(avg.size), avg, marker="D" if single else "o",
                markersize=7 if single else 3, color=cmap(k % cmap.N),
                linestyle="-" if len(mats) <= 10 or k % 2 == 0 else "--",
                label=f"{label}{last}")
    ax.set_xticks(np.arange(t), [f"after {n}" for n in labels], rotation=45, ha="right")
    ax.set_ylabel("average accuracy over seen tasks")
    ax.set_ylim(*_padded_range(list(mats.values())))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return _save(fig, path, title, caption, dpi)


def plot_matrices_side_by_side(
    matrices: Mapping[str, Any],
    path: str | os.PathLike,
    *,
    names: Sequence[str] | None = None,
    title: str | None = None,
    caption: str | None = None,
    fmt: str = ".2f",
    dpi: int = 150,
) -> Path:
    """Heatmaps of several accuracy matrices on one shared colour scale, one panel per label."""
    if not matrices:
        raise ValueError("plot_matrices_side_by_side needs at least one matrix")
    mats = {str(k): _matrix(v) for k, v in matrices.items()}
    t = max(m.shape[0] for m in mats.values())
    side = max(3.2, 0.55 * t + 2.0)
    fig = _figure(side * len(mats) + 1.0, side + 0.4)
    vmin, vmax = _value_range(list(mats.values()))
    axes = [fig.add_subplot(1, len(mats), k + 1) for k in range(len(mats))]
    image = None
    for ax, (label, m) in zip(axes, mats.items()):
        image = _heatmap(ax, m, _names(names, m.shape[0]), vmin, vmax, fmt)
        ax.set_title(label, fontsize=10)
    for ax in axes[1:]:
        ax.set_ylabel("")
    fig.colorbar(image, ax=axes, fraction=0.025, pad=0.02, label="accuracy")
    return _save(fig, path, title, caption, dpi)
