"""Compatibility name: ``FastPCEngine(graph, ..., kernels, cuda_graph, autocast)`` is
``PCEngine(graph, ..., backend="fast", backend_options={...})``.

The fast backend itself lives in :mod:`pcfast.pc.backends.fast`; this module only imports the
front (never the other way round).
"""

from __future__ import annotations

from pcfast.pc.engine import PCEngine
from pcfast.pc.graph import PCGraph


class FastPCEngine(PCEngine):
    """:class:`~pcfast.pc.PCEngine` with ``backend="fast"``.

    Example::

        engine = FastPCEngine(net.pc_graph(), T=100, rate=0.5, kernels="auto")
        result = engine.step(x.cuda(), y.cuda(), optimizer)
    """

    def __init__(self, graph: PCGraph, T: int = 100, rate: float = 0.5,
                 schedule: str = "jacobi", fpa: bool = True, output_loss: str = "ce",
                 error_clamp: float | None = None, record_energy: bool = False,
                 kernels: str = "auto", cuda_graph: bool = True, autocast: bool = False) -> None:
        super().__init__(graph, T=T, rate=rate, schedule=schedule, fpa=fpa,
                         output_loss=output_loss, error_clamp=error_clamp, backend="fast",
                         record_energy=record_energy,
                         backend_options={"kernels": kernels, "cuda_graph": cuda_graph,
                                          "autocast": autocast})
