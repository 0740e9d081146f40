"""The PC engine, fast path (``PCEngine(..., backend="fast")``): FPA inference on fused kernels.

Same math as the reference path (``pcfast.pc.engine``), organised for speed:

- one feedforward pass per batch computes every prediction (with autograd, for the weight
  gradients at the end) and, per node, an explicit input-VJP closure over the tensors it saved
  (:mod:`pcfast.pc.vjp_rules`; unknown nodes fall back to autograd over their retained graph);
- all hidden errors live in ONE preallocated flat buffer (per-node views), and the propagated
  errors in a second one; a step is the VJP sweep into the second buffer, then ONE fused
  :func:`~pcfast.ops.pc_update` launch ``e <- e + rate * (clamp(back) - e)`` over the whole
  network that also returns the energy;
- on CUDA the first step runs eagerly (it warms the kernels up), the step is captured once in a
  CUDA graph and replayed for the other ``T - 1`` steps: no Python per step;
- optional bfloat16 autocast of the feedforward pass (errors stay in float32).

The jacobi schedule keeps its error-front property (every VJP reads the previous step's errors
before the single update), and the weight gradients are computed by the reference's own
autograd pass, so weight updates equal the reference engine's step for step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from pcfast.ops.pc_update import pc_update
from pcfast.pc.energy import output_energy, output_error
from pcfast.pc.engine import PCEngine, PCResult
from pcfast.pc.graph import PCGraph
from pcfast.pc.vjp_rules import KERNELS, node_forward

STRICT_ERROR = "backend='fast' supports fpa=True only; use backend='reference' for strict PC"


class FastPCEngine(PCEngine):
    """FPA predictive coding on flat error buffers, fused kernels and CUDA graphs.

    Args (beyond :class:`~pcfast.pc.PCEngine`'s):
        kernels: ``"auto"`` (registered ops: Triton on CUDA, PyTorch on CPU), ``"triton"``
            (Triton kernels; on CPU through the Triton interpreter, for tests on tiny shapes) or
            ``"torch"`` (the PyTorch forms of the fused ops).
        cuda_graph: replay the inference steps from a CUDA graph on CUDA tensors (ignored on
            CPU and when ``record_energy`` asks for a per-step trace).
        autocast: run the feedforward pass under bfloat16 autocast.

    Example::

        engine = FastPCEngine(net.pc_graph(), T=100, rate=0.5)
        result = engine.step(x.cuda(), y.cuda(), optimizer)
    """

    def __init__(self, graph: PCGraph, T: int = 100, rate: float = 0.5,
                 schedule: str = "jacobi", fpa: bool = True, output_loss: str = "ce",
                 error_clamp: float | None = None, record_energy: bool = False,
                 kernels: str = "auto", cuda_graph: bool = True, autocast: bool = False) -> None:
        if not fpa:
            raise ValueError(STRICT_ERROR)
        if kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
        super().__init__(graph, T=T, rate=rate, schedule=schedule, fpa=True,
                         output_loss=output_loss, error_clamp=error_clamp,
                         backend="reference", record_energy=record_energy)
        self.backend = "fast"
        self.kernels = kernels
        self.cuda_graph = cuda_graph
        self.autocast = autocast
        self._buffers: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def _update_backend(self) -> str:
        return {"auto": "auto", "triton": "triton", "torch": "ref"}[self.kernels]

    def compute_gradients(self, x: torch.Tensor, y: torch.Tensor) -> PCResult:
        """Relax the errors for ``(x, y)`` and accumulate the PC weight gradients into ``.grad``."""
        if not self.fpa:
            raise ValueError(STRICT_ERROR)
        self._check_batch(x, y)
        g = self.graph
        mus, vjps = self._feedforward(x)
        logits = mus[g.output].detach().float() if self.autocast else mus[g.output].detach()
        e_out = output_error(logits, y, self.output_loss)
        base_energy = output_energy(logits, y, self.output_loss)
        err_flat, back_flat = self._flat_buffers([mus[n] for n in g.hidden])
        err_flat.zero_()
        errors = self._views(err_flat, mus)
        backs = self._views(back_flat, mus)
        errors[g.output] = e_out.to(mus[g.output].dtype)
        step = self._make_step(vjps, errors, backs, err_flat, back_flat)
        trace = [base_energy] if self.record_energy else []
        self._relax_loop(step, trace, base_energy, x.device)
        with torch.enable_grad():
            self._write_weight_grads([mus[n.name] for n in g.nodes],
                                     [errors[n.name].to(mus[n.name].dtype) for n in g.nodes],
                                     x.shape[0])
        energy = _flat_energy(err_flat) + base_energy
        kept = err_flat.clone()
        out_errors = self._views(kept, mus)
        out_errors[g.output] = e_out
        return self._result(logits, y, base_energy, energy, out_errors, trace)

    # ------------------------------------------------------------------------------ setup
    def _feedforward(self, x: torch.Tensor):
        g = self.graph
        ctx = (torch.autocast(x.device.type, dtype=torch.bfloat16) if self.autocast
               else contextlib.nullcontext())
        leaves: dict[str, torch.Tensor] = {g.input_name: x}
        mus: dict[str, torch.Tensor] = {}
        vjps: dict[str, Callable] = {}
        with torch.enable_grad(), ctx:
            for node in g.nodes:
                inputs = [leaves[p] for p in node.parents]
                needs = [p != g.input_name for p in node.parents]
                if any(needs):
                    mu, vjps[node.name] = node_forward(node.fn, inputs, needs, self.kernels)
                else:
                    mu = node.fn(*inputs)
                mus[node.name] = mu
                if node.name != g.output:
                    leaves[node.name] = mu.detach().requires_grad_(True)
        return mus, vjps

    def _flat_buffers(self, hidden_mus: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        dtypes = {m.dtype for m in hidden_mus}
        dtype = dtypes.pop() if len(dtypes) == 1 and not self.autocast else torch.float32
        device = hidden_mus[0].device
        total = sum(m.numel() for m in hidden_mus)
        key = (total, dtype, device)
        if key not in self._buffers:
            # One entry: a new batch shape replaces the buffers instead of accumulating them.
            self._buffers = {key: (torch.zeros(total, dtype=dtype, device=device),
                                   torch.zeros(total, dtype=dtype, device=device))}
        return self._buffers[key]

    def _views(self, flat: torch.Tensor, mus: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        views, offset = {}, 0
        for name in self.graph.hidden:
            n = mus[name].numel()
            views[name] = flat[offset:offset + n].view(mus[name].shape)
            offset += n
        return views

    # ------------------------------------------------------------------------------- steps
    def _make_step(self, vjps, errors, backs, err_flat,
                   back_flat) -> Callable[[], torch.Tensor | None]:
        g = self.graph
        hidden = set(g.hidden)
        senders = [(n.name, [(i, p) for i, p in enumerate(n.parents) if p in hidden])
                   for n in g.nodes if n.name in vjps]
        rate, clamp, backend = self.rate, self.error_clamp, self._update_backend
        record = self.record_energy

        def jacobi() -> torch.Tensor:
            back_flat.zero_()
            for name, targets in senders:
                grads = vjps[name](errors[name])
                for i, p in targets:
                    backs[p].add_(grads[i])
            return pc_update(err_flat, back_flat, rate, clamp, backend=backend)

        kids = {u: [(k.name, [i for i, p in enumerate(k.parents) if p == u])
                    for k in g.children[u]] for u in g.hidden}

        def sequential() -> torch.Tensor:
            for u in reversed(g.hidden):
                b = backs[u]
                b.zero_()
                for k, positions in kids[u]:
                    grads = vjps[k](errors[k])
                    for i in positions:
                        b.add_(grads[i])
                pc_update(errors[u], b, rate, clamp, backend=backend)
            # The per-node updates' partial energies cover one node each; the whole network's
            # energy is one more pass over the buffer, paid only when a trace is recorded.
            return _flat_energy(err_flat) if record else None

        return jacobi if self.schedule == "jacobi" else sequential

    def _relax_loop(self, step: Callable[[], torch.Tensor | None], trace: list, base_energy,
                    device: torch.device) -> None:
        if self.T == 0:
            return
        graphed = (self.cuda_graph and device.type == "cuda" and not self.record_energy
                   and self.T > 1)
        if not graphed:
            for _ in range(self.T):
                energy = step()
                if self.record_energy:
                    trace.append(energy + base_energy)
            return
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            step()  # the first real step; it also compiles and warms up every kernel
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()  # recorded only: capture does not execute the step
        for _ in range(self.T - 1):
            graph.replay()


def _flat_energy(err_flat: torch.Tensor) -> torch.Tensor:
    """``0.5 * ||e||^2`` over the flat error buffer, accumulated in float32 (float64 for float64)."""
    acc = torch.float64 if err_flat.dtype == torch.float64 else torch.float32
    return 0.5 * err_flat.to(acc).pow(2).sum()
