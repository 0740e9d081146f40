"""The interface every PC backend implements, and what backends share.

A backend runs one PC batch (``compute_gradients``) for the settings the front
(:class:`pcfast.pc.PCEngine`) passes it, and says up front whether it can run a batch
(``can_use(x, settings) -> (ok, reason)``), as PyTorch's SDPA backends do. Backends never import
the front; the front owns the choice among them.

A backend that finds, while running, that a kernel it relies on cannot run (a missing or broken
compiled kernel, a Triton compile failure, a CUDA-graph capture failure) raises
:class:`BackendUnavailable`, and only that: ``backend="auto"`` falls back to the reference path
on this exception and lets every other one (programming errors included) propagate.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from pcfast.pc.graph import PCGraph


class BackendUnavailable(RuntimeError):
    """A backend cannot run this batch: a kernel or a CUDA-graph capture is missing or failed.

    ``cause`` names what failed, for the fallback warning.
    """

    def __init__(self, cause: str) -> None:
        super().__init__(cause)
        self.cause = cause


@dataclass(frozen=True)
class PCSettings:
    """The PC options a backend runs a batch with (validated by the front)."""

    T: int = 100
    rate: float = 0.5
    schedule: str = "jacobi"
    fpa: bool = True
    output_loss: str = "ce"
    error_clamp: float | None = None
    record_energy: bool = False
    state_momentum: float = 0.0
    state_nesterov: bool = False
    ipc: bool = False
    epc: bool = False
    tol: float | None = None
    check_every: int = 5
    # precision weighting: pi(node, t) -> float, t = inference steps taken; None: all 1
    precision: Callable[[str, int], float] | None = None


@dataclass
class PCResult:
    """What one PC training step reports.

    ``loss`` and ``accuracy`` are those of the feedforward prediction (mean over the batch);
    ``energy`` is the relaxed energy per sample; ``errors`` maps each node to its error.
    ``energy_trace`` holds the energy per sample after initialisation and after every step
    when the engine was asked to record it. ``steps`` is the number of inference steps taken
    (``T``, or fewer when adaptive inference stopped early).
    """

    loss: torch.Tensor
    accuracy: torch.Tensor
    energy: torch.Tensor
    logits: torch.Tensor
    errors: dict[str, torch.Tensor]
    energy_trace: list[torch.Tensor] = field(default_factory=list)
    steps: int | None = None

    def error_norms(self) -> dict[str, float]:
        """Per-node error norm, averaged over the batch (one sync)."""
        n = self.logits.shape[0]
        norms = torch.stack([e.detach().flatten(1).norm(dim=1).sum() / n
                             for e in self.errors.values()])
        return dict(zip(self.errors, norms.tolist()))


class PCBackend(ABC):
    """One way of running PC batches over a :class:`PCGraph`.

    Subclasses set ``name`` and implement :meth:`can_use` and :meth:`compute_gradients`.
    """

    name: str = "backend"

    def __init__(self, graph: PCGraph) -> None:
        self.graph = graph

    @abstractmethod
    def can_use(self, x: torch.Tensor, settings: PCSettings) -> tuple[bool, str]:
        """``(True, "")`` if this backend can run a batch like ``x``, else ``(False, why)``."""

    def prefers(self, x: torch.Tensor, settings: PCSettings) -> bool:
        """Whether ``backend="auto"`` should pick this backend for ``x`` under ``settings`` when
        it can run it."""
        return True

    @abstractmethod
    def compute_gradients(self, x: torch.Tensor, y: torch.Tensor,
                          settings: PCSettings) -> PCResult:
        """Relax the errors for ``(x, y)`` and accumulate the PC weight gradients into ``.grad``.

        ``.grad`` is only touched at the very end (after every kernel and capture ran), so a
        :class:`BackendUnavailable` leaves the user's accumulated gradients as they were.
        """


# ------------------------------------------------------------------------------ shared helpers
def check_batch(graph: PCGraph, x: torch.Tensor, y: torch.Tensor) -> None:
    """Clear errors for a malformed ``(x, y)`` batch."""
    if graph.input_check is not None:
        graph.input_check(x)
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.dtype != torch.long:
        got = f"{tuple(y.shape)} {y.dtype}" if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"labels must be a 1-D int64 tensor of class indices, got {got}")
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"batch sizes differ: {x.shape[0]} inputs, {y.shape[0]} labels")


def accumulate(params: Sequence[nn.Parameter], grads: Sequence[torch.Tensor | None],
               batch: int, sign: float = 1.0) -> None:
    """``p.grad += sign * g / batch`` (or set it): the only place a backend writes ``.grad``."""
    for p, gr in zip(params, grads):
        if gr is None:
            continue
        gr = gr / (sign * batch)
        if p.grad is None:
            p.grad = gr.detach()
        else:
            p.grad.add_(gr)


def weight_grads(graph: PCGraph, mus: Sequence[torch.Tensor],
                 errors: Sequence[torch.Tensor]) -> tuple[list[nn.Parameter], list]:
    """``(d mu_v/d theta)^T e_v`` for every node with parameters (one autograd pass); the PC
    gradient is its negative (``accumulate(..., sign=-1)``: negating the small parameter
    gradients instead of every full-size error). Returns ``(params, grads)`` without touching
    ``.grad``."""
    outs, gouts = [], []
    for node, mu, e in zip(graph.nodes, mus, errors):
        if graph.node_parameters(node) and mu.requires_grad:
            outs.append(mu)
            gouts.append(e)
    params = graph.parameters()
    if not outs:
        return params, [None] * len(params)
    with torch.enable_grad():
        grads = torch.autograd.grad(outs, params, gouts, allow_unused=True)
    return params, list(grads)


def hidden_energy(graph: PCGraph, errors: dict[str, torch.Tensor]) -> torch.Tensor:
    """``sum_v 0.5 ||e_v||^2`` over the hidden nodes."""
    return sum(0.5 * errors[name].pow(2).sum() for name in graph.hidden)


def make_result(logits: torch.Tensor, y: torch.Tensor, loss_sum: torch.Tensor,
                energy: torch.Tensor, errors: dict[str, torch.Tensor],
                trace: list[torch.Tensor], steps: int | None = None) -> PCResult:
    """``loss_sum``: the output loss of the feedforward logits, summed over the batch."""
    n = logits.shape[0]
    logits = logits.detach()
    return PCResult(
        loss=loss_sum.detach() / n,
        accuracy=(logits.argmax(1) == y).float().mean(),
        energy=energy.detach() / n,
        logits=logits,
        errors=errors,
        energy_trace=[t.detach() / n for t in trace],
        steps=steps,
    )
