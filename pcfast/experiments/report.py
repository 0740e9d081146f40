"""Reporting for the experiments: final numbers of a run, Markdown tables, comparison plots."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from pcfast.train.plots import save_figure  # noqa: E402

Rows = list[dict[str, Any]]


def pct(value: float | None, digits: int = 2) -> str:
    """``0.0875 -> "8.75"``; ``None -> "—"``."""
    return "—" if value is None else f"{100 * value:.{digits}f}"


def final_metrics(rows: Rows) -> dict[str, Any]:
    """Final and best errors of one run's metric rows (fractions, not percent).

    Returns ``epochs``, ``steps``, ``final_train_error``, ``final_test_error``,
    ``best_test_error``, ``final_val_error`` (None without a validation split), ``test_acc``.

    Example::

        final_metrics([{"epoch": 1, "step": 10, "train_error": 0.5, "test_acc": 0.6}])
    """
    if not rows:
        raise ValueError("the run has no metric rows yet: train at least one epoch")
    last = rows[-1]
    test_errors = [1 - r["test_acc"] for r in rows if r.get("test_acc") is not None]
    val = last.get("val_acc")
    return {
        "epochs": last["epoch"],
        "steps": last.get("step"),
        "final_train_error": last.get("train_error"),
        "final_test_error": test_errors[-1] if test_errors else None,
        "best_test_error": min(test_errors) if test_errors else None,
        "final_val_error": None if val is None else 1 - val,
        "test_acc": last.get("test_acc"),
    }


def equal_epoch_gaps(base: Rows, other: Rows) -> list[tuple[int, float, float, float]]:
    """Test accuracy of two runs at every epoch both have finished, and the gap ``other - base``.

    Returns ``(epoch, base acc, other acc, other - base)`` tuples (fractions), in epoch order;
    only each run's last row per epoch counts (a resumed epoch appears once). The comparison a
    run still in progress allows: the same recipe at the same point of its schedule.

    Example::

        equal_epoch_gaps([{"epoch": 1, "test_acc": 0.6}], [{"epoch": 1, "test_acc": 0.55}])
        # [(1, 0.6, 0.55, -0.05)]  (up to rounding)
    """
    def by_epoch(rows: Rows) -> dict[int, float]:
        return {r["epoch"]: r["test_acc"] for r in rows if r.get("test_acc") is not None}

    a, b = by_epoch(base), by_epoch(other)
    return [(e, a[e], b[e], b[e] - a[e]) for e in sorted(a.keys() & b.keys())]


# A CPU epoch whose training got at least this share of its threads' time had the cores to
# itself (``cpu_busy`` in the metric rows; 0.99 measured on a quiet 2-core machine, 0.5-0.7
# with a second training job running).
UNCONTENDED = 0.9


def median_epoch_seconds(rows: Rows) -> str:
    """The median of the rows' ``epoch_seconds`` as a table cell (``"—"`` without any).

    CPU rows carry ``cpu_busy``: where some epochs shared the CPU with other jobs the median is
    taken over the others and the cell says over how many; where all did, it says so. A run
    resumed across versions has rows without the field (trained before it was recorded): those
    count as unmeasured, and the cell says "measured alone" then.
    """
    timed = [r for r in rows if r.get("epoch_seconds") is not None]
    if not timed:
        return "—"
    median = statistics.median(r["epoch_seconds"] for r in timed)
    busy = [r.get("cpu_busy") for r in timed]
    known = [b for b in busy if b is not None]
    measured_all = len(known) == len(busy)
    if not known or (measured_all and min(known) >= UNCONTENDED):
        return f"{median:.1f}"
    clean = [r["epoch_seconds"] for r, b in zip(timed, busy) if b is not None and b >= UNCONTENDED]
    if not clean:
        return f"{median:.1f} ({'every epoch shared' if measured_all else 'no epoch measured alone on'}" \
            " the CPU)"
    alone = "alone" if measured_all else "measured alone"
    return f"{statistics.median(clean):.1f} ({len(clean)} of {len(timed)} epochs {alone} on the CPU)"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table; numbers right-aligned, text left-aligned.

    Example::

        markdown_table(["model", "params"], [["resnet20", "269,722"]])
    """
    if any(len(r) != len(headers) for r in rows):
        raise ValueError(f"every row needs {len(headers)} cells")

    def numeric(col: int) -> bool:
        cells = [str(r[col]).replace(",", "").replace("%", "") for r in rows]
        try:
            for c in cells:
                if c != "—":
                    float(c)
        except ValueError:
            return False
        return bool(cells)

    align = ["---:" if numeric(i) else ":---" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def plot_error_panels(panels: Mapping[str, Mapping[str, Rows]], path: Path,
                      x: str = "step") -> Path:
    """One panel per entry: training error (dashed) and test error (solid) of every run.

    ``panels`` maps a panel title to ``{run label: metric rows}``; ``x`` is ``"step"``
    (iterations, as in He et al.'s Figure 6) or ``"epoch"``. Writes a PNG and returns its path.
    """
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    for ax, (title, runs) in zip(axes[0], panels.items()):
        for i, (label, rows) in enumerate(runs.items()):
            color = f"C{i % 10}"
            xs = [r[x] for r in rows]
            train = [100 * r["train_error"] for r in rows if r.get("train_error") is not None]
            test = [100 * (1 - r["test_acc"]) for r in rows]
            if len(train) == len(xs):
                ax.plot(xs, train, "--", color=color, linewidth=1)
            ax.plot(xs, test, "-", color=color, linewidth=1.6, label=label, marker="o",
                    markersize=2)
        ax.set_title(title)
        ax.set_xlabel("iteration" if x == "step" else x)
        ax.set_ylabel("error (%)  — test, - - train")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def write_summary(path: Path, title: str, sections: Sequence[str]) -> Path:
    """Write a Markdown file: ``# title`` then the sections separated by blank lines."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {title}\n\n" + "\n\n".join(s.strip() for s in sections) + "\n")
    return path
