"""Learning-rate schedules that scale every parameter group's base rate by one factor.

``step``: multiply by ``gamma`` at each milestone (epochs or iterations); ``plateau``: multiply
by ``gamma`` when the validation (or test) error has not improved for ``patience`` epochs;
``constant``. An optional warm-up holds ``warmup_lr`` until the training error falls below a
threshold (He et al.'s ResNet-110).
"""

from __future__ import annotations

import torch

from pcfast.train.config import TrainConfig

SCHEDULES = ("step", "plateau", "constant")


class LRSchedule:
    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> None:
        if cfg.lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {SCHEDULES}, got {cfg.lr_schedule!r}")
        if cfg.milestone_unit not in ("epoch", "iteration"):
            raise ValueError(f"milestone_unit must be 'epoch' or 'iteration', got {cfg.milestone_unit!r}")
        self.optimizer = optimizer
        self.cfg = cfg
        self.base = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
        for g, lr in zip(optimizer.param_groups, self.base):
            g["initial_lr"] = lr
        self.plateau_factor = 1.0
        self.best_error = float("inf")
        self.bad_epochs = 0
        self.warming_up = cfg.warmup_lr is not None
        self.epoch = 0
        self.step = 0

    def factor(self) -> float:
        cfg = self.cfg
        if cfg.lr_schedule == "step":
            at = self.epoch if cfg.milestone_unit == "epoch" else self.step
            return cfg.lr_gamma ** sum(at >= m for m in cfg.milestones)
        if cfg.lr_schedule == "plateau":
            return self.plateau_factor
        return 1.0

    def apply(self) -> None:
        f = self.factor()
        for g, lr in zip(self.optimizer.param_groups, self.base):
            g["lr"] = self.cfg.warmup_lr if self.warming_up else lr * f

    def on_iteration(self, step: int, train_error: float | None = None) -> None:
        """Called before optimizer step ``step`` (0-based), with the running training error."""
        self.step = step
        if self.warming_up and train_error is not None and train_error < self.cfg.warmup_until_train_error:
            self.warming_up = False
        self.apply()

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch
        self.apply()

    def on_epoch_end(self, eval_error: float) -> None:
        if self.cfg.lr_schedule != "plateau":
            return
        if eval_error < self.best_error - 1e-4:
            self.best_error, self.bad_epochs = eval_error, 0
        else:
            self.bad_epochs += 1
            if self.bad_epochs > self.cfg.plateau_patience:
                self.plateau_factor *= self.cfg.lr_gamma
                self.bad_epochs = 0

    def current_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in
                ("plateau_factor", "best_error", "bad_epochs", "warming_up", "epoch", "step")}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)
        self.apply()
