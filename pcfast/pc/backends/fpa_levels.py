"""FPA inference solved by path length: ``T`` steps for the cost of one VJP per (node, length).

Under the fixed prediction assumption every Jacobian ``J_vu`` stays at its feedforward value and
the output error ``e_out`` is fixed, so the relaxation is a linear recursion on the hidden
errors. Plain jacobi steps, ``e_u <- (1 - r) e_u + r sum_v J_vu^T e_v`` from ``e = 0``, give

    e_u(T) = sum_k C_k(T) u_{u,k},   u_{u,k} = sum over paths u -> out of k edges of the
                                               products of the J^T along the path, times e_out,

where the scalar ``C_k(T)`` depends only on the path length ``k``: it is the error, after ``T``
steps, of the node ``k`` edges below the output on a chain whose Jacobians are all 1 (run with
the same schedule, rate and state momentum). Induction on ``t``: a node's update is linear in
its own error and in the sum it receives, and the sum of its children's length-``k`` terms
pushed through ``J^T`` is its own length-``(k + 1)`` term. For jacobi steps ``C_k(T) =
P(Binomial(T, r) >= k)``, zero beyond ``k = T``; the sequential schedule and heavy-ball or
Nesterov momentum give other scalars and the same vectors.

So instead of ``T`` sweeps over every node, :func:`relax_by_levels` sends each vector ``u_{v,k}``
through its node's VJP once (skipping lengths whose coefficient is zero) and combines each
node's vectors with the scalars. A chain (MLP, plain CNN) costs one VJP per node whatever
``T``; Res-DualNet at the seed's ``T = 100`` 298 VJPs instead of 3,700. The vectors of the
nodes not yet sent are held at once (memory: up to about the number of distinct path lengths
times a node's error).

The result equals the stepped relaxation up to rounding (the sums are associated differently).
Not covered: error clamping (not linear), adaptive stopping and per-step energy traces (they
need the errors of every step); the fast backend steps there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pcfast.pc.backends.base import PCSettings
from pcfast.pc.backends.steps import StateSteps

# (sender, [(input index, hidden parent)], [parents it finishes]) per sender, outputs first
Plan = Sequence[tuple[str, Sequence[tuple[int, str]], Sequence[str]]]


def applies(s: PCSettings) -> bool:
    """Whether the settings keep the FPA relaxation linear and need only its final errors (the
    front allows no precision, iPC or ePC with FPA)."""
    return s.fpa and s.error_clamp is None and s.tol is None and not s.record_energy


def level_coefficients(s: PCSettings, longest: int) -> list[float]:
    """``C_k(T)`` for ``k = 0..longest``: the errors after ``s.T`` steps of a chain of unit
    Jacobians whose output error is 1 (``C_0 = 1``), stepped as the engine steps (``s.schedule``,
    ``s.rate``, ``s.state_momentum``/``s.state_nesterov``), in float64."""
    e = [1.0] + [0.0] * longest
    steps = StateSteps(s) if s.state_momentum else None

    def new(k: int, back: float) -> float:
        if steps is not None:
            return float(steps.update(k, e[k], e[k] - back))
        return e[k] + s.rate * (back - e[k]) if s.rate != 1.0 else back

    for _ in range(s.T):
        if s.schedule == "jacobi":
            e[1:] = [new(k, e[k - 1]) for k in range(1, longest + 1)]
        else:  # sequential: a node reads its child's freshly updated error
            for k in range(1, longest + 1):
                e[k] = new(k, e[k - 1])
    return e


def path_lengths(plan: Plan, output: str, s: PCSettings) -> dict[str, list[int]]:
    """Per sender, the path lengths whose vectors it sends through its VJP: all of them under
    the sequential schedule, only those below ``T`` under jacobi (``C_k(T) = 0`` for ``k > T``)."""
    lengths: dict[str, set[int]] = {output: {0}}
    sent: dict[str, list[int]] = {}
    for name, targets, _ in plan:
        mine = sorted(k for k in lengths.get(name, ()) if s.schedule != "jacobi" or k < s.T)
        sent[name] = mine
        for _, p in targets:
            lengths.setdefault(p, set()).update(k + 1 for k in mine)
    return sent


def solver_costs(plan: Plan, sent: dict[str, list[int]], output: str,
                 s: PCSettings) -> tuple[float, int]:
    """``(levels, steps)``: the work of ``T`` steps by path length and stepped, in VJPs;
    ``sent`` is :func:`path_lengths`'s.

    Stepped: one VJP per sender and step (each fused with its parents' updates where the rule
    has a fused form; the first jacobi step is one VJP). By path length: one VJP per sender and
    length sent, plus each node's combination ``sum_k C_k u_k``, an add that reads two tensors
    and writes one per term, counted as half a VJP (``bench/cost.py``'s bytes put it nearer a
    third on Res-DualNet).
    """
    vjps = sum(len(v) for v in sent.values())
    terms = sum(len(v) for name, v in sent.items() if name != output)
    first = s.schedule == "jacobi" and not s.state_momentum and s.T > 0
    stepped = len(plan) * s.T - (len(plan) - 1 if first else 0)
    return vjps + 0.5 * terms, stepped


def coefficients_for(sent: dict[str, list[int]], s: PCSettings) -> list[float]:
    """:func:`level_coefficients` up to the longest path length that ``sent`` reaches."""
    return level_coefficients(s, max((k + 1 for ks in sent.values() for k in ks), default=0))


def relax_by_levels(plan: Plan, rules: dict, output: str, e_out: torch.Tensor,
                    errors: dict[str, torch.Tensor], sent: dict[str, list[int]],
                    coef: list[float]) -> None:
    """Write the FPA errors after ``T`` steps into ``errors`` (one tensor per hidden node, all
    overwritten) from the VJP ``rules``; ``plan`` as the fast backend's ``_plan``, ``sent``
    from :func:`path_lengths` and ``coef`` from :func:`coefficients_for` (both per settings,
    not per batch)."""
    vectors: dict[str, dict[int, torch.Tensor]] = {output: {0: e_out}}

    def combine(name: str) -> None:
        out = errors[name]
        terms = [(k, u) for k, u in sorted(vectors.pop(name, {}).items()) if coef[k] != 0.0]
        if not terms:
            out.zero_()
            return
        (k, u), rest = terms[0], terms[1:]
        torch.mul(u, coef[k], out=out)
        for k, u in rest:
            out.add_(u, alpha=coef[k])

    done: set[str] = set()
    for name, targets, _ in plan:
        mine = vectors.get(name, {})
        for k in sent[name]:
            grads = rules[name].vjp(mine[k])
            for i, p in targets:
                gr = grads[i].to(e_out.dtype)
                got = vectors.setdefault(p, {})
                # Never in place: a VJP may return a view or one tensor for two inputs.
                got[k + 1] = gr if k + 1 not in got else got[k + 1] + gr
        if name in errors:
            combine(name)
            done.add(name)
    for name in errors:  # the hidden nodes fed by the graph input alone send nothing
        if name not in done:
            combine(name)
