"""The CIFAR-10 ResNets of He et al. 2016 (Sec. 4.2) and their plain twins.

3x3 conv stem (16 filters); three stages of ``n`` basic blocks with 16/32/64 filters on
32x32/16x16/8x8 maps (the first block of stages 2 and 3 subsamples with stride 2); global average
pool; linear classifier. Depth ``6n + 2`` (20, 32, 44, 56, 110, 1202). Shortcuts:

- option ``"A"``: identity; where the shape changes, the input is subsampled (every second pixel)
  and zero channels are appended: no parameters. ResNet-20/32/44/56/110 then have
  269,722 / 464,154 / 658,586 / 853,018 / 1,727,962 parameters.
- option ``"B"``: identity, and a 1x1 projection conv + BatchNorm where the shape changes.

``plain=True`` builds the same layers without any shortcut.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pcfast.models.init import he_init
from pcfast.models.layers import AddReLU, BlockNet, Head
from pcfast.pc.graph import Node

WIDTHS = (16, 32, 64)
SHORTCUTS = ("A", "B")


class ShortcutA(nn.Module):
    """Parameter-free shortcut: subsample by ``stride`` and append zero channels.

    Shapes: ``(N, C, H, W) -> (N, out_channels, H / stride, W / stride)``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"option A cannot shrink channels: {in_channels} -> {out_channels}")
        self.extra = out_channels - in_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra))


def conv_bn(in_channels: int, out_channels: int, stride: int, relu: bool) -> nn.Sequential:
    """3x3 conv (no bias) + BatchNorm (+ ReLU): one sub-layer of a basic block."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN sub-layers, merged with a shortcut as ``ReLU(branch + shortcut(x))``.

    With ``plain=True`` there is no shortcut: ``ReLU(BN(conv(ReLU(BN(conv(x))))))``.

    Shapes: ``(N, in_channels, H, W) -> (N, out_channels, H / stride, W / stride)``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1,
                 shortcut: str = "A", plain: bool = False) -> None:
        super().__init__()
        if shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut must be one of {SHORTCUTS}, got {shortcut!r}")
        self.plain = plain
        self.sub1 = conv_bn(in_channels, out_channels, stride, relu=True)
        self.sub2 = conv_bn(out_channels, out_channels, 1, relu=plain)
        self.changes_shape = stride != 1 or in_channels != out_channels
        self.shortcut: nn.Module | None = None
        self.merge: nn.Module | None = None
        if not plain:
            self.merge = AddReLU()
            if not self.changes_shape:
                self.shortcut = nn.Identity()
            elif shortcut == "A":
                self.shortcut = ShortcutA(in_channels, out_channels, stride)
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                    nn.BatchNorm2d(out_channels),
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.sub2(self.sub1(x))
        if self.plain:
            return out
        return self.merge(out, self.shortcut(x))

    def pc_nodes(self, prefix: str, parent: str) -> list[Node]:
        """Nodes ``sub1``, ``sub2``, a ``shortcut`` node where the shortcut computes something
        (option A or B where the shape changes), and the ``merge``; plain blocks: ``sub1, sub2``."""
        nodes = [Node(f"{prefix}.sub1", self.sub1, (parent,)),
                 Node(f"{prefix}.sub2", self.sub2, (f"{prefix}.sub1",))]
        if self.plain:
            return nodes
        skip = parent
        if self.changes_shape:
            skip = f"{prefix}.shortcut"
            nodes.append(Node(skip, self.shortcut, (parent,)))
        nodes.append(Node(f"{prefix}.merge", self.merge, (f"{prefix}.sub2", skip)))
        return nodes


class CifarResNet(BlockNet):
    """ResNet-(6n+2) for 32x32 RGB images, or its plain twin.

    Args:
        depth: ``6n + 2`` (20, 32, 44, 56, 110, 1202, ...).
        shortcut: ``"A"`` (zero-padded identity) or ``"B"`` (1x1 projection where shapes change).
        plain: no shortcuts at all (the "plain" nets of the paper's Figure 6).
        num_classes: classifier outputs.
        widths: filters of the three stages.

    Shapes: ``(N, 3, 32, 32) -> (N, num_classes)``.

    Example::

        net = CifarResNet(20)                 # 269,722 parameters
        logits = net(torch.randn(7, 3, 32, 32))   # (7, 10)
    """

    def __init__(self, depth: int = 20, shortcut: str = "A", plain: bool = False,
                 num_classes: int = 10, widths: tuple[int, int, int] = WIDTHS) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110), got {depth}")
        if shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        n = (depth - 2) // 6
        self.depth = depth
        self.stem = conv_bn(3, widths[0], 1, relu=True)
        blocks: list[nn.Module] = []
        c = widths[0]
        for stage, w in enumerate(widths):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(c, w, stride, shortcut, plain))
                c = w
        self.blocks = nn.Sequential(*blocks)
        self.head = Head(c, num_classes)
        he_init(self)




def cifar_resnet_factory(depth: int, plain: bool):
    """A registry factory ``(shortcut="A", num_classes=10) -> CifarResNet`` for one depth."""

    def build(shortcut: str = "A", num_classes: int = 10) -> CifarResNet:
        return CifarResNet(depth, shortcut=shortcut, plain=plain, num_classes=num_classes)

    kind = "plain" if plain else "resnet"
    build.__name__ = f"{kind}{depth}"
    build.__doc__ = f"{'Plain' if plain else 'Residual'} CIFAR net of depth {depth}."
    return build
