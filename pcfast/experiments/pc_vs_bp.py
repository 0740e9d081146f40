"""``pcfast experiment pc-vs-bp``: PC against BP on the same small conv nets, two seeds each.

For each net (the zoo's ``cnn`` and ``rescnn``, ``--nets`` picks) and each of two seeds
(``--seed`` and ``--seed + 1``; ``--seeds N`` for N) it trains three rules (``--rules`` picks)
on the same data, epochs and weight
optimizer (preset ``pc-vs-bp``: Adam 1e-3, batch 128, pad-4 crop + flip, per-channel
normalisation, 20 epochs):

- ``bp``: backprop on the cross-entropy;
- ``fpa``: PC under the fixed prediction assumption, jacobi schedule, rate 0.5 and
  ``T = 3 x depth`` (the seed's convention: errors need ``depth`` jacobi steps to reach the input);
- ``strict``: strict PC (predictions recomputed every step), sequential schedule (one sweep
  reaches every node), T=3, rate 0.2 (``STRICT_RATE``: at 0.5 strict inference diverges on
  these nets, see there).

Writes ``curves.png`` (test and training error per epoch) and ``summary.md``: per run the final
and best test accuracy and the median seconds per epoch; per net and PC rule the gap PC - BP in
best test accuracy, as the mean over the seeds with the spread (half the range) across them.
A run with fewer epochs than planned (still training, resumable) is listed as such and left out
of the gaps until it finishes.
"""

from __future__ import annotations

import statistics
from typing import Any

from pcfast.experiments import register_experiment
from pcfast.experiments.model_zoo import ZOO
from pcfast.experiments.report import (
    final_metrics,
    markdown_table,
    median_epoch_seconds,
    pct,
    plot_error_panels,
    write_summary,
)
from pcfast.experiments.runner import (
    chosen_nets,
    chosen_rules,
    planned_epochs,
    run_dir,
    train_run,
)
from pcfast.models import build_model
from pcfast.train.presets import register_preset

NAME = "pc-vs-bp"
PRESET = "pc-vs-bp"
NETS = ("cnn", "rescnn")
SEEDS = 2
RULES = ("bp", "fpa", "strict")  # the keys of rule_options(net), in training order
# Strict PC's inference is gradient descent on the energy, whose curvature in x_u is
# I + J^T J (the children's terms): stable only for rate < 2 / (1 + ||J||^2). On cnn at rate
# 0.5 the energy rises from the 4th sequential step (at init; from the 2nd on trained weights)
# and at T=3 the middle layers' weight gradients point against BP's (cosines -0.1 to -0.4);
# at 0.2 it falls for the first 6 steps on trained weights too, and T=3 gives cosines 0.65-1.
# FPA's error dynamics are triangular with diagonal 1 - rate: the seed's 0.5 is stable there.
STRICT_RATE = 0.2

register_preset(PRESET, dict(
    model="cnn", rule="bp", optimizer="adam", lr=1e-3, batch_size=128, epochs=20,
    lr_schedule="constant", augment="flip-crop", preprocess="channel", pc_backend="auto"))


def graph_depth(net: str) -> int:
    """Depth (longest input-to-output path in nodes) of the zoo net's PC graph."""
    model, kwargs = ZOO[net]
    return build_model(model, **kwargs).pc_graph().depth


def rule_options(net: str) -> dict[str, dict[str, Any]]:
    """The three rules' training options for ``net`` (label -> options)."""
    return {
        "bp": dict(rule="bp"),
        "fpa": dict(rule="pc", fpa=True, schedule="jacobi", rate=0.5, T=3 * graph_depth(net)),
        "strict": dict(rule="pc", fpa=False, schedule="sequential", rate=STRICT_RATE, T=3),
    }


