"""Running one training of an experiment: preset + per-run options + the command-line overrides.

Every run lives in its own sub-folder of the experiment's run directory and always resumes, so
re-running an interrupted experiment continues where it stopped and skips finished runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pcfast.train import preset_config, run_training
from pcfast.train.checkpoint import read_metrics
from pcfast.train.presets import PRESETS

# --quick: tiny subsets and two optimizer steps per run; checks an experiment end to end.
QUICK = dict(train_subset=32, test_subset=32, val_split=32, batch_size=8, eval_batch_size=32,
             iterations=2)


def run_dir(args: Any, experiment: str) -> Path:
    """``args.run_dir`` or ``runs/<experiment>``."""
    return Path(getattr(args, "run_dir", None) or Path("runs") / experiment)


def overrides(args: Any) -> dict[str, Any]:
    """Training options that the experiment's command line sets for every run.

    ``--quick`` shrinks the data and the step count; ``--epochs`` replaces an iteration budget;
    ``--iterations`` sets one (both win over ``--quick``'s step count); ``--train-subset`` trains
    every run on the first N training images.
    """
    values: dict[str, Any] = dict(QUICK) if getattr(args, "quick", False) else {}
    if getattr(args, "epochs", None):
        values.update(epochs=args.epochs, iterations=None)
    if getattr(args, "iterations", None):
        values["iterations"] = args.iterations
    if getattr(args, "train_subset", None):
        values["train_subset"] = args.train_subset
    values.update(device=getattr(args, "device", "auto") or "auto",
                  data_dir=getattr(args, "data_dir", None), seed=getattr(args, "seed", 0),
                  allow_unofficial_data=bool(getattr(args, "allow_unofficial_data", False)),
                  resume=True)
    if getattr(args, "quick", False):
        values["progress"] = False
    return values


def planned_epochs(args: Any, preset: str) -> int | None:
    """The epochs each run of ``preset`` trains under this command line; None under a step
    budget (``--iterations``, ``--quick``), where runs have no planned epoch count."""
    values = {**PRESETS[preset], **overrides(args)}
    return None if values.get("iterations") else values.get("epochs")


def chosen_nets(args: Any, experiment: str, known, default) -> list[str]:
    """The nets ``--nets`` asked for (``default`` without it), each checked against ``known``."""
    nets = list(getattr(args, "nets", None) or default)
    unknown = sorted(set(nets) - set(known))
    if unknown:
        raise ValueError(f"{experiment} runs the nets {sorted(known)}; unknown: {unknown}")
    return nets


def train_run(args: Any, experiment: str, name: str, preset: str,
              **options: Any) -> list[dict[str, Any]]:
    """Train (or resume, or just reload) run ``name`` of ``experiment``; returns its rows.
    With ``args.report`` it trains nothing and returns the rows finished so far.

    ``options`` are the run's own settings on top of ``preset`` (model, model_kwargs,
    preprocess, ...); the command-line overrides win over both.

    Example::

        rows = train_run(args, "resnet-depth", "plain20", "he-cifar", model="plain20")
    """
    out = run_dir(args, experiment) / name
    if getattr(args, "report", False):
        return finished_rows(experiment, name, out)
    values = {**options, **overrides(args)}
    values["out_dir"] = str(out)
    return run_training(preset_config(preset, **values))


def finished_rows(experiment: str, name: str, out: Path) -> list[dict[str, Any]]:
    """The metric rows run ``name`` has written so far (``--report``: nothing is trained)."""
    rows = read_metrics(out / "metrics.jsonl")
    if not rows:
        raise ValueError(
            f"{experiment} --report: run {name!r} has no finished epoch in {out} yet; the "
            "report tabulates finished epochs only: train it first, or leave it out with "
            "--rules/--nets")
    return rows


def chosen_rules(args: Any, experiment: str, known) -> list[str]:
    """The rules ``--rules`` asked for, in the experiment's own order (all without it), each
    checked against ``known``."""
    asked = getattr(args, "rules", None)
    if not asked:
        return list(known)
    unknown = sorted(set(asked) - set(known))
    if unknown:
        raise ValueError(f"{experiment} trains the rules {list(known)}; unknown: {unknown}")
    return [r for r in known if r in asked]
