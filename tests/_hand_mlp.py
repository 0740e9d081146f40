"""A 2-hidden-layer tanh MLP with every PC derivative in closed form: the independent oracle of
the strict-PC, state-momentum and iPC tests (float64)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pcfast.pc import sequential_graph


def strict_update(x: torch.Tensor, e: torch.Tensor, dF_dx: torch.Tensor, rate: float,
                  clamp: float | None) -> torch.Tensor:
    """``x <- x - rate * (e - clamp(e - dF/dx))``; ``e - dF/dx = sum_v J_vu^T e_v``."""
    back = e - dF_dx
    if clamp is not None:
        back = back.clamp(-clamp, clamp)
    return x - rate * (e - back)


class HandMLP:
    """``x -> tanh(W1 x + b1) -> tanh(W2 . + b2) -> W3 . + b3`` (CE output), every derivative
    in closed form. Rows are samples: ``a = x @ W.T + b``."""

    def __init__(self, layers: list[nn.Linear]) -> None:
        self.W = [lin.weight.detach().clone() for lin in layers]
        self.b = [lin.bias.detach().clone() for lin in layers]

    def predict(self, u: int, parent: torch.Tensor) -> torch.Tensor:
        a = parent @ self.W[u].T + self.b[u]
        return a if u == 2 else torch.tanh(a)

    def dF_dvalues(self, x0, x1, x2, y, which: tuple[int, ...]) -> dict[int, torch.Tensor]:
        """dF/dx_u for the hidden values ``x1`` (u=1) and ``x2`` (u=2), all at given values."""
        mu1, mu2, mu3 = self.predict(0, x0), self.predict(1, x1), self.predict(2, x2)
        e1, e2 = x1 - mu1, x2 - mu2
        d_out = torch.softmax(mu3, 1) - F.one_hot(y, mu3.shape[1]).double()  # dCE_sum/dmu3
        out = {}
        if 1 in which:  # e1 - J_21^T e2, J_21 = diag(1 - mu2^2) W2
            out[1] = e1 - (e2 * (1 - mu2 ** 2)) @ self.W[1]
        if 2 in which:  # e2 + W3^T dCE/dmu3
            out[2] = e2 + d_out @ self.W[2]
        return out

    def relax(self, x0, y, T: int, rate: float, schedule: str, clamp: float | None,
              momentum: float = 0.0, nesterov: bool = False, fpa: bool = False):
        """Strict PC (or FPA: predictions, Jacobians and the output error frozen at the
        feedforward values), plain steps or momentum on the values."""
        x1 = self.predict(0, x0)
        x2 = self.predict(1, x1)
        ff = (x1, x2)
        velocity: dict[int, torch.Tensor] = {}

        def grads(a1, a2, which):
            if not fpa:
                return self.dF_dvalues(x0, a1, a2, y, which)
            # FPA: dF/dx_u = e_u - J^T e_v with J and mu at the feedforward values.
            g = self.dF_dvalues(x0, *ff, y, which)  # the feedforward errors are zero
            e = {1: a1 - ff[0], 2: a2 - ff[1]}
            mu2 = ff[1]
            if 1 in which:
                g[1] = e[1] - (e[2] * (1 - mu2 ** 2)) @ self.W[1]
            if 2 in which:
                g[2] = g[2] + e[2]
            return g

        def update(u, x, e, dF_dx):
            if not momentum:
                return strict_update(x, e, dF_dx, rate, clamp)
            back = e - dF_dx
            if clamp is not None:
                back = back.clamp(-clamp, clamp)
            g = e - back
            v = g if u not in velocity else momentum * velocity[u] + g
            velocity[u] = v
            return x - rate * (g + momentum * v if nesterov else v)

        def mu(u, parent):
            return ff[u] if fpa else self.predict(u, parent)

        for _ in range(T):
            if schedule == "jacobi":
                g = grads(x1, x2, (1, 2))
                e1, e2 = x1 - mu(0, x0), x2 - mu(1, x1)
                x1, x2 = update(1, x1, e1, g[1]), update(2, x2, e2, g[2])
            else:  # top-down: x2 first, then x1 with the fresh x2
                g2 = grads(x1, x2, (2,))[2]
                x2 = update(2, x2, x2 - mu(1, x1), g2)
                g1 = grads(x1, x2, (1,))[1]
                x1 = update(1, x1, x1 - mu(0, x0), g1)
        return x1, x2

    def fpa_weight_grads(self, x0, x1, x2, y) -> list[torch.Tensor]:
        """FPA: each layer's gradient from its relaxed error and its feedforward input."""
        n = x0.shape[0]
        mu1 = self.predict(0, x0)
        mu2 = self.predict(1, mu1)
        mu3 = self.predict(2, mu2)
        d3 = torch.softmax(mu3, 1) - F.one_hot(y, mu3.shape[1]).double()
        d2 = -(x2 - mu2) * (1 - mu2 ** 2)
        d1 = -(x1 - mu1) * (1 - mu1 ** 2)
        grads = []
        for d, inp in ((d1, x0), (d2, mu1), (d3, mu2)):
            grads += [d.T @ inp / n, d.sum(0) / n]
        return grads

    def weight_grads(self, x0, x1, x2, y) -> list[torch.Tensor]:
        """dF/dtheta / N at the relaxed values, in nn.Linear order (W1, b1, W2, b2, W3, b3)."""
        n = x0.shape[0]
        mu1, mu2, mu3 = self.predict(0, x0), self.predict(1, x1), self.predict(2, x2)
        d3 = torch.softmax(mu3, 1) - F.one_hot(y, mu3.shape[1]).double()
        d2 = -(x2 - mu2) * (1 - mu2 ** 2)  # dF/da2
        d1 = -(x1 - mu1) * (1 - mu1 ** 2)  # dF/da1
        grads = []
        for d, inp in ((d1, x0), (d2, x1), (d3, x2)):
            grads += [d.T @ inp / n, d.sum(0) / n]
        return grads


    def ipc(self, x0, y, T: int, rate: float, schedule: str, lr: float):
        """Incremental PC with plain SGD (``lr``) on the weights, which this object holds and
        updates: every step takes ``dF/dtheta / N`` and ``dF/dx`` at the same point, moves the
        values (jacobi, or a top-down sweep) and then the weights. Returns the final values."""
        x1 = self.predict(0, x0)
        x2 = self.predict(1, x1)
        for _ in range(T):
            wg = self.weight_grads(x0, x1, x2, y)
            if schedule == "jacobi":
                g = self.dF_dvalues(x0, x1, x2, y, (1, 2))
                e1, e2 = x1 - self.predict(0, x0), x2 - self.predict(1, x1)
                x1, x2 = (strict_update(x1, e1, g[1], rate, None),
                          strict_update(x2, e2, g[2], rate, None))
            else:
                g2 = self.dF_dvalues(x0, x1, x2, y, (2,))[2]
                x2 = strict_update(x2, x2 - self.predict(1, x1), g2, rate, None)
                g1 = self.dF_dvalues(x0, x1, x2, y, (1,))[1]
                x1 = strict_update(x1, x1 - self.predict(0, x0), g1, rate, None)
            for i in range(3):
                self.W[i] = self.W[i] - lr * wg[2 * i]
                self.b[i] = self.b[i] - lr * wg[2 * i + 1]
        return x1, x2

    def epc(self, x0, y, T: int, rate: float):
        """Error-based PC: errors ``e1, e2`` from zero, ``x1 = mu1(x0) + e1``,
        ``x2 = tanh(W2 x1 + b2) + e2``, ``e <- e - rate dF/de`` in closed form (the output loss
        reaches both errors through the forward composition). Returns the final values."""
        W2, b2, W3 = self.W[1], self.b[1], self.W[2]
        mu1 = self.predict(0, x0)
        e1 = torch.zeros_like(mu1)
        e2 = torch.zeros(x0.shape[0], W2.shape[0], dtype=x0.dtype)
        for _ in range(T):
            x1 = mu1 + e1
            t2 = torch.tanh(x1 @ W2.T + b2)
            out = self.predict(2, t2 + e2)
            dL_dx2 = (torch.softmax(out, 1) - F.one_hot(y, out.shape[1]).double()) @ W3
            dL_dx1 = (dL_dx2 * (1 - t2 ** 2)) @ W2
            e1, e2 = e1 - rate * (e1 + dL_dx1), e2 - rate * (e2 + dL_dx2)
        x1 = mu1 + e1
        return x1, self.predict(1, x1) + e2

def strict_mlp_case():
    torch.manual_seed(3)
    layers = [nn.Linear(5, 8), nn.Linear(8, 6), nn.Linear(6, 4)]
    for lin in layers:
        nn.init.normal_(lin.weight, std=0.7)
        nn.init.normal_(lin.bias, std=0.3)
    layers = [lin.double() for lin in layers]
    graph = sequential_graph([nn.Sequential(layers[0], nn.Tanh()),
                              nn.Sequential(layers[1], nn.Tanh()), layers[2]])
    g = torch.Generator().manual_seed(4)
    x = torch.randn(7, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (7,), generator=g)
    return layers, graph, x, y

