"""The reference PC backend: plain PyTorch autograd over a node graph (the oracle of the tests).

Energy ``F = sum_v 1/2 ||x_v - mu_v||^2 + L(mu_out, y)`` (summed over the batch). Per batch:

1. feedforward: ``x_v = mu_v`` for every hidden node; BatchNorm statistics, and its running
   statistics, come from this pass only;
2. ``T`` inference steps ``x_u <- x_u - rate * (e_u - sum_v J_vu^T e_v)``;
3. weight gradients ``dF/dtheta_v = -(d mu_v / d theta_v)^T e_v`` (each layer from its own input
   and its own error), divided by the batch size so that they are on the scale of a mean loss.

Under the fixed prediction assumption (FPA) the predictions and Jacobians stay at their
feedforward values: every inference step is ONE backward-data pass through a retained autograd
graph. Strict PC recomputes the predictions from the current values every step.

Incremental PC (iPC, Salvatori et al., ICLR 2024) is strict PC whose weights also take a step at
every inference step (:meth:`ReferenceBackend.run_incremental`): each step computes ``dF/dx`` and
``dF/dtheta`` at the same point ``(x_t, theta_t)``, moves the values and hands the weight
gradient to the optimizer.

Error-based PC (ePC, Goemaere et al., arXiv 2505.20137) keeps strict PC's energy but takes the
errors as the free variables: ``x_v = f_v(x_parents) + e_v``, errors start at zero, and every
step is ``e <- e - rate dF/de`` with ``F(e) = sum_v 1/2 ||e_v||^2 + L(mu_out(e), y)``, one forward
and one backward pass through the whole net, so the output error reaches every node in one step.
The weight gradients are PC's local ones at the values the errors define (as strict PC's).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pcfast.pc.backends.base import (
    PCBackend,
    PCResult,
    PCSettings,
    accumulate,
    check_batch,
    hidden_energy,
    make_result,
    weight_grads,
)
from pcfast.pc.backends.steps import StateSteps, StopRule, clamp, relax, weighted
from pcfast.pc.energy import frozen_running_stats, output_energy, output_error


class ReferenceBackend(PCBackend):
    """FPA and strict PC on autograd; runs anything on any device.

    Example::

        backend = ReferenceBackend(net.pc_graph())
        result = backend.compute_gradients(x, y, PCSettings(T=20))
    """

    name = "reference"

    def can_use(self, x: torch.Tensor, settings: PCSettings) -> tuple[bool, str]:
        return True, ""

    def compute_gradients(self, x: torch.Tensor, y: torch.Tensor,
                          settings: PCSettings) -> PCResult:
        check_batch(self.graph, x, y)
        if settings.ipc:
            raise ValueError("iPC moves the weights during inference: use run_incremental")
        if settings.epc:
            return self._run_epc(x, y, settings)
        if settings.fpa:
            return self._run_fpa(x, y, settings)
        return self._run_strict(x, y, settings)

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

    def _run_fpa(self, x: torch.Tensor, y: torch.Tensor, s: PCSettings) -> PCResult:
        g = self.graph
        with torch.enable_grad():
            leaves, mus = self._feedforward_graph(x)
            logits = mus[g.output].detach()
            e_out = output_error(logits, y, s.output_loss)
            base_energy = output_energy(logits, y, s.output_loss)
            errors = {name: torch.zeros_like(mus[name]) for name in g.hidden}
            errors[g.output] = e_out
            trace = [base_energy] if s.record_energy else []
            # Nodes whose predictions depend on hidden values: they carry errors downwards.
            senders = [n.name for n in g.nodes if any(p != g.input_name for p in n.parents)]
            hidden_leaves = [leaves[name] for name in g.hidden]
            steps = StateSteps(s)

            def update(name: str, b: torch.Tensor) -> torch.Tensor:
                # Under FPA mu is fixed, so the value step is the error step.
                if not s.state_momentum:
                    return relax(errors[name], b, s)
                return steps.update(name, errors[name], errors[name] - clamp(b, s))

            stop, taken = StopRule(s), s.T
            for t in range(s.T):
                if stop.done(t, lambda: hidden_energy(g, errors) + base_energy):
                    taken = t
                    break
                if s.schedule == "jacobi":
                    back = torch.autograd.grad([mus[v] for v in senders], hidden_leaves,
                                               [errors[v] for v in senders], retain_graph=True)
                    for name, b in zip(g.hidden, back):
                        errors[name] = update(name, b)
                else:
                    for name in reversed(g.hidden):
                        kids = g.children[name]
                        (b,) = torch.autograd.grad([mus[k.name] for k in kids], leaves[name],
                                                   [errors[k.name] for k in kids],
                                                   retain_graph=True)
                        errors[name] = update(name, b)
                if s.record_energy:
                    trace.append(hidden_energy(g, errors) + base_energy)
            params, grads = weight_grads(g, [mus[n.name] for n in g.nodes],
                                         [errors[n.name] for n in g.nodes])
        accumulate(params, grads, x.shape[0], sign=-1.0)
        energy = hidden_energy(g, errors) + base_energy
        return make_result(logits, y, base_energy, energy, errors, trace, taken)

    # --------------------------------------------------------------------------- strict
    def _predict(self, values: dict[str, torch.Tensor], names=None) -> dict[str, torch.Tensor]:
        g = self.graph
        return {n.name: n.fn(*(values[p] for p in n.parents))
                for n in g.nodes if names is None or n.name in names}

    def _strict_energy(self, values, mus, y, s: PCSettings, t: int = 0) -> torch.Tensor:
        """``sum_v pi_v(t)/2 ||x_v - mu_v||^2 + pi_out(t) L`` over the nodes in ``mus``
        (precisions 1 without ``s.precision``)."""
        g = self.graph
        hidden = sum(weighted(n, 0.5 * (values[n] - mus[n]).pow(2).sum(), s, t)
                     for n in g.hidden if n in mus)
        out = (weighted(g.output, output_energy(mus[g.output], y, s.output_loss), s, t)
               if g.output in mus else 0.0)
        return hidden + out

    def _run_strict(self, x: torch.Tensor, y: torch.Tensor, s: PCSettings,
                    weight_step: Callable[[], None] | None = None) -> PCResult:
        """Strict PC; with ``weight_step`` iPC (see :meth:`run_incremental`)."""
        g = self.graph
        params = g.parameters()
        n = x.shape[0]
        with torch.no_grad():
            ff = {g.input_name: x}
            for node in g.nodes:  # the one feedforward pass that moves BatchNorm running stats
                ff[node.name] = node.fn(*(ff[p] for p in node.parents))
        logits = ff[g.output]
        values = {name: ff[name].clone() for name in g.hidden}
        values[g.input_name] = x
        trace = []
        steps = StateSteps(s)
        with torch.enable_grad(), frozen_running_stats(g.modules):
            if s.record_energy:
                with torch.no_grad():
                    trace.append(self._strict_energy(values, self._predict(values), y, s))
            stop, taken = StopRule(s), s.T
            for t in range(s.T):
                if stop.done(t, lambda t=t: self._strict_energy(values, self._predict(values),
                                                                y, s, t)):
                    taken = t
                    break
                if weight_step is None:
                    self._strict_step(values, y, s, steps, t)
                else:
                    wgrads = self._strict_step(values, y, s, steps, t, params)
                    for p in params:
                        p.grad = None
                    accumulate(params, wgrads, n)
                    weight_step()
                if s.record_energy:
                    with torch.no_grad():
                        trace.append(self._strict_energy(values, self._predict(values), y, s,
                                                         t + 1))
            with torch.set_grad_enabled(weight_step is None):
                mus = self._predict(values)
                energy = self._strict_energy(values, mus, y, s, taken)
            if weight_step is None:
                accumulate(params, torch.autograd.grad(energy, params, allow_unused=True), n)
        with torch.no_grad():
            errors = {name: values[name] - mus[name] for name in g.hidden}
            errors[g.output] = output_error(mus[g.output], y, s.output_loss)
        ff_loss = output_energy(logits, y, s.output_loss)
        return make_result(logits, y, ff_loss, energy.detach(), errors, trace, taken)

    def _strict_step(self, values, y, s: PCSettings, steps: StateSteps, t: int,
                     params=()) -> tuple:
        """Inference step ``t`` (jacobi, or a sequential sweep) on ``values`` in place; returns
        ``dF/dtheta`` for ``params`` at the step's starting point (empty without params)."""
        if s.schedule == "jacobi":
            return self._strict_jacobi_step(values, y, s, steps, t, params)
        wgrads: tuple = ()
        if params:
            g = self.graph
            leaves = {k: v if k == g.input_name else v.detach() for k, v in values.items()}
            energy = self._strict_energy(leaves, self._predict(leaves), y, s, t)
            wgrads = torch.autograd.grad(energy, params, allow_unused=True)
        self._strict_sequential_sweep(values, y, s, steps, t)
        return wgrads

    # ------------------------------------------------------------------------------ ePC
    def _epc_forward(self, x: torch.Tensor, errors: dict[str, torch.Tensor],
                     fixed: dict[str, torch.Tensor] | None = None):
        """Values ``x_v = f_v(parents) + e_v`` (hidden nodes) and the output prediction;
        ``fixed`` holds predictions that do not change during inference (of nodes fed by the
        graph input alone)."""
        g = self.graph
        vals = {g.input_name: x}
        for node in g.nodes:
            if fixed is not None and node.name in fixed:
                mu = fixed[node.name]
            else:
                mu = node.fn(*(vals[p] for p in node.parents))
            vals[node.name] = mu + errors[node.name] if node.name in errors else mu
        return vals

    def _epc_energy(self, errors, logits, y, s: PCSettings, t: int) -> torch.Tensor:
        g = self.graph
        hidden = sum(weighted(n, 0.5 * errors[n].pow(2).sum(), s, t) for n in g.hidden)
        return hidden + weighted(g.output, output_energy(logits, y, s.output_loss), s, t)

    def _run_epc(self, x: torch.Tensor, y: torch.Tensor, s: PCSettings) -> PCResult:
        g = self.graph
        with torch.no_grad():
            ff = self._epc_forward(x, {})  # the one pass that moves BatchNorm running stats
        logits = ff[g.output]
        errors = {name: torch.zeros_like(ff[name]) for name in g.hidden}
        # Nodes fed by the input alone predict the same at every step (BatchNorm in training
        # mode normalises with the batch's statistics, whatever its running ones).
        fixed = {n.name: ff[n.name] for n in g.nodes
                 if n.name != g.output and all(p == g.input_name for p in n.parents)}
        trace = []
        steps = StateSteps(s)
        with torch.enable_grad(), frozen_running_stats(g.modules):
            stop, taken = StopRule(s), s.T
            for t in range(s.T):
                leaves = {k: e.detach().requires_grad_(True) for k, e in errors.items()}
                vals = self._epc_forward(x, leaves, fixed)
                energy = self._epc_energy(leaves, vals[g.output], y, s, t)
                if stop.done(t, energy.detach):
                    taken = t
                    break
                if s.record_energy:
                    trace.append(energy.detach())
                grads = torch.autograd.grad(energy, list(leaves.values()))
                for (name, e), gr in zip(errors.items(), grads):
                    errors[name] = (steps.update(name, e, gr) if s.state_momentum
                                    else e - s.rate * gr)
            with torch.no_grad():
                vals = self._epc_forward(x, errors, fixed)
            values = {name: vals[name] for name in g.hidden}
            values[g.input_name] = x
            mus = self._predict(values)
            energy = self._strict_energy(values, mus, y, s, taken)
            params = g.parameters()
            accumulate(params, torch.autograd.grad(energy, params, allow_unused=True), x.shape[0])
        if s.record_energy:
            trace.append(energy.detach())
        with torch.no_grad():
            out = {name: values[name] - mus[name] for name in g.hidden}
            out[g.output] = output_error(mus[g.output], y, s.output_loss)
        ff_loss = output_energy(logits, y, s.output_loss)
        return make_result(logits, y, ff_loss, energy.detach(), out, trace, taken)

    # ------------------------------------------------------------------------------ iPC
    def run_incremental(self, x: torch.Tensor, y: torch.Tensor, settings: PCSettings,
                        weight_step: Callable[[], None]) -> PCResult:
        """iPC on one batch: ``T`` steps, each moving the values and the weights together.

        Values start at the feedforward pass (which alone moves the BatchNorm running
        statistics). Step ``t``: ``dF/dx`` and ``dF/dtheta`` at ``(x_t, theta_t)``; the values
        take their step (jacobi: all at once; sequential: a top-down sweep starting from the
        same point); every parameter's ``.grad`` is set to ``dF/dtheta / N``; then
        ``weight_step()`` (the front's optimizer step) moves the weights. ``.grad`` holds the
        last step's gradient afterwards. The result's errors and energy are those at the final
        values and weights; ``loss``/``accuracy`` are the feedforward pass's.
        """
        check_batch(self.graph, x, y)
        return self._run_strict(x, y, settings, weight_step)

    @staticmethod
    def _strict_update(name: str, value: torch.Tensor, e: torch.Tensor, grad: torch.Tensor,
                       s: PCSettings, steps: StateSteps, t: int) -> torch.Tensor:
        e = weighted(name, e, s, t)
        back = e - grad  # dF/dx_u = pi_u e_u - sum_v pi_v J_vu^T e_v
        if s.state_momentum:
            return steps.update(name, value, e - clamp(back, s))
        return value - s.rate * (e - clamp(back, s))

    def _strict_jacobi_step(self, values, y, s: PCSettings, steps: StateSteps, t: int,
                            params=()) -> tuple:
        """One jacobi step on ``values`` (in place); returns ``dF/dtheta`` for ``params`` at
        the step's starting point (same autograd pass; empty without params)."""
        g = self.graph
        leaves = {k: (v if k == g.input_name else v.detach().requires_grad_(True))
                  for k, v in values.items()}
        mus = self._predict(leaves)
        energy = self._strict_energy(leaves, mus, y, s, t)
        hidden = [leaves[n] for n in g.hidden]
        grads = torch.autograd.grad(energy, hidden + list(params), allow_unused=True)
        for name, grad in zip(g.hidden, grads):
            e = (values[name] - mus[name]).detach()
            values[name] = self._strict_update(name, values[name], e, grad, s, steps,
                                               t).detach()
        return grads[len(hidden):]

    def _strict_sequential_sweep(self, values, y, s: PCSettings, steps: StateSteps,
                                 t: int) -> None:
        g = self.graph
        for name in reversed(g.hidden):
            leaf = values[name].detach().requires_grad_(True)
            local = dict(values)
            local[name] = leaf
            kids = {k.name for k in g.children[name]}
            mus = self._predict(local, kids | {name})
            energy = self._strict_energy(local, mus, y, s, t)
            (grad,) = torch.autograd.grad(energy, leaf)
            e = (values[name] - mus[name]).detach()
            values[name] = self._strict_update(name, values[name], e, grad, s, steps,
                                               t).detach()
