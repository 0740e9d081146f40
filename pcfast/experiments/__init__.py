"""One-command reproductions: ``pcfast experiment NAME``.

An experiment is a function ``fn(args)``; ``args`` has ``run_dir``, ``epochs``, ``iterations``,
``device``, ``data_dir``, ``seed``, ``quick``, ``allow_unofficial_data``, ``train_subset``
and ``nets``. Each one trains its runs
through :func:`pcfast.train.run_training` in sub-folders of ``run_dir`` (so an interrupted
experiment resumes) and writes its plots and a Markdown summary there.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Experiment:
    name: str
    fn: Callable
    help: str


EXPERIMENTS: dict[str, Experiment] = {}
_MODULES = ("resnet_depth", "preprocessing", "model_zoo", "resnet18_34", "dtp", "pc_vs_bp", "deep_pc",
            "seed_gap")


def register_experiment(name: str, fn: Callable, help: str) -> None:
    EXPERIMENTS[name] = Experiment(name, fn, help)


def load_all() -> dict[str, Experiment]:
    """Import the experiment modules (each registers itself) and return the registry."""
    for mod in _MODULES:
        try:
            importlib.import_module(f"pcfast.experiments.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"pcfast.experiments.{mod}":
                raise
    return EXPERIMENTS
