"""Learning rules: how one batch turns into a parameter update (BP, PC; DTP registers itself)."""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import nn

from pcfast.train.config import TrainConfig


class Rule:
    """A learning rule for ``run_training``.

    Subclasses implement :meth:`train_step`; it zeroes gradients, computes them, clips them
    (``cfg.grad_clip``), steps the optimizer and returns scalar tensors (batch means), at least
    ``loss`` and ``accuracy``, without synchronising with the device.
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig) -> None:
        self.model = model
        self.cfg = cfg

    def parameter_groups(self) -> list[dict]:
        return [{"params": [p for p in self.model.parameters() if p.requires_grad]}]

    def train_step(self, x: torch.Tensor, y: torch.Tensor,
                   optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
        raise TypeError(f"{type(self).__name__} does not define train_step")

    def epoch_metrics(self, loader) -> dict[str, float]:
        """Extra per-epoch metrics measured on ``loader`` (held-out data)."""
        return {}

    def clip(self) -> None:
        if self.cfg.grad_clip:
            params = [p for g in self.parameter_groups() for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(1) == y).float().mean()


class BPRule(Rule):
    """Backprop on the mean cross-entropy."""

    def train_step(self, x, y, optimizer):
        self.model.train()
        optimizer.zero_grad(set_to_none=True)
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        self.clip()
        optimizer.step()
        return {"loss": loss.detach(), "accuracy": accuracy(logits.detach(), y)}


class PCRule(Rule):
    """Predictive coding through :class:`pcfast.pc.PCEngine` over ``model.pc_graph()``."""

    def __init__(self, model: nn.Module, cfg: TrainConfig) -> None:
        super().__init__(model, cfg)
        if not hasattr(model, "pc_graph"):
            raise ValueError(
                f"model {cfg.model!r} has no PC node placement (pc_graph); train it with --rule bp"
            )
        from pcfast.pc import PCEngine

        self.engine = PCEngine(model.pc_graph(), T=cfg.T, rate=cfg.rate, schedule=cfg.schedule,
                               fpa=cfg.fpa, output_loss=cfg.output_loss,
                               error_clamp=cfg.error_clamp, backend=cfg.pc_backend,
                               state_momentum=cfg.state_momentum,
                               state_nesterov=cfg.state_nesterov, ipc=cfg.ipc,
                               epc=cfg.epc, tol=cfg.tol, check_every=cfg.check_every,
                               precision=cfg.precision or None)

    def train_step(self, x, y, optimizer):
        self.model.train()
        result = self.engine.step(x, y, optimizer, before_step=self.clip)
        out = {"loss": result.loss, "accuracy": result.accuracy, "energy": result.energy}
        if self.cfg.tol is not None:  # adaptive inference: the mean steps taken per batch
            out["inference_steps"] = result.loss.new_tensor(float(result.steps))
        return out


RULES: dict[str, type[Rule]] = {"bp": BPRule, "pc": PCRule}
# Rules living in their own packages register themselves when imported.
_RULE_MODULES = {"dtp": "pcfast.dtp.rule"}


def load_rule_modules() -> None:
    for module in _RULE_MODULES.values():
        importlib.import_module(module)


def register_rule(name: str, cls: type[Rule]) -> None:
    if name in RULES and RULES[name] is not cls:
        raise ValueError(f"rule {name!r} is registered already")
    RULES[name] = cls


def build_rule(model: nn.Module, cfg: TrainConfig) -> Rule:
    load_rule_modules()
    try:
        cls = RULES[cfg.rule]
    except KeyError:
        raise ValueError(f"unknown rule {cfg.rule!r}; choose from: {', '.join(sorted(RULES))}") from None
    return cls(model, cfg)


def build_optimizer(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    name = cfg.optimizer.lower()
    if name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose from: adam, adamw, sgd")

