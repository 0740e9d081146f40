"""The DTP comparison figure: error curves, reconstruction error per ``g_i``, class accuracy."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from pcfast.train.plots import save_figure  # noqa: E402

Rows = list[dict[str, Any]]


def recon_keys(rows: Rows) -> list[str]:
    """The ``recon_err/g*`` keys found in ``rows``, in layer order."""
    keys = {k for r in rows for k in r if k.startswith("recon_err/g")}
    return sorted(keys, key=lambda k: int(k.rsplit("g", 1)[1]))


def plot_dtp_comparison(runs: Mapping[str, Rows], path: Path,
                        classes: Sequence[str]) -> Path:
    """Write one PNG with three panels for the runs in ``runs`` (label -> metric rows).

    1. train error (dashed) and test error (solid) per epoch;
    2. reconstruction error of each ``g_i`` per epoch (runs that report it, log scale);
    3. final per-class test accuracy, grouped bars (``test_acc_per_class``, one per class).

    Example::

        plot_dtp_comparison({"DTP": dtp_rows, "BP": bp_rows}, Path("dtp.png"), CLASSES)
    """
    if not runs or not all(runs.values()):
        raise ValueError("every run needs at least one metric row: train at least one epoch")
    fig, axes = plt.subplots(1, 3, figsize=(16, 4), gridspec_kw={"width_ratios": [1, 1, 1.6]})
    err_ax, rec_ax, cls_ax = axes
    for i, (label, rows) in enumerate(runs.items()):
        color = f"C{i % 10}"
        xs = [r["epoch"] for r in rows]
        err_ax.plot(xs, [100 * (1 - r["test_acc"]) for r in rows], "-", color=color,
                    marker="o", markersize=2, label=f"{label} test")
        train = [(r["epoch"], 100 * r["train_error"]) for r in rows
                 if r.get("train_error") is not None]
        if train:
            err_ax.plot(*zip(*train), "--", color=color, linewidth=1, label=f"{label} train")
        for j, key in enumerate(recon_keys(rows)):
            pts = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
            rec_ax.plot(*zip(*pts), color=color, linestyle=("-", "--", ":", "-.")[j % 4],
                        marker="o", markersize=2, label=f"{label} {key.split('/')[1]}")
    err_ax.set(title="error per epoch", xlabel="epoch", ylabel="error (%)")
    rec_ax.set(title="reconstruction error of g_i (held-out)", xlabel="epoch",
               ylabel="mean squared error")
    if rec_ax.get_legend_handles_labels()[0]:
        rec_ax.set_yscale("log")
        rec_ax.legend(fontsize=7)
    width = 0.8 / len(runs)
    for i, (label, rows) in enumerate(runs.items()):
        per_class = rows[-1].get("test_acc_per_class") or []
        if per_class:
            xs = [c + (i - (len(runs) - 1) / 2) * width for c in range(len(per_class))]
            cls_ax.bar(xs, [100 * a for a in per_class], width, label=label, color=f"C{i % 10}")
    cls_ax.set_xticks(range(len(classes)), list(classes), fontsize=8)
    cls_ax.set(title="final test accuracy per class", ylabel="accuracy (%)", ylim=(0, 100))
    for ax in axes:
        ax.grid(alpha=0.3)
    err_ax.legend(fontsize=7)
    cls_ax.legend(fontsize=8)
    return save_figure(fig, path)
