"""Output energies and the errors they send down, plus a guard for BatchNorm running stats."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

OUTPUT_LOSSES = ("ce", "mse")


def output_energy(logits: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    """Task loss of the output node, summed over the batch.

    ``ce``: cross-entropy of the logits; ``mse``: ``0.5 * ||logits - onehot(y)||^2``.
    """
    if kind == "ce":
        return F.cross_entropy(logits, y, reduction="sum")
    if kind == "mse":
        target = F.one_hot(y, logits.shape[1]).to(logits.dtype)
        return 0.5 * (logits - target).pow(2).sum()
    raise ValueError(f"output_loss must be one of {OUTPUT_LOSSES}, got {kind!r}")


def output_error(logits: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    """The output node's error ``-dL/dlogits`` (per sample, the batch-summed loss)."""
    if kind == "ce":
        return F.one_hot(y, logits.shape[1]).to(logits.dtype) - torch.softmax(logits, dim=1)
    if kind == "mse":
        return F.one_hot(y, logits.shape[1]).to(logits.dtype) - logits
    raise ValueError(f"output_loss must be one of {OUTPUT_LOSSES}, got {kind!r}")


@contextmanager
def frozen_running_stats(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Run forward passes that use batch statistics but leave BatchNorm running stats as they were.

    PC takes BatchNorm running statistics from the feedforward pass only, once per batch; strict
    PC recomputes predictions many times per batch and must not move them again.
    """
    saved = []
    for root in modules:
        for m in root.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                saved.append((m, [b.detach().clone() for b in m.buffers()]))
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in saved:
                for b, old in zip(m.buffers(), buffers):
                    b.copy_(old)
