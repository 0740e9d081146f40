"""``pcfast experiment model-zoo``: MLP, CNN, residual CNN and four MLP-Mixers (patch 4 and 2,
C 128 and 192) under the ``model-template`` recipe (Adam 1e-3, wd 1e-4, clip 1.0, batch 500).

Writes ``curves.png`` and ``summary.md`` (parameter table and final accuracies).
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

NAME = "model-zoo"


def _mixer(patch: int, hidden: int) -> dict[str, Any]:
    return dict(patch_size=patch, hidden=hidden, depth=8, token_mlp=hidden // 2,
                channel_mlp=4 * hidden)


# run name -> (registered model, model kwargs)
ZOO: dict[str, tuple[str, dict[str, Any]]] = {
    "mlp": ("mlp", dict(hidden=[1024, 512, 256], activation="relu", batchnorm=True)),
    "cnn": ("cnn", dict(spec=[32, 32, "p", 64, 64, "p", 128, 128, "p"])),
    "rescnn": ("rescnn", dict(channels=[32, 64, 128], blocks=2, block="small")),
    "mixer-p4-c128": ("mixer", _mixer(4, 128)),
    "mixer-p2-c128": ("mixer", _mixer(2, 128)),
    "mixer-p4-c192": ("mixer", _mixer(4, 192)),
    "mixer-p2-c192": ("mixer", _mixer(2, 192)),
}


def parameter_rows() -> list[list[Any]]:
    """``[run name, model, kwargs, parameter count]`` for every zoo entry."""
    rows = []
    for name, (model, kwargs) in ZOO.items():
        n = count_parameters(build_model(model, **kwargs))
        rows.append([name, model, ", ".join(f"{k}={v}" for k, v in kwargs.items()), f"{n:,}"])
    return rows


def run(args: Any) -> dict[str, list[dict[str, Any]]]:
    """Train every zoo model (resuming), plot and tabulate."""
    out = run_dir(args, NAME)
    results = {name: train_run(args, NAME, name, "model-template", model=model,
                               model_kwargs=kwargs)
               for name, (model, kwargs) in ZOO.items()}
    plot_error_panels({"simple nets": {k: results[k] for k in ("mlp", "cnn", "rescnn")},
                       "MLP-Mixer": {k: v for k, v in results.items() if k.startswith("mixer")}},
                      out / "curves.png", x="epoch")
    params = {r[0]: r[3] for r in parameter_rows()}
    rows = []
    for name in ZOO:
        m = final_metrics(results[name])
        rows.append([name, params[name], m["epochs"], pct(m["final_train_error"]),
                     pct(m["test_acc"]), pct(1 - m["best_test_error"])])
    sections = [
        "## Models\n\n" + markdown_table(["run", "model", "options", "params"], parameter_rows()),
        "## Results\n\n" + markdown_table(["run", "params", "epochs", "train error %",
                                           "final test acc %", "best test acc %"], rows),
        "![curves](curves.png)",
    ]
    write_summary(out / "summary.md", "Model zoo under the model-template recipe", sections)
    return results


register_experiment(NAME, run, "MLP, CNN, residual CNN, MLP-Mixers under the model-template recipe")
