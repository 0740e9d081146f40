"""The configuration of one training run: every option of ``pcfast train``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainConfig:
    """One training run. Presets (``pcfast.train.presets``) fill it; flags override.

    Example::

        cfg = TrainConfig(model="resdualnet", rule="pc", epochs=2, T=20, out_dir="runs/demo")
        rows = run_training(cfg)
    """

    # what to train
    model: str = "resdualnet"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    rule: str = "pc"
    rule_options: dict[str, Any] = field(default_factory=dict)
    init: str = "default"
    # how long
    epochs: int = 25
    iterations: int | None = None
    batch_size: int = 256
    eval_batch_size: int = 1000
    # optimizer and learning-rate schedule
    optimizer: str = "adam"
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = None
    lr_schedule: str = "step"
    milestones: tuple[int, ...] = (10, 20)
    milestone_unit: str = "epoch"
    lr_gamma: float = 0.1
    plateau_patience: int = 5
    warmup_lr: float | None = None
    warmup_until_train_error: float = 0.8
    # predictive coding
    T: int = 100
    rate: float = 0.5
    schedule: str = "jacobi"
    fpa: bool = True
    output_loss: str = "ce"
    error_clamp: float | None = None
    state_momentum: float = 0.0
    state_nesterov: bool = False
    ipc: bool = False
    epc: bool = False
    tol: float | None = None
    check_every: int = 5
    precision: dict[str, Any] = field(default_factory=dict)
    pc_backend: str = "auto"
    # data
    data_dir: str | None = None
    download: bool = False
    allow_unofficial_data: bool = False
    synthetic: bool = False
    train_subset: int | None = None
    test_subset: int | None = None
    val_split: int = 0
    augment: str = "flip"
    extra_augment: str | None = None
    preprocess: str = "channel"
    # run
    seed: int = 0
    device: str = "auto"
    out_dir: str = "runs/latest"
    resume: bool = False
    progress: bool = True
    # data parallel (torchrun): BatchNorm statistics of the global batch instead of per rank
    sync_bn: bool = False
    preset: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown training options: {', '.join(unknown)}")
        values = dict(values)
        for key in ("betas", "milestones"):
            if key in values and values[key] is not None:
                values[key] = tuple(values[key])
        return cls(**values)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)
