"""``pcfast experiment preprocessing``: the three preprocessing variants of the He et al. study
on the same ResNet-20 and the ``he-cifar`` recipe.

Variants (all fitted on the 45k training images only): per-pixel mean subtraction on the
0..255 scale (``pixel-mean``), the same divided by 255 (``pixel-mean-div255``), and that
ZCA-whitened (``zca``). Writes ``curves.png`` and ``summary.md`` into the run directory.
"""

from __future__ import annotations

from typing import Any

from pcfast.experiments import register_experiment
from pcfast.experiments.report import (
    final_metrics,
    markdown_table,
    pct,
    plot_error_panels,
    write_summary,
)
from pcfast.experiments.runner import run_dir, train_run

NAME = "preprocessing"
MODEL = "resnet20"
VARIANTS = {
    "pixel-mean": "per-pixel mean subtracted, 0..255 scale",
    "pixel-mean-div255": "per-pixel mean subtracted, divided by 255",
    "zca": "per-pixel mean subtracted / 255, then ZCA-whitened (eps 1e-2)",
}


def run(args: Any) -> dict[str, list[dict[str, Any]]]:
    """Train ResNet-20 once per variant (resuming), plot and tabulate."""
    out = run_dir(args, NAME)
    results = {v: train_run(args, NAME, v, "he-cifar", model=MODEL, preprocess=v)
               for v in VARIANTS}
    plot_error_panels({"ResNet-20, preprocessing": results}, out / "curves.png")
    rows = []
    for v, desc in VARIANTS.items():
        m = final_metrics(results[v])
        rows.append([v, desc, m["steps"], pct(m["final_train_error"]),
                     pct(m["final_val_error"]), pct(m["final_test_error"]),
                     pct(m["best_test_error"])])
    table = markdown_table(["preprocessing", "what", "iterations", "train error %",
                            "val error %", "test error %", "best test error %"], rows)
    write_summary(out / "summary.md", "Preprocessing variants on ResNet-20 (CIFAR-10)",
                  [table, "![curves](curves.png)"])
    return results


register_experiment(NAME, run, "per-pixel mean, /255 and ZCA preprocessing on ResNet-20")
