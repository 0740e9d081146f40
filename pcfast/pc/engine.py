"""The PC engine front: validates the options, owns the choice of backend, runs the batches.

Backends (:mod:`pcfast.pc.backends`) share one small interface (``can_use(x, settings) ->
(ok, reason)``, ``compute_gradients(x, y, settings)``) and never import this module:

- ``"reference"``: plain PyTorch autograd (:class:`~pcfast.pc.backends.ReferenceBackend`), FPA,
  strict PC, incremental PC (iPC) and error-based PC (ePC), any device; the oracle of the tests;
- ``"fast"``: explicit VJP rules, fused ops, CUDA graphs
  (:class:`~pcfast.pc.backends.fast.FastBackend`): FPA, and strict PC, iPC and ePC on the
  same rules without autograd in the inference steps (eagerly, no CUDA graph);
- ``"auto"``: the fast backend where it can run and is preferred (CUDA batches, and strict PC
  and ePC on the CPU; iPC always runs on the reference under ``auto``), else the reference.
  Decided up front from the fast backend's ``can_use``; while running, only a
  :class:`~pcfast.pc.backends.BackendUnavailable` (a missing or failing kernel or CUDA-graph
  capture) makes ``auto`` fall back, with a warning that names the cause. The user's
  accumulated ``.grad`` and the BatchNorm running statistics are kept as they were before the
  failed attempt; every other exception propagates.

Backends are built here, at construction, outside any fallback: bad ``backend_options`` raise
at once.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from pcfast.pc.backends.base import BackendUnavailable, PCBackend, PCResult, PCSettings
from pcfast.pc.backends.reference import ReferenceBackend
from pcfast.pc.energy import OUTPUT_LOSSES
from pcfast.pc.graph import PCGraph
from pcfast.pc.precision import as_precision

SCHEDULES = ("jacobi", "sequential")
BACKENDS = ("reference", "fast", "auto")

__all__ = ["BACKENDS", "SCHEDULES", "PCEngine", "PCResult"]


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
        backend: ``"reference"``, ``"fast"`` or ``"auto"`` (fast for CUDA batches and for
            strict PC and ePC on the CPU, else reference; see the module docstring). The fast
            backend runs FPA, strict PC, iPC and ePC, with every option.
        record_energy: keep the energy after initialisation and after every step.
        backend_options: options of the fast backend: ``kernels`` (``"auto"``, ``"triton"``,
            ``"torch"``), ``cuda_graph`` (bool), ``autocast`` (bool); see
            :class:`pcfast.pc.backends.fast.FastBackend`. Unknown options raise a ValueError.
        state_momentum: momentum ``m`` of the inference steps on the values (0: plain gradient
            steps). Per node, with ``g = dF/dx_u`` (its propagated part clamped as above) and
            ``v = 0`` at the start of a batch: ``v <- m v + g``; heavy-ball ``x_u <- x_u - rate
            v``, Nesterov ``x_u <- x_u - rate (g + m v)`` (``torch.optim.SGD``'s convention).
            Every PC variant, either backend (the fast backend's FPA then runs its steps
            eagerly, without the fused relax ops or a CUDA graph).
        state_nesterov: Nesterov momentum (needs ``state_momentum > 0``).
        ipc: incremental PC (Salvatori et al., ICLR 2024): strict PC (needs ``fpa=False``) whose
            weights take an optimizer step at EVERY inference step, from ``dF/dtheta`` at the
            same point as the values' step (``T`` optimizer steps per batch). Train with
            :meth:`step` and an optimizer; ``backend="fast"`` or the reference (``auto`` picks
            the reference, since a failure half-way could not undo the weight steps).
        epc: error-based PC (Goemaere et al., arXiv 2505.20137; needs ``fpa=False``, the jacobi
            schedule, no ``error_clamp``): the errors are the free variables, ``x_v = f_v(parents)
            + e_v``, starting at zero; each step ``e <- e - rate dF/de`` is one forward and one
            backward pass through the whole net, so the output error reaches every node at the
            first step. Weight gradients: PC's local ones at the final values (at equilibrium
            those of strict PC). Either backend.
        tol: adaptive inference: ``T`` becomes the maximum and inference stops once the energy
            changed by at most ``tol`` (relative) between two readings ``check_every`` steps
            apart (one host synchronisation per reading). ``PCResult.steps`` reports the steps
            taken. FPA, strict PC and ePC on either backend (the fast backend's FPA then runs
            its steps eagerly, not from a CUDA graph).
        check_every: steps between two energy readings under ``tol``.
        precision: precision weighting ``F = sum_v pi_v(t)/2 ||e_v||^2 + pi_out(t) L``: a mapping
            node -> constant or schedule ``t -> pi`` (:mod:`pcfast.pc.precision`), or one callable
            ``(node, t) -> pi``; unnamed nodes keep 1. Strict PC, iPC and ePC (either
            backend); ``None`` (default) is the unweighted energy, and all precisions 1 give
            bit-identical results.

    Example::

        engine = PCEngine(net.pc_graph(), T=20, rate=0.5)
        result = engine.step(x, y, optimizer)
    """

    def __init__(self, graph: PCGraph, T: int = 100, rate: float = 0.5,
                 schedule: str = "jacobi", fpa: bool = True, output_loss: str = "ce",
                 error_clamp: float | None = None, backend: str = "auto",
                 record_energy: bool = False, backend_options: dict | None = None,
                 state_momentum: float = 0.0, state_nesterov: bool = False,
                 ipc: bool = False, epc: bool = False, tol: float | None = None,
                 check_every: int = 5, precision=None) -> None:
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
        if not 0.0 <= state_momentum < 1.0:
            raise ValueError(f"state_momentum must be in [0, 1), got {state_momentum}")
        if state_nesterov and state_momentum == 0.0:
            raise ValueError("state_nesterov=True needs state_momentum > 0")
        if ipc and fpa:
            raise ValueError("ipc=True is incremental PC, which recomputes the predictions every "
                             "step as strict PC does: pass fpa=False with it")
        if ipc and T < 1:
            raise ValueError(f"ipc=True needs T >= 1 (one weight step per inference step), got {T}")
        if epc:
            if fpa:
                raise ValueError("epc=True recomputes the predictions every step (the values are "
                                 "f(parents) + e): pass fpa=False with it")
            if ipc:
                raise ValueError("choose one PC variant: ipc=True or epc=True, not both")
            if schedule != "jacobi":
                raise ValueError("epc=True moves every error from one backward pass through the "
                                 "whole net: use schedule='jacobi'")
            if error_clamp is not None:
                raise ValueError("error_clamp is not defined for epc=True (no propagated errors "
                                 "are formed); leave it None")
        if tol is not None and not tol > 0:
            raise ValueError(f"tol must be positive or None, got {tol}")
        if check_every < 1 or int(check_every) != check_every:
            raise ValueError(f"check_every must be a positive integer, got {check_every}")
        if precision is not None and fpa:
            raise ValueError("precision weighting runs with strict PC, iPC and ePC: pass "
                             "fpa=False with it")
        if tol is not None and ipc:
            raise ValueError("tol (adaptive inference) is not defined for ipc=True, whose weights "
                             "move at every step; use a fixed T")
        if backend not in BACKENDS:
            raise ValueError(f"unknown PC backend {backend!r}; available: {BACKENDS}")
        if backend == "reference" and backend_options:
            raise ValueError(f"backend_options {sorted(backend_options)} are options of the fast "
                             "backend; backend='reference' takes none")
        self.graph = graph
        self.T = int(T)
        self.rate = float(rate)
        self.schedule = schedule
        self.fpa = fpa
        self.output_loss = output_loss
        self.error_clamp = error_clamp
        self.backend = backend
        self.record_energy = record_energy
        self.state_momentum = float(state_momentum)
        self.state_nesterov = bool(state_nesterov)
        self.ipc = bool(ipc)
        self.epc = bool(epc)
        self.tol = None if tol is None else float(tol)
        self.check_every = int(check_every)
        self.precision = as_precision(precision, [*graph.hidden, graph.output])
        self._warn_if_overshooting()
        self.backend_options = dict(backend_options or {})
        self._reference = ReferenceBackend(graph)
        self._fast: PCBackend | None = None
        if backend != "reference":
            from pcfast.pc.backends.fast import FastBackend

            self._fast = FastBackend.from_options(graph, self.backend_options)
        self._fast_disabled: str | None = None  # "auto": why the fast backend is no longer used
        self._warned: set[str] = set()
        self.last_backend: str | None = None  # the backend that ran the last batch

    def _warn_if_overshooting(self) -> None:
        """Warn when the first step is unstable on its own: a hidden node's energy term
        ``pi_u/2 ||e_u||^2`` alone has curvature ``pi_u``, so ``rate * pi_u(0) >= 2`` flips and
        grows its error whatever the rest of the net does."""
        pis = {n: 1.0 if self.precision is None else float(self.precision(n, 0))
               for n in self.graph.hidden}
        if not pis:
            return
        node = max(pis, key=pis.get)
        if self.rate * pis[node] >= 2.0:
            what = f"precision {pis[node]:g} of node {node!r} at step 0" \
                if self.precision is not None else "its own error term"
            warnings.warn(f"rate {self.rate:g} x {what} is >= 2: the first inference step "
                          "overshoots (the error flips sign and grows); use a rate below "
                          f"{2.0 / pis[node]:.3g}", RuntimeWarning, stacklevel=3)

    @property
    def settings(self) -> PCSettings:
        """The current options as the backends receive them."""
        return PCSettings(T=self.T, rate=self.rate, schedule=self.schedule, fpa=self.fpa,
                          output_loss=self.output_loss, error_clamp=self.error_clamp,
                          record_energy=self.record_energy, state_momentum=self.state_momentum,
                          state_nesterov=self.state_nesterov, ipc=self.ipc, epc=self.epc,
                          tol=self.tol, check_every=self.check_every,
                          precision=self.precision)

    # ----------------------------------------------------------------------------- public
    def step(self, x: torch.Tensor, y: torch.Tensor,
             optimizer: torch.optim.Optimizer | None = None,
             before_step: Callable[[], None] | None = None) -> PCResult:
        """One PC training step: relax, write each parameter's ``.grad``, step the optimizer.

        ``before_step`` (e.g. gradient clipping) runs between the gradients and every optimizer
        step. Under iPC the optimizer steps ``T`` times, once per inference step.
        """
        if self.ipc:
            if optimizer is None:
                raise ValueError("ipc=True updates the weights at every inference step: pass the "
                                 "optimizer, engine.step(x, y, optimizer)")
            return self._step_incremental(x, y, optimizer, before_step)
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        result = self.compute_gradients(x, y)
        if before_step is not None:
            before_step()
        if optimizer is not None:
            optimizer.step()
        return result

    def _step_incremental(self, x, y, optimizer, before_step) -> PCResult:
        settings = self.settings
        # The weights move during the batch, so a kernel failure half-way could not be undone:
        # "auto" runs iPC on the reference backend, backend="fast" on the fast one.
        backend = self.choose_backend(x, settings) if self.backend == "fast" else self._reference
        self.last_backend = backend.name

        def weight_step() -> None:
            if before_step is not None:
                before_step()
            optimizer.step()

        optimizer.zero_grad(set_to_none=True)
        return backend.run_incremental(x, y, settings, weight_step)

    def compute_gradients(self, x: torch.Tensor, y: torch.Tensor) -> PCResult:
        """Relax the errors for ``(x, y)`` and accumulate the PC weight gradients into ``.grad``."""
        if self.ipc:
            raise ValueError("ipc=True updates the weights at every inference step, so there is "
                             "no single gradient to return: use engine.step(x, y, optimizer)")
        settings = self.settings
        backend = self.choose_backend(x, settings)
        self.last_backend = backend.name
        if backend is self._reference or self.backend == "fast":
            return backend.compute_gradients(x, y, settings)
        return self._run_auto_fast(x, y, settings)

    def choose_backend(self, x: torch.Tensor, settings: PCSettings | None = None) -> PCBackend:
        """The backend that runs a batch like ``x`` (decided from explicit checks)."""
        settings = settings or self.settings
        if self.backend == "reference":
            return self._reference
        fast = self._fast
        assert fast is not None
        ok, why = fast.can_use(x, settings)
        if self.backend == "fast":
            if not ok:
                raise RuntimeError(f"backend='fast' cannot run this batch: {why}")
            return fast
        if self._fast_disabled is not None or not fast.prefers(x, settings):
            return self._reference
        if not ok:
            self._warn_once(f"backend='auto' uses the reference PC backend: {why}")
            return self._reference
        return fast

    # ----------------------------------------------------------------------------- auto
    def _run_auto_fast(self, x: torch.Tensor, y: torch.Tensor,
                       settings: PCSettings) -> PCResult:
        assert self._fast is not None
        params = self.graph.parameters()
        grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
        buffers = [b for m in self.graph.modules for b in m.buffers()]
        saved = [b.detach().clone() for b in buffers]
        try:
            return self._fast.compute_gradients(x, y, settings)
        except BackendUnavailable as exc:
            self._fast_disabled = exc.cause
            warnings.warn(
                f"the fast PC backend cannot run ({exc.cause}); backend='auto' continues on the "
                "reference path. backend='fast' raises the error instead.",
                RuntimeWarning, stacklevel=3)
            with torch.no_grad():
                for b, old in zip(buffers, saved):
                    b.copy_(old)
            for p, gr in zip(params, grads):
                p.grad = gr
        self.last_backend = self._reference.name
        return self._reference.compute_gradients(x, y, settings)

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, RuntimeWarning, stacklevel=4)
