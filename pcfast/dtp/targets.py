"""DTP targets and the local losses of the forward and feedback layers.

Notation of :mod:`pcfast.dtp.net`: ``h_0`` input, ``h_i = f_i(h_{i-1})``, ``h_M`` log-probs,
feedback ``g_i`` (layer ``i`` -> layer ``i-1``) for ``i = 2..M-1``. Per batch (Lee et al. 2015):

- top target: ``hat h_{M-1} = h_{M-1} - eta_hat * dL/dh_{M-1}`` with ``L`` the NLL summed over
  the batch, so each sample's target moves by its own loss gradient whatever the batch size;
- difference correction: ``hat h_{i-1} = h_{i-1} - g_i(h_i) + g_i(hat h_i)``;
- forward losses: ``||f_i(h_{i-1}) - hat h_i||^2`` (sum over units, mean over the batch) for
  ``i < M``; the mean NLL for ``i = M``;
- feedback losses (``"dtp"``): ``||g_i(f_i(h_{i-1} + eps)) - (h_{i-1} + eps)||^2``,
  ``eps ~ N(0, sigma^2)``; or the difference reconstruction loss (``"drl"``), see
  :func:`feedback_losses`.

Every loss reads detached inputs and detached targets, and no two losses share parameters, so
the gradient of their sum gives each layer exactly the gradient of its own loss: one
``backward()`` trains all layers, with no per-layer backward calls and no in-place hazards.

With ``eta_hat = 0.5`` the gradient of layer ``M-1``'s loss ``||h_{M-1} - hat h_{M-1}||^2``
w.r.t. its own parameters equals the BP gradient of the mean NLL: ``2 * eta_hat = 1``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch.nn import functional as F

from pcfast.dtp.net import DTPNet

FEEDBACK_LOSSES = ("dtp", "drl")

Layer = Callable[[torch.Tensor], torch.Tensor]


def difference_targets(hidden: Sequence[torch.Tensor], top_target: torch.Tensor,
                       feedback: Sequence[Layer]) -> list[torch.Tensor]:
    """Propagate a top target down with the difference correction.

    Args:
        hidden: ``[h_1, ..., h_{M-1}]``, each ``(N, d_i)``.
        top_target: ``hat h_{M-1}``, shape of ``h_{M-1}``.
        feedback: ``[g_2, ..., g_{M-1}]``; ``feedback[j]`` maps ``hidden[j+1]``'s space to
            ``hidden[j]``'s.

    Returns:
        ``[hat h_1, ..., hat h_{M-1}]`` with ``hat h_{i-1} = h_{i-1} - g_i(h_i) + g_i(hat h_i)``.

    Example::

        g = lambda h: h / 2                                  # inverse of f(h) = 2 h
        t = difference_targets([h1, 2 * h1], top, [g])       # t[0] == h1 - h1 + top / 2
    """
    if len(feedback) != len(hidden) - 1:
        raise ValueError(f"need one feedback layer per hidden layer but the first: got "
                         f"{len(hidden)} hidden layers and {len(feedback)} feedback layers")
    if top_target.shape != hidden[-1].shape:
        raise ValueError(f"top target shape {tuple(top_target.shape)} differs from the top "
                         f"hidden layer's {tuple(hidden[-1].shape)}")
    targets = [top_target]
    for j in range(len(hidden) - 2, -1, -1):
        g = feedback[j]
        targets.append(hidden[j] - g(hidden[j + 1]) + g(targets[-1]))
    return targets[::-1]


@dataclass
class ForwardPass:
    """One DTP forward pass with its targets and forward losses.

    ``activations``: ``[h_0, ..., h_M]`` (``h_i`` carries the autograd graph of ``f_i`` only);
    ``top_grad``: ``dL/dh_{M-1}`` of the summed NLL, ``(N, d_{M-1})``;
    ``targets``: ``[hat h_1, ..., hat h_{M-1}]`` (detached);
    ``losses``: ``[L_1, ..., L_M]`` scalars, ``L_M`` the mean NLL.
    """

    activations: list[torch.Tensor]
    top_grad: torch.Tensor
    targets: list[torch.Tensor]
    losses: list[torch.Tensor]

    @property
    def log_probs(self) -> torch.Tensor:
        """The output ``h_M``, ``(N, classes)``, detached."""
        return self.activations[-1].detach()

    @property
    def nll(self) -> torch.Tensor:
        """The mean NLL of the batch (the global loss ``L_M``)."""
        return self.losses[-1]


def forward_pass(net: DTPNet, x: torch.Tensor, y: torch.Tensor,
                 eta_hat: float = 0.5) -> ForwardPass:
    """Forward pass, targets and forward losses for the batch ``(x, y)``.

    Args:
        net: the network.
        x: inputs ``(N, 3, 32, 32)`` or ``(N, d_0)``.
        y: integer labels ``(N,)``.
        eta_hat: step size of the top target along ``-dL/dh_{M-1}``.

    Example::

        fp = forward_pass(net, x, y, eta_hat=0.5)
        sum(fp.losses).backward()        # each f_i gets the gradient of its own L_i
    """
    if y.dim() != 1 or y.shape[0] != x.shape[0] or y.is_floating_point():
        raise ValueError(f"labels must be integer class indices of shape ({x.shape[0]},), got "
                         f"shape {tuple(y.shape)} and dtype {y.dtype}")
    with torch.enable_grad():
        hs = net.activations(x, detach_inputs=True)
        M = net.depth
        # The top layer's input as its own leaf: dL/dh_{M-1} without touching any parameter.
        top_in = hs[M - 1].detach().requires_grad_(True)
        out = net.f(M, top_in)
        hs[M] = out
        nll_sum = F.nll_loss(out, y, reduction="sum")
        (top_grad,) = torch.autograd.grad(nll_sum, top_in, retain_graph=True)
    with torch.no_grad():
        hidden = [h.detach() for h in hs[1:M]]
        top = hidden[-1] - eta_hat * top_grad
        feedback = [partial(net.g, i) for i in net.feedback_indices()]
        targets = difference_targets(hidden, top, feedback)
    losses = [(hs[i] - targets[i - 1]).pow(2).sum(dim=1).mean() for i in range(1, M)]
    losses.append(nll_sum / x.shape[0])
    return ForwardPass(hs, top_grad, targets, losses)


def feedback_losses(net: DTPNet, activations: Sequence[torch.Tensor], sigma: float,
                    kind: str = "dtp") -> list[torch.Tensor]:
    """The reconstruction losses of ``g_2..g_{M-1}`` (scalars, mean over the batch).

    ``"dtp"`` (Lee et al. 2015): ``||g_i(f_i(h_{i-1} + eps)) - (h_{i-1} + eps)||^2``.

    ``"drl"``, the difference reconstruction loss (Meulemans et al. 2020, "A theoretical
    framework for target propagation"): the corrupted activation is carried up to the top
    hidden layer, ``r_{M-1} = f_{M-1}(...f_i(h_{i-1} + eps))``, then back down through the
    difference-corrected feedback ``r_{k-1} = h_{k-1} - g_k(h_k) + g_k(r_k)`` (the same map as
    the targets), and

        ``DRL_i = ||h_{i-1} - g_i(h_i) + g_i(r_i) - (h_{i-1} + eps)||^2``.

    It trains ``g_i`` so that the difference-corrected feedback path inverts the forward path
    from layer ``i-1`` to the top (its Jacobian), not the layer alone. As in that paper, the
    loss of layer ``i`` trains ``g_i`` only: ``f`` and ``g_{i+1..M-1}`` act as fixed maps here.
    (Their optional extra regulariser on the feedback Jacobian is not included.)

    Args:
        net: the network.
        activations: ``[h_0, ..., h_M]`` from a forward pass (detached here).
        sigma: standard deviation of the corruption ``eps``.
        kind: ``"dtp"`` or ``"drl"``.

    Returns:
        ``[loss_g2, ..., loss_g{M-1}]``; each carries the autograd graph of its ``g_i`` only.

    Example::

        hs = net.activations(x)
        sum(feedback_losses(net, hs, sigma=0.1)).backward()
    """
    if kind not in FEEDBACK_LOSSES:
        raise ValueError(f"feedback loss must be one of {FEEDBACK_LOSSES}, got {kind!r}")
    if not sigma >= 0:
        raise ValueError(f"sigma must be non-negative, got {sigma}")
    M = net.depth
    hs = [h.detach() for h in activations]
    losses = []
    for i in net.feedback_indices():
        corrupted = hs[i - 1] + sigma * torch.randn_like(hs[i - 1])
        with torch.no_grad():
            r = net.f(i, corrupted)
            if kind == "drl":
                for k in range(i + 1, M):
                    r = net.f(k, r)
                for k in range(M - 1, i, -1):
                    r = hs[k - 1] - net.g(k, hs[k]) + net.g(k, r)
        with torch.enable_grad():
            recon = net.g(i, r)
            if kind == "drl":
                recon = hs[i - 1] - net.g(i, hs[i]) + recon
            losses.append((recon - corrupted).pow(2).sum(dim=1).mean())
    return losses


@torch.no_grad()
def reconstruction_errors(net: DTPNet, activations: Sequence[torch.Tensor]) -> torch.Tensor:
    """Noise-free reconstruction error of each ``g_i``, ``i = 2..M-1``.

    ``mean_n mean_units (g_i(f_i(h_{i-1})) - h_{i-1})^2``; returns a tensor ``(M-2,)``.

    Example::

        errs = reconstruction_errors(net, net.activations(x_held_out))   # errs[0] is g_2's
    """
    hs = activations
    errs = [(net.g(i, hs[i]) - hs[i - 1]).pow(2).mean() for i in net.feedback_indices()]
    return torch.stack(errs) if errs else hs[0].new_zeros(0)
