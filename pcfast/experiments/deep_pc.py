"""``pcfast experiment deep-pc``: the PC variants on deep residual nets, against BP.

For each net (Res-DualNet and the CIFAR ResNet-18 by default; ``--nets`` picks, ``resnet20`` is
the CPU-sized one) it trains (``--rules`` picks among them), on the same data, epochs and weight
optimizer (preset
``pc-vs-bp``: Adam 1e-3, batch 128, flip + crop, per-channel normalisation, 20 epochs):

=============  ==============================================================================
``bp``         backprop on the cross-entropy
``fpa``        PC under the fixed prediction assumption: the seed's jacobi schedule, T=100,
               rate 0.5
``strict``     strict PC, sequential schedule (one sweep reaches every node), T=2, rate 0.5
``ipc``        incremental PC: the same, the weights stepping at both inference steps
``epc``        error-based PC, T=5, rate 0.001 (the ePC paper's ResNet-18 / CIFAR-10 CE
               setting: 5 iterations, error learning rate 0.001)
``precision``  strict PC as above with every node's energy weighted by ``decaying(4, 0.5)``
               (4 at the first step, towards 1; rate 0.125, so that the first step's
               ``rate x pi`` is the strict row's 0.5): pcfast's example schedule, not a paper's
=============  ==============================================================================

``--quick`` checks it end to end on a CPU in a few minutes (its T is capped at 3, on top of the
usual tiny data and two optimizer steps: its numbers mean nothing); the full length is for a GPU
(FPA at T=100 costs about 50 BP steps per batch on a CPU). Writes ``curves.png`` and
``summary.md`` (final and best test accuracy, median seconds per epoch, and for adaptive runs
the mean inference steps).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pcfast.experiments import register_experiment
from pcfast.experiments.report import (
    final_metrics,
    markdown_table,
    median_epoch_seconds,
    pct,
    plot_error_panels,
    write_summary,
)
from pcfast.experiments.runner import chosen_nets, chosen_rules, run_dir, train_run

NAME = "deep-pc"
PRESET = "pc-vs-bp"  # registered by pcfast.experiments.pc_vs_bp
NETS = {"resdualnet": ("resdualnet", {}), "resnet18": ("resnet18", {}),
        "resnet20": ("resnet20", {})}
DEFAULT_NETS = ("resdualnet", "resnet18")
QUICK_T = 3

RULES: dict[str, dict[str, Any]] = {
    "bp": dict(rule="bp"),
    "fpa": dict(rule="pc", fpa=True, schedule="jacobi", T=100, rate=0.5),
    "strict": dict(rule="pc", fpa=False, schedule="sequential", T=2, rate=0.5),
    "ipc": dict(rule="pc", fpa=False, ipc=True, schedule="sequential", T=2, rate=0.5),
    "epc": dict(rule="pc", fpa=False, epc=True, schedule="jacobi", T=5, rate=0.001),
    # rate 0.125 = 0.5 / 4: the first step moves each node as far as the strict row's does;
    # at rate 0.5 the weighted first step overshoots (rate x 4 >= 2) and the run cannot learn.
    "precision": dict(rule="pc", fpa=False, schedule="sequential", T=2, rate=0.125,
                      precision={"*": {"decaying": [4.0, 0.5]}}),
}


def describe(options: dict[str, Any]) -> str:
    """A one-line label of a rule's options."""
    if options["rule"] == "bp":
        return "BP"
    kind = ("ePC" if options.get("epc") else "iPC" if options.get("ipc")
            else "FPA" if options["fpa"] else "strict")
    extra = " precision decaying(4, 0.5)" if options.get("precision") else ""
    return f"PC {kind} {options['schedule']} T={options['T']} rate {options['rate']}{extra}"


def rows_options(args: Any, name: str) -> dict[str, Any]:
    """The options run ``name`` (``{net}-{rule}``) trained with (T capped under --quick)."""
    options = RULES[name.split("-", 1)[1]]
    if getattr(args, "quick", False) and "T" in options:
        options = {**options, "T": min(options["T"], QUICK_T)}
    return options


def run(args: Any) -> dict[str, list[dict[str, Any]]]:
    """Train every (net, rule) run (resuming), then plot and tabulate."""
    import pcfast.experiments.pc_vs_bp  # noqa: F401  (registers the shared preset)

    out = run_dir(args, NAME)
    nets = chosen_nets(args, NAME, NETS, DEFAULT_NETS)
    labels = chosen_rules(args, NAME, tuple(RULES))
    results: dict[str, list[dict[str, Any]]] = {}
    for net in nets:
        model, kwargs = NETS[net]
        for label in labels:
            name = f"{net}-{label}"
            results[name] = train_run(args, NAME, name, PRESET, model=model,
                                      model_kwargs=kwargs, **rows_options(args, name))
    report(args, results, out)
    return results


def report(args: Any, results: dict[str, list[dict[str, Any]]], out: Path) -> None:
    """``curves.png`` and ``summary.md`` in ``out`` from the runs' metric rows (``{net}-{rule}``
    -> rows), e.g. reloaded from their ``metrics.jsonl``."""
    nets = list(dict.fromkeys(name.split("-", 1)[0] for name in results))
    plot_error_panels({net: {k.split("-", 1)[1]: v for k, v in results.items()
                             if k.startswith(f"{net}-")} for net in nets},
                      out / "curves.png", x="epoch")
    table = []
    for name, rows in results.items():
        m = final_metrics(rows)
        table.append([name, describe(rows_options(args, name)), m["epochs"],
                      pct(m["final_train_error"]), pct(m["test_acc"]),
                      pct(1 - m["best_test_error"]),
                      median_epoch_seconds(rows)])
    sections = [
        f"Preset `{PRESET}` for every run (Adam 1e-3, batch 128, flip + crop, per-channel "
        "normalisation).",
        markdown_table(["run", "rule", "epochs", "train error %", "final test acc %",
                        "best test acc %", "s/epoch (median)"], table),
        "![curves](curves.png)",
    ]
    write_summary(out / "summary.md", "PC variants on deep residual nets", sections)


register_experiment(NAME, run, "BP, FPA, strict PC, iPC, ePC and precision-weighted PC on "
                               "Res-DualNet and ResNet-18")
