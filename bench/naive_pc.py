"""A faithful re-creation of the seed project's PC loop for Res-DualNet: the baseline to beat.

What the seed did (DESIGN.md sections 1, 2 and 4), and what this file does the same way:

- data: a ``torch.utils.data.Dataset`` of uint8 HWC images, CPU-side torchvision transforms
  (RandomHorizontalFlip, ToTensor, Normalize) through a ``DataLoader``, batches copied to the
  device;
- one value node per sub-layer (``model.pc_graph()``), one Adam optimizer per sub-layer;
- FPA, jacobi: one feedforward pass sets ``x_v = mu_v``; then every inference step computes, for
  every node, ``torch.autograd.functional.vjp(node_fn, node_inputs, e_v)`` — re-running that
  layer's forward each time — and updates ``x_u <- x_u - rate * (e_u - sum_v J_vu^T e_v)``;
- weights: each layer re-runs its forward once more and back-propagates its own error,
  ``grad = -(d mu_v / d theta)^T e_v / N``, then steps its own optimizer.

BatchNorm running statistics move with the feedforward pass only, as in pcfast's engines (every
re-run forward keeps them frozen), so this computes exactly the reference engine's math.

Example::

    net = ResDualNet().cuda()
    naive = NaivePC(net, T=100, rate=0.5)
    for x, y in seed_loader(make_uint8_dataset(512), batch_size=256):
        naive.step(x.cuda(), y.cuda())
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pcfast.data.preprocess import CIFAR10_MEAN, CIFAR10_STD
from pcfast.pc.energy import frozen_running_stats, output_error


class UInt8Images(Dataset):
    """``(H, W, 3)`` uint8 images with int labels, transformed on the CPU per item."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def make_uint8_dataset(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` synthetic uint8 images of CIFAR-10 shape ``(n, 32, 32, 3)`` and labels ``(n,)``."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
            rng.integers(0, 10, n, dtype=np.int64))


def seed_loader(data: tuple[np.ndarray, np.ndarray], batch_size: int,
                num_workers: int = 0) -> DataLoader:
    """The seed's input pipeline: torchvision transforms on the CPU through a DataLoader."""
    from torchvision import transforms

    tf = transforms.Compose([transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                             transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)])
    return DataLoader(UInt8Images(*data, tf), batch_size=batch_size, shuffle=True,
                      num_workers=num_workers, drop_last=True)


class NaivePC:
    """The seed's per-layer-vjp PC loop (FPA, jacobi, cross-entropy output)."""

    def __init__(self, model: nn.Module, T: int = 100, rate: float = 0.5, lr: float = 0.01) -> None:
        self.graph = model.pc_graph()
        self.T, self.rate = T, rate
        self.optimizers = [torch.optim.Adam(node.fn.parameters(), lr=lr)
                           for node in self.graph.nodes if self.graph.node_parameters(node)]

    def compute_gradients(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Relax, then write every parameter's ``.grad``; returns the relaxed errors."""
        g = self.graph
        with torch.no_grad():
            values = {g.input_name: x}
            for node in g.nodes:  # feedforward: x_v = mu_v (moves BN running stats once)
                values[node.name] = node.fn(*(values[p] for p in node.parents))
        mus = {name: values[name].clone() for name in g.hidden}
        errors = {name: torch.zeros_like(mus[name]) for name in g.hidden}
        errors[g.output] = output_error(values[g.output], y, "ce")
        with frozen_running_stats(g.modules):
            for _ in range(self.T):
                back = {name: torch.zeros_like(mus[name]) for name in g.hidden}
                for node in g.nodes:
                    hidden = [p for p in node.parents if p != g.input_name]
                    if not hidden:
                        continue
                    # FPA: Jacobians at the feedforward values; the layer's forward re-runs.
                    inputs = tuple(x if p == g.input_name else mus[p] for p in node.parents)
                    _, vjps = torch.autograd.functional.vjp(node.fn, inputs, errors[node.name])
                    for p, v in zip(node.parents, vjps):
                        if p != g.input_name:
                            back[p] = back[p] + v
                for name in g.hidden:
                    values[name] = values[name] - self.rate * (errors[name] - back[name])
                for name in g.hidden:
                    errors[name] = values[name] - mus[name]
            n = x.shape[0]
            for node in g.nodes:
                if not g.node_parameters(node):
                    continue
                # FPA: the prediction at the feedforward inputs; the forward is re-run here.
                inputs = (x if p == g.input_name else mus[p] for p in node.parents)
                with torch.enable_grad():
                    mu = node.fn(*inputs)
                    (mu * (-errors[node.name] / n)).sum().backward()
        return errors

    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """One training step: zero grads, relax, per-layer gradients, every optimizer steps."""
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        errors = self.compute_gradients(x, y)
        for opt in self.optimizers:
            opt.step()
        return errors
