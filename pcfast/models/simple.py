"""Configurable simple nets: an MLP from a list of widths, a CNN from a layer list, and a
residual CNN from a channel list with small (basic) or big (bottleneck) blocks.

Every one of them is a chain of sub-layers (or of residual blocks) and has ``pc_graph()``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from pcfast.models.cifar_resnet import BasicBlock, conv_bn
from pcfast.models.init import he_init
from pcfast.models.layers import AddReLU, BlockNet, Head, check_image_batch
from pcfast.pc.graph import Node, PCGraph, sequential_graph

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.01),
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "elu": nn.ELU,
    "selu": nn.SELU,
    "silu": nn.SiLU,
    "softplus": nn.Softplus,
    "identity": nn.Identity,
}
POOLS = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}


def make_activation(name: str, table: dict[str, Callable[[], nn.Module]] | None = None
                    ) -> nn.Module:
    """A fresh activation module by name from ``table`` (default ``ACTIVATIONS``)."""
    table = ACTIVATIONS if table is None else table
    try:
        return table[name]()
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; choose from: {', '.join(sorted(table))}"
        ) from None


class MLP(nn.Module):
    """Multi-layer perceptron on flattened images.

    ``Flatten -> [Linear -> BatchNorm1d? -> act] * len(hidden) -> Linear(num_classes)``.

    Args:
        hidden: hidden widths, e.g. ``(512, 256)``; empty gives a linear classifier.
        in_features: flattened input size (CIFAR: 3 * 32 * 32 = 3072).
        num_classes: outputs.
        activation: a name from ``ACTIVATIONS``.
        batchnorm: BatchNorm1d after every hidden linear layer.

    Shapes: ``(N, *) -> (N, num_classes)`` with ``prod(*) == in_features``.

    Example::

        net = MLP((512, 256), activation="gelu")
        logits = net(torch.randn(7, 3, 32, 32))   # (7, 10)
    """

    def __init__(self, hidden: Sequence[int] = (1024, 512, 256), in_features: int = 3072,
                 num_classes: int = 10, activation: str = "relu", batchnorm: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        layers: list[nn.Module] = []
        width = in_features
        for i, h in enumerate(hidden):
            parts: list[nn.Module] = [nn.Flatten()] if i == 0 else []
            parts.append(nn.Linear(width, h, bias=not batchnorm))
            if batchnorm:
                parts.append(nn.BatchNorm1d(h))
            parts.append(make_activation(activation))
            layers.append(nn.Sequential(*parts))
            width = h
        last = [nn.Linear(width, num_classes)]
        layers.append(nn.Sequential(*([nn.Flatten()] if not hidden else []), *last))
        self.layers = nn.Sequential(*layers)
        he_init(self)

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() < 2 or x[0].numel() != self.in_features or not x.is_floating_point():
            raise ValueError(
                f"MLP expects a floating batch (N, ...) with {self.in_features} features per "
                f"sample, got {tuple(x.shape)} {x.dtype}; set in_features to match the data"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return self.layers(x)

    def pc_graph(self) -> PCGraph:
        """One node per layer (Linear, BatchNorm, activation together); the last gives logits."""
        names = [f"fc{i}" for i in range(len(self.layers))]
        return sequential_graph(list(self.layers), names, input_check=self._check)


class CNN(nn.Module):
    """Plain CNN from a layer list such as ``[16, 16, "p", 32, 32, "p", 64, "p"]``.

    A number ``c`` is a 3x3 conv (padding 1) to ``c`` channels, then BatchNorm (optional) and
    the activation; ``"p"`` is a 2x2 pooling (``pool="max"`` or ``"avg"``). The head flattens the
    last feature map and applies a linear classifier (``head="flatten"``), or global-average
    pools first (``head="gap"``).

    Shapes: ``(N, in_channels, image_size, image_size) -> (N, num_classes)``.

    Example::

        net = CNN([16, 16, "p", 32, 32, "p"])
        logits = net(torch.randn(7, 3, 32, 32))   # (7, 10)
    """

    def __init__(self, spec: Sequence[int | str] = (32, 32, "p", 64, 64, "p", 128, 128, "p"),
                 num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
                 activation: str = "relu", batchnorm: bool = True, pool: str = "max",
                 head: str = "flatten") -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {sorted(POOLS)}, got {pool!r}")
        if head not in ("flatten", "gap"):
            raise ValueError(f"head must be 'flatten' or 'gap', got {head!r}")
        self.in_channels, self.image_size = in_channels, image_size
        layers: list[nn.Module] = []
        names: list[str] = []
        c, size = in_channels, image_size
        for i, item in enumerate(spec):
            if item == "p":
                if size < 2:
                    raise ValueError(f"too many poolings in {list(spec)} for {image_size}px images")
                layers.append(POOLS[pool](2))
                names.append(f"pool{i}")
                size //= 2
            elif isinstance(item, int) and not isinstance(item, bool) and item > 0:
                parts: list[nn.Module] = [nn.Conv2d(c, item, 3, padding=1, bias=not batchnorm)]
                if batchnorm:
                    parts.append(nn.BatchNorm2d(item))
                parts.append(make_activation(activation))
                layers.append(nn.Sequential(*parts))
                names.append(f"conv{i}")
                c = item
            else:
                raise ValueError(
                    f"CNN spec entries are positive ints (conv channels) or 'p' (pool); "
                    f"got {item!r} at position {i}"
                )
        if head == "gap":
            layers.append(Head(c, num_classes))
        else:
            layers.append(nn.Sequential(nn.Flatten(), nn.Linear(c * size * size, num_classes)))
        names.append("head")
        self.layers = nn.Sequential(*layers)
        self.names = names
        he_init(self)

    def _check(self, x: torch.Tensor) -> None:
        check_image_batch(x, self.in_channels, self.image_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return self.layers(x)

    def pc_graph(self) -> PCGraph:
        """One node per conv sub-layer (conv, BN, activation), one per pooling, one head."""
        return sequential_graph(list(self.layers), self.names, input_check=self._check)


class Bottleneck(nn.Module):
    """Bottleneck block 1x1 (c/4) -> 3x3 (c/4, stride) -> 1x1 (c), each with BatchNorm,
    merged as ``ReLU(branch + shortcut(x))`` with a 1x1 projection where the shape changes.

    Shapes: ``(N, in_channels, H, W) -> (N, out_channels, H / stride, W / stride)``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1,
                 reduction: int = 4) -> None:
        super().__init__()
        mid = max(out_channels // reduction, 1)
        self.sub1 = nn.Sequential(nn.Conv2d(in_channels, mid, 1, bias=False),
                                  nn.BatchNorm2d(mid), nn.ReLU())
        self.sub2 = conv_bn(mid, mid, stride, relu=True)
        self.sub3 = nn.Sequential(nn.Conv2d(mid, out_channels, 1, bias=False),
                                  nn.BatchNorm2d(out_channels))
        self.changes_shape = stride != 1 or in_channels != out_channels
        self.shortcut: nn.Module = nn.Identity()
        if self.changes_shape:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        self.merge = AddReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.merge(self.sub3(self.sub2(self.sub1(x))), self.shortcut(x))

    def pc_nodes(self, prefix: str, parent: str) -> list[Node]:
        """Nodes ``sub1, sub2, sub3``, the projection ``shortcut`` if any, and the ``merge``."""
        nodes = [Node(f"{prefix}.sub1", self.sub1, (parent,)),
                 Node(f"{prefix}.sub2", self.sub2, (f"{prefix}.sub1",)),
                 Node(f"{prefix}.sub3", self.sub3, (f"{prefix}.sub2",))]
        skip = parent
        if self.changes_shape:
            skip = f"{prefix}.shortcut"
            nodes.append(Node(skip, self.shortcut, (parent,)))
        nodes.append(Node(f"{prefix}.merge", self.merge, (f"{prefix}.sub3", skip)))
        return nodes


class ResCNN(BlockNet):
    """Residual CNN from a channel list: one stage per entry, ``blocks`` blocks per stage.

    Stem 3x3 conv + BN + ReLU to ``channels[0]``; stage ``i`` has ``blocks`` residual blocks
    with ``channels[i]`` output channels, the first subsampling by 2 for ``i > 0``; global
    average pool; linear. ``block`` is ``"small"`` (two 3x3 convs, projection shortcut where the
    shape changes) or ``"big"`` (bottleneck 1x1-3x3-1x1), or one of these per stage.

    Shapes: ``(N, 3, H, W) -> (N, num_classes)``.

    Example::

        net = ResCNN((32, 64, 128), blocks=2, block=("small", "small", "big"))
        logits = net(torch.randn(7, 3, 32, 32))   # (7, 10)
    """

    def __init__(self, channels: Sequence[int] = (32, 64, 128), blocks: int = 2,
                 block: str | Sequence[str] = "small", num_classes: int = 10) -> None:
        super().__init__()
        if not channels or blocks < 1:
            raise ValueError(f"need at least one stage and one block, got {channels}, {blocks}")
        kinds = [block] * len(channels) if isinstance(block, str) else list(block)
        if len(kinds) != len(channels) or any(k not in ("small", "big") for k in kinds):
            raise ValueError(
                f"block must be 'small', 'big' or one of these per stage ({len(channels)} "
                f"stages), got {block!r}"
            )
        self.stem = conv_bn(3, channels[0], 1, relu=True)
        layers: list[nn.Module] = []
        c = channels[0]
        for stage, (w, kind) in enumerate(zip(channels, kinds)):
            for i in range(blocks):
                stride = 2 if stage > 0 and i == 0 else 1
                if kind == "small":
                    layers.append(BasicBlock(c, w, stride, shortcut="B"))
                else:
                    layers.append(Bottleneck(c, w, stride))
                c = w
        self.blocks = nn.Sequential(*layers)
        self.head = Head(c, num_classes)
        he_init(self)


