"""The dual-path depthwise 3x3 convolution of Res-DualNet."""

from __future__ import annotations

import torch
from torch import nn

# The op and its reference live in pcfast.ops; the reference is re-exported here for old imports.
from pcfast.ops.dwconv import dual_path_dwconv, dual_path_dwconv_ref


class DualPathDWConv(nn.Module):
    """Two depthwise 3x3 paths per channel whose outputs are summed.

    Equivalent to ``Conv2d(C, 2C, 3, stride, padding=1, groups=C, bias=False)`` followed by
    summing output channels ``2c`` and ``2c + 1`` for every input channel ``c``. The weight keeps
    both paths, shape ``(2C, 1, 3, 3)``, so checkpoints match the two-path formulation.

    Shapes: input ``(N, C, H, W)`` -> output ``(N, C, H_out, W_out)`` with
    ``H_out = (H - 1) // stride + 1``.

    Example::

        conv = DualPathDWConv(16, stride=2)
        y = conv(torch.randn(8, 16, 32, 32))   # (8, 16, 16, 16)
    """

    def __init__(self, channels: int, stride: int = 1) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"DualPathDWConv supports stride 1 or 2, got {stride}")
        self.channels = channels
        self.stride = stride
        self.weight = nn.Parameter(torch.empty(2 * channels, 1, 3, 3))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # the default init of nn.Conv2d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dual_path_dwconv(x, self.weight, self.stride, backend="auto")

    def extra_repr(self) -> str:
        return f"{self.channels}, stride={self.stride}"


__all__ = ["DualPathDWConv", "dual_path_dwconv_ref"]
