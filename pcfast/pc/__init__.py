"""The predictive-coding engine: node graphs, energies, inference schedules, local updates."""

from pcfast.pc.backends import BackendUnavailable, PCSettings
from pcfast.pc.engine import SCHEDULES, PCEngine, PCResult
from pcfast.pc.graph import Node, PCGraph, sequential_graph
from pcfast.pc.precision import decaying, spiking

__all__ = ["SCHEDULES", "BackendUnavailable", "Node", "PCEngine", "PCGraph", "PCResult",
           "PCSettings", "decaying", "sequential_graph", "spiking"]
