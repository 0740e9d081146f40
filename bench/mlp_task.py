"""The standard small PC task that PC libraries compare on: pcfast vs a hand-written PyTorch loop.

Task: MLP 784-256-256-10 with tanh hidden layers, squared-error output energy
``0.5 ||logits - onehot(y)||^2`` summed over the batch, batch 128, T=20 inference steps at state
rate 0.1 (jacobi schedule: every node from the previous step's errors), then ONE Adam step
(lr 1e-3) on the weights per batch. Inputs are N(0, 1) of MNIST size (784 features, flattened),
labels random ints in [0, 10): timing does not depend on content. Per row: 3 warm-up batches,
then the best of 3 repeats of 11 batches, reported as ms per batch; the repeats of all rows are
interleaved so that load from other jobs falls on every row alike.

Rows (all in one run, same device, same initial weights, same batches):

=================================  ==============================================================
``pcfast-strict-reference``        ``PCEngine(fpa=False, backend="reference")``: strict PC
``pcfast-strict-fast``             ``PCEngine(fpa=False, backend="fast")``: strict PC, on the CPU
                                   the T steps as one op (``dense_strict_relax``; the first hidden
                                   node carried by its Gram matrix, which saves matmuls here)
``pcfast-strict-fast-straight``    the same op without the Gram matrix (the hand-written loop's
                                   matmuls: ``backend_options={"dense_chain": "straight"}``)
``pcfast-strict-fast-nodes``       the fast backend's per-node steps on explicit VJP rules
                                   (``{"dense_chain": "off"}``)
``pcfast-fpa-fast``                ``PCEngine(fpa=True, backend="fast")``: the T steps solved by
                                   path length (``fpa_solver="auto"``: one VJP per layer, whatever
                                   T), on the CPU in closed form for this dense chain (explicit
                                   VJPs and weight gradients, no autograd past the first layer)
``pcfast-fpa-fast-nodes``          the same on the generic path (VJP rules, autograd weight
                                   gradients: ``{"dense_chain": "off"}``)
``pcfast-fpa-fast-steps``          the same taking the T steps (``fpa_solver="steps"``)
``pcfast-fpa-reference``           ``PCEngine(fpa=True, backend="reference")``
``hand-strict-eager``              :func:`hand_strict_grads`, closed-form gradients, eager
``hand-strict-compile``            the same under ``torch.compile`` (the reason is recorded if it
                                   cannot compile here)
``hand-fpa-eager``                 :func:`hand_fpa_grads`, eager
``hand-fpa-compile``               the same under ``torch.compile``
``pcfast-ipc-reference``           ``PCEngine(fpa=False, ipc=True)``: incremental PC, one Adam step
                                   per inference step (T per batch)
``pcfast-ipc-fast``                the same with ``backend="fast"``
``hand-ipc-eager``                 :func:`hand_ipc_step`, closed-form iPC, eager
``pcfast-epc-reference``           ``PCEngine(fpa=False, epc=True)``: error-based PC
``pcfast-epc-fast``                the same with ``backend="fast"``
``hand-epc-eager``                 :func:`hand_epc_grads`, closed-form ePC, eager
``floor-strict-eager``             NOT PC: :func:`floor_strict_grads`, only the matmuls, tanh and
                                   the Adam step of a strict batch (a lower bound, same optimizer)
``hand-strict-gram-eager``         :func:`gram_strict_grads`: the hand-written strict loop with the
                                   first hidden node carried by a Gram matrix (one big matmul per
                                   step fewer; a bound on restructuring the math)
=================================  ==============================================================

The ratio column is each row's time over the hand-written EAGER loop of the same math (strict,
FPA, iPC or ePC). The hand-written loops implement exactly the engine's math (``tests/test_mlp_task.py``
checks their weight gradients against ``PCEngine(backend="reference")`` in float64, and every run
re-checks it on a small float64 batch before timing):

- nodes: ``h1 = tanh(W0 x + b0)``, ``h2 = tanh(W1 h1 + b1)``, output ``W2 h2 + b2`` (the output
  is not a free node: its energy is the task loss at its prediction);
- feedforward initialisation (all hidden errors 0);
- state update ``x_u <- x_u - rate * (e_u - J^T e_child)`` for all hidden nodes at once;
- FPA keeps predictions and Jacobians (``1 - h^2``) at their feedforward values and the output
  error at ``onehot - logits_ff``; strict recomputes them from the current values every step;
- weight gradients ``-(d mu_v / d theta)^T e_v`` at the relaxed state, divided by the batch size.

Usage::

    python bench/mlp_task.py                         # every row, device auto
    python bench/mlp_task.py --device cuda
    python bench/mlp_task.py --rows hand-fpa-eager pcfast-fpa-fast --batches 5 --repeats 1

CPU timings here check that the benchmark runs and give CPU ratios; GPU speed is measured on a GPU.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import environment, print_table, write_result  # noqa: E402
from pcfast.pc import PCEngine, sequential_graph  # noqa: E402

ROWS = ("pcfast-strict-reference", "pcfast-strict-fast", "pcfast-strict-fast-straight",
        "pcfast-strict-fast-nodes", "pcfast-fpa-fast", "pcfast-fpa-fast-nodes",
        "pcfast-fpa-fast-steps",
        "pcfast-fpa-reference",
        "pcfast-ipc-reference", "pcfast-ipc-fast", "pcfast-epc-reference", "pcfast-epc-fast",
        "hand-strict-eager",
        "hand-strict-compile", "hand-fpa-eager", "hand-fpa-compile", "hand-ipc-eager",
        "hand-epc-eager", "floor-strict-eager", "hand-strict-gram-eager")
SIZES = (784, 256, 256, 10)


# ------------------------------------------------------------------------------- the network
def make_layers(sizes: Sequence[int] = SIZES, seed: int = 0, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu") -> list[nn.Module]:
    """The PC node modules: ``Linear + Tanh`` for every hidden layer, a bare ``Linear`` last.

    Shapes: node ``l`` maps ``(N, sizes[l]) -> (N, sizes[l + 1])``.
    """
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        lin = nn.Linear(a, b)
        layers.append(nn.Sequential(lin, nn.Tanh()) if i < len(sizes) - 2 else lin)
    return [m.to(device=device, dtype=dtype) for m in layers]


def flat_params(layers: Sequence[nn.Module]) -> list[torch.Tensor]:
    """``[W0, b0, W1, b1, ...]`` (``W_l``: ``(out, in)`` as ``nn.Linear``) of ``make_layers``."""
    out: list[torch.Tensor] = []
    for m in layers:
        lin = m[0] if isinstance(m, nn.Sequential) else m
        out += [lin.weight, lin.bias]
    return out


# ------------------------------------------------------------------- hand-written PC, closed form
def hand_fpa_grads(params: Sequence[torch.Tensor], x: torch.Tensor, y: torch.Tensor, T: int,
                   rate: float) -> list[torch.Tensor]:
    """FPA PC on a tanh MLP with squared-error output; returns ``[dW0, db0, dW1, db1, ...]``.

    ``params``: ``[W0, b0, ..., WL, bL]``; ``x``: ``(N, in)``; ``y``: ``(N,)`` int64. Hidden
    nodes ``h_{l+1} = tanh(W_l h_l + b_l)`` (``h_0 = x``), output ``W_L h_L + b_L``. Predictions,
    the tanh derivatives ``1 - h^2`` and the output error stay at their feedforward values; the
    hidden errors relax for ``T`` jacobi steps ``e_l <- e_l + rate (J_l^T e_{l+1} - e_l)``.
    """
    Ws, bs = list(params[0::2]), list(params[1::2])
    L = len(Ws) - 1  # hidden nodes 1..L
    n = x.shape[0]
    h = [x]
    for W, b in zip(Ws[:-1], bs[:-1]):
        h.append(torch.tanh(torch.addmm(b, h[-1], W.t())))
    logits = torch.addmm(bs[-1], h[-1], Ws[-1].t())
    d = [None] + [1 - hl * hl for hl in h[1:]]  # tanh' at the feedforward values
    e_out = F.one_hot(y, logits.shape[1]).to(logits.dtype) - logits
    e = [None] + [torch.zeros_like(hl) for hl in h[1:]]
    for _ in range(T):
        # J^T e of node l's child: through the child's tanh (hidden) or straight (output).
        back = [None] + [(e[l + 1] * d[l + 1]) @ Ws[l] for l in range(1, L)] + [e_out @ Ws[L]]
        e = [None] + [e[l] + rate * (back[l] - e[l]) for l in range(1, L + 1)]
    grads: list[torch.Tensor] = []
    for l in range(L + 1):
        g = e[l + 1] * d[l + 1] if l < L else e_out  # error at the pre-activation
        grads += [-(g.t() @ h[l]) / n, -g.sum(0) / n]
    return grads


def _strict_terms(Ws, bs, v, target, mu1=None):
    """At values ``v`` (``v[0] = x``): the hidden errors ``eps_l = v_l - mu_l`` and the error at
    each node's pre-activation ``g_l = eps_l * tanh'(a_l)`` (``g_{L+1}``: the output's
    ``onehot - logits``). ``mu1`` (depends on the clamped input only) may be passed in."""
    L = len(Ws) - 1
    if mu1 is None:
        mu1 = torch.tanh(torch.addmm(bs[0], v[0], Ws[0].t()))
    mu = [None, mu1] + [torch.tanh(torch.addmm(bs[l], v[l], Ws[l].t())) for l in range(1, L)]
    eps = [None] + [v[l] - mu[l] for l in range(1, L + 1)]
    eps_out = target - torch.addmm(bs[L], v[L], Ws[L].t())
    g = [None] + [eps[l] * (1 - mu[l] * mu[l]) for l in range(1, L + 1)] + [eps_out]
    return eps, g


def _strict_step(Ws, v, eps, g, rate):
    """All hidden values at once: ``v_l <- v_l - rate (eps_l - g_{l+1} W_l)``."""
    L = len(Ws) - 1
    return [v[0]] + [v[l] - rate * (eps[l] - g[l + 1] @ Ws[l]) for l in range(1, L + 1)]


def _strict_weight_grads(v, g, n):
    grads: list[torch.Tensor] = []
    for l in range(len(v)):
        grads += [-(g[l + 1].t() @ v[l]) / n, -g[l + 1].sum(0) / n]
    return grads


def _feedforward(Ws, bs, x):
    v = [x]
    for W, b in zip(Ws[:-1], bs[:-1]):
        v.append(torch.tanh(torch.addmm(b, v[-1], W.t())))
    return v


def hand_strict_grads(params: Sequence[torch.Tensor], x: torch.Tensor, y: torch.Tensor, T: int,
                      rate: float) -> list[torch.Tensor]:
    """Strict PC on a tanh MLP with squared-error output; returns ``[dW0, db0, dW1, db1, ...]``.

    Energy ``F = sum_l 0.5 ||v_l - mu_l||^2 + 0.5 ||mu_out - onehot(y)||^2`` (summed over the
    batch), ``mu_{l+1} = tanh(W_l v_l + b_l)`` with ``v_0 = x``. Values start at the feedforward
    pass; every step recomputes the predictions and moves all hidden values at once by
    ``-rate dF/dv``; the weight gradients are ``dF/dtheta`` at the relaxed values, over ``N``.
    ``mu_1`` depends on the clamped input only and is computed once.
    """
    Ws, bs = list(params[0::2]), list(params[1::2])
    v = _feedforward(Ws, bs, x)
    target = F.one_hot(y, Ws[-1].shape[0]).to(x.dtype)
    mu1 = v[1]
    for _ in range(T):
        eps, g = _strict_terms(Ws, bs, v, target, mu1)
        v = _strict_step(Ws, v, eps, g, rate)
    _, g = _strict_terms(Ws, bs, v, target, mu1)
    return _strict_weight_grads(v, g, x.shape[0])


def floor_strict_grads(params: Sequence[torch.Tensor], x: torch.Tensor, y: torch.Tensor, T: int,
                       rate: float) -> list[torch.Tensor]:
    """NOT PC: the matmuls, tanh and bias sums that :func:`hand_strict_grads` dispatches, with
    none of its error arithmetic (every error term replaced by a tensor of its shape that is
    already there); returns tensors shaped like the weight gradients. Its time is a lower bound
    on any eager implementation of strict PC's math on the machine (the ``floor-strict-eager``
    row)."""
    Ws, bs = list(params[0::2]), list(params[1::2])
    L = len(Ws) - 1
    v = _feedforward(Ws, bs, x)
    for step in range(T + 1):  # T steps, then the final prediction pass
        mus = [torch.tanh(torch.addmm(bs[l], v[l], Ws[l].t())) for l in range(1, L)]
        out = torch.addmm(bs[L], v[L], Ws[L].t())
        g = [None, v[1], *mus, out]  # g[l + 1]: the shape of layer l's output
        if step < T:
            for l in range(1, L + 1):
                g[l + 1] @ Ws[l]
    grads: list[torch.Tensor] = []
    for l in range(L + 1):
        grads += [g[l + 1].t() @ v[l], g[l + 1].sum(0)]
    return grads


def gram_strict_grads(params: Sequence[torch.Tensor], x: torch.Tensor, y: torch.Tensor, T: int,
                      rate: float) -> list[torch.Tensor]:
    """Strict PC as :func:`hand_strict_grads`, with fewer matmuls: the first hidden node is
    carried through its child's pre-activation and a Gram matrix (the ``hand-strict-gram-eager``
    row, a bound on what restructuring the math can save).

    The first hidden node's parent is the clamped input, so its prediction ``mu_1`` is fixed and
    its error moves linearly: ``e_1 <- (1 - rate) e_1 + rate g_2 W_1`` (``g_2``: the error at the
    next pre-activation). Its child needs only ``a_2 = c + e_1 W_1^T`` (``c = mu_1 W_1^T + b_1``),
    so ``s = e_1 W_1^T`` steps as ``s <- (1 - rate) s + rate g_2 (W_1 W_1^T)``: one matmul with
    the Gram matrix per step instead of the forward and backward pair through ``W_1``, and
    ``e_1 = rate (sum_t (1 - rate)^(T-1-t) g_2^t) W_1`` once at the end (from the feedforward
    start, ``e_1 = 0``). Equal to the straight loop up to rounding (tested in float64).
    """
    Ws, bs = list(params[0::2]), list(params[1::2])
    L = len(Ws) - 1
    q = 1 - rate
    target = F.one_hot(y, Ws[-1].shape[0]).to(x.dtype)
    v = _feedforward(Ws, bs, x)
    mu1, W1 = v[1], Ws[1]
    gram = W1 @ W1.t()
    c = torch.addmm(bs[1], mu1, W1.t())
    s = torch.zeros_like(c)
    g2_sum = torch.zeros_like(c)
    v[1] = None  # not needed until the end: its child reads a_2 = c + s
    for _ in range(T):
        a = [None, None, c + s] + [torch.addmm(bs[l], v[l], Ws[l].t()) for l in range(2, L)]
        mu = [None, mu1] + [torch.tanh(a[l]) for l in range(2, L + 1)]
        eps = [None, None] + [v[l] - mu[l] for l in range(2, L + 1)]
        g = [None, None] + [torch.addcmul(eps[l], eps[l], mu[l] * mu[l], value=-1)
                            for l in range(2, L + 1)]
        g.append(target - (a[2] if L == 1 else torch.addmm(bs[L], v[L], Ws[L].t())))
        for l in range(2, L + 1):  # v_l <- v_l - rate (eps_l - g_{l+1} W_l)
            v[l] = v[l] - rate * (eps[l] - g[l + 1] @ Ws[l])
        s = torch.addmm(s, g[2], gram, beta=q, alpha=rate)
        g2_sum = torch.add(g[2], g2_sum, alpha=q)
    v[1] = mu1 + (g2_sum @ W1).mul_(rate)
    _, g = _strict_terms(Ws, bs, v, target, mu1)
    return _strict_weight_grads(v, g, x.shape[0])


def hand_epc_grads(params: Sequence[torch.Tensor], x: torch.Tensor, y: torch.Tensor, T: int,
                   rate: float) -> list[torch.Tensor]:
    """Error-based PC on the same MLP; returns ``[dW0, db0, dW1, db1, ...]``.

    The errors ``e_l`` (zero at the start) are the free variables: ``v_1 = mu_1 + e_1``,
    ``v_{l+1} = tanh(W_l v_l + b_l) + e_{l+1}``, output ``W_L v_L + b_L``; every step one forward
    and one backward pass give ``dF/de_l = e_l + dL/dv_l`` and ``e_l <- e_l - rate dF/de_l``. The
    weight gradients are strict PC's local ones at the final values.
    """
    Ws, bs = list(params[0::2]), list(params[1::2])
    L = len(Ws) - 1
    target = F.one_hot(y, Ws[-1].shape[0]).to(x.dtype)
    mu1 = torch.tanh(torch.addmm(bs[0], x, Ws[0].t()))
    e = [None] + [torch.zeros(x.shape[0], W.shape[0], dtype=x.dtype, device=x.device)
                  for W in Ws[:-1]]
    for _ in range(T):
        v, t = [x, mu1 + e[1]], [None, mu1]
        for l in range(1, L):
            t.append(torch.tanh(torch.addmm(bs[l], v[l], Ws[l].t())))
            v.append(t[l + 1] + e[l + 1])
        gv = [None] * (L + 1)
        gv[L] = (torch.addmm(bs[L], v[L], Ws[L].t()) - target) @ Ws[L]
        for l in range(L - 1, 0, -1):
            gv[l] = (gv[l + 1] * (1 - t[l + 1] * t[l + 1])) @ Ws[l]
        e = [None] + [e[l] - rate * (e[l] + gv[l]) for l in range(1, L + 1)]
    v = [x, mu1 + e[1]]
    for l in range(1, L):
        v.append(torch.tanh(torch.addmm(bs[l], v[l], Ws[l].t())) + e[l + 1])
    _, g = _strict_terms(Ws, bs, v, target, mu1)
    return _strict_weight_grads(v, g, x.shape[0])


def hand_ipc_step(params: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer,
                  x: torch.Tensor, y: torch.Tensor, T: int, rate: float) -> None:
    """Incremental PC on the same MLP: ``T`` steps, each taking the weight gradient and the
    value step at the same point, then ``optimizer.step()`` (``T`` weight steps per batch).
    ``mu_1`` is recomputed every step (its weights move)."""
    Ws, bs = list(params[0::2]), list(params[1::2])
    with torch.no_grad():
        v = _feedforward(Ws, bs, x)
    target = F.one_hot(y, Ws[-1].shape[0]).to(x.dtype)
    for _ in range(T):
        with torch.no_grad():
            eps, g = _strict_terms(Ws, bs, v, target)
            grads = _strict_weight_grads(v, g, x.shape[0])
            v = _strict_step(Ws, v, eps, g, rate)
        for p, gr in zip(params, grads):
            p.grad = gr
        optimizer.step()


HAND = {"strict": hand_strict_grads, "fpa": hand_fpa_grads, "epc": hand_epc_grads}
FLOOR = {"strict": floor_strict_grads}
GRAM = {"strict": gram_strict_grads}


# --------------------------------------------------------------------------------- the rows
class HandLoop:
    """One training step of the hand-written loop: closed-form PC gradients, then Adam."""

    def __init__(self, layers: Sequence[nn.Module], math_: str, T: int, rate: float, lr: float,
                 compile_: bool, floor: bool = False, gram: bool = False) -> None:
        self.params = flat_params(layers)
        self.optimizer = torch.optim.Adam(self.params, lr=lr)
        self.ipc = (T, rate) if math_ == "ipc" else None
        if self.ipc:
            if compile_:
                raise ValueError("the hand-written iPC loop has no torch.compile row")
            return
        fn = FLOOR[math_] if floor else GRAM[math_] if gram else HAND[math_]

        def grads(x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
            return fn(self.params, x, y, T, rate)

        self.grads: Callable[[torch.Tensor, torch.Tensor], list[torch.Tensor]] = (
            torch.compile(grads, dynamic=False) if compile_ else grads)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.ipc:
            hand_ipc_step(self.params, self.optimizer, x, y, *self.ipc)
            return
        with torch.no_grad():
            gs = self.grads(x, y)
        for p, gr in zip(self.params, gs):
            p.grad = gr
        self.optimizer.step()


class EngineLoop:
    """One training step of pcfast: ``PCEngine.step`` (relax, local gradients, Adam)."""

    def __init__(self, layers: Sequence[nn.Module], math_: str, backend: str, T: int,
                 rate: float, lr: float, options: dict | None = None) -> None:
        graph = sequential_graph(list(layers), [f"fc{i}" for i in range(len(layers))])
        self.engine = PCEngine(graph, T=T, rate=rate, schedule="jacobi", fpa=math_ == "fpa",
                               ipc=math_ == "ipc", epc=math_ == "epc", output_loss="mse",
                               backend=backend, backend_options=options)
        self.optimizer = torch.optim.Adam(graph.parameters(), lr=lr)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.engine.step(x, y, self.optimizer)


def row_math(row: str) -> str:
    for math_ in ("strict", "ipc", "epc"):
        if math_ in row:
            return math_
    return "fpa"


def build_row(row: str, layers: Sequence[nn.Module], T: int, rate: float, lr: float):
    if row.startswith(("hand-", "floor-")):
        return HandLoop(layers, row_math(row), T, rate, lr, compile_=row.endswith("compile"),
                        floor=row.startswith("floor-"), gram="-gram-" in row)
    if row.endswith("-steps"):  # the fast backend taking FPA's T steps one by one
        return EngineLoop(layers, row_math(row), backend="fast", T=T, rate=rate, lr=lr,
                          options={"fpa_solver": "steps"})
    if row.endswith(("-straight", "-nodes")):  # the dense-chain paths without Gram / off
        chain = "straight" if row.endswith("-straight") else "off"
        return EngineLoop(layers, row_math(row), backend="fast", T=T, rate=rate, lr=lr,
                          options={"dense_chain": chain})
    return EngineLoop(layers, row_math(row), backend=row.rsplit("-", 1)[1], T=T, rate=rate,
                      lr=lr)


# ---------------------------------------------------------------------------- correctness check
def max_rel_diff(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """Largest ``max|a - b| / max|b|`` over the pairs."""
    return max(float((x - z).abs().max() / z.abs().max().clamp_min(1e-300)) for x, z in zip(a, b))


def check_against_engine(math_: str, T: int, rate: float, batch: int = 8,
                         sizes: Sequence[int] = SIZES, seed: int = 0) -> float:
    """Max relative difference (float64, CPU) between the hand-written loop's weight gradients and
    ``PCEngine(backend="reference")``'s for ``math_`` in ``("strict", "fpa")``; for ``"ipc"``
    between the weights after one batch (Adam, lr 1e-2) of both."""
    layers = make_layers(sizes, seed=seed, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, sizes[0], generator=g, dtype=torch.float64)
    y = torch.randint(0, sizes[-1], (batch,), generator=g)
    params = flat_params(layers)
    if math_ == "ipc":
        hand_layers = copy.deepcopy(layers)
        hand_params = flat_params(hand_layers)
        hand_ipc_step(hand_params, torch.optim.Adam(hand_params, lr=1e-2), x, y, T, rate)
        EngineLoop(layers, "ipc", "reference", T, rate, 1e-2)(x, y)
        moved = max_rel_diff([p.detach() for p in params],
                             [p.detach() for p in flat_params(make_layers(sizes, seed,
                                                                          torch.float64))])
        if not moved > 1e-6:
            raise AssertionError("iPC check: the weights did not move")
        return max_rel_diff([p.detach() for p in hand_params], [p.detach() for p in params])
    with torch.no_grad():
        hand = HAND[math_](params, x, y, T, rate)
    graph = sequential_graph(layers)
    PCEngine(graph, T=T, rate=rate, fpa=math_ == "fpa", epc=math_ == "epc", output_loss="mse",
             backend="reference").compute_gradients(x, y)
    return max_rel_diff(hand, [p.grad for p in params])


# ------------------------------------------------------------------------------------- timing
def time_batches(step: Callable[[torch.Tensor, torch.Tensor], None],
                 batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 device: torch.device) -> float:
    """ms per batch of running ``step`` over ``batches`` once (synchronised on CUDA)."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    sync()
    t0 = time.perf_counter()
    for x, y in batches:
        step(x, y)
    sync()
    return (time.perf_counter() - t0) * 1e3 / len(batches)


