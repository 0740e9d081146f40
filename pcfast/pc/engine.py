"""The PC engine, reference path: plain PyTorch autograd over a node graph.

Energy ``F = sum_v 1/2 ||x_v - mu_v||^2 + L(mu_out, y)`` (summed over the batch). Per batch:

1. feedforward: ``x_v = mu_v`` for every hidden node; BatchNorm statistics, and its running
   statistics, come from this pass only;
2. ``T`` inference steps ``x_u <- x_u - rate * (e_u - sum_v J_vu^T e_v)``;
3. weight gradients ``dF/dtheta_v = -(d mu_v / d theta_v)^T e_v`` (each layer from its own input
   and its own error), divided by the batch size so that they are on the scale of a mean loss,
   then any ``torch.optim`` optimizer step.

Under the fixed prediction assumption (FPA, the default) the predictions and Jacobians stay at
their feedforward values: every inference step is ONE backward-data pass through a retained
autograd graph. Strict PC recomputes the predictions from the current values every step.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from pcfast.pc.energy import OUTPUT_LOSSES, frozen_running_stats, output_energy, output_error
from pcfast.pc.graph import PCGraph

SCHEDULES = ("jacobi", "sequential")
BACKENDS = ("reference", "fast", "auto")


@dataclass
class PCResult:
    """What one PC training step reports.

    ``loss`` and ``accuracy`` are those of the feedforward prediction (mean over the batch);
    ``energy`` is the relaxed energy per sample; ``errors`` maps each node to its error.
    ``energy_trace`` holds the energy per sample after initialisation and after every step
    when the engine was asked to record it.
    """

    loss: torch.Tensor
    accuracy: torch.Tensor
    energy: torch.Tensor
    logits: torch.Tensor
    errors: dict[str, torch.Tensor]
    energy_trace: list[torch.Tensor] = field(default_factory=list)

    def error_norms(self) -> dict[str, float]:
        """Per-node error norm, averaged over the batch (one sync)."""
        n = self.logits.shape[0]
        norms = torch.stack([e.detach().flatten(1).norm(dim=1).sum() / n
                             for e in self.errors.values()])
        return dict(zip(self.errors, norms.tolist()))


class PCEngine:
    """Trains the nodes of a :class:`PCGraph` with predictive coding.

    Args:
        graph: the node graph (for a model, ``model.pc_graph()``).
        T: inference steps per batch.
        rate: inference rate ``gamma``.
        schedule: ``"jacobi"`` (all nodes from the previous step's errors) or ``"sequential"``
            (top-down; each node uses the freshly updated errors above it).
        fpa: fixed prediction assumption (default); ``False`` is strict PC.
        output_loss: ``"ce"`` (default) or ``"mse"``.
        error_clamp: if set, clamp the propagated errors ``sum_v J_vu^T e_v`` to ``[-c, c]``.
        backend: ``"reference"`` (this file), ``"fast"`` (``pcfast.pc.fast``: fused kernels,
            CUDA graphs; FPA only) or ``"auto"`` (fast for CUDA batches under FPA, else
            reference; decided per batch).
        backend_options: keyword options of the fast path (``kernels``, ``cuda_graph``,
            ``autocast``; see :class:`pcfast.pc.fast.FastPCEngine`).

    Example::

        engine = PCEngine(net.pc_graph(), T=20, rate=0.5)
        result = engine.step(x, y, optimizer)
    """

    def __init__(self, graph: PCGraph, T: int = 100, rate: float = 0.5,
                 schedule: str = "jacobi", fpa: bool = True, output_loss: str = "ce",
                 error_clamp: float | None = None, backend: str = "auto",
                 record_energy: bool = False, backend_options: dict | None = None) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if output_loss not in OUTPUT_LOSSES:
            raise ValueError(f"output_loss must be one of {OUTPUT_LOSSES}, got {output_loss!r}")
        if T < 0 or int(T) != T:
            raise ValueError(f"T must be a non-negative integer, got {T}")
        if not rate > 0:
            raise ValueError(f"rate must be positive, got {rate}")
        if error_clamp is not None and not error_clamp > 0:
            raise ValueError(f"error_clamp must be positive or None, got {error_clamp}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown PC backend {backend!r}; available: {BACKENDS}")
        if backend == "fast" and not fpa:
            raise ValueError("backend='fast' supports fpa=True only; "
                             "use backend='reference' for strict PC")
        self.backend_options = dict(backend_options or {})
        self._fast = None
        self._fast_worked = False  # "auto": the fast path ran a batch, errors now propagate
        self._fast_failed = False  # "auto": the fast path failed on its first batch
        self.graph = graph
        self.T = int(T)
        self.rate = float(rate)
        self.schedule = schedule
        self.fpa = fpa
        self.output_loss = output_loss
        self.error_clamp = error_clamp
        self.backend = backend
        self.record_energy = record_energy

    # ----------------------------------------------------------------------------- public
    def step(self, x: torch.Tensor, y: torch.Tensor,
             optimizer: torch.optim.Optimizer | None = None) -> PCResult:
        """One PC training step: relax, write each parameter's ``.grad``, step the optimizer."""
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        result = self.compute_gradients(x, y)
        if optimizer is not None:
            optimizer.step()
        return result

    def compute_gradients(self, x: torch.Tensor, y: torch.Tensor) -> PCResult:
        """Relax the errors for ``(x, y)`` and accumulate the PC weight gradients into ``.grad``."""
        if self._use_fast(x):
            if self.backend == "fast" or self._fast_worked:
                return self._fast_engine().compute_gradients(x, y)
            buffers = [b for m in self.graph.modules for b in m.buffers()]
            saved = [b.detach().clone() for b in buffers]  # BN stats, should the batch fail
            try:
                result = self._fast_engine().compute_gradients(x, y)
            except Exception as exc:  # "auto" keeps training on the reference path
                self._fast_failed = True
                warnings.warn(
                    f"the fast PC backend failed on its first batch ({type(exc).__name__}: {exc}); "
                    "backend='auto' continues on the reference path. backend='fast' raises the "
                    "error instead.", RuntimeWarning, stacklevel=2)
                with torch.no_grad():
                    for b, old in zip(buffers, saved):
                        b.copy_(old)
                for p in self.graph.parameters():
                    p.grad = None
            else:
                self._fast_worked = True
                return result
        self._check_batch(x, y)
        if self.fpa:
            return self._run_fpa(x, y)
        return self._run_strict(x, y)

    def _use_fast(self, x: torch.Tensor) -> bool:
        if self.backend == "reference" or not self.fpa or self._fast_failed:
            return False
        return self.backend == "fast" or x.is_cuda

    def _fast_engine(self):
        """The fast path (``pcfast.pc.fast``), built on first use, with this engine's settings."""
        if self._fast is None:
            from pcfast.pc.fast import FastPCEngine

            self._fast = FastPCEngine(self.graph, **self.backend_options)
        for name in ("T", "rate", "schedule", "output_loss", "error_clamp", "record_energy"):
            setattr(self._fast, name, getattr(self, name))
        return self._fast

    # ------------------------------------------------------------------------------ FPA
    def _feedforward_graph(self, x: torch.Tensor):
        """Feedforward with every hidden value as a detached leaf: ``mu_v = f_v(leaves)``."""
        g = self.graph
        leaves: dict[str, torch.Tensor] = {g.input_name: x}
        mus: dict[str, torch.Tensor] = {}
        for node in g.nodes:
            mu = node.fn(*(leaves[p] for p in node.parents))
            mus[node.name] = mu
            if node.name != g.output:
                leaves[node.name] = mu.detach().requires_grad_(True)
        return leaves, mus

    def _run_fpa(self, x: torch.Tensor, y: torch.Tensor) -> PCResult:
        g = self.graph
        with torch.enable_grad():
            leaves, mus = self._feedforward_graph(x)
            logits = mus[g.output].detach()
            e_out = output_error(logits, y, self.output_loss)
            base_energy = output_energy(logits, y, self.output_loss)
            errors = {name: torch.zeros_like(mus[name]) for name in g.hidden}
            errors[g.output] = e_out
            trace = [base_energy] if self.record_energy else []
            # Nodes whose predictions depend on hidden values: they carry errors downwards.
            senders = [n.name for n in g.nodes if any(p != g.input_name for p in n.parents)]
            hidden_leaves = [leaves[name] for name in g.hidden]
            for _ in range(self.T):
                if self.schedule == "jacobi":
                    back = torch.autograd.grad([mus[v] for v in senders], hidden_leaves,
                                               [errors[v] for v in senders], retain_graph=True)
                    for name, b in zip(g.hidden, back):
                        errors[name] = self._relax(errors[name], b)
                else:
                    for name in reversed(g.hidden):
                        kids = g.children[name]
                        (b,) = torch.autograd.grad([mus[k.name] for k in kids], leaves[name],
                                                   [errors[k.name] for k in kids],
                                                   retain_graph=True)
                        errors[name] = self._relax(errors[name], b)
                if self.record_energy:
                    trace.append(self._hidden_energy(errors) + base_energy)
            self._write_weight_grads([mus[n.name] for n in g.nodes],
                                     [errors[n.name] for n in g.nodes], x.shape[0])
        energy = self._hidden_energy(errors) + base_energy
        return self._result(logits, y, base_energy, energy, errors, trace)

    def _relax(self, e: torch.Tensor, back: torch.Tensor) -> torch.Tensor:
        """``e <- e - rate * (e - back)``: the value update seen through ``e = x - mu``."""
        back = self._clamp(back)
        return torch.lerp(e, back, self.rate) if self.rate != 1.0 else back

    def _clamp(self, back: torch.Tensor) -> torch.Tensor:
        """The optional clamp of the propagated errors ``sum_v J_vu^T e_v``."""
        if self.error_clamp is None:
            return back
        return back.clamp(-self.error_clamp, self.error_clamp)

    # --------------------------------------------------------------------------- strict
    def _predict(self, values: dict[str, torch.Tensor], names=None) -> dict[str, torch.Tensor]:
        g = self.graph
        return {n.name: n.fn(*(values[p] for p in n.parents))
                for n in g.nodes if names is None or n.name in names}

    def _strict_energy(self, values, mus, y) -> torch.Tensor:
        g = self.graph
        hidden = sum(0.5 * (values[n] - mus[n]).pow(2).sum() for n in g.hidden if n in mus)
        out = output_energy(mus[g.output], y, self.output_loss) if g.output in mus else 0.0
        return hidden + out

    def _run_strict(self, x: torch.Tensor, y: torch.Tensor) -> PCResult:
        g = self.graph
        with torch.no_grad():
            ff = {g.input_name: x}
            for n in g.nodes:  # the one feedforward pass that moves BatchNorm running stats
                ff[n.name] = n.fn(*(ff[p] for p in n.parents))
        logits = ff[g.output]
        values = {name: ff[name].clone() for name in g.hidden}
        values[g.input_name] = x
        trace = []
        with torch.enable_grad(), frozen_running_stats(g.modules):
            if self.record_energy:
                with torch.no_grad():
                    trace.append(self._strict_energy(values, self._predict(values), y))
            for _ in range(self.T):
                if self.schedule == "jacobi":
                    self._strict_jacobi_step(values, y)
                else:
                    self._strict_sequential_sweep(values, y)
                if self.record_energy:
                    with torch.no_grad():
                        trace.append(self._strict_energy(values, self._predict(values), y))
            mus = self._predict(values)
            energy = self._strict_energy(values, mus, y)
            params = g.parameters()
            grads = torch.autograd.grad(energy, params, allow_unused=True)
            self._accumulate(params, grads, x.shape[0])
        with torch.no_grad():
            errors = {name: values[name] - mus[name] for name in g.hidden}
            errors[g.output] = output_error(mus[g.output], y, self.output_loss)
        ff_loss = output_energy(logits, y, self.output_loss)
        return self._result(logits, y, ff_loss, energy.detach(), errors, trace)

    def _strict_update(self, value: torch.Tensor, e: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        back = e - grad  # dF/dx_u = e_u - sum_v J_vu^T e_v
        return value - self.rate * (e - self._clamp(back))

    def _strict_jacobi_step(self, values, y) -> None:
        g = self.graph
        leaves = {k: (v if k == g.input_name else v.detach().requires_grad_(True))
                  for k, v in values.items()}
        mus = self._predict(leaves)
        energy = self._strict_energy(leaves, mus, y)
        grads = torch.autograd.grad(energy, [leaves[n] for n in g.hidden])
        for name, grad in zip(g.hidden, grads):
            e = (values[name] - mus[name]).detach()
            values[name] = self._strict_update(values[name], e, grad).detach()

    def _strict_sequential_sweep(self, values, y) -> None:
        g = self.graph
        for name in reversed(g.hidden):
            leaf = values[name].detach().requires_grad_(True)
            local = dict(values)
            local[name] = leaf
            kids = {k.name for k in g.children[name]}
            mus = self._predict(local, kids | {name})
            energy = self._strict_energy(local, mus, y)
            (grad,) = torch.autograd.grad(energy, leaf)
            e = (values[name] - mus[name]).detach()
            values[name] = self._strict_update(values[name], e, grad).detach()

    # --------------------------------------------------------------------------- shared
    def _write_weight_grads(self, mus, errors, batch: int) -> None:
        """``grad_theta = -(d mu_v/d theta)^T e_v / N`` for every node with parameters."""
        g = self.graph
        outs, gouts = [], []
        for node, mu, e in zip(g.nodes, mus, errors):
            if g.node_parameters(node) and mu.requires_grad:
                outs.append(mu)
                gouts.append(-e)
        params = g.parameters()
        if not outs:
            return
        grads = torch.autograd.grad(outs, params, gouts, allow_unused=True)
        self._accumulate(params, grads, batch)

    @staticmethod
    def _accumulate(params, grads, batch: int) -> None:
        for p, gr in zip(params, grads):
            if gr is None:
                continue
            gr = gr / batch
            if p.grad is None:
                p.grad = gr.detach()
            else:
                p.grad.add_(gr)

    def _hidden_energy(self, errors: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(0.5 * errors[name].pow(2).sum() for name in self.graph.hidden)

    def _result(self, logits, y, loss_sum, energy, errors, trace) -> PCResult:
        """``loss_sum``: the output loss of the feedforward logits, summed over the batch."""
        n = logits.shape[0]
        logits = logits.detach()
        return PCResult(
            loss=loss_sum.detach() / n,
            accuracy=(logits.argmax(1) == y).float().mean(),
            energy=energy.detach() / n,
            logits=logits,
            errors=errors,
            energy_trace=[t.detach() / n for t in trace],
        )

    def _check_batch(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.graph.input_check is not None:
            self.graph.input_check(x)
        if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.dtype != torch.long:
            got = f"{tuple(y.shape)} {y.dtype}" if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"labels must be a 1-D int64 tensor of class indices, got {got}")
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"batch sizes differ: {x.shape[0]} inputs, {y.shape[0]} labels")
