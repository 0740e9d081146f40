"""pcfast: fast predictive-coding networks in PyTorch, with BP and DTP baselines.

Example::

    import pcfast, torch
    net = pcfast.PCResDualNet(T=100, rate=0.5)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    out = net.pc_step(x, y, opt)      # loss, accuracy, energy
"""

from pcfast.models import PCResDualNet, ResDualNet, build_model, count_parameters
from pcfast.pc import Node, PCEngine, PCGraph, sequential_graph

__version__ = "0.1.0"

__all__ = ["Node", "PCEngine", "PCGraph", "PCResDualNet", "ResDualNet", "__version__",
           "build_model", "count_parameters", "sequential_graph"]