def run(rows: Sequence[str], device: torch.device, T: int, batch_size: int, rate: float, lr: float,
        warmup: int, n: int, repeats: int, seed: int = 0) -> list[dict[str, Any]]:
    """Time ``rows``; returns one dict per row (``ms_per_batch`` or ``status``).

    Every row is built and warmed up (``warmup`` batches) first; then the repeats are
    interleaved (repeat 1 of every row, then repeat 2, ...), so that load from other jobs on the
    machine falls on all rows alike; each repeat times the same ``n`` batches.
    """
    g = torch.Generator().manual_seed(seed + 1)
    batches = [(torch.randn(batch_size, SIZES[0], generator=g).to(device),
                torch.randint(0, SIZES[-1], (batch_size,), generator=g).to(device))
               for _ in range(warmup + n)]
    base = make_layers(seed=seed, device=device)
    results: list[dict[str, Any]] = []
    steps: dict[str, Callable[[torch.Tensor, torch.Tensor], None]] = {}
    for row in rows:
        layers = copy.deepcopy(base)  # the same initial weights for every row
        rec: dict[str, Any] = {"row": row, "math": row_math(row)}
        results.append(rec)
        step = build_row(row, layers, T, rate, lr)
        if row.endswith("compile"):
            try:
                t0 = time.perf_counter()
                step(*batches[0])
                rec["compile_s"] = time.perf_counter() - t0
            except Exception as exc:  # noqa: BLE001 -- any compile failure makes the row optional
                rec["status"] = f"torch.compile failed: {type(exc).__name__}: {str(exc)[:300]}"
                continue
        time_batches(step, batches[:warmup], device)
        steps[row] = step
    for _ in range(repeats):
        for rec in results:
            if rec["row"] in steps:
                ms = time_batches(steps[rec["row"]], batches[warmup:], device)
                rec.setdefault("repeats_ms", []).append(ms)
    for rec in results:
        if rec["row"] in steps:
            rec.update(ms_per_batch=min(rec["repeats_ms"]), status="ok")
            step = steps[rec["row"]]
            if isinstance(step, EngineLoop):
                rec["backend_ran"] = step.engine.last_backend
    eager = {r["math"]: r["ms_per_batch"] for r in results
             if r["row"] == f"hand-{r['math']}-eager" and "ms_per_batch" in r}
    for r in results:
        if "ms_per_batch" in r and r["math"] in eager:
            r["x_hand_eager"] = r["ms_per_batch"] / eager[r["math"]]
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), metavar="ROW",
                        help=f"subset of rows (default all): {', '.join(ROWS)}")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    parser.add_argument("--T", type=int, default=20, help="inference steps per batch (20)")
    parser.add_argument("--batches", type=int, default=11, help="timed batches per repeat (11)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats; the best counts (3)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed warm-up batches (3)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rate", type=float, default=0.1, help="state rate (0.1)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (1e-3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); 1 is steadier on a shared machine")
    ns = parser.parse_args(argv)
    if ns.batches < 1 or ns.repeats < 1 or ns.warmup < 1 or ns.T < 0:
        parser.error("need --batches, --repeats, --warmup >= 1 and --T >= 0")
    device = torch.device("cuda" if ns.device == "auto" and torch.cuda.is_available()
                          else "cpu" if ns.device == "auto" else ns.device)

    if ns.threads is not None:
        torch.set_num_threads(ns.threads)
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    checks = {m: check_against_engine(m, ns.T, ns.rate) for m in ("strict", "fpa", "ipc", "epc")}
    if any(not math.isfinite(v) or v > 1e-9 for v in checks.values()):
        raise SystemExit(f"the hand-written loop no longer matches PCEngine(reference): {checks}")
    results = run(ns.rows, device, ns.T, ns.batch_size, ns.rate, ns.lr, ns.warmup, ns.batches,
                  ns.repeats, ns.seed)
    env = environment(device)
    print(f"MLP {'-'.join(map(str, SIZES))} tanh, mse output, batch {ns.batch_size}, T={ns.T}, "
          f"rate {ns.rate}, jacobi, Adam {ns.lr}; best of {ns.repeats} x {ns.batches} batches "
          f"after {ns.warmup} warm-up; {env['device_name']}")
    print(f"hand-written vs PCEngine(reference) weight gradients, float64: max rel diff "
          f"strict {checks['strict']:.1e}, fpa {checks['fpa']:.1e}, epc {checks['epc']:.1e}; iPC "
          f"weights after one batch {checks['ipc']:.1e}")
    print_table(results, ["row", "math", "ms_per_batch", "x_hand_eager", "status"])
    config = {"sizes": SIZES, "activation": "tanh", "output_loss": "mse", "batch_size": ns.batch_size,
              "T": ns.T, "rate": ns.rate, "schedule": "jacobi", "optimizer": "adam", "lr": ns.lr,
              "warmup": ns.warmup, "batches": ns.batches, "repeats": ns.repeats, "seed": ns.seed,
              "data": "x ~ N(0,1) (N, 784), y ~ randint(10)", "threads": torch.get_num_threads(),
              # 1-minute load averages before and after: other jobs on the machine skew CPU times
              "load_average_1min": [load_before and load_before[0],
                                    os.getloadavg()[0] if hasattr(os, "getloadavg") else None]}
    path = write_result("mlp_task", {"config": config, "rows": results,
                                     "hand_vs_engine_max_rel_diff_float64": checks,
                                     "environment": env})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
