"""Small building blocks shared by the models: merges, classifier heads, input checks."""

from __future__ import annotations

import torch
from torch import nn


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
