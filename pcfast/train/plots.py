"""The curves of a run as a PNG: loss, accuracy and, where present, energy and other series."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.ticker import MaxNLocator  # noqa: E402


def save_figure(fig, path: Path) -> Path:
    """Lay out ``fig``, write it to ``path`` (PNG, parents created) and close it."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["epoch"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_curves(rows: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Write ``path`` (PNG) with one panel per family of metrics found in ``rows``."""
    return save_figure(curves_figure(rows, title), path)


def curves_figure(rows: list[dict[str, Any]], title: str = ""):
    """The figure of :func:`plot_curves`: one panel per family of metrics, ``title`` on top."""
    panels: list[tuple[str, list[str]]] = [
        ("loss", ["train_loss", "val_loss", "test_loss"]),
        ("accuracy", ["train_acc", "val_acc", "test_acc"]),
    ]
    if any("energy" in r for r in rows):
        panels.append(("PC energy per sample", ["energy"]))
    groups: dict[str, list[str]] = {}
    for r in rows:
        for k, v in r.items():
            if "/" in k and isinstance(v, (int, float)):
                groups.setdefault(k.split("/")[0], [])
                if k not in groups[k.split("/")[0]]:
                    groups[k.split("/")[0]].append(k)
    panels += sorted(groups.items())
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (name, keys) in zip(axes[0], panels):
        for key in keys:
            xs, ys = _series(rows, key)
            if xs:
                ax.plot(xs, ys, marker="o", markersize=3, label=key)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
