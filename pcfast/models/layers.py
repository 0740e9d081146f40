"""Small building blocks shared by the models: merges, classifier heads, input checks."""

from __future__ import annotations

import torch
from torch import nn

from pcfast.pc.graph import Node, PCGraph


class AddReLU(nn.Module):
    """``ReLU(a + b)``: the merge of a residual block whose shapes match."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.relu(a + b)


class ConcatReLU(nn.Module):
    """``ReLU(concat(a, b))`` along channels: the merge of a channel-doubling block."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.relu(torch.cat((a, b), dim=1))


class Head(nn.Module):
    """Global average pool, flatten, linear classifier."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


def check_image_batch(x: torch.Tensor, channels: int, size: int | None = None) -> None:
    """Raise a clear error unless ``x`` is a floating batch of shape ``(N, channels, H, W)``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor image batch, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != channels or (size is not None and x.shape[2:] != (size, size)):
        want = f"(N, {channels}, {size or 'H'}, {size or 'W'})"
        raise ValueError(
            f"expected an image batch of shape {want}, got {tuple(x.shape)}; "
            "add a batch dimension with x.unsqueeze(0) or permute NHWC data with x.permute(0, 3, 1, 2)"
        )
    if not x.is_floating_point():
        raise TypeError(
            f"expected a floating-point image batch, got dtype {x.dtype}; "
            "convert uint8 images with x.float().div(255) and normalise them"
        )


def block_graph(stem: nn.Module, blocks: nn.Sequential, head: nn.Module) -> PCGraph:
    """PC graph of a stem, a chain of blocks that have ``pc_nodes(prefix, parent)``, a head.

    Every block contributes its own nodes (sub-layers, shortcut, merge); the stem and the head
    are one node each. The input must be a 3-channel image batch.
    """
    nodes = [Node("stem", stem, ("input",))]
    for i, block in enumerate(blocks):
        nodes += block.pc_nodes(f"block{i}", nodes[-1].name)
    nodes.append(Node("head", head, (nodes[-1].name,)))
    return PCGraph(nodes, input_check=lambda x: check_image_batch(x, channels=3))


class BlockNet(nn.Module):
    """A network ``head(blocks(stem(x)))`` over 3-channel images; subclasses build the three parts.

    Its PC node graph (:meth:`pc_graph`) has one node for the stem, the nodes each block declares
    with ``pc_nodes(prefix, parent)``, and one for the head.
    """

    stem: nn.Module
    blocks: nn.Sequential
    head: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_batch(x, channels=3)
        return self.head(self.blocks(self.stem(x)))

    def pc_graph(self) -> PCGraph:
        """The PC node graph over this network's own sub-modules."""
        return block_graph(self.stem, self.blocks, self.head)
