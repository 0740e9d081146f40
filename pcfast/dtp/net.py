"""The DTP network: fully connected forward layers ``f_i`` and feedback layers ``g_i``.

Layers are numbered as in Lee et al. 2015: ``h_0`` is the flattened input, ``h_i = f_i(h_{i-1})``
for ``i = 1..M`` and ``h_M`` holds the log-probabilities. The top hidden layer ``h_{M-1}`` gets
its target from the loss gradient, so feedback layers exist only between hidden layers:
``g_i`` maps layer ``i``'s space back to layer ``i-1``'s for ``i = 2..M-1``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "sigmoid": nn.Sigmoid,
    "linear": nn.Identity,
}

BASELINE_SIZES: tuple[int, ...] = (3072, 1000, 1000, 1000, 10)


def _activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose from: "
                         f"{', '.join(sorted(ACTIVATIONS))}") from None


class DTPNet(nn.Module):
    """A fully connected net with forward layers ``f_1..f_M`` and feedback layers ``g_2..g_{M-1}``.

    ``f_i(h) = act(W_i h + b_i)`` for ``i < M``; ``f_M(h) = log_softmax(W_M h + b_M)``;
    ``g_i(h) = act_g(V_i h + c_i)``. ``net(x)`` is an ordinary forward pass, so BP can train the
    same module (it then ignores the feedback layers).

    Args:
        sizes: layer widths ``(d_0, ..., d_M)``; ``d_0`` is the flattened input size, ``d_M`` the
            number of classes. At least one hidden layer. Default: the CIFAR-10 baseline
            3072-1000-1000-1000-10.
        activation: hidden activation of ``f_i`` (``tanh`` default; see ``ACTIVATIONS``).
        feedback_activation: activation of ``g_i``; defaults to ``activation``.

    Shapes: input ``(N, 3, 32, 32)`` or ``(N, d_0)`` (any ``(N, ...)`` with ``d_0`` features),
    output ``(N, d_M)`` log-probabilities.

    Example::

        net = DTPNet((3072, 256, 256, 10))
        logp = net(torch.randn(8, 3, 32, 32))        # (8, 10), rows sum to 1 after exp()
        hs = net.activations(torch.randn(8, 3072))   # [h_0, h_1, h_2, h_3]
    """

    def __init__(self, sizes: Sequence[int] = BASELINE_SIZES, activation: str = "tanh",
                 feedback_activation: str | None = None) -> None:
        super().__init__()
        sizes = tuple(int(s) for s in sizes)
        if len(sizes) < 3 or min(sizes) < 1:
            raise ValueError(f"sizes must list at least input, one hidden and output width, all "
                             f"positive, e.g. (3072, 1000, 10); got {sizes}")
        self.sizes = sizes
        self.activation_name = activation
        self.feedback_activation_name = feedback_activation or activation
        self.act = _activation(activation)
        self.feedback_act = _activation(self.feedback_activation_name)
        self.forward_layers = nn.ModuleList(
            nn.Linear(sizes[i], sizes[i + 1]) for i in range(len(sizes) - 1))
        # feedback_layers[j] is g_{j+2}: layer j+2's width -> layer j+1's width.
        self.feedback_layers = nn.ModuleList(
            nn.Linear(sizes[i + 1], sizes[i]) for i in range(1, len(sizes) - 2))

    @property
    def depth(self) -> int:
        """``M``, the number of forward layers."""
        return len(self.forward_layers)

    def feedback_indices(self) -> range:
        """The indices ``i`` that have a feedback layer ``g_i``: ``2..M-1``."""
        return range(2, self.depth)

    def f(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Forward layer ``f_i`` (1-based): ``(N, d_{i-1}) -> (N, d_i)``."""
        z = self.forward_layers[i - 1](h)
        return F.log_softmax(z, dim=1) if i == self.depth else self.act(z)

    def g(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Feedback layer ``g_i`` for ``i in 2..M-1``: ``(N, d_i) -> (N, d_{i-1})``."""
        if i not in self.feedback_indices():
            raise IndexError(f"feedback layers are g_2..g_{self.depth - 1}; there is no g_{i}")
        return self.feedback_act(self.feedback_layers[i - 2](h))

    def forward_parameters(self) -> list[nn.Parameter]:
        """Parameters of ``f_1..f_M`` (the forward weights)."""
        return list(self.forward_layers.parameters())

    def feedback_parameters(self) -> list[nn.Parameter]:
        """Parameters of ``g_2..g_{M-1}`` (the feedback weights)."""
        return list(self.feedback_layers.parameters())

    def flatten_input(self, x: torch.Tensor) -> torch.Tensor:
        """Check ``x`` and flatten it to ``(N, d_0)``."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor batch, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"expected a floating-point batch, got dtype {x.dtype}; convert "
                            "uint8 images with x.float().div(255) and normalise them")
        if x.dim() < 2 or x[0].numel() != self.sizes[0]:
            raise ValueError(
                f"expected a batch (N, {self.sizes[0]}) or (N, 3, 32, 32) with {self.sizes[0]} "
                f"features per sample, got shape {tuple(x.shape)}; add a batch dimension with "
                "x.unsqueeze(0), or build DTPNet with sizes[0] equal to the input size")
        return x.reshape(x.shape[0], -1)

    def activations(self, x: torch.Tensor, detach_inputs: bool = False) -> list[torch.Tensor]:
        """``[h_0, h_1, ..., h_M]`` for the batch ``x``.

        With ``detach_inputs`` every layer sees a detached input, so the autograd graph of
        ``h_i`` reaches ``f_i``'s parameters only: a loss on ``h_i`` trains layer ``i`` alone.
        """
        hs = [self.flatten_input(x)]
        for i in range(1, self.depth + 1):
            h = hs[-1].detach() if detach_inputs else hs[-1]
            hs.append(self.f(i, h))
        return hs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Log-probabilities ``(N, d_M)`` of the batch ``x``."""
        h = self.flatten_input(x)
        for i in range(1, self.depth + 1):
            h = self.f(i, h)
        return h

    def extra_repr(self) -> str:
        return (f"sizes={self.sizes}, activation={self.activation_name!r}, "
                f"feedback_activation={self.feedback_activation_name!r}")
