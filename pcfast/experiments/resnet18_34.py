"""``pcfast experiment resnet18-34``: CIFAR ResNet-18 and ResNet-34 under the ``resnet18-cifar``
recipe (SGD 0.9, wd 1e-4, batch 256, lr 0.1 divided by 10 on validation plateaus).

Writes ``curves.png`` and ``summary.md`` into the run directory.
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
from pcfast.models import build_model, count_parameters

NAME = "resnet18-34"
MODELS = ("resnet18", "resnet34")


def run(args: Any) -> dict[str, list[dict[str, Any]]]:
    """Train both nets (resuming), plot and tabulate."""
    out = run_dir(args, NAME)
    results = {m: train_run(args, NAME, m, "resnet18-cifar", model=m) for m in MODELS}
    plot_error_panels({"CIFAR ResNet-18 / 34": results}, out / "curves.png", x="epoch")
    rows = []
    for name in MODELS:
        m = final_metrics(results[name])
        lr = results[name][-1]["lr"]
        rows.append([name, f"{count_parameters(build_model(name)):,}", m["epochs"],
                     f"{lr:g}", pct(m["final_train_error"]), pct(m["final_val_error"]),
                     pct(m["final_test_error"]), pct(m["best_test_error"])])
    table = markdown_table(["net", "params", "epochs", "final lr", "train error %",
                            "val error %", "test error %", "best test error %"], rows)
    write_summary(out / "summary.md", "CIFAR ResNet-18 and ResNet-34", [table,
                                                                      "![curves](curves.png)"])
    return results


register_experiment(NAME, run, "CIFAR ResNet-18 and ResNet-34 with their recipe")
