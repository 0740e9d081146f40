"""Strict PC, iPC and ePC on explicit VJP rules (the fast backend's ``fpa=False`` modes).

The same math as :class:`~pcfast.pc.backends.reference.ReferenceBackend`, without autograd in
the inference steps. Every step recomputes the predictions of the nodes that have a hidden
parent at the current values with :func:`~pcfast.pc.vjp_rules.node_forward`, which also
derives their input-VJP rules (fresh ReLU masks, BatchNorm batch statistics, activation
derivatives); the propagated errors are those rules applied to the (precision-weighted)
errors. Nodes fed by the graph input alone predict the same at every step (BatchNorm in
training mode normalises with the batch's statistics): their feedforward prediction is kept.

- strict PC, jacobi: ``x_u <- x_u - rate (pi_u e_u - clamp(sum_v pi_v J_vu^T e_v))`` for every
  hidden node from one prediction pass; sequential: a top-down sweep in which each node moves
  on its own error and its children's at the current values (each node predicted once per
  sweep: a child's prediction from its own turn stays current until a parent moves);
- iPC: the same steps, the predictions also recorded by autograd so that ``dF/dtheta`` at the
  step's starting point is one backward pass over the weights; the optimizer steps after every
  inference step;
- ePC: the errors are the free variables, ``x_v = f_v(parents) + e_v``; each step is one
  prediction pass and one sweep of the rules from the output down, ``dF/de_u = pi_u e_u -
  b_u`` with ``b_u = sum_k J_ku^T b_k = -dL/dx_u`` (``b_out = pi_out`` times the output error).

On the CPU, strict PC on a dense chain (an MLP: every node after the first a ``Linear`` with an
optional Tanh, ReLU or Sigmoid) runs its T steps as ONE op (:mod:`.dense_chain`): plain steps,
unit precisions, no clamp, no adaptive stop or energy trace; other settings take the per-node
steps below.

Weight gradients (strict PC, ePC) are taken once, at the final values, with autograd (on a
dense chain in closed form, ``-(g_k^T v_k) / N``, with autograd through the first node only). The
steps run eagerly (no CUDA graph); BatchNorm running statistics move in the feedforward pass
only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from pcfast.ops.pc_relax import pc_relax
from pcfast.pc.backends.base import (
    PCResult,
    PCSettings,
    accumulate,
    make_result,
    weight_grads,
)
from pcfast.pc.backends.dense_chain import DenseChain
from pcfast.pc.backends.steps import StateSteps, StopRule, clamp, relax, summed, weighted
from pcfast.pc.energy import frozen_running_stats, output_energy
from pcfast.pc.graph import PCGraph
from pcfast.pc.vjp_rules import Rule, has_rule, node_forward


class StrictRunner:
    """Runs one batch of strict PC, iPC or ePC over ``graph`` with explicit VJP rules.

    Args:
        graph: the node graph.
        kernels: ``"auto"``, ``"triton"`` or ``"torch"``, for the fused ops inside the rules.
        chain: the graph's :class:`~.dense_chain.DenseChain`, whose strict op runs the batches
            it takes on the CPU (see the module doc), or None.
    """

    def __init__(self, graph: PCGraph, kernels: str, chain: DenseChain | None = None) -> None:
        self.graph = graph
        self.kernels = kernels
        g = graph
        self.senders = [n for n in g.nodes if any(p != g.input_name for p in n.parents)]
        self.sender_names = {n.name for n in self.senders}
        # Per sender, once: which inputs receive errors, and whether it needs autograd.
        self.needs = {n.name: [p != g.input_name for p in n.parents] for n in self.senders}
        self.fallback = {n.name for n in self.senders if not has_rule(n.fn)}
        self.node_of = {n.name: n for n in graph.nodes}
        self.chain = chain

    # -------------------------------------------------------------------- predictions
    def _feedforward(self, x: torch.Tensor, known: dict[str, torch.Tensor] | None = None,
                     with_rules: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
        """The one pass that moves BatchNorm running statistics (as the reference's); the
        predictions in ``known`` were already made. With ``with_rules`` it also returns
        ``{name: (mu, rule)}`` for the senders: every value starts at its prediction, so these
        are the first inference step's predictions and rules, which that step then reuses
        instead of predicting the whole graph again at the same values."""
        g = self.graph
        ff = {g.input_name: x, **(known or {})}
        first: dict[str, tuple[torch.Tensor, Rule | None]] = {}
        with torch.no_grad():
            for node in g.nodes:
                if node.name in ff:
                    continue
                if with_rules and node.name in self.sender_names:
                    mu, rule = self.predict_node(node, ff, {}, grad=False)
                    first[node.name] = (mu, rule)
                    ff[node.name] = mu.detach()
                else:
                    ff[node.name] = node.fn(*(ff[p] for p in node.parents))
        return ff, first

    def _predict(self, values: dict[str, torch.Tensor], fixed: dict[str, torch.Tensor],
                 grad: bool = False) -> tuple[dict, dict[str, Rule]]:
        """Every node's prediction at ``values`` and the senders' rules, in topological order;
        ``grad`` records them for the weight gradients; ``fixed`` holds kept predictions of
        nodes fed by the input alone."""
        mus: dict[str, torch.Tensor] = {}
        rules: dict[str, Rule] = {}
        for node in self.graph.nodes:
            mus[node.name], rule = self.predict_node(node, values, fixed, grad)
            if rule is not None:
                rules[node.name] = rule
        return mus, rules

    def predict_node(self, node, values, fixed, grad: bool,
                     want_rule: bool = True) -> tuple[torch.Tensor, Rule | None]:
        """One node's prediction at ``values`` and, for a sender (if ``want_rule``), its
        input-VJP rule."""
        if node.name not in self.sender_names or not want_rule:
            if not grad and node.name in fixed:
                return fixed[node.name], None
            with torch.set_grad_enabled(grad):
                return node.fn(*(values[p] for p in node.parents)), None
        inputs = [values[p] for p in node.parents]
        needs = self.needs[node.name]
        fallback = node.name in self.fallback
        if fallback:  # autograd over the node: its hidden inputs become leaves
            inputs = [v.detach().requires_grad_(True) if n else v for v, n in zip(inputs, needs)]
        with torch.set_grad_enabled(grad or fallback):
            return node_forward(node.fn, inputs, needs, self.kernels)

    def _errors(self, values, mus, s: PCSettings, t: int) -> tuple[dict, dict]:
        """``(e, pi e)`` for the nodes in ``mus``: hidden ``x - mu``, output ``-dL/dmu``."""
        g = self.graph
        errors, weighted_errors = {}, {}
        for name, mu in mus.items():
            mu = mu.detach()
            e = self._output_error(mu, s) if name == g.output else values[name] - mu
            errors[name] = e
            weighted_errors[name] = weighted(name, e, s, t)
        return errors, weighted_errors

    def _output_error(self, logits: torch.Tensor, s: PCSettings) -> torch.Tensor:
        """:func:`~pcfast.pc.energy.output_error` with the batch's one-hot target formed once."""
        pred = torch.softmax(logits, dim=1) if s.output_loss == "ce" else logits
        return self._target - pred

    def _energy(self, values, fixed, y, s: PCSettings, t: int) -> torch.Tensor:
        """The energy at ``values`` (predictions without rules)."""
        g = self.graph
        with torch.no_grad():
            mus = {n.name: (fixed[n.name] if n.name in fixed
                            else n.fn(*(values[p] for p in n.parents))) for n in g.nodes}
            return self._weighted_energy({n: values[n] - mus[n] for n in g.hidden},
                                         mus[g.output], y, s, t)

    def _weighted_energy(self, errors, logits, y, s: PCSettings, t: int) -> torch.Tensor:
        """``sum_v pi_v(t)/2 ||e_v||^2 + pi_out(t) L(logits)`` over the hidden ``errors``."""
        g = self.graph
        hidden = sum(weighted(n, 0.5 * errors[n].pow(2).sum(), s, t) for n in g.hidden)
        return hidden + weighted(g.output, output_energy(logits, y, s.output_loss), s, t)

    def _propagate(self, rules: dict[str, Rule], sent: dict[str, torch.Tensor],
                   into: str | None = None) -> dict[str, list[torch.Tensor]]:
        """The contributions ``J_vu^T sent_v`` to every hidden parent ``u`` (or only ``into``),
        unsummed: the update sums them in its own pass."""
        g = self.graph
        back: dict[str, list[torch.Tensor]] = {}
        for node in reversed(self.senders):
            if node.name not in rules:
                continue
            grads = rules[node.name].vjp(sent[node.name])
            for p, gr in zip(node.parents, grads):
                if p == g.input_name or gr is None or (into is not None and p != into):
                    continue
                back.setdefault(p, []).append(gr)
        return back

    @staticmethod
    def _update(name, value, mu, e_w, backs, s: PCSettings, steps: StateSteps,
                t: int) -> torch.Tensor:
        """``x - rate (pi e - clamp(sum(backs)))`` (or the momentum step on that gradient);
        ``e_w`` (``pi e``) is formed here from ``value`` and ``mu`` where it is None.

        Plain steps with ``pi = 1`` and no clamp are one ``pc_relax`` pass:
        ``x - rate (x - mu - back) = lerp(x, mu + sum(backs), rate)``. Otherwise
        ``(x - pi e) + pc_relax(pi e, backs)``: ``pc_relax`` sums the contributions, clamps and
        forms ``pi e + rate (clamp(back) - pi e)``, and ``x - pi e`` is the prediction itself
        where ``pi = 1`` (so that unit precisions give bit-identical results)."""
        backs = backs or []
        if (not s.state_momentum and s.error_clamp is None and _unit(name, s, t)
                and len(backs) < 4):
            out = torch.empty_like(value)
            pc_relax(value, [mu.detach(), *backs], s.rate, None, out)
            return out
        if e_w is None:
            e_w = weighted(name, value - mu.detach(), s, t)
        if s.state_momentum:
            back = summed(backs, value.dtype) if backs else torch.zeros_like(value)
            return steps.update(name, value, e_w - clamp(back, s))
        out = torch.empty_like(value)
        if not backs:
            backs = [torch.zeros_like(value)]
        pc_relax(e_w, backs, s.rate, s.error_clamp, out)
        return out.add_(mu.detach() if _unit(name, s, t) else value - e_w)

    # ----------------------------------------------------------------------- strict / iPC
    def run_strict(self, x: torch.Tensor, y: torch.Tensor, s: PCSettings,
                   weight_step: Callable[[], None] | None = None) -> PCResult:
        """Strict PC on one batch; with ``weight_step`` iPC (``.grad`` set and the optimizer
        stepped after every inference step)."""
        known = {}
        if weight_step is None and self._chain_fits(x, s):
            mu1 = self.chain.first_prediction(x)
            if mu1.dim() == 2:  # (N, features), and so is every value of the chain
                return self.chain.strict(x, y, s, mu1)
            known[self.graph.nodes[0].name] = mu1.detach()
        g = self.graph
        params = g.parameters()
        n = x.shape[0]
        ff, first = self._feedforward(x, known, with_rules=weight_step is None)
        logits = ff[g.output]
        self._target = F.one_hot(y, logits.shape[1]).to(logits.dtype)  # formed once per batch
        # Under iPC the weights move at every step: no prediction stays fixed.
        fixed = {} if weight_step is not None else \
            {k: ff[k] for k in g.hidden if k not in self.sender_names}
        # Every step makes new value tensors (none is written in place): no copy needed.
        values = {name: ff[name] for name in g.hidden}
        values[g.input_name] = x
        steps, trace = StateSteps(s), []
        with frozen_running_stats(g.modules):
            if s.record_energy:
                trace.append(self._energy(values, fixed, y, s, 0))
            stop, taken = StopRule(s), s.T
            for t in range(s.T):
                if stop.done(t, lambda t=t: self._energy(values, fixed, y, s, t)):
                    taken = t
                    break
                if weight_step is not None:
                    self._ipc_step(values, fixed, s, steps, t, params, n)
                    weight_step()
                elif s.schedule == "jacobi":
                    self._jacobi_step(values, fixed, s, steps, t, ff if first else None, first)
                else:
                    self._sequential_sweep(values, fixed, s, steps, t,
                                           self._at_feedforward(ff, first) if first else None)
                first = None  # the values moved: free the feedforward's rules
                if s.record_energy:
                    trace.append(self._energy(values, fixed, y, s, t + 1))
            return self._finish(x, y, s, values, logits, trace, taken,
                                weight_grads_too=weight_step is None)

    def _chain_fits(self, x: torch.Tensor, s: PCSettings) -> bool:
        """Whether the batch runs as one strict op on the dense chain (see the module doc)."""
        return (self.chain is not None and self.chain.runs_on(x) and self.chain.kernel_built()
                and s.state_momentum == 0
                and s.error_clamp is None and s.tol is None and not s.record_energy
                and self._unit_precisions(s))

    def _unit_precisions(self, s: PCSettings) -> bool:
        """Every node's precision is 1 at every step and at the end (none given, or all ones:
        those run the same op, so that unit precisions stay bit-identical to none)."""
        if s.precision is None:
            return True
        names = [*self.graph.hidden, self.graph.output]
        return all(_unit(name, s, t) for t in range(s.T + 1) for name in names)

    def _at_feedforward(self, ff: dict[str, torch.Tensor],
                        first: dict[str, tuple]) -> dict[str, tuple[torch.Tensor, Rule | None]]:
        """Every node's ``(prediction, rule)`` while the values are still the feedforward's."""
        return {n.name: first.get(n.name, (ff[n.name], None)) for n in self.graph.nodes}

    def _jacobi_step(self, values, fixed, s, steps, t, ff=None, first=None) -> None:
        """One jacobi step; ``ff`` and ``first`` (:meth:`_feedforward`'s) on the first step,
        whose predictions and rules they already are."""
        if ff is None:
            mus, rules = self._predict(values, fixed)
        else:
            mus = {n.name: ff[n.name] for n in self.graph.nodes}
            rules = {k: rule for k, (_, rule) in first.items() if rule is not None}
        errors, sent = self._errors(values, mus, s, t)
        back = self._propagate(rules, sent)
        for name in self.graph.hidden:
            values[name] = self._update(name, values[name], mus[name], sent[name],
                                        back.get(name), s, steps, t)

    def _ipc_step(self, values, fixed, s, steps, t, params, n) -> None:
        """dF/dx and dF/dtheta at one point; the values move, ``.grad`` is set."""
        g = self.graph
        start = dict(values)
        mus, rules = self._predict(start, fixed, grad=True)
        errors, sent = self._errors(start, mus, s, t)
        # The propagated errors first: a node on the autograd fallback takes its input-VJP
        # through the graph that the weight gradients then free.
        back = self._propagate(rules, sent) if s.schedule == "jacobi" else {}
        ps, grads = weight_grads(g, [mus[nd.name] for nd in g.nodes],
                                 [sent[nd.name] for nd in g.nodes])
        if s.schedule == "jacobi":
            for name in g.hidden:
                values[name] = self._update(name, values[name], mus[name], sent[name],
                                            back.get(name), s, steps, t)
        else:
            self._sequential_sweep(values, fixed, s, steps, t)
        for p in params:
            p.grad = None
        accumulate(ps, grads, n, sign=-1.0)

    def _sequential_sweep(self, values, fixed, s, steps, t, current=None) -> None:
        """One top-down sweep: each hidden node ``u`` moves on its own error and its children's
        errors at the current values.

        A prediction depends on the parents only, so the one a node computes on its own turn
        (with its rule, where it is a sender) is still current on its parent's turn, unless
        another parent of that node moved in between (merges): each node's prediction is
        computed once per sweep instead of twice, and recomputed only after a parent moved.
        ``current``: the predictions and rules already known at the values (the first sweep's
        are the feedforward's, :meth:`_at_feedforward`). The moving node's own error is formed
        only where its update reads it (plain steps read ``x`` and ``mu`` instead).
        """
        g = self.graph
        current = dict(current) if current else {}
        for name in reversed(g.hidden):
            kids = g.children[name]
            kid_mus, rules = {}, {}
            for node in [*kids, self.node_of[name]]:
                if node.name not in current:
                    current[node.name] = self.predict_node(node, values, fixed, grad=False)
            for kid in kids:
                kid_mus[kid.name], rule = current[kid.name]
                if rule is not None:
                    rules[kid.name] = rule
            _, sent = self._errors(values, kid_mus, s, t)
            back = self._propagate(rules, sent, into=name)
            values[name] = self._update(name, values[name], current[name][0], None,
                                        back.get(name), s, steps, t)
            for kid in kids:  # their parent moved: predict them again if asked
                current.pop(kid.name, None)

    def _finish(self, x, y, s, values, logits, trace, taken, weight_grads_too: bool,
                trace_final: bool = False) -> PCResult:
        """Errors and energy at the final values (appended to ``trace`` with
        ``trace_final``); strict PC's weight gradients there."""
        g = self.graph
        with torch.set_grad_enabled(weight_grads_too):
            mus = {nd.name: nd.fn(*(values[p] for p in nd.parents)) for nd in g.nodes}
        errors, sent = self._errors(values, mus, s, taken)
        if weight_grads_too:
            params, grads = weight_grads(g, [mus[nd.name] for nd in g.nodes],
                                         [sent[nd.name] for nd in g.nodes])
            accumulate(params, grads, x.shape[0], sign=-1.0)
        energy = self._weighted_energy(errors, mus[g.output].detach(), y, s, taken)
        if trace_final:
            trace.append(energy)
        ff_loss = output_energy(logits, y, s.output_loss)
        return make_result(logits, y, ff_loss, energy, errors, trace, taken)

    # ------------------------------------------------------------------------------ ePC
    def run_epc(self, x: torch.Tensor, y: torch.Tensor, s: PCSettings) -> PCResult:
        """Error-based PC on one batch (jacobi, no clamp: validated by the front)."""
        g = self.graph
        ff, first = self._feedforward(x, with_rules=True)
        logits = ff[g.output]
        self._target = F.one_hot(y, logits.shape[1]).to(logits.dtype)  # formed once per batch
        fixed = {k: ff[k] for k in g.hidden if k not in self.sender_names}
        errors = {name: torch.zeros_like(ff[name]) for name in g.hidden}
        steps, trace = StateSteps(s), []
        with frozen_running_stats(g.modules):
            stop, taken = StopRule(s), s.T
            for t in range(s.T):
                if first is not None:  # zero errors: the values and rules are the feedforward's
                    values = ff
                    rules = {k: rule for k, (_, rule) in first.items() if rule is not None}
                    first = None
                else:
                    values, rules = self._epc_forward(x, errors, fixed, with_rules=True)
                out = values[g.output]

                def energy(t=t, out=out) -> torch.Tensor:
                    return self._weighted_energy(errors, out, y, s, t)

                if stop.done(t, energy):
                    taken = t
                    break
                if s.record_energy:
                    trace.append(energy())
                back = self._epc_backward(rules, weighted(g.output, self._output_error(out, s),
                                                          s, t))
                for name in g.hidden:
                    e = errors[name]
                    b = back[name].to(e.dtype) if name in back else torch.zeros_like(e)
                    if s.state_momentum:  # dF/de = pi e - back
                        errors[name] = steps.update(name, e, weighted(name, e, s, t) - b)
                    elif _unit(name, s, t):  # e - rate (e - back) in one pass
                        errors[name] = relax(e, b, s)
                    else:
                        errors[name] = e - s.rate * (weighted(name, e, s, t) - b)
            values, _ = self._epc_forward(x, errors, fixed, with_rules=False)
            return self._finish(x, y, s, values, logits, trace, taken, weight_grads_too=True,
                                trace_final=s.record_energy)

    def _epc_forward(self, x, errors, fixed,
                     with_rules: bool) -> tuple[dict[str, torch.Tensor], dict[str, Rule]]:
        """``x_v = f_v(parents) + e_v`` for every hidden node, the output's prediction, and
        (``with_rules``) the senders' rules at those values: one prediction pass."""
        g = self.graph
        values, rules = {g.input_name: x}, {}
        for node in g.nodes:
            mu, rule = self.predict_node(node, values, fixed, grad=False, want_rule=with_rules)
            if rule is not None:
                rules[node.name] = rule
            values[node.name] = mu + errors[node.name] if node.name in errors else mu
        return values, rules

    def _epc_backward(self, rules: dict[str, Rule],
                      seed: torch.Tensor) -> dict[str, torch.Tensor]:
        """``b_u = -dL/dx_u`` for every hidden node, from ``seed = b_out`` down: a hidden
        ``x_k = f_k + e_k`` passes on all it receives, so each sender's rule takes the sum."""
        g = self.graph
        back = {g.output: seed}
        for node in reversed(self.senders):
            grads = rules[node.name].vjp(back[node.name])
            for p, gr in zip(node.parents, grads):
                if p != g.input_name and gr is not None:
                    back[p] = gr if p not in back else back[p] + gr
        return back


def _unit(name: str, s: PCSettings, t: int) -> bool:
    """Whether node ``name``'s precision at step ``t`` is 1 (always, without weighting)."""
    return s.precision is None or float(s.precision(name, t)) == 1.0


__all__ = ["StrictRunner"]
