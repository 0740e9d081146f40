"""VGG-5 and VGG-7: the CIFAR-10 convolutional networks of the PCX benchmark.

Pinchetti et al., "Benchmarking Predictive Coding Networks -- Made Simple" (ICLR 2025,
arXiv 2407.01163), code at github.com/liukidar/pcx (the paper's experiments were in
``examples/s4_1_discriminative_mode/models.py`` and
``examples/s6_computational_resources/time_benchmarking/VGG*/cifar10/PC_SE.py`` until commit
3778164 removed them; the layers below follow those files).

Every block is ``Conv2d(3x3, stride 1) -> activation [-> MaxPool2d(2, 2)]``; the classifier is
ONE linear layer on the flattened last feature map. No BatchNorm, no dropout; every conv and
the linear layer have a bias. PCX places one value node ("vode") after every block and one at
the output, so ``pc_graph()`` has one node per block and one for the classifier.

=====  ==============================  ==========================  =========================
net    channels                        padding                     2x2 max-pool after block
=====  ==============================  ==========================  =========================
VGG-5  128, 256, 512, 512              1, 1, 1, 1                  1, 2, 3, 4
VGG-7  128, 128, 256, 256, 512, 512    1, 1, 1, 0, 1, 0            1, 3, 5
=====  ==============================  ==========================  =========================

On 32x32 inputs VGG-5's last map is 512 x 2 x 2 (linear 2048 -> 10) and VGG-7's is
512 x 1 x 1 (32 -> pool 16 -> 16 -> pool 8 -> 6 -> pool 3 -> 1; linear 512 -> 10).

Initialisation is PyTorch's default (uniform, bound ``1/sqrt(fan_in)`` for weights and biases),
which is also the default of the equinox layers PCX wraps; no He init.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from pcfast.models.layers import check_image_batch
from pcfast.models.simple import ACTIVATIONS, make_activation
from pcfast.pc.graph import PCGraph, sequential_graph

# (out_channels, padding, max-pool after the block) per conv block.
VGG5_BLOCKS: tuple[tuple[int, int, bool], ...] = (
    (128, 1, True), (256, 1, True), (512, 1, True), (512, 1, True),
)
VGG7_BLOCKS: tuple[tuple[int, int, bool], ...] = (
    (128, 1, True), (128, 1, False), (256, 1, True), (256, 0, False), (512, 1, True), (512, 0, False),
)

# PCX takes its activations from jax.nn: ``gelu`` there is the tanh approximation (jax's
# default ``approximate=True``), ``hard_tanh`` clips to [-1, 1], ``leaky_relu`` has slope 0.01.
VGG_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    **ACTIVATIONS,
    "gelu": lambda: nn.GELU(approximate="tanh"),
    "gelu_exact": nn.GELU,
    "hard_tanh": nn.Hardtanh,
}


def vgg_activation(name: str) -> nn.Module:
    """A fresh activation module by name (see ``VGG_ACTIVATIONS``)."""
    return make_activation(name, VGG_ACTIVATIONS)


class VGG(nn.Module):
    """A PCX-style VGG: conv blocks (3x3 conv, activation, optional 2x2 max-pool) and one linear.

    Args:
        blocks: ``(out_channels, padding, pool)`` per conv block (``VGG5_BLOCKS``,
            ``VGG7_BLOCKS``).
        num_classes: outputs of the linear classifier.
        in_channels: input channels (3 for CIFAR-10).
        image_size: input height and width (32 for CIFAR-10; PCX used 56 for Tiny ImageNet).
        activation: a name from ``VGG_ACTIVATIONS`` (``gelu`` is the tanh approximation, as
            ``jax.nn.gelu``).

    Shapes: ``(N, in_channels, image_size, image_size) -> (N, num_classes)``.

    Example::

        net = VGG(VGG5_BLOCKS, activation="gelu")
        logits = net(torch.randn(7, 3, 32, 32))   # (7, 10)
        graph = net.pc_graph()                    # nodes block0..block3, head
    """

    def __init__(self, blocks: Sequence[tuple[int, int, bool]], num_classes: int = 10,
                 in_channels: int = 3, image_size: int = 32, activation: str = "gelu") -> None:
        super().__init__()
        if not blocks:
            raise ValueError("a VGG needs at least one conv block")
        self.in_channels, self.image_size = in_channels, image_size
        self.activation = activation
        layers: list[nn.Module] = []
        c, size = in_channels, image_size
        for i, (out, padding, pool) in enumerate(blocks):
            size = size + 2 * padding - 2  # 3x3 conv, stride 1
            if pool:
                size //= 2
            if size < 1:
                raise ValueError(f"{image_size}px images are too small for this VGG: the feature "
                                 f"map of block {i} would be empty")
            parts: list[nn.Module] = [nn.Conv2d(c, out, 3, padding=padding), vgg_activation(activation)]
            if pool:
                parts.append(nn.MaxPool2d(2, 2))
            layers.append(nn.Sequential(*parts))
            c = out
        self.feature_shape = (c, size, size)
        layers.append(nn.Sequential(nn.Flatten(), nn.Linear(c * size * size, num_classes)))
        self.layers = nn.Sequential(*layers)
        self.names = [f"block{i}" for i in range(len(blocks))] + ["head"]

    def _check(self, x: torch.Tensor) -> None:
        check_image_batch(x, self.in_channels, self.image_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` images to ``(N, num_classes)`` logits."""
        self._check(x)
        return self.layers(x)

    def pc_graph(self) -> PCGraph:
        """One node per conv block (conv, activation, pool: PCX's vode sits after the pool) and
        one for the classifier (flatten + linear), whose value is the logits."""
        return sequential_graph(list(self.layers), self.names, input_check=self._check)


def vgg5(num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
         activation: str = "gelu") -> VGG:
    """PCX's VGG-5: conv 128-256-512-512 (3x3, pad 1, each followed by a 2x2 max-pool), linear.

    3,859,210 parameters for CIFAR-10. The default activation is that of PCX's CIFAR-10 PC runs
    (GELU, tanh approximation).
    """
    return VGG(VGG5_BLOCKS, num_classes, in_channels, image_size, activation)


def vgg7(num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
         activation: str = "hard_tanh") -> VGG:
    """PCX's VGG-7: conv 128-128-256-256-512-512 (3x3; padding 1,1,1,0,1,0; 2x2 max-pool after
    blocks 1, 3, 5), linear.

    4,581,514 parameters for CIFAR-10. The default activation is that of PCX's CIFAR-10 VGG-7
    PC-SE run (hard tanh).
    """
    return VGG(VGG7_BLOCKS, num_classes, in_channels, image_size, activation)
