"""``pcfast experiment resnet-depth``: plain nets vs ResNets at depth 20/32/44/56 (He et al.
2016, Figure 6 and Table 6), under the ``he-cifar`` recipe.

Writes ``degradation.png`` (training and test error per depth, plain left, ResNet right) and
``summary.md`` (final errors next to the paper's) into the run directory.
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

NAME = "resnet-depth"
DEPTHS = (20, 32, 44, 56)
# He et al. 2016, Table 6: CIFAR-10 test error (%) of the option-A ResNets.
PAPER_RESNET_ERROR = {20: 8.75, 32: 7.51, 44: 7.17, 56: 6.97, 110: 6.43}


def run(args: Any) -> dict[str, dict[int, list[dict[str, Any]]]]:
    """Train the eight nets (resuming any that are done or half done), plot and tabulate."""
    out = run_dir(args, NAME)
    results: dict[str, dict[int, list[dict[str, Any]]]] = {"plain": {}, "resnet": {}}
    for kind in ("plain", "resnet"):
        for depth in DEPTHS:
            results[kind][depth] = train_run(args, NAME, f"{kind}{depth}", "he-cifar",
                                             model=f"{kind}{depth}")
    plot_error_panels({"plain":
                       {f"plain-{d}": results["plain"][d] for d in DEPTHS},
                       "ResNet (option A)": {f"ResNet-{d}": results["resnet"][d] for d in DEPTHS}},
                      out / "degradation.png")
    write_summary(out / "summary.md", "Plain nets vs ResNets on CIFAR-10", sections(results))
    return results


def sections(results: dict[str, dict[int, list[dict[str, Any]]]]) -> list[str]:
    """The Markdown table and the degradation verdict of a finished experiment."""
    table = []
    for kind in ("plain", "resnet"):
        for depth in DEPTHS:
            m = final_metrics(results[kind][depth])
            paper = PAPER_RESNET_ERROR[depth] if kind == "resnet" else None
            params = count_parameters(build_model(f"{kind}{depth}"))
            table.append([f"{'ResNet' if kind == 'resnet' else 'plain'}-{depth}", f"{params:,}",
                          m["steps"], pct(m["final_train_error"]), pct(m["final_test_error"]),
                          pct(m["best_test_error"]), "—" if paper is None else f"{paper:.2f}"])
    headers = ["net", "params", "iterations", "train error %", "test error %",
               "best test error %", "paper test error %"]
    plain = [final_metrics(results["plain"][d])["final_train_error"] for d in DEPTHS]
    worse = all(a is not None and b is not None and b >= a for a, b in zip(plain, plain[1:]))
    verdict = (
        "Plain nets: the final training error "
        + ("grows" if worse else "does not grow monotonically")
        + " with depth in this run ("
        + ", ".join(f"plain-{d} {pct(e)} %" for d, e in zip(DEPTHS, plain))
        + "). The paper (Figure 6) reports that deeper plain nets have higher training and test "
        "error, while ResNets improve with depth (Table 6)."
    )
    note = ("Paper numbers: He et al. 2016, Table 6 (option-A ResNets, 64k iterations, "
            "45k/5k split). Runs shortened with --epochs/--iterations/--quick are not comparable.")
    return [markdown_table(headers, table), verdict, note, "![degradation](degradation.png)"]


register_experiment(NAME, run, "plain vs ResNet at depth 20/32/44/56 (He et al. Fig. 6, Table 6)")
