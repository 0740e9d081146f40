"""Preprocessing applied on the device to float images in ``[0, 1]``, fitted on the training split.

Every preprocessor has ``fit(train_images_uint8_nchw) -> self`` and ``__call__(x01) -> x``;
``PREPROCESSORS`` maps the names used by ``--preprocess`` to their factories.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from pcfast.data.zca import PixelMean, ZCAWhiten

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class Preprocessor(Protocol):
    def fit(self, train_images: torch.Tensor) -> Preprocessor: ...
    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class ChannelNormalize:
    """``(x - mean_c) / std_c`` per channel.

    With ``mean``/``std`` left as None they are fitted on the training split.
    """

    def __init__(self, mean: tuple[float, ...] | None = None,
                 std: tuple[float, ...] | None = None) -> None:
        self.mean = None if mean is None else torch.tensor(mean).view(1, -1, 1, 1)
        self.std = None if std is None else torch.tensor(std).view(1, -1, 1, 1)

    def fit(self, train_images: torch.Tensor) -> ChannelNormalize:
        if self.mean is None or self.std is None:
            x = train_images.float().div(255)
            self.mean = x.mean(dim=(0, 2, 3)).view(1, -1, 1, 1)
            self.std = x.std(dim=(0, 2, 3)).view(1, -1, 1, 1)
        self.mean = self.mean.to(train_images.device)
        self.std = self.std.to(train_images.device)
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Identity:
    """Leaves images in ``[0, 1]``."""

    def fit(self, train_images: torch.Tensor) -> Identity:
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x


PREPROCESSORS: dict[str, Callable[[], Preprocessor]] = {
    "channel": ChannelNormalize,
    "cifar10": lambda: ChannelNormalize(CIFAR10_MEAN, CIFAR10_STD),
    "half": lambda: ChannelNormalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "none": Identity,
    # He et al. 2016: per-pixel mean of the training split, on the 0..255 scale / on [0, 1];
    # ZCA after the [0, 1] mean (build ZCAWhiten(eps=...) for another epsilon).
    "pixel-mean": PixelMean,
    "pixel-mean-div255": lambda: PixelMean(scale=1.0),
    "zca": ZCAWhiten,
}


def build_preprocessor(name: str) -> Preprocessor:
    try:
        return PREPROCESSORS[name]()
    except KeyError:
        raise ValueError(
            f"unknown preprocessing {name!r}; choose from: {', '.join(sorted(PREPROCESSORS))}"
        ) from None
