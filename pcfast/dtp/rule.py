"""``pcfast train --rule dtp``: difference target propagation as a training rule.

Options (``TrainConfig.rule_options``, CLI ``--rule-option KEY=VALUE`` where the CLI has it):

- ``eta_hat`` (0.5): step of the top target along ``-dL/dh_{M-1}``;
- ``sigma`` (0.1): noise scale of the feedback training;
- ``feedback_lr`` (``cfg.lr``): learning rate of the feedback layers ``g_i``; the forward
  layers use ``cfg.lr``;
- ``feedback_updates`` (1): feedback updates per forward update;
- ``feedback_loss`` (``"dtp"``): ``"dtp"`` (Lee et al. 2015) or ``"drl"`` (the difference
  reconstruction loss of Meulemans et al. 2020);
- ``recon_batches`` (10): held-out batches for the per-epoch reconstruction errors.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from pcfast.dtp.net import DTPNet
from pcfast.dtp.targets import (
    FEEDBACK_LOSSES,
    feedback_losses,
    forward_pass,
    reconstruction_errors,
)
from pcfast.train.config import TrainConfig
from pcfast.train.rules import Rule, accuracy, register_rule


@dataclass
class DTPOptions:
    """The DTP options carried by ``TrainConfig.rule_options``.

    Example::

        opts = DTPOptions.from_dict({"sigma": 0.2, "feedback_loss": "drl"})
    """

    eta_hat: float = 0.5
    sigma: float = 0.1
    feedback_lr: float | None = None
    feedback_updates: int = 1
    feedback_loss: str = "dtp"
    recon_batches: int = 10

    def __post_init__(self) -> None:
        if not self.eta_hat > 0:
            raise ValueError(f"DTP eta_hat must be positive, got {self.eta_hat}")
        if not self.sigma >= 0:
            raise ValueError(f"DTP sigma must be non-negative, got {self.sigma}")
        if self.feedback_lr is not None and not self.feedback_lr > 0:
            raise ValueError(f"DTP feedback_lr must be positive, got {self.feedback_lr}")
        if int(self.feedback_updates) != self.feedback_updates or self.feedback_updates < 1:
            raise ValueError(f"DTP feedback_updates must be an integer >= 1, got "
                             f"{self.feedback_updates}")
        if self.feedback_loss not in FEEDBACK_LOSSES:
            raise ValueError(f"DTP feedback_loss must be one of {FEEDBACK_LOSSES}, got "
                             f"{self.feedback_loss!r}")
        if int(self.recon_batches) != self.recon_batches or self.recon_batches < 1:
            raise ValueError(f"DTP recon_batches must be an integer >= 1, got "
                             f"{self.recon_batches}")
        self.feedback_updates = int(self.feedback_updates)
        self.recon_batches = int(self.recon_batches)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DTPOptions:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown DTP rule options: {', '.join(unknown)}; "
                             f"valid: {', '.join(sorted(names))}")
        return cls(**values)


class DTPRule(Rule):
    """Trains a :class:`DTPNet` with difference target propagation.

    Per batch: ``feedback_updates - 1`` feedback-only steps, then one step on the sum of the
    last feedback losses and the forward losses (one backward; losses disjoint in parameters).
    The optimizer gets two groups, forward layers at ``cfg.lr`` and feedback layers at
    ``feedback_lr``; gradient clipping (``cfg.grad_clip``) is applied per layer so that no
    layer's update depends on another's gradient.

    Example::

        cfg = TrainConfig(model="dtp-mlp", rule="dtp", lr=1e-4,
                          rule_options={"sigma": 0.1, "feedback_lr": 1e-3})
        rule = DTPRule(DTPNet(), cfg)
        opt = build_optimizer(rule.parameter_groups(), cfg)
        stats = rule.train_step(x, y, opt)            # loss, accuracy, feedback_loss, ...
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig) -> None:
        super().__init__(model, cfg)
        if not isinstance(model, DTPNet):
            raise ValueError(f"rule 'dtp' trains a DTPNet (forward and feedback layers), got "
                             f"{type(model).__name__} from model {cfg.model!r}; use "
                             "--model dtp-mlp")
        self.net: DTPNet = model
        self.opts = DTPOptions.from_dict(dict(cfg.rule_options))

    def parameter_groups(self) -> list[dict]:
        fb_lr = self.opts.feedback_lr if self.opts.feedback_lr is not None else self.cfg.lr
        groups = [{"params": self.net.forward_parameters(), "lr": self.cfg.lr, "name": "forward"}]
        if self.net.feedback_parameters():
            groups.append({"params": self.net.feedback_parameters(), "lr": fb_lr,
                           "name": "feedback"})
        return groups

    def clip(self) -> None:
        if self.cfg.grad_clip:
            layers = list(self.net.forward_layers) + list(self.net.feedback_layers)
            for layer in layers:
                torch.nn.utils.clip_grad_norm_(layer.parameters(), self.cfg.grad_clip)

    def train_step(self, x: torch.Tensor, y: torch.Tensor,
                   optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
        self.net.train()
        opts = self.opts
        if opts.feedback_updates > 1:
            with torch.no_grad():
                hs = self.net.activations(x)
            # Optimizers skip parameters whose .grad is None, so these steps move g only.
            for _ in range(opts.feedback_updates - 1):
                optimizer.zero_grad(set_to_none=True)
                sum(feedback_losses(self.net, hs, opts.sigma, opts.feedback_loss),
                    torch.zeros((), device=x.device)).backward()
                self.clip()
                optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        fp = forward_pass(self.net, x, y, opts.eta_hat)
        fb = feedback_losses(self.net, fp.activations, opts.sigma, opts.feedback_loss)
        (sum(fp.losses) + sum(fb, torch.zeros((), device=x.device))).backward()
        self.clip()
        optimizer.step()
        stats = {"loss": fp.nll.detach(), "accuracy": accuracy(fp.log_probs, y)}
        for i, loss in zip(self.net.feedback_indices(), fb):
            stats[f"feedback_loss/g{i}"] = loss.detach()
        for i, loss in enumerate(fp.losses[:-1], start=1):
            stats[f"target_loss/f{i}"] = loss.detach()
        return stats

    @torch.no_grad()
    def epoch_metrics(self, loader) -> dict[str, float]:
        """Noise-free reconstruction error of each ``g_i`` on up to ``recon_batches`` batches.

        Keys ``recon_err/g2 .. recon_err/g{M-1}``: ``mean (g_i(f_i(h_{i-1})) - h_{i-1})^2``.
        """
        self.net.eval()
        total, count = None, 0
        for b, batch in enumerate(loader):
            if b >= self.opts.recon_batches:
                break
            x = batch[0]
            errs = reconstruction_errors(self.net, self.net.activations(x)) * x.shape[0]
            total = errs if total is None else total + errs
            count += x.shape[0]
        if total is None or count == 0:
            return {}
        return {f"recon_err/g{i}": v
                for i, v in zip(self.net.feedback_indices(), (total / count).tolist())}


register_rule("dtp", DTPRule)
