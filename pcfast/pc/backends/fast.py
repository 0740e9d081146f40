"""The fast PC backend (``PCEngine(..., backend="fast")``): FPA inference on explicit VJP rules,
fused ops and CUDA graphs; strict PC, iPC and ePC on the same rules (:mod:`.fast_strict`).

Same math as the reference backend, organised for speed:

- one feedforward pass per batch computes every prediction (with autograd, for the weight
  gradients at the end) and, per node, an explicit input-VJP :class:`~pcfast.pc.vjp_rules.Rule`
  over tensors saved once per batch (ReLU masks, BatchNorm statistics);
- hidden errors live in two flat buffers (per-node views): a jacobi step reads one and writes
  the other; every VJP result goes straight to the node it feeds, and the last writer of a node
  applies its update: fused into its own VJP op where the rule has a fused form
  (:meth:`~pcfast.pc.vjp_rules.Rule.fused`: the dw+BN+ReLU sub-layer, 1x1 convs, the merges,
  with ``kernels="auto"``), else one :func:`~pcfast.ops.pc_relax.pc_relax` (sum of the
  contributions, clamp, lerp, written into the other buffer): no zero fill, no ``add_``, no
  flat re-read, no energy reduction unless a trace is recorded. Res-DualNet: 38 ops per jacobi
  step (``bench/cost.py``);
- the first jacobi step starts from the zero state (x = mu), where every hidden sender's VJP
  is zero: it is one VJP of the output error and a fill, and the start buffer is never read;
- the sequential schedule is the same sweep with each node's VJP reading its freshly updated
  error;
- where the relaxation is plain FPA (no clamp, ``tol`` or energy trace), ``fpa_solver="auto"``
  solves the T steps by path length instead (:mod:`.fpa_levels`): one VJP per node and path
  length, whatever T, where that costs less than stepping;
- the result keeps the final buffer; the next batch takes it back once nothing refers to it
  (on the CPU a fresh buffer of this size costs page faults every batch);
- BatchNorm rules take the batch statistics the BN's autograd node saved (CPU);
- on CUDA the whole relaxation is captured once per key (shapes, dtype, T, rate, ...) in a CUDA
  graph and replayed for later batches over static buffers (:mod:`.capture`); graphs with
  autograd-fallback nodes run eagerly (autograd cannot be captured);
- optional bfloat16 autocast of the feedforward pass (errors stay in float32).

Weight gradients are the reference's own autograd pass over the relaxed errors, so weight
updates equal the reference backend's step for step.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable

import torch

from pcfast.ops.pc_relax import pc_relax
from pcfast.pc.backends.base import (
    BackendUnavailable,
    PCBackend,
    PCResult,
    PCSettings,
    accumulate,
    check_batch,
    make_result,
    weight_grads,
)
from pcfast.pc.backends.capture import CaptureCache, CudaGraphRelaxation
from pcfast.pc.backends.dense_chain import DenseChain
from pcfast.pc.backends.fast_strict import StrictRunner
from pcfast.pc.backends.fpa_levels import applies as levels_apply
from pcfast.pc.backends.fpa_levels import (
    coefficients_for,
    path_lengths,
    relax_by_levels,
    solver_costs,
)
from pcfast.pc.backends.steps import StateSteps, StopRule, clamp, summed
from pcfast.pc.energy import output_energy, output_error
from pcfast.pc.graph import PCGraph
from pcfast.pc.vjp_rules import KERNELS, Rule, node_forward, stored

OPTIONS = ("kernels", "cuda_graph", "autocast", "fpa_solver", "dense_chain")
FPA_SOLVERS = ("auto", "levels", "steps")
DENSE_CHAIN = ("auto", "straight", "off")


def sole_owner(t: torch.Tensor) -> bool:
    """Whether ``t`` is the only tensor on its memory (no view of it, no other tensor sharing
    it, alive anywhere): then it can be overwritten. False where torch cannot tell."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None:
        return False
    # Compared with what a tensor alone on its memory shows when asked the same way (the
    # storage objects, kept alive here, may hold references of their own).
    probe = torch.empty(1)
    probe_storage, storage = probe.untyped_storage(), t.untyped_storage()
    return count(storage._cdata) == count(probe_storage._cdata)


