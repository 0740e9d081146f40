"""ResNet-18 and ResNet-34, CIFAR variant.

As ImageNet ResNet-18/34 (He et al. 2016, Table 1) but with a 3x3 stride-1 stem and no max-pool,
so that 32x32 inputs keep 32/16/8/4 maps in the four stages (64/128/256/512 filters); 1x1
projection shortcuts (conv + BatchNorm) where the shape changes. 11,173,962 and 21,282,122
parameters with 10 classes.
"""

from __future__ import annotations

from torch import nn

from pcfast.models.cifar_resnet import BasicBlock, conv_bn
from pcfast.models.init import he_init
from pcfast.models.layers import BlockNet, Head

LAYOUTS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
WIDTHS = (64, 128, 256, 512)


class ResNet(BlockNet):
    """CIFAR ResNet-18 or ResNet-34 built from :class:`BasicBlock` with option-B shortcuts.

    Shapes: ``(N, 3, H, W) -> (N, num_classes)`` (H, W divisible by 8; CIFAR: 32).

    Example::

        net = ResNet(18)                          # 11,173,962 parameters
        logits = net(torch.randn(7, 3, 32, 32))   # (7, 10)
    """

    def __init__(self, depth: int = 18, num_classes: int = 10) -> None:
        super().__init__()
        if depth not in LAYOUTS:
            raise ValueError(f"depth must be one of {sorted(LAYOUTS)}, got {depth}")
        self.depth = depth
        self.stem = conv_bn(3, WIDTHS[0], 1, relu=True)
        blocks: list[nn.Module] = []
        c = WIDTHS[0]
        for stage, (w, n) in enumerate(zip(WIDTHS, LAYOUTS[depth])):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(c, w, stride, shortcut="B"))
                c = w
        self.blocks = nn.Sequential(*blocks)
        self.head = Head(c, num_classes)
        he_init(self)




def resnet18(num_classes: int = 10) -> ResNet:
    """CIFAR ResNet-18 (11,173,962 parameters with 10 classes)."""
    return ResNet(18, num_classes)


def resnet34(num_classes: int = 10) -> ResNet:
    """CIFAR ResNet-34 (21,282,122 parameters with 10 classes)."""
    return ResNet(34, num_classes)
