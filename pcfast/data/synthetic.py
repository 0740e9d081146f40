"""A small built-in synthetic image set that is learnable: the pipeline's stand-in for CIFAR-10.

Each of the 10 classes has a smooth random colour template; an image is its class template with a
random brightness shift and pixel noise, stored as uint8 like CIFAR-10.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pcfast.data.cifar10 import CIFAR10Split


def make_synthetic(n_train: int = 5000, n_test: int = 1000, seed: int = 0,
                   noise: float = 48.0) -> tuple[CIFAR10Split, CIFAR10Split]:
    """Training and test splits of ``(N, 3, 32, 32)`` uint8 images with labels 0..9.

    Example::

        train, test = make_synthetic(2000, 500)
    """
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(10, 3, 4, 4, generator=g)
    templates = F.interpolate(coarse, size=(32, 32), mode="bicubic", align_corners=False)
    templates = 40 + 175 * templates.clamp(0, 1)

    def split(n: int) -> CIFAR10Split:
        labels = torch.randint(0, 10, (n,), generator=g)
        shift = 30 * torch.randn(n, 1, 1, 1, generator=g)
        pixels = noise * torch.randn(n, 3, 32, 32, generator=g)
        images = (templates[labels] + shift + pixels).round().clamp(0, 255).to(torch.uint8)
        return CIFAR10Split(images.numpy(), labels.numpy().astype(np.int64))

    return split(n_train), split(n_test)
