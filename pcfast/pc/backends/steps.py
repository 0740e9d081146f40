"""The inference-step rules every backend shares: the value/error updates, state momentum,
precision weighting and adaptive stopping."""

from __future__ import annotations

from collections.abc import Callable

import torch

from pcfast.pc.backends.base import PCSettings


def relax(e: torch.Tensor, back: torch.Tensor, s: PCSettings) -> torch.Tensor:
    """``e <- e - rate * (e - clamp(back))``: the value update seen through ``e = x - mu``."""
    back = clamp(back, s)
    return torch.lerp(e, back, s.rate) if s.rate != 1.0 else back


def summed(backs: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The propagated errors a node receives, ``sum_v J_vu^T e_v``, added in ``dtype``."""
    back = backs[0].to(dtype)
    for other in backs[1:]:
        back = back + other.to(dtype)
    return back


def clamp(back: torch.Tensor, s: PCSettings) -> torch.Tensor:
    """The optional clamp of the propagated errors ``sum_v J_vu^T e_v``."""
    if s.error_clamp is None:
        return back
    return back.clamp(-s.error_clamp, s.error_clamp)


class StateSteps:
    """The inference steps on one batch's values: plain gradient steps, or momentum.

    ``update(name, x, g)`` returns the node's new value (or error, under FPA) for the gradient
    ``g = dF/dx``: ``x - rate g`` without momentum; with momentum ``m`` a per-node velocity
    ``v <- m v + g`` (``v = g`` at the first step) and ``x - rate v`` (heavy-ball) or
    ``x - rate (g + m v)`` (Nesterov), as ``torch.optim.SGD`` does.
    """

    def __init__(self, s: PCSettings) -> None:
        self.rate, self.m, self.nesterov = s.rate, s.state_momentum, s.state_nesterov
        self.velocity: dict[str, torch.Tensor] = {}

    def update(self, name: str, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        v = self.velocity.get(name)
        v = g if v is None else self.m * v + g
        self.velocity[name] = v
        return x - self.rate * (g + self.m * v if self.nesterov else v)


def weighted(name: str, term: torch.Tensor, s: PCSettings, t: int) -> torch.Tensor:
    """``term * pi_name(t)`` under precision weighting, else ``term`` itself."""
    return term if s.precision is None else term * s.precision(name, t)


class StopRule:
    """Adaptive inference: ``T`` is a maximum; with ``tol`` set, every ``check_every`` steps the
    energy is read (one host synchronisation) and inference stops once it changed by at most
    ``tol`` relative to the previous reading: ``|E_prev - E| <= tol |E_prev|``.

    ``done(t, energy)`` is asked before step ``t`` (``t`` steps taken so far); ``energy`` is a
    callable, evaluated only at the readings.
    """

    def __init__(self, s: PCSettings) -> None:
        self.tol, self.every = s.tol, s.check_every
        self.previous: float | None = None

    def done(self, t: int, energy: Callable[[], torch.Tensor]) -> bool:
        if self.tol is None or t % self.every:
            return False
        with torch.no_grad():
            now = float(energy())
        previous, self.previous = self.previous, now
        return previous is not None and abs(previous - now) <= self.tol * abs(previous)
