"""``pcfast experiment dtp``: DTP vs BP on the same MLP, data, epochs and optimizer settings.

Both runs use the ``dtp-baseline`` preset (3072-1000-1000-1000-10 tanh ``dtp-mlp``); the BP run
trains the same module's forward layers with backprop on the NLL. Writes ``dtp.png`` (error
curves, reconstruction errors of each ``g_i``, per-class test accuracy) and ``summary.md``
(one table: final/best accuracy, train error and per-class test accuracy of both rules).
"""

from __future__ import annotations

from typing import Any

from pcfast.data import CLASSES
from pcfast.dtp.plots import plot_dtp_comparison, recon_keys
from pcfast.experiments import register_experiment
from pcfast.experiments.report import final_metrics, markdown_table, pct, write_summary
from pcfast.experiments.runner import run_dir, train_run

NAME = "dtp"
PRESET = "dtp-baseline"


def summary_rows(results: dict[str, list[dict[str, Any]]]) -> list[list[Any]]:
    """One table row per run: rule, epochs, train error, final and best test accuracy, classes."""
    rows = []
    for label, metric_rows in results.items():
        m = final_metrics(metric_rows)
        per_class = metric_rows[-1].get("test_acc_per_class") or [None] * len(CLASSES)
        rows.append([label, m["epochs"], pct(m["final_train_error"]), pct(m["test_acc"]),
                     pct(1 - m["best_test_error"]), *(pct(a, 1) for a in per_class)])
    return rows


def run(args: Any) -> dict[str, list[dict[str, Any]]]:
    """Train DTP and BP (resuming), then plot and tabulate them side by side."""
    out = run_dir(args, NAME)
    results = {
        "DTP": train_run(args, NAME, "dtp", PRESET),
        "BP": train_run(args, NAME, "bp", PRESET, rule="bp", rule_options={}),
    }
    plot_dtp_comparison(results, out / "dtp.png", CLASSES)
    recon = recon_keys(results["DTP"])
    last = results["DTP"][-1]
    sections = [
        "Same MLP (`dtp-mlp`, 3072-1000-1000-1000-10, tanh), data, epochs and Adam settings "
        f"(preset `{PRESET}`); the BP run ignores the feedback layers.",
        markdown_table(["rule", "epochs", "train error %", "final test acc %", "best test acc %",
                        *CLASSES], summary_rows(results)),
        "Final reconstruction error of the feedback layers (held-out, mean squared): "
        + ", ".join(f"{k.split('/')[1]} {last[k]:.4g}" for k in recon),
        "![DTP vs BP](dtp.png)",
    ]
    write_summary(out / "summary.md", "DTP vs BP on the CIFAR-10 MLP", sections)
    return results


register_experiment(NAME, run, "DTP vs BP on the same MLP: one table and one plot")