def gap_rows(results: dict[str, list[dict[str, Any]]], nets, seeds,
             epochs: int | None = None) -> list[list[Any]]:
    """Per net and PC rule: best test accuracy gap PC - BP, mean over seeds and half-range
    (over the seeds that trained both, each to ``epochs`` epochs where given; a rule without
    any such seed has no row)."""

    def finished(run: list[dict[str, Any]] | None) -> bool:
        return bool(run) and (epochs is None or final_metrics(run)["epochs"] >= epochs)

    rows = []
    for net in nets:
        for label in RULES[1:]:
            gaps = []
            for s in seeds:
                pc_run, bp_run = results.get(f"{net}-{label}-s{s}"), results.get(f"{net}-bp-s{s}")
                if not finished(pc_run) or not finished(bp_run):
                    continue
                pc = final_metrics(pc_run)["best_test_error"]
                bp = final_metrics(bp_run)["best_test_error"]
                gaps.append(bp - pc)  # accuracy PC - BP = error BP - error PC
            if not gaps:
                continue
            spread = (max(gaps) - min(gaps)) / 2
            rows.append([net, label, len(gaps), f"{100 * statistics.mean(gaps):+.2f}",
                         f"{100 * spread:.2f}"])
    return rows


def run(args: Any) -> dict[str, list[dict[str, Any]]]:
    """Train every (net, rule, seed) run (resuming), then plot and tabulate."""
    out = run_dir(args, NAME)
    nets = chosen_nets(args, NAME, NETS, NETS)
    labels = chosen_rules(args, NAME, RULES)
    base_seed = getattr(args, "seed", 0)
    count = getattr(args, "seeds", None)
    count = SEEDS if count is None else count
    if count < 1:
        raise ValueError(f"{NAME}: --seeds must be at least 1, got {count}")
    seeds = [base_seed + i for i in range(count)]
    results: dict[str, list[dict[str, Any]]] = {}
    for net in nets:
        model, kwargs = ZOO[net]
        for label, options in rule_options(net).items():
            if label not in labels:
                continue
            for s in seeds:
                name = f"{net}-{label}-s{s}"
                results[name] = train_run(_with_seed(args, s), NAME, name, PRESET, model=model,
                                          model_kwargs=kwargs, **options)
    report(out, results, nets, seeds, planned_epochs(args, PRESET))
    return results


def report(out, results: dict[str, list[dict[str, Any]]], nets, seeds,
           epochs: int | None = None) -> None:
    """``curves.png`` and ``summary.md`` of the runs ``{net}-{rule}-s{seed}`` in ``results``;
    ``epochs``: the planned length (None under a step budget), against which runs count as
    unfinished."""
    settings = {f"{net}-{label}-s{s}": options for net in nets
                for label, options in rule_options(net).items() for s in seeds}
    panels = {net: {k: v for k, v in results.items() if k.startswith(f"{net}-")} for net in nets}
    plot_error_panels(panels, out / "curves.png", x="epoch")
    finals = {name: final_metrics(rows) for name, rows in results.items()}
    table = []
    for name, rows in results.items():
        m = finals[name]
        o = settings[name]
        rule = "BP" if o["rule"] == "bp" else (
            f"PC {'FPA' if o['fpa'] else 'strict'} {o['schedule']} T={o['T']} rate {o['rate']}")
        table.append([name, rule, m["epochs"], pct(m["final_train_error"]), pct(m["test_acc"]),
                      pct(1 - m["best_test_error"]), median_epoch_seconds(rows)])
    sections = [
        f"Preset `{PRESET}` for every run (Adam 1e-3, batch 128, flip + crop, per-channel "
        "normalisation); seeds " + ", ".join(map(str, seeds)) + ".",
        "## Runs\n\n" + markdown_table(["run", "rule", "epochs", "train error %",
                                        "final test acc %", "best test acc %",
                                        "s/epoch (median)"], table),
        "## Gap PC - BP (best test accuracy, points)\n\n"
        + markdown_table(["net", "PC rule", "seeds", "mean gap", "spread (half range)"],
                         gap_rows(results, nets, seeds, epochs)),
        "![curves](curves.png)",
    ]
    unfinished = [f"`{name}` has {m['epochs']} of {epochs} epochs" for name, m in finals.items()
                  if epochs is not None and m["epochs"] < epochs]
    if unfinished:
        sections.insert(2, "Still training: " + "; ".join(unfinished) + ". The same command "
                        "resumes from the last finished epoch; the gaps below leave these runs "
                        "out until they finish.")
    write_summary(out / "summary.md", "PC vs BP on the same conv nets", sections)


def _with_seed(args: Any, seed: int) -> Any:
    from types import SimpleNamespace

    values = dict(vars(args))
    values["seed"] = seed
    return SimpleNamespace(**values)


register_experiment(NAME, run, "PC (FPA and strict) vs BP on the zoo's cnn and rescnn, 2 seeds")
