"""Res-DualNet: a light residual network of dual-path depthwise convolutions.

stem conv3x3 3->16 + BN + ReLU; four stages of two blocks with out channels 32, 64, 128, 256
and strides 1, 1, 2, 2; global average pool; Linear 256->10. 141,354 parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from pcfast.models.dualpath import DualPathDWConv
from pcfast.models.layers import AddReLU, BlockNet, ConcatReLU, Head
from pcfast.pc.graph import Node

STAGES = ((32, 1), (64, 1), (128, 2), (256, 2))


class DWSubLayer(nn.Sequential):
    """Dual-path depthwise 3x3 conv + BatchNorm + ReLU."""

    def __init__(self, channels: int, stride: int = 1) -> None:
        super().__init__(
            DualPathDWConv(channels, stride), nn.BatchNorm2d(channels), nn.ReLU()
        )


class ResDualBlock(nn.Module):
    """Residual path dw3x3 -> pw1x1 -> dw3x3, merged with the input by add or concat.

    When ``out_channels == in_channels`` and ``stride == 1`` the merge is ``ReLU(r + x)``;
    otherwise ``out_channels`` must be ``2 * in_channels`` and the merge is
    ``ReLU(concat(r, AvgPool3x3(stride, pad 1)(x)))``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.concat = not (in_channels == out_channels and stride == 1)
        if self.concat and out_channels != 2 * in_channels:
            raise ValueError(
                f"a concat block doubles the channels: got {in_channels} -> {out_channels}"
            )
        c = in_channels
        self.dw1 = DWSubLayer(c, stride)
        self.pw = nn.Conv2d(c, c, 1, bias=True)
        self.dw2 = DWSubLayer(c, 1)
        self.shortcut = nn.AvgPool2d(3, stride, 1) if self.concat else nn.Identity()
        self.merge = ConcatReLU() if self.concat else AddReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.merge(self.dw2(self.pw(self.dw1(x))), self.shortcut(x))

    def pc_nodes(self, prefix: str, parent: str) -> list[Node]:
        """One value node per sub-layer, plus the shortcut (concat blocks) and the merge."""
        nodes = [
            Node(f"{prefix}.dw1", self.dw1, (parent,)),
            Node(f"{prefix}.pw", self.pw, (f"{prefix}.dw1",)),
            Node(f"{prefix}.dw2", self.dw2, (f"{prefix}.pw",)),
        ]
        skip = parent
        if self.concat:
            skip = f"{prefix}.shortcut"
            nodes.append(Node(skip, self.shortcut, (parent,)))
        nodes.append(Node(f"{prefix}.merge", self.merge, (f"{prefix}.dw2", skip)))
        return nodes


class ResDualNet(BlockNet):
    """Res-DualNet for 32x32 RGB images (CIFAR-10).

    Example::

        net = ResDualNet()
        logits = net(torch.randn(4, 3, 32, 32))   # (4, 10)
    """

    def __init__(self, num_classes: int = 10, stem_channels: int = 16,
                 stages: tuple[tuple[int, int], ...] = STAGES, blocks_per_stage: int = 2) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, stem_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(stem_channels),
            nn.ReLU(),
        )
        blocks = []
        c = stem_channels
        for out, stride in stages:
            for i in range(blocks_per_stage):
                blocks.append(ResDualBlock(c, out, stride if i == 0 else 1))
                c = out
        self.blocks = nn.Sequential(*blocks)
        self.head = Head(c, num_classes)
