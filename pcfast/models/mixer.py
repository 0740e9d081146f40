"""MLP-Mixer (Tolstikhin et al. 2021) for small images.

Patch embedding (a ``p x p`` stride-``p`` conv to ``C`` channels), ``N`` Mixer layers, LayerNorm,
global average pool over tokens, linear classifier. Each Mixer layer is
``x = x + TokenMLP(LN(x)^T)^T`` then ``x = x + ChannelMLP(LN(x))`` with two-layer GELU MLPs
of widths ``D_S`` (token mixing, over the ``S = (H/p)^2`` patches) and ``D_C`` (channel mixing).
"""

from __future__ import annotations

import torch
from torch import nn

from pcfast.models.layers import check_image_batch


class MlpBlock(nn.Sequential):
    """``Linear(dim, hidden) -> GELU -> Linear(hidden, dim)`` on the last axis."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class MixerLayer(nn.Module):
    """One Mixer layer on tokens of shape ``(N, S, C)``."""

    def __init__(self, tokens: int, channels: int, token_mlp: int, channel_mlp: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(channels)
        self.token_mix = MlpBlock(tokens, token_mlp)
        self.norm2 = nn.LayerNorm(channels)
        self.channel_mix = MlpBlock(channels, channel_mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.token_mix(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mix(self.norm2(x))


class MLPMixer(nn.Module):
    """MLP-Mixer classifier.

    Args:
        patch_size: ``p``; the image side must be divisible by it.
        hidden: ``C``, channels per token.
        depth: ``N``, number of Mixer layers.
        token_mlp: ``D_S``, hidden width of the token-mixing MLP.
        channel_mlp: ``D_C``, hidden width of the channel-mixing MLP.
        image_size, in_channels, num_classes: input and output sizes.

    Shapes: ``(N, in_channels, image_size, image_size) -> (N, num_classes)``.

    Example::

        net = MLPMixer(patch_size=4, hidden=128, depth=8, token_mlp=64, channel_mlp=512)
        logits = net(torch.randn(7, 3, 32, 32))   # (7, 10)
    """

    def __init__(self, patch_size: int = 4, hidden: int = 128, depth: int = 8,
                 token_mlp: int = 64, channel_mlp: int = 512, image_size: int = 32,
                 in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        if patch_size < 1 or image_size % patch_size:
            raise ValueError(
                f"image_size {image_size} must be divisible by patch_size {patch_size} "
                "(CIFAR: use 1, 2, 4, 8, 16 or 32)"
            )
        self.image_size, self.in_channels = image_size, in_channels
        tokens = (image_size // patch_size) ** 2
        self.patch = nn.Conv2d(in_channels, hidden, patch_size, stride=patch_size)
        self.layers = nn.Sequential(
            *(MixerLayer(tokens, hidden, token_mlp, channel_mlp) for _ in range(depth))
        )
        self.norm = nn.LayerNorm(hidden)
        self.fc = nn.Linear(hidden, num_classes)
        self._init()

    def _init(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.normal_(m.bias, std=1e-6)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_batch(x, self.in_channels, self.image_size)
        tokens = self.patch(x).flatten(2).transpose(1, 2)  # (N, S, C)
        return self.fc(self.norm(self.layers(tokens)).mean(dim=1))
