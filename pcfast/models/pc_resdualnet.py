"""``PCResDualNet``: Res-DualNet with a built-in PC training step."""

from __future__ import annotations

import torch

from pcfast.models.resdualnet import ResDualNet
from pcfast.pc.engine import PCEngine, PCResult


class PCResDualNet(ResDualNet):
    """A Res-DualNet trained by predictive coding in the user's own loop.

    ``net(x)`` is the plain feedforward prediction; ``net.pc_step(x, y, optimizer)`` runs one PC
    training step (feedforward init, ``T`` inference steps, local weight updates, optimizer step)
    and returns a :class:`~pcfast.pc.PCResult` with ``loss``, ``accuracy`` and ``energy``.

    ``backend="auto"`` runs the fast engine (explicit VJP rules, fused kernels, CUDA graphs under
    FPA) for CUDA batches and for strict PC on the CPU, the reference path otherwise; see
    :class:`~pcfast.pc.PCEngine`.

    Example::

        net = PCResDualNet(T=100, rate=0.5)
        opt = torch.optim.Adam(net.parameters(), lr=0.01)
        for x, y in loader:
            out = net.pc_step(x, y, opt)
    """

    def __init__(self, T: int = 100, rate: float = 0.5, schedule: str = "jacobi",
                 fpa: bool = True, output_loss: str = "ce", error_clamp: float | None = None,
                 backend: str = "auto", backend_options: dict | None = None,
                 num_classes: int = 10) -> None:
        super().__init__(num_classes=num_classes)
        self.engine = PCEngine(self.pc_graph(), T=T, rate=rate, schedule=schedule, fpa=fpa,
                               output_loss=output_loss, error_clamp=error_clamp, backend=backend,
                               backend_options=backend_options)

    def pc_step(self, x: torch.Tensor, y: torch.Tensor,
                optimizer: torch.optim.Optimizer | None = None) -> PCResult:
        """One PC training step on the batch ``(x, y)``; puts the net in training mode."""
        self.train()
        return self.engine.step(x, y, optimizer)
