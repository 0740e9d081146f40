"""Helpers that make small test nets carry distinct signals on every path."""

from __future__ import annotations

import torch
from torch import nn


def randomize_batchnorm(net: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm affine parameters (weight in [0.5, 1.5], bias in [-0.2, 0.2])."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net
