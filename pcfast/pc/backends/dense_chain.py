"""PC on a dense chain (an MLP) on the CPU: strict PC as one op, FPA in closed form.

A dense chain is a graph whose nodes each read the one before, every node after the first a
``Linear`` alone or followed by Tanh, ReLU or Sigmoid (:func:`find_dense_chain`); the first node
may be anything, its prediction reads the clamped input and stays fixed. With hidden values
``v_1 .. v_L`` (``v_1`` the first node's output), node ``k`` predicts
``mu_{k+1} = act_k(v_k W_k^T + b_k)`` and ``g_k = e_{k+1} act_k'(mu_{k+1})`` is the error at its
pre-activation (``e_{L+1}``: the output error).

- strict PC: the T steps run as ONE op, :func:`~pcfast.ops.dense_strict.dense_strict_relax`
  (the matmuls of a step and one fused elementwise pass, no Python between steps; the first
  hidden value carried by its Gram matrix where that takes fewer multiply-adds);
- FPA: the Jacobians and the output error stay at their feedforward values, and every hidden
  value has one path to the output, so its error after T steps is ``C_k(T) u_j``
  (:mod:`.fpa_levels`): ``u_j = J_j^T u_{j+1}`` from ``u_{L+1} = e_out``, one VJP per node;
- both: the weight gradients in closed form, ``-(g_k^T v_k) / N`` and ``-sum g_k / N``, with
  autograd only through the first node (recorded in its feedforward pass).

The same math as the per-node paths (tested equal to the reference backend in float64), with
the per-step Python, the autograd graph of the chain and its backward pass gone: what is left is
what a hand-written loop of the same math dispatches (``bench/mlp_task.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pcfast.ops import _ext
from pcfast.ops.dense_strict import (
    activate_,
    activation_code,
    dense_strict_relax,
    gram_pays,
    pre_activation_error,
)
from pcfast.pc.backends.base import PCResult, PCSettings, hidden_energy, make_result
from pcfast.pc.backends.fpa_levels import Plan
from pcfast.pc.energy import output_energy, output_error
from pcfast.pc.graph import PCGraph


def find_dense_chain(graph: PCGraph) -> list[tuple[nn.Linear, int]] | None:
    """``[(Linear, activation code)]`` of nodes ``1 .. L`` when ``graph`` is a dense chain
    (each node fed by the one before; every node after the first a ``Linear``, alone or followed
    by one activation :func:`~pcfast.ops.dense_strict.activation_code` knows), else None. The
    first node may be anything: its prediction comes from the clamped input and stays fixed."""
    nodes = graph.nodes
    if len(nodes) < 2 or tuple(nodes[0].parents) != (graph.input_name,):
        return None
    chain = []
    for prev, node in zip(nodes, nodes[1:]):
        if tuple(node.parents) != (prev.name,):
            return None
        parts = list(node.fn) if isinstance(node.fn, nn.Sequential) else [node.fn]
        if not 1 <= len(parts) <= 2 or type(parts[0]) is not nn.Linear:
            return None
        code = activation_code(parts[1] if len(parts) == 2 else None)
        if code is None:
            return None
        chain.append((parts[0], code))
    return chain


class DenseChain:
    """Strict PC and FPA on one dense chain (see the module doc).

    Args:
        graph: the node graph.
        chain: :func:`find_dense_chain`'s list for it.
        gram: let strict PC carry the first hidden value by its Gram matrix where
            :func:`~pcfast.ops.dense_strict.gram_pays`.
    """

    def __init__(self, graph: PCGraph, chain: list[tuple[nn.Linear, int]], gram: bool) -> None:
        self.graph = graph
        self.linears = [lin for lin, _ in chain]
        self.codes = [code for _, code in chain]
        self.gram = gram
        # The fast backend's FPA plan of a chain: every node after the first sends to the one
        # before, its only child (``FastBackend._plan``'s form).
        self.plan: Plan = [(node.name, [(0, node.parents[0])], [node.parents[0]])
                           for node in reversed(graph.nodes[1:])]

    @classmethod
    def of(cls, graph: PCGraph, gram: bool) -> DenseChain | None:
        """The graph's dense chain, or None when it is not one."""
        chain = find_dense_chain(graph)
        return None if chain is None else cls(graph, chain, gram)

    @staticmethod
    def runs_on(x: torch.Tensor) -> bool:
        """Whether a batch can take these paths: float32/float64 on the CPU."""
        return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)

    @staticmethod
    def kernel_built() -> bool:
        """Whether the strict op's C++ kernel is there (without it the per-node steps run)."""
        return _ext.has_kernel("dense_strict_relax_cpu", "cpu")

    def first_prediction(self, x: torch.Tensor) -> torch.Tensor:
        """The first node's feedforward prediction, recorded by autograd where its parameters
        train (the one pass that moves its BatchNorm statistics)."""
        first = self.graph.nodes[0]
        with torch.set_grad_enabled(any(p.requires_grad
                                        for p in self.graph.node_parameters(first))):
            return first.fn(x)

    def _feedforward(self, mu1: torch.Tensor) -> list[torch.Tensor]:
        """``[v_1, .., v_L, logits]`` from the first node's prediction."""
        ff = [mu1]
        with torch.no_grad():
            for lin, code in zip(self.linears, self.codes):
                ff.append(activate_(code, F.linear(ff[-1], lin.weight, lin.bias)))
        return ff

    # ----------------------------------------------------------------------------- strict
    def strict(self, x: torch.Tensor, y: torch.Tensor, s: PCSettings,
               mu1_graph: torch.Tensor) -> PCResult:
        """Strict PC from the first node's prediction ``mu1_graph`` (2-D)."""
        g = self.graph
        hidden = g.hidden
        mu1 = mu1_graph.detach()
        ff = self._feedforward(mu1)
        logits, n = ff[-1], x.shape[0]
        target = F.one_hot(y, logits.shape[1]).to(logits.dtype)
        # The op moves the values in place: only v_1 shares its tensor with the fixed mu_1.
        values = [mu1.clone(), *ff[1:-1]]
        gram = self.gram and gram_pays(n, [values[0].shape[1], self.linears[0].out_features],
                                          s.T)
        dense_strict_relax(mu1, [lin.weight for lin in self.linears],
                           [lin.bias for lin in self.linears], values, target, self.codes, s.T,
                           s.rate, sequential=s.schedule != "jacobi", ce=s.output_loss == "ce",
                           gram=gram)
        with torch.no_grad():
            mus = [activate_(code, F.linear(v, lin.weight, lin.bias))
                   for v, lin, code in zip(values, self.linears, self.codes)]
            errors = {hidden[0]: values[0] - mu1}
            errors.update((name, v - mu) for name, v, mu in zip(hidden[1:], values[1:], mus))
            pred = torch.softmax(mus[-1], dim=1) if s.output_loss == "ce" else mus[-1]
            errors[g.output] = target - pred
            scale = -1.0 / n  # the PC gradient: -(d mu / d theta)^T e over the batch
            pres = [pre_activation_error(code, errors[name], mu, scale)
                    for code, name, mu in zip(self.codes, [*hidden[1:], g.output], mus)]
            self._linear_grads(pres, values)
            # Energies: sum_v 0.5 ||e_v||^2 + L(mu_out); the squared error's output error is its
            # own residual, so no second one-hot target is formed.
            e_hidden = hidden_energy(g, errors)
            if s.output_loss == "mse":
                energy = e_hidden + _half_square(errors[g.output])
                ff_loss = _half_square(logits - target)
            else:
                energy = e_hidden + output_energy(mus[-1], y, "ce")
                ff_loss = output_energy(logits, y, "ce")
        self._first_grads(mu1_graph, errors[hidden[0]], scale)
        return make_result(logits, y, ff_loss, energy, errors, [], s.T)

    # -------------------------------------------------------------------------------- FPA
    def fpa(self, x: torch.Tensor, y: torch.Tensor, s: PCSettings, mu1_graph: torch.Tensor,
            coef: list[float]) -> PCResult:
        """FPA by path length from the first node's prediction ``mu1_graph`` (2-D); ``coef``:
        ``C_k(T)`` from the fast backend's level solution of :attr:`plan` (lengths it leaves
        out have ``C_k = 0``)."""
        g = self.graph
        hidden = g.hidden
        L = len(self.linears)
        ff = self._feedforward(mu1_graph.detach())
        logits, n = ff[-1], x.shape[0]
        scale = -1.0 / n

        def c(k: int) -> float:
            return coef[k] if k < len(coef) else 0.0

        with torch.no_grad():
            e_out = output_error(logits, y, s.output_loss)
            errors = {g.output: e_out}
            u, pres = e_out, [None] * L
            for k in range(L - 1, -1, -1):  # linears[k] sends u down to the value hidden[k]
                p = pre_activation_error(self.codes[k], u, ff[k + 1])
                u = p @ self.linears[k].weight  # u_k: hidden[k] sits L - k edges below the output
                pres[k] = p.mul_(c(L - 1 - k) * scale)  # g_k = C_{L-1-k} p, scaled
                errors[hidden[k]] = u * c(L - k)
            self._linear_grads(pres, ff[:-1])
            base_energy = output_energy(logits, y, s.output_loss)
            energy = base_energy + hidden_energy(g, errors)
        self._first_grads(mu1_graph, errors[hidden[0]], scale)
        return make_result(logits, y, base_energy, energy, errors, [], s.T)

    # -------------------------------------------------------------------------- gradients
    def _linear_grads(self, pres: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """``.grad`` of every ``Linear`` from its scaled pre-activation error and input."""
        for lin, pre, v in zip(self.linears, pres, values):
            if lin.weight.requires_grad:  # frozen layers get no gradient, as with autograd
                _add_grad(lin.weight, torch.mm(pre.t(), v))
            if lin.bias is not None and lin.bias.requires_grad:
                _add_grad(lin.bias, pre.sum(0))

    def _first_grads(self, mu1_graph: torch.Tensor, e1: torch.Tensor, scale: float) -> None:
        """The first node's parameter gradients by autograd from its feedforward pass."""
        if not mu1_graph.requires_grad:
            return
        params = [p for p in self.graph.node_parameters(self.graph.nodes[0]) if p.requires_grad]
        grads = torch.autograd.grad(mu1_graph, params, e1 * scale, allow_unused=True)
        for p, gr in zip(params, grads):
            if gr is not None:
                _add_grad(p, gr)


def _half_square(t: torch.Tensor) -> torch.Tensor:
    flat = t.flatten()
    return 0.5 * torch.vdot(flat, flat)


def _add_grad(p: nn.Parameter, grad: torch.Tensor) -> None:
    """``p.grad += grad`` (or set it), as :func:`~pcfast.pc.backends.base.accumulate` does with a
    gradient already scaled."""
    if p.grad is None:
        p.grad = grad
    else:
        p.grad.add_(grad)