def _triton_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "this Triton kernel cannot be compiled or launched here"."""
    types: list[type[BaseException]] = []
    try:
        from triton.compiler.errors import CompilationError

        types.append(CompilationError)
    except ImportError:
        pass
    try:
        from triton.runtime.errors import OutOfResources

        types.append(OutOfResources)
    except ImportError:
        pass
    return tuple(types)


class FastBackend(PCBackend):
    """FPA predictive coding on explicit VJP rules, double-buffered errors and CUDA graphs;
    strict PC, iPC and ePC (``fpa=False``) on the same rules, eagerly.

    Args:
        graph: the node graph.
        kernels: ``"auto"`` (registered ops: compiled/Triton on CUDA, C++/PyTorch on CPU),
            ``"triton"`` (Triton kernels; on CPU through the Triton interpreter, for tests on
            tiny shapes) or ``"torch"`` (the PyTorch forms of the fused ops).
        cuda_graph: capture the relaxation in a CUDA graph on CUDA tensors (ignored on CPU, when
            ``record_energy`` asks for a per-step trace, and for graphs with autograd-fallback
            nodes).
        autocast: run the feedforward pass under bfloat16 autocast.
        fpa_solver: how FPA inference runs: ``"levels"`` solves the ``T`` linear steps by path
            length (:mod:`.fpa_levels`: one VJP per node and path length instead of one per
            node and step; not with ``error_clamp``, ``tol`` or ``record_energy``, which step),
            ``"steps"`` takes the ``T`` steps, ``"auto"`` (default) takes levels wherever they
            apply and cost less (:func:`~.fpa_levels.solver_costs`).
        dense_chain: PC on a dense chain (an MLP) on the CPU, with ``kernels="auto"``
            (:mod:`.dense_chain`): ``"auto"`` (default) runs strict PC's T steps as one op
            (:func:`~pcfast.ops.dense_strict.dense_strict_relax`) with the first hidden value
            carried by its Gram matrix where that takes fewer multiply-adds, and FPA by path
            length in closed form; ``"straight"`` the same without the Gram matrix; ``"off"``
            the generic per-node path (for comparisons).

    Example::

        backend = FastBackend(net.pc_graph(), kernels="torch")
        result = backend.compute_gradients(x, y, PCSettings(T=20))
    """

    name = "fast"

    def __init__(self, graph: PCGraph, kernels: str = "auto", cuda_graph: bool = True,
                 autocast: bool = False, fpa_solver: str = "auto",
                 dense_chain: str = "auto") -> None:
        super().__init__(graph)
        if fpa_solver not in FPA_SOLVERS:
            raise ValueError(f"backend_options: fpa_solver must be one of {FPA_SOLVERS}, got "
                             f"{fpa_solver!r}")
        if kernels not in KERNELS:
            raise ValueError(f"backend_options: kernels must be one of {KERNELS}, got {kernels!r}")
        if not isinstance(cuda_graph, bool) or not isinstance(autocast, bool):
            raise ValueError(f"backend_options: cuda_graph and autocast are booleans, got "
                             f"{cuda_graph!r} and {autocast!r}")
        if dense_chain not in DENSE_CHAIN:
            raise ValueError(f"backend_options: dense_chain must be one of {DENSE_CHAIN}, got "
                             f"{dense_chain!r}")
        self.kernels = kernels
        self.cuda_graph = cuda_graph
        self.autocast = autocast
        self.fpa_solver = fpa_solver
        self.captures = CaptureCache()
        self._chain = (DenseChain.of(graph, gram=dense_chain == "auto")
                       if dense_chain != "off" and kernels == "auto" else None)
        self._strict = StrictRunner(graph, kernels, self._chain)
        self._buffers: dict[tuple, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
        self._handed: torch.Tensor | None = None  # the flat buffer the last result holds
        # settings -> (path lengths sent, coefficients) of the path-length solver, or None
        # where the relaxation steps: the plan is the graph's, so one entry serves every batch
        self._levels: dict[tuple, tuple[dict, list[float]] | None] = {}

    @classmethod
    def from_options(cls, graph: PCGraph, options: dict | None) -> FastBackend:
        """Build from ``backend_options``; unknown or ill-typed options raise a ValueError."""
        options = dict(options or {})
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ValueError(f"unknown backend_options {unknown} for the fast PC backend; "
                             f"valid options: {list(OPTIONS)}")
        return cls(graph, **options)

    # ------------------------------------------------------------------------ selection
    def can_use(self, x: torch.Tensor, settings: PCSettings) -> tuple[bool, str]:
        """Every PC variant and option runs here; what can stop it is the input or Triton."""
        if not x.is_floating_point():
            return False, f"the fast backend needs a floating-point input, got {x.dtype}"
        needs_triton = self.kernels == "triton" or (self.kernels == "auto" and x.is_cuda)
        if needs_triton and importlib.util.find_spec("triton") is None:
            return False, "Triton is not installed (pip install 'pcfast[kernels]')"
        return True, ""

    def prefers(self, x: torch.Tensor, settings: PCSettings) -> bool:
        """CUDA batches; on the CPU strict PC and ePC too, which run faster here than on the
        reference in every case measured (``bench/mlp_task.py``: MLP strict 5.2x as one op per
        batch, 2.4x on the per-node steps, ePC 1.8x; ``bench/backends_ab.py``: resnet20 strict
        1.15-1.26x, ePC 1.04x), and FPA where the path-length solver applies (Res-DualNet,
        batch 64, T=10: 4.2x; the MLP of ``bench/mlp_task.py``: 3.0x in closed form, 2.5x
        generic). Stepped CPU FPA (error clamps, ``tol``, energy traces) stays on the
        reference: faster here on conv nets (Res-DualNet 1.3-1.4x), slower on small ones."""
        return x.is_cuda or not settings.fpa or (self.fpa_solver != "steps"
                                                 and levels_apply(settings))

    # -------------------------------------------------------------------------- a batch
    def compute_gradients(self, x: torch.Tensor, y: torch.Tensor,
                          settings: PCSettings) -> PCResult:
        ok, why = self.can_use(x, settings)
        if not ok:
            raise BackendUnavailable(why)
        check_batch(self.graph, x, y)
        if settings.ipc:
            raise ValueError("iPC moves the weights during inference: use run_incremental")
        try:
            if settings.epc:
                return self._strict.run_epc(x, y, settings)
            if not settings.fpa:
                return self._strict.run_strict(x, y, settings)
            return self._run(x, y, settings)
        except _triton_error_types() as exc:
            raise BackendUnavailable(f"a Triton kernel failed ({type(exc).__name__}: {exc})") \
                from exc

    def run_incremental(self, x: torch.Tensor, y: torch.Tensor, settings: PCSettings,
                        weight_step: Callable[[], None]) -> PCResult:
        """iPC on one batch, as :meth:`ReferenceBackend.run_incremental
        <pcfast.pc.backends.reference.ReferenceBackend.run_incremental>` (``weight_step`` runs
        after every inference step)."""
        ok, why = self.can_use(x, settings)
        if not ok:
            raise BackendUnavailable(why)
        check_batch(self.graph, x, y)
        return self._strict.run_strict(x, y, settings, weight_step)

    def _run(self, x: torch.Tensor, y: torch.Tensor, s: PCSettings) -> PCResult:
        g = self.graph
        known = {}
        chain = self._chain
        # A dense chain's FPA in closed form where the path-length solver would run (CPU).
        solution = (self._level_solution(chain.plan, s)
                    if chain is not None and chain.runs_on(x) and not self.autocast else None)
        if solution is not None:
            mu1 = chain.first_prediction(x)
            if mu1.dim() == 2:  # (N, features), and so is every value of the chain
                return chain.fpa(x, y, s, mu1, solution[1])
            known[g.nodes[0].name] = mu1
        mus, rules = self._feedforward(x, known)
        logits = mus[g.output].detach().float() if self.autocast else mus[g.output].detach()
        e_out = output_error(logits, y, s.output_loss)
        base_energy = output_energy(logits, y, s.output_loss)
        shapes = [mus[n].shape for n in g.hidden]
        dtype = self._error_dtype([mus[n] for n in g.hidden])
        trace = [base_energy] if s.record_energy else []
        taken = s.T
        if self.graphable(x.device, s, rules):
            final = self._run_graphed(rules, e_out.to(dtype), shapes, dtype, x, s)
            kept = final.clone()  # the graph's static buffers are reused by the next batch
        else:
            bufs = self._flat_buffers(shapes, dtype, x.device)
            kept, taken = self._relax(rules, e_out.to(dtype), bufs, shapes, s, trace,
                                      base_energy)
            # The result keeps the final buffer (no copy); the next batch takes it back if
            # the result is gone by then, else allocates another.
            self._buffers = {k: tuple(None if b is kept else b for b in v)
                             for k, v in self._buffers.items()}
            self._handed = kept
        errors = self._views(kept, shapes)
        errors[g.output] = e_out
        params, grads = weight_grads(g, [mus[n.name] for n in g.nodes],
                                     [errors[n.name].to(mus[n.name].dtype) for n in g.nodes])
        accumulate(params, grads, x.shape[0], sign=-1.0)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        flat = kept.to(acc)
        energy = 0.5 * torch.dot(flat, flat) + base_energy
        return make_result(logits, y, base_energy, energy, errors, trace, taken)

    def graphable(self, device: torch.device, s: PCSettings, rules: dict[str, Rule]) -> bool:
        """Whether the relaxation runs from a CUDA graph: CUDA tensors, ``cuda_graph=True``, no
        per-step energy trace, a fixed ``T`` (no ``tol``), plain state steps (no momentum), and
        no autograd-fallback node (autograd cannot be captured: such graphs run their steps
        eagerly)."""
        return (self.cuda_graph and device.type == "cuda" and not s.record_energy and s.T > 0
                and s.tol is None and not s.state_momentum
                and all(r.capturable for r in rules.values()))

    # ------------------------------------------------------------------------------ setup
    def _feedforward(self, x: torch.Tensor,
                     known: dict[str, torch.Tensor] | None = None) -> tuple[dict, dict[str, Rule]]:
        """Every node's prediction (recorded by autograd) and the senders' rules; ``known``
        holds predictions already made (of nodes fed by the input alone)."""
        g = self.graph
        ctx = (torch.autocast(x.device.type, dtype=torch.bfloat16) if self.autocast
               else contextlib.nullcontext())
        leaves: dict[str, torch.Tensor] = {g.input_name: x}
        mus: dict[str, torch.Tensor] = {}
        rules: dict[str, Rule] = {}
        with torch.enable_grad(), ctx:
            for node in g.nodes:
                inputs = [leaves[p] for p in node.parents]
                needs = [p != g.input_name for p in node.parents]
                if any(needs):
                    mu, rules[node.name] = node_forward(node.fn, inputs, needs, self.kernels)
                elif known and node.name in known:
                    mu = known[node.name]
                else:
                    mu = node.fn(*inputs)
                mus[node.name] = mu
                if node.name != g.output:
                    leaves[node.name] = mu.detach().requires_grad_(True)
        return mus, rules

    def _error_dtype(self, hidden_mus: list[torch.Tensor]) -> torch.dtype:
        dtypes = {m.dtype for m in hidden_mus}
        return dtypes.pop() if len(dtypes) == 1 and not self.autocast else torch.float32

    def _flat_buffers(self, shapes, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        total = sum(sh.numel() for sh in shapes)
        key = (total, dtype, device)
        # One entry: a new batch shape replaces the buffers instead of accumulating them. A
        # buffer handed to a result (None here) is taken back when nothing refers to it any
        # more, else replaced by a new one: on the CPU a fresh buffer of this size costs page
        # faults (~100 ms per batch for Res-DualNet at batch 64, a third of a feedforward pass).
        old = self._buffers.get(key, (None, None))
        spare, self._handed = self._handed, None
        if spare is not None and ((spare.numel(), spare.dtype, spare.device) != key
                                  or not sole_owner(spare)):
            spare = None
        bufs = []
        for b in old:
            if b is None and spare is not None:
                b, spare = spare, None
            bufs.append(b if b is not None else torch.empty(total, dtype=dtype, device=device))
        self._buffers = {key: tuple(bufs)}
        return self._buffers[key]

    def _views(self, flat: torch.Tensor, shapes) -> dict[str, torch.Tensor]:
        views, offset = {}, 0
        for name, shape in zip(self.graph.hidden, shapes):
            n = shape.numel()
            views[name] = flat[offset:offset + n].view(shape)
            offset += n
        return views

    # ------------------------------------------------------------------------ relaxation
    def _plan(self, rules: dict[str, Rule]) -> list[tuple[str, list[tuple[int, str]], list[str]]]:
        """Per sender, in reverse topological order: ``(sender, [(input index, hidden parent)],
        [hidden parents whose last contribution this sender sends])``."""
        g = self.graph
        hidden = set(g.hidden)
        remaining = {u: sum(p == u for n in g.nodes if n.name in rules for p in n.parents)
                     for u in g.hidden}
        plan = []
        for node in reversed(g.nodes):
            if node.name not in rules:
                continue
            targets = [(i, p) for i, p in enumerate(node.parents) if p in hidden]
            done = []
            for _, p in targets:
                remaining[p] -= 1
                if remaining[p] == 0:
                    done.append(p)
            plan.append((node.name, targets, done))
        return plan

    def _step_fn(self, plan, rules, e_out, cur: dict, nxt: dict, s: PCSettings,
                 momentum: StateSteps | None):
        """One step over ``plan`` (:meth:`_plan`): every sender's VJP, each hidden node relaxed
        by its last writer (with ``momentum``, the batch's state-momentum steps instead of the
        fused relax)."""
        out_name = self.graph.output
        read = nxt if s.schedule == "sequential" else cur
        rate, limit = s.rate, s.error_clamp
        # Fused forms need one input per parent (a node fed twice by one parent sums its VJPs).
        distinct = {name: len({p for _, p in targets}) == len(targets)
                    for name, targets, _ in plan}
        # A merge hands its masked error to a parent whose last writer reads it unstored.
        last_writer = {p: name for name, _, done in plan for p in done}
        defer = {name: frozenset(i for i, p in targets if p not in done
                                 and rules[last_writer[p]].takes_masked_other())
                 for name, targets, done in plan}

        def step() -> None:
            pending: dict[str, list[torch.Tensor]] = {}
            for name, targets, done in plan:
                e = e_out if name == out_name else read[name]
                rule = rules[name]
                if done and distinct[name] and momentum is None:
                    # The last writer of the parents in `done`: VJP and their updates in one op
                    # where the rule has a fused form.
                    keep = rule.takes_masked_other()
                    finish = {i: (cur[p], pending.get(p, []) if keep else
                                  stored(pending.get(p, [])), nxt[p])
                              for i, p in targets if p in done}
                    res = rule.fused(e, finish, rate, limit, defer[name])
                    if res is not None:
                        for i, p in targets:
                            if i in finish:
                                pending.pop(p, None)
                            else:
                                pending.setdefault(p, []).append(res[i])
                        continue
                grads = rule.vjp(e)
                for i, p in targets:
                    pending.setdefault(p, []).append(grads[i])
                for p in done:
                    if momentum is None:
                        pc_relax(cur[p], stored(pending.pop(p)), rate, limit, nxt[p])
                    else:  # under FPA mu is fixed: the value step is the error step
                        err = cur[p]
                        g = err - clamp(summed(stored(pending.pop(p)), err.dtype), s)
                        nxt[p].copy_(momentum.update(p, err, g))

        return step

    def _relax(self, rules, e_out, bufs, shapes, s: PCSettings, trace: list,
               base_energy) -> tuple[torch.Tensor, int]:
        """Run up to ``T`` steps over the double buffer (fewer when ``tol`` stops them); return
        the flat buffer with the result and the steps taken."""
        # x = mu after the feedforward pass: every hidden error starts at zero. A jacobi run
        # takes its first step from that zero state without reading it (``_first_step_fn``),
        # so the start buffer is zeroed only where it is read.
        a, b = bufs
        plan = self._plan(rules)
        solution = self._level_solution(plan, s)
        if solution is not None:
            relax_by_levels(plan, rules, self.graph.output, e_out, self._views(a, shapes),
                            *solution)
            return a, s.T
        views = (self._views(a, shapes), self._views(b, shapes))
        momentum = StateSteps(s) if s.state_momentum else None
        steps = (self._step_fn(plan, rules, e_out, views[0], views[1], s, momentum),
                 self._step_fn(plan, rules, e_out, views[1], views[0], s, momentum))
        first = None
        if s.schedule == "jacobi" and momentum is None and s.T > 0:
            first = self._first_step_fn(plan, rules, e_out, views[0], views[1], b, s)
        zeroed = first is None
        if zeroed:
            a.zero_()
        acc = torch.float64 if a.dtype == torch.float64 else torch.float32

        def energy(t: int) -> torch.Tensor:
            if t == 0 and not zeroed:
                return base_energy + 0.0  # every hidden error is zero
            return 0.5 * bufs[t % 2].to(acc).pow(2).sum() + base_energy

        stop = StopRule(s)
        taken = s.T
        for t in range(s.T):
            if stop.done(t, lambda t=t: energy(t)):
                taken = t
                break
            (first if t == 0 and first is not None else steps[t % 2])()
            if s.record_energy:
                trace.append(energy(t + 1))
        return bufs[taken % 2], taken  # taken > 0 where not zeroed: no reading stops at t=0

    def by_levels(self, plan, s: PCSettings) -> bool:
        """Whether this relaxation is solved by path length (``fpa_solver``, :mod:`.fpa_levels`)."""
        return self._level_solution(plan, s) is not None

    def _level_solution(self, plan, s: PCSettings) -> tuple[dict, list[float]] | None:
        """``(path lengths sent, coefficients)`` where the path-length solver runs ``s``, else
        None; derived once per settings."""
        if self.fpa_solver == "steps":
            return None
        if not levels_apply(s):
            if self.fpa_solver == "levels":
                raise ValueError(
                    "fpa_solver='levels' solves plain FPA relaxations only: error_clamp, tol "
                    "and record_energy need the stepped one (fpa_solver='steps', or 'auto' to "
                    "take levels where they apply)")
            return None
        key = (s.T, s.rate, s.schedule, s.state_momentum, s.state_nesterov)
        if key not in self._levels:
            sent = path_lengths(plan, self.graph.output, s)
            levels, stepped = solver_costs(plan, sent, self.graph.output, s)
            cheaper = self.fpa_solver == "levels" or levels < stepped
            self._levels[key] = (sent, coefficients_for(sent, s)) if cheaper else None
        return self._levels[key]

    def _first_step_fn(self, plan, rules, e_out, cur: dict, nxt: dict, nxt_flat: torch.Tensor,
                       s: PCSettings) -> Callable[[], None]:
        """The first jacobi step from the zero state, as one VJP and a fill.

        Every hidden sender's VJP of a zero error is zero, so a full sweep would only move the
        output's hidden parents, each to ``lerp(0, clamp(J^T e_out), rate)`` (the sum of the
        exact zeros the other senders add changes nothing), and leave every other node at
        zero. The start state is never read; only the output parents' entries are zeroed, as
        the ``e`` of their update.
        """
        out = self.graph.output
        targets = next((tg for name, tg, _ in plan if name == out), [])
        rule = rules.get(out)

        def first() -> None:
            nxt_flat.zero_()
            if not targets:
                return
            grads = rule.vjp(e_out)
            backs: dict[str, list[torch.Tensor]] = {}
            for i, p in targets:
                backs.setdefault(p, []).append(grads[i])
            for p, contributions in backs.items():
                cur[p].zero_()
                pc_relax(cur[p], contributions, s.rate, s.error_clamp, nxt[p])

        return first

    def _run_graphed(self, rules, e_out, shapes, dtype, x, s: PCSettings) -> torch.Tensor:
        key = (tuple((n, r.signature) for n, r in rules.items()), tuple(e_out.shape), dtype,
               x.device, s.T, s.rate, s.schedule, s.error_clamp, self.kernels, self.autocast,
               self.fpa_solver)

        def build():
            # This batch's rules and buffers become the static ones the graph reads.
            total = sum(sh.numel() for sh in shapes)
            bufs = (torch.empty(total, dtype=dtype, device=x.device),
                    torch.empty(total, dtype=dtype, device=x.device))
            static_out = e_out.clone()
            result: dict[str, torch.Tensor] = {}

            def run() -> None:  # fixed T: no tol
                result["final"], _ = self._relax(rules, static_out, bufs, shapes, s, [], None)

            try:
                graph = CudaGraphRelaxation(run, x.device)
            except RuntimeError as exc:
                raise BackendUnavailable(f"CUDA graph capture failed ({exc})") from exc
            return {"graph": graph, "rules": rules, "e_out": static_out,
                    "final": result["final"]}

        entry, fresh = self.captures.get(key, build)
        if not fresh:
            for name, rule in entry["rules"].items():
                rule.load_from(rules[name])
            entry["e_out"].copy_(e_out)
            entry["graph"].replay()
        return entry["final"]
