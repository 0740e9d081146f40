"""``pcfast experiment seed-gap``: BP and PC on Res-DualNet with the seed's recipe, CPU-sized PC.

The seed trained Res-DualNet with PC at T=100 (jacobi) for 25 epochs; at about 100 s per batch
on a 2-core CPU that run is out of reach there. This experiment keeps the seed's recipe for both
rules (presets ``seed-bp`` and ``seed-pc``: the seed's initialisation, Adam 0.01, step decay
x0.1 at 40 % and 80 % of the epochs, flip-only augmentation, the seed's CIFAR-10 normalisation;
BP at batch 128, PC at 256) and runs PC with the demo's inference instead (FPA, sequential
schedule, T=2, rate 0.5: one top-down sweep reaches every node), so that the gap PC - BP on the
seed's net can be measured on a CPU:

========  ==================================================================================
``bp``    backprop on the cross-entropy (``seed-bp``)
``pc``    PC, FPA, sequential T=2, rate 0.5 (``seed-pc`` with the demo's inference)
========  ==================================================================================

``--epochs E`` (default the seed's 25) scales the learning-rate milestones with it (10 and 20 of
25 epochs: ``round(0.4 E)`` and ``round(0.8 E)``). Writes ``curves.png`` and ``summary.md``
(final and best test accuracy, median seconds per epoch, the seed's published figures beside).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pcfast.experiments import register_experiment
from pcfast.experiments.report import (
    equal_epoch_gaps,
    final_metrics,
    markdown_table,
    median_epoch_seconds,
    pct,
    plot_error_panels,
    write_summary,
)
from pcfast.experiments.runner import chosen_rules, run_dir, train_run
from pcfast.train.presets import PRESETS

NAME = "seed-gap"
SEED_EPOCHS = PRESETS["seed-pc"]["epochs"]  # 25, milestones (10, 20): the seed's schedule
RULES: dict[str, tuple[str, dict[str, Any]]] = {
    "bp": ("seed-bp", {}),
    "pc": ("seed-pc", dict(schedule="sequential", T=2, rate=0.5)),
}
# The seed's published figures (25 epochs; PC at jacobi T=100, GPU): final and best test acc.
SEED_FIGURES = {"bp": "87.85 % (BP, same net)", "pc": "86.50 % final / 86.96 % best (T=100)"}


def scaled_milestones(epochs: int) -> tuple[int, ...]:
    """The seed's milestones (10 and 20 of 25 epochs) at the same fractions of ``epochs``; the
    ones that would fall on epoch 0 or at/after the end are left out."""
    steps = (round(m * epochs / SEED_EPOCHS) for m in PRESETS["seed-pc"]["milestones"])
    return tuple(sorted({m for m in steps if 0 < m < epochs}))


def epochs_of(args: Any) -> int:
    epochs = getattr(args, "epochs", None) or SEED_EPOCHS
    if epochs < 1:
        raise ValueError(f"{NAME}: --epochs must be at least 1, got {epochs}")
    return epochs


def run(args: Any) -> dict[str, list[dict[str, Any]]]:
    """Train the BP and PC runs (resuming), then plot and tabulate."""
    out = run_dir(args, NAME)
    labels = chosen_rules(args, NAME, tuple(RULES))
    milestones = scaled_milestones(epochs_of(args))
    results: dict[str, list[dict[str, Any]]] = {}
    for label in labels:
        preset, options = RULES[label]
        results[label] = train_run(args, NAME, label, preset, milestones=milestones,
                                   download=False, **options)
    report(args, results, out)
    return results


def describe(label: str) -> str:
    preset, options = RULES[label]
    if not options:
        return f"BP (`{preset}`)"
    return (f"PC FPA {options['schedule']} T={options['T']} rate {options['rate']} "
            f"(`{preset}`, batch {PRESETS[preset]['batch_size']})")


def report(args: Any, results: dict[str, list[dict[str, Any]]], out: Path) -> None:
    """``curves.png`` and ``summary.md`` of the runs (label -> metric rows)."""
    plot_error_panels({"Res-DualNet": results}, out / "curves.png", x="epoch")
    finals = {label: final_metrics(rows) for label, rows in results.items()}
    table = []
    for label, rows in results.items():
        m = finals[label]
        table.append([label, describe(label), m["epochs"], pct(m["final_train_error"]),
                      pct(m["test_acc"]), pct(1 - m["best_test_error"]),
                      median_epoch_seconds(rows), SEED_FIGURES[label]])
    epochs = epochs_of(args)
    sections = [
        f"The seed's recipe at {epochs} epochs (learning rate x0.1 after epochs "
        f"{', '.join(map(str, scaled_milestones(epochs))) or 'none'}); PC with the demo's "
        "inference (sequential, T=2) instead of the seed's jacobi T=100.",
        markdown_table(["run", "rule", "epochs", "train error %", "final test acc %",
                        "best test acc %", "s/epoch (median)", "seed's figure (25 epochs)"],
                       table),
    ]
    if not getattr(args, "iterations", None):  # an epoch budget: say which runs are unfinished
        unfinished = [f"`{label}` has {m['epochs']} of {epochs} epochs"
                      for label, m in finals.items() if m["epochs"] < epochs]
        if unfinished:
            sections.append("Still training: " + "; ".join(unfinished) + ". The same command "
                            "resumes from the last finished epoch; until then compare at equal "
                            "epochs (below), not the final columns.")
    if "bp" in results and "pc" in results:
        gaps = equal_epoch_gaps(results["bp"], results["pc"])
        sections.append("Test accuracy at equal epochs (same recipe, same point of the "
                        "schedule):\n\n" + markdown_table(
                            ["epoch", "BP test acc %", "PC test acc %", "PC - BP (points)"],
                            [[e, pct(bp), pct(pc), f"{100 * gap:+.2f}"]
                             for e, bp, pc, gap in gaps]))
    sections.append("![curves](curves.png)")
    write_summary(out / "summary.md", "BP vs PC on Res-DualNet, the seed's recipe", sections)


register_experiment(NAME, run, "BP vs PC (sequential T=2) on Res-DualNet with the seed's recipe, "
                               "milestones scaled to --epochs")
