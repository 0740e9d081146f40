"""Traffic model: the ops and bytes of one PC inference step against one BP training step.

A device-independent cost model (DESIGN.md section 5): run a step on the CPU under a
:class:`~torch.utils._python_dispatch.TorchDispatchMode` that records every op reaching the
dispatcher (aten ops and registered custom ops such as ``pcfast::pc_update``), with

    bytes(op) = sum of the bytes of its tensor arguments (read)
              + sum of the bytes of its tensor results and mutated arguments (written),

except that an ``out=`` argument, and a mutated argument the op declares write-only (the
``out`` destinations of pcfast's fused ops, :func:`pcfast.ops.write_only_args`; a test poisons
them with NaN on every backend to check that no backend reads them), is charged its write only.

A custom op counts once: inside ``__torch_dispatch__`` the mode is off while the op runs, so
what the op does inside (its PyTorch reference body, or a C++ kernel's own aten calls) is not
counted, exactly as one GPU kernel launch is one op. On a GPU these nets are bandwidth-bound,
so the ratio of bytes predicts the time ratio, and the op count bounds the launch overhead
that a CUDA graph removes.

What a tensor's bytes are: ``element_size * distinct elements it addresses`` -- ``nbytes`` for
an ordinary tensor; a broadcast (stride-0) dimension counts once, as the kernel reads that
memory once (``x.expand(...)`` of a per-sample vector is not a full-size read).

Excluded (counted separately under ``excluded`` in the JSON, never in ops or bytes):

- view and metadata ops: every op whose schema returns an alias of an input without writing it
  (``view``, ``_reshape_alias``, ``as_strided``, ``t``, ``transpose``, ``permute``, ``expand``,
  ``unsqueeze``, ``squeeze``, ``slice``, ``select``, ``split``, ``unbind``, ``detach``,
  ``alias``, ``lift_fresh``, ...), ``_unsafe_view`` (a view without an alias annotation) and
  the in-place view ops (tag ``inplace_view``: ``t_``, ``unsqueeze_``, ...): they change sizes
  and strides, move no data and launch no kernel;
- allocations without data: ``empty``, ``empty_strided``, ``empty_like``, ``new_empty``,
  ``new_empty_strided``, ``resize_``: a caching allocator call, no kernel, no traffic;
- metadata queries that read no tensor data (``is_same_size``, ``sym_size``, ...).

Everything else counts, copies included (``_to_copy``, ``copy_``, ``clone``, ``contiguous``
through its ``clone``), as does ``_local_scalar_dense`` (``.item()``: a device sync on a GPU).
Write-only ops (``zero_``, ``fill_``) are charged their read too: an upper bound by one pass.

One PC inference step = ``(count at T=k+1 - count at T=1) / k``: the feedforward pass, the
output error, the weight gradients and the first step are in both and cancel (the fast jacobi
path takes its first step from the zero state as one VJP and a fill, so a step after it is what
the other T-1 steps cost). Each count is the first
``compute_gradients`` of a fresh engine with all ``.grad`` cleared, so one-time work (buffer
allocation) cancels too. BP training step = forward + mean cross-entropy + backward +
``torch.optim.Adam(foreach=True)`` step (the multi-tensor Adam that CUDA uses by default),
counted after one warm-up step (Adam's state exists, as in training).

Whole FPA relaxations (``--relax-T``, the ``relaxation`` rows of the JSON): ``count(T) -
count(T=0)`` on the fast path (the T=0 run's zero fill of the errors not subtracted), once
stepped (``fpa_solver="steps"``) and once solved by path length (``fpa_solver="levels"``,
``pcfast/pc/backends/fpa_levels.py``), whose cost does not grow with T once T exceeds the net's
depth: what a batch's inference costs, beside one BP step.

Batch scaling: counts are taken at small batches on the CPU in float32 and fitted as
``bytes = a + b * N`` (``a``: weights, batch independent; ``b``: per sample) from the smallest
and largest batch size; every further batch size must agree with the fit (``--batch-sizes 4 8 6``
checks linearity at 6), and the op count must not depend on the batch. Reported: ``a + 256 b``.

Two counts per fast-path row: ``ops_per_step`` / ``x_bp_bytes`` count every registered pcfast
op as one op, what a device with a fused kernel for each runs (the CPU, through ``pcfast._C``);
``cuda_ops_per_step`` / ``cuda_x_bp_bytes`` count the ops that CUDA runs as several launches
(``pcfast.ops.cuda_composites()``: the depthwise VJP as its two registered Triton passes, the
1x1 conv VJP as a matmul plus the relax op) as those launches, and compute BatchNorm rules'
batch statistics again as CUDA does (the CPU takes them from the BN's forward pass): the
figure for a GPU step.

Counts are of what the CPU dispatches. On CUDA a few modules pick device-specific ops that move
the same data (``cudnn_batch_norm`` for ``native_batch_norm``); pcfast's C++ ops count only
where ``pcfast._C`` is built and fresh (otherwise their PyTorch reference runs; the JSON lists
the custom ops seen and the extension status).

PC variants (``--modes``, each on both paths): ``fpa`` (default), ``strict`` (predictions
recomputed every step) and ``epc`` (error-based PC: one forward and one backward pass through
the net per step; jacobi only). Each row names its mode.

Usage::

    python bench/cost.py --models resdualnet resnet20 resnet56 --schedules jacobi sequential
    python bench/cost.py --models resnet20 --modes fpa strict epc
    python bench/cost.py --models resdualnet --check --max-ratio 0.35 --max-ops 40  # CI gate

Writes ``bench/results/cost-<model>.json`` per model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS_DIR, environment, print_table  # noqa: E402
from pcfast.models import build_model  # noqa: E402
from pcfast.ops import bn_saved_stats, cuda_composites, write_only_args  # noqa: E402
from pcfast.pc import PCEngine, PCGraph, vjp_rules  # noqa: E402

TARGET_BATCH = 256


@contextlib.contextmanager
def statistics_as_on_cuda():
    """Count BatchNorm rules as CUDA runs them: the batch statistics computed again
    (:func:`~pcfast.ops.bn_saved_stats`), where the CPU takes them from the BN's forward."""
    saved = vjp_rules.batch_stats
    vjp_rules.batch_stats = lambda y, z, eps: bn_saved_stats(z, eps)
    try:
        yield
    finally:
        vjp_rules.batch_stats = saved
GIB = 1024 ** 3
PATHS = ("reference", "fast")
MODES = ("fpa", "strict", "epc")

# Allocations that hand out memory without writing it, and queries that read no tensor data.
ALLOCATION_OPS = frozenset({"empty", "empty_strided", "empty_like", "new_empty",
                            "new_empty_strided", "resize_", "resize_as_"})
METADATA_OPS = frozenset({"_unsafe_view", "is_same_size", "sym_size", "sym_stride", "sym_numel",
                          "sym_storage_offset", "_has_compatible_shallow_copy_type",
                          "is_contiguous", "is_non_overlapping_and_dense", "is_complex",
                          "is_floating_point", "size", "stride", "numel", "dim",
                          "storage_offset", "_nested_tensor_size", "prim_layout",
                          "prim_device"})


def _op_name(func: Any) -> str:
    """``aten.add.Tensor`` -> ``add`` (the overload packet's name without namespace)."""
    return func._schema.name.split("::")[-1]


def excluded_reason(func: Any) -> str | None:
    """Why ``func`` is left out of the count (``None``: it counts)."""
    name = _op_name(func)
    if name in ALLOCATION_OPS:
        return "allocation"
    if name in METADATA_OPS:
        return "metadata"
    if torch.Tag.inplace_view in getattr(func, "tags", ()):
        return "view"
    returns = func._schema.returns
    if returns and all(r.alias_info is not None and not r.alias_info.is_write for r in returns):
        return "view"
    return None


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements ``t`` addresses (``nbytes``; stride-0 dims count once)."""
    distinct = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            distinct *= size
    if t.numel() == 0:
        distinct = 0
    return distinct * t.element_size()


def _tensors(tree: Any) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(tree)
    return [x for x in leaves if isinstance(x, torch.Tensor)]


def op_bytes(func: Any, args: tuple, kwargs: dict, out: Any,
             write_only: Collection[str] = ()) -> int:
    """Bytes one op moves: tensor arguments read + results and mutated arguments written.

    ``out=`` arguments, and the mutated arguments named in ``write_only`` (destinations the op
    never reads: :func:`pcfast.ops.write_only_args`), are written only; in-place and ``out=``
    ops that return the mutated tensor are charged one write for it (not two).
    """
    schema = func._schema
    read: list[torch.Tensor] = []
    mutated: list[torch.Tensor] = []
    bound: dict[str, Any] = dict(kwargs)
    for arg, value in zip(schema.arguments, args):
        bound[arg.name] = value
    for arg in schema.arguments:
        if arg.name not in bound:
            continue
        tensors = _tensors(bound[arg.name])
        writes = arg.alias_info is not None and arg.alias_info.is_write
        if not (arg.is_out or (writes and arg.name in write_only)):
            read += tensors
        if writes:
            mutated += tensors
    written = _tensors(out)
    seen = {id(t) for t in written}
    written += [t for t in mutated if id(t) not in seen]
    return sum(tensor_bytes(t) for t in read) + sum(tensor_bytes(t) for t in written)


@dataclass
class Count:
    """Ops and bytes of a stretch of code, per op name (``aten.add.Tensor``, ``pcfast.pc_update...``)."""

    ops: Counter = field(default_factory=Counter)
    bytes: Counter = field(default_factory=Counter)
    excluded: Counter = field(default_factory=Counter)

    @property
    def n_ops(self) -> int:
        return sum(self.ops.values())

    @property
    def n_bytes(self) -> int:
        return sum(self.bytes.values())


class OpCounter(TorchDispatchMode):
    """Records every op that reaches the dispatcher while active, with the bytes it moves.

    Example::

        with OpCounter() as c:
            torch.add(a, b)
        c.count.n_ops, c.count.n_bytes   # 1, 3 * a.nbytes
    """

    def __init__(self, expand: Mapping[str, Callable[..., Any]] | None = None,
                 write_only: Mapping[str, Collection[str]] | None = None) -> None:
        """``expand``: ``{"pcfast::op": composite}`` for ops to count as the unfused ops that
        ``composite(*args)`` dispatches (what a device without that op's fused kernel runs).
        ``write_only``: ``{"ns::op": (argument, ...)}``, mutated arguments charged a write only
        (default: pcfast's registered ops, :func:`pcfast.ops.write_only_args`)."""
        super().__init__()
        self.count = Count()
        self.expand = dict(expand or {})
        self.write_only = dict(write_only_args() if write_only is None else write_only)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        composite = self.expand.get(getattr(func, "_schema", None) and func._schema.name)
        if composite is not None:
            with self:  # count what the composite dispatches, op by op
                return composite(*args, **kwargs)
        out = func(*args, **kwargs)  # the mode is off in here: a custom op's body is not counted
        name = str(func)
        reason = excluded_reason(func)
        if reason is not None:
            self.count.excluded[f"{reason}: {name}"] += 1
        else:
            self.count.ops[name] += 1
            self.count.bytes[name] += op_bytes(func, args, kwargs, out,
                                               self.write_only.get(func._schema.name, ()))
        return out


def count_ops(fn: Callable[[], Any],
              expand: Mapping[str, Callable[..., Any]] | None = None) -> Count:
    """Run ``fn()`` under an :class:`OpCounter` (``expand``: see there); return what it
    dispatched."""
    with OpCounter(expand) as counter:
        fn()
    return counter.count


# ----------------------------------------------------------------------------- PC and BP steps
@dataclass
class StepCost:
    """One step's cost at one batch size: op counts (whole, by op) and bytes per op name."""

    batch: int
    ops: dict[str, float]
    bytes: dict[str, float]
    excluded: dict[str, float]

    @property
    def n_ops(self) -> float:
        return sum(self.ops.values())

    @property
    def n_bytes(self) -> float:
        return sum(self.bytes.values())


def _difference(a: Count, b: Count, k: int, batch: int) -> StepCost:
    """``(a - b) / k`` per op name."""
    def diff(x: Counter, y: Counter) -> dict[str, float]:
        keys = set(x) | set(y)
        out = {key: (x[key] - y[key]) / k for key in keys}
        return {key: v for key, v in out.items() if v != 0}

    return StepCost(batch, diff(a.ops, b.ops), diff(a.bytes, b.bytes),
                    diff(a.excluded, b.excluded))


def pc_step_cost(make_graph: Callable[[], PCGraph], make_batch: Callable[[int], tuple],
                 batch: int, schedule: str, path: str, k: int = 2, rate: float = 0.5,
                 kernels: str = "auto",
                 expand: Mapping[str, Callable[..., Any]] | None = None,
                 mode: str = "fpa") -> StepCost:
    """Cost of one inference step after the first: ``(count(T=k+1) - count(T=1)) / k`` of
    ``compute_gradients``.

    ``make_graph()`` builds a fresh graph each time (same seed, same weights); ``path`` is
    ``"reference"`` or ``"fast"`` (``backend_options={"kernels": kernels}``); ``mode`` one of
    :data:`MODES`.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    # A step is a step of the stepped FPA relaxation (the path-length solver takes none), and
    # of the per-node strict steps: on the CPU a dense chain's whole strict relaxation is one
    # op (``dense_strict_relax``), which a GPU does not run and whose steps no count can split.
    options = ({"kernels": kernels, "fpa_solver": "steps", "dense_chain": "off"}
               if path == "fast" else None)
    counts = [_count_batch(make_graph, make_batch, batch, expand, T=T, rate=rate,
                           schedule=schedule, backend=path, backend_options=options,
                           fpa=mode == "fpa", epc=mode == "epc")
              for T in (k + 1, 1)]
    return _difference(counts[0], counts[1], k, batch)


def _count_batch(make_graph: Callable[[], PCGraph], make_batch: Callable[[int], tuple],
                 batch: int, expand: Mapping[str, Callable[..., Any]] | None,
                 **engine_options: Any) -> Count:
    """The count of the first ``compute_gradients`` of a fresh ``PCEngine(**engine_options)``
    on a fresh graph, every ``.grad`` cleared."""
    graph = make_graph()
    engine = PCEngine(graph, **engine_options)
    x, y = make_batch(batch)
    for p in graph.parameters():
        p.grad = None
    return count_ops(lambda: engine.compute_gradients(x, y), expand)


ZERO_FILLS = ("aten.zero_.default",)


def relaxation_cost(make_graph: Callable[[], PCGraph], make_batch: Callable[[int], tuple],
                    batch: int, schedule: str, T: int, solver: str, rate: float = 0.5,
                    kernels: str = "auto",
                    expand: Mapping[str, Callable[..., Any]] | None = None) -> StepCost:
    """Cost of a whole FPA relaxation of ``T`` steps on the fast path: ``count(T) - count(T=0)``
    of ``compute_gradients`` with ``fpa_solver=solver`` (``"steps"`` or ``"levels"``) at ``T``
    and the stepped solver at ``T=0`` without its zero fill of the errors (what a relaxation of
    no steps comes to): the feedforward pass, output error and weight gradients cancel."""
    # The generic path, as a GPU runs it: on the CPU a dense chain's FPA runs in closed form
    # (pcfast/pc/backends/dense_chain.py), whose feedforward and gradients would not cancel.
    counts = [_count_batch(make_graph, make_batch, batch, expand, T=t, rate=rate,
                           schedule=schedule, backend="fast",
                           backend_options={"kernels": kernels, "fpa_solver": how,
                                            "dense_chain": "off"})
              for t, how in ((T, solver), (0, "steps"))]
    base = counts[1]
    for name in ZERO_FILLS:  # T=0 relaxes to zero errors: that fill is a relaxation's own work
        base.ops.pop(name, None)
        base.bytes.pop(name, None)
    return _difference(counts[0], base, 1, batch)


def bp_step_cost(make_model: Callable[[], torch.nn.Module], make_batch: Callable[[int], tuple],
                 batch: int) -> StepCost:
    """Cost of one BP training step: forward, mean cross-entropy, backward, Adam (foreach) step.

    Counted after one uncounted warm-up step, so Adam's state is already allocated.
    """
    model = make_model()
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True)
    x, y = make_batch(batch)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    step()
    c = count_ops(step)
    return StepCost(batch, {k: float(v) for k, v in c.ops.items()},
                    {k: float(v) for k, v in c.bytes.items()},
                    {k: float(v) for k, v in c.excluded.items()})


@dataclass
class Fit:
    """Ops (batch independent) and ``bytes = a + b N`` fitted over batch sizes."""

    ops: float
    a: float
    b: float
    by_op: dict[str, dict[str, float]]
    batches: list[int]

    def bytes_at(self, n: int) -> float:
        return self.a + self.b * n


def fit_linear(costs: Sequence[StepCost], rel_tol: float = 1e-6) -> Fit:
    """Fit ``bytes = a + b N`` from the smallest and largest batch; check the others and the ops.

    Raises ``AssertionError`` when the op counts differ between batch sizes or a middle batch's
    bytes are off the line by more than ``rel_tol`` (relative).
    """
    if len(costs) < 2:
        raise ValueError("need counts at two batch sizes at least")
    costs = sorted(costs, key=lambda c: c.batch)
    lo, hi = costs[0], costs[-1]
    if lo.batch == hi.batch:
        raise ValueError("need two different batch sizes")
    for c in costs[1:]:
        if c.ops != lo.ops:
            diff = {k: (lo.ops.get(k), c.ops.get(k)) for k in set(lo.ops) | set(c.ops)
                    if lo.ops.get(k) != c.ops.get(k)}
            raise AssertionError(f"op counts differ between batch {lo.batch} and {c.batch}: {diff}")

    def line(y0: float, y1: float) -> tuple[float, float]:
        b = (y1 - y0) / (hi.batch - lo.batch)
        return y0 - b * lo.batch, b

    a, b = line(lo.n_bytes, hi.n_bytes)
    for c in costs[1:-1]:
        want = a + b * c.batch
        if abs(c.n_bytes - want) > rel_tol * max(abs(want), 1.0):
            raise AssertionError(f"bytes are not linear in the batch: {c.n_bytes} at batch "
                                 f"{c.batch}, the line through batches {lo.batch} and "
                                 f"{hi.batch} gives {want}")
    by_op = {}
    for name in sorted(set(lo.bytes) | set(hi.bytes) | set(lo.ops)):
        oa, ob = line(lo.bytes.get(name, 0.0), hi.bytes.get(name, 0.0))
        by_op[name] = {"ops": lo.ops.get(name, 0.0), "bytes_a": oa, "bytes_per_sample": ob,
                       f"GiB_at_{TARGET_BATCH}": (oa + ob * TARGET_BATCH) / GIB}
    return Fit(lo.n_ops, a, b, by_op, [c.batch for c in costs])


# ---------------------------------------------------------------------------------- models
def _model_factory(name: str, seed: int = 0) -> Callable[[], torch.nn.Module]:
    def make() -> torch.nn.Module:
        torch.manual_seed(seed)
        return build_model(name).float().train()
    return make


def _image_batch(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def _custom_ops(names: Iterable[str]) -> list[str]:
    return sorted({n for n in names if not n.startswith("aten.")})


def _extension_status() -> str:
    try:  # optional detail for the record; the cost model itself uses public APIs only
        from pcfast.ops import _ext
        return _ext.unavailable_reason() or "built and fresh"
    except Exception as exc:  # noqa: BLE001
        return f"unknown ({type(exc).__name__})"


def _uncommitted() -> list[str]:
    """Files under pcfast/, csrc/, kernels/ that differ from the commit or are untracked.

    The count is of the working tree, which the commit alone does not pin down when this list
    is not empty.
    """
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--", "pcfast", "csrc",
                              "kernels"], cwd=Path(__file__).resolve().parents[1],
                             capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return ["unknown"]
    return [line[3:] for line in out.stdout.splitlines() if line.strip()]


def run_combinations(modes: Sequence[str], schedules: Sequence[str],
                     paths: Sequence[str]) -> list[tuple[str, str, str]]:
    """The ``(mode, schedule, path)`` rows that exist: every mode on both paths, ePC with the
    jacobi schedule only."""
    return [(m, s, p) for m in modes for s in schedules for p in paths
            if m != "epc" or s == "jacobi"]


def measure_model(name: str, schedules: Sequence[str], paths: Sequence[str],
                  batch_sizes: Sequence[int], k: int, rate: float,
                  kernels: str, modes: Sequence[str] = ("fpa",),
                  relax_T: Sequence[int] = ()) -> dict[str, Any]:
    """Every (mode, schedule, path) row for one model, plus the BP step, plus (FPA on the fast
    path) whole relaxations of each ``relax_T`` steps by both solvers; the JSON payload."""
    make_model = _model_factory(name)

    def make_graph() -> PCGraph:
        return make_model().pc_graph()

    t0 = time.perf_counter()
    bp = fit_linear([bp_step_cost(make_model, _image_batch, n) for n in batch_sizes])
    bp_bytes = bp.bytes_at(TARGET_BATCH)
    rows = []
    for mode, schedule, path in run_combinations(modes, schedules, paths):
        fit = fit_linear([pc_step_cost(make_graph, _image_batch, n, schedule, path, k=k,
                                       rate=rate, kernels=kernels, mode=mode)
                          for n in batch_sizes])
        step_bytes = fit.bytes_at(TARGET_BATCH)
        # What CUDA dispatches today: ops without a fused CUDA kernel run unfused there, and
        # BatchNorm rules compute the batch statistics again.
        with statistics_as_on_cuda():
            cuda = fit if path != "fast" else fit_linear([
                pc_step_cost(make_graph, _image_batch, n, schedule, path, k=k, rate=rate,
                             kernels=kernels, expand=cuda_composites(), mode=mode)
                for n in batch_sizes])
        cuda_bytes = cuda.bytes_at(TARGET_BATCH)
        rows.append({
            "model": name, "mode": mode, "schedule": schedule, "path": path,
            "ops_per_step": fit.ops, "GiB_per_step": step_bytes / GIB,
            "x_bp_bytes": step_bytes / bp_bytes,
            "cuda_ops_per_step": cuda.ops, "cuda_x_bp_bytes": cuda_bytes / bp_bytes,
            "cuda_by_op": cuda.by_op,
            "bp_ops": bp.ops, "bp_GiB": bp_bytes / GIB,
            "bytes_a": fit.a, "bytes_per_sample": fit.b,
            "custom_ops": _custom_ops(fit.by_op),
            "by_op": fit.by_op,
        })
    relaxation = []
    for schedule in schedules if "fpa" in modes and "fast" in paths else ():
        for T in relax_T:
            for solver in ("steps", "levels"):
                fit = fit_linear([relaxation_cost(make_graph, _image_batch, n, schedule, T,
                                                  solver, rate=rate, kernels=kernels)
                                  for n in batch_sizes])
                total = fit.bytes_at(TARGET_BATCH)
                relaxation.append({
                    "model": name, "schedule": schedule, "T": T, "solver": solver,
                    "ops": fit.ops, "GiB": total / GIB, "x_bp_bytes": total / bp_bytes,
                    "bp_GiB": bp_bytes / GIB, "by_op": fit.by_op})
    graph = make_graph()
    return {
        "model": name,
        "config": {"batch_sizes": list(batch_sizes), "target_batch": TARGET_BATCH,
                   "dtype": "float32", "k": k, "rate": rate, "modes": list(modes),
                   "schedules": list(schedules),
                   "paths": list(paths), "fast_kernels": kernels,
                   "bp_optimizer": "Adam(foreach=True)", "bp_loss": "cross_entropy(mean)",
                   "relax_T": list(relax_T), "input": "3x32x32", "hidden_nodes": len(graph.hidden),
                   "depth": graph.depth},
        "bp": {"ops": bp.ops, "GiB": bp_bytes / GIB, "bytes_a": bp.a, "bytes_per_sample": bp.b,
               "by_op": bp.by_op},
        "rows": rows,
        "relaxation": relaxation,
        "pcfast_C": _extension_status(),
        "uncommitted_changes": _uncommitted(),
        "count_seconds": time.perf_counter() - t0,
    }


COLUMNS = ("model", "mode", "schedule", "path", "ops_per_step", "GiB_per_step", "x_bp_bytes",
           "cuda_ops_per_step", "cuda_x_bp_bytes", "bp_ops", "bp_GiB")

RELAX_COLUMNS = ("model", "schedule", "T", "solver", "ops", "GiB", "x_bp_bytes", "bp_GiB")


def check_rows(rows: Sequence[dict[str, Any]], max_ratio: float | None, max_ops: float | None,
               paths: Sequence[str] = ("fast",)) -> list[str]:
    """Threshold violations among the rows of ``paths`` (empty: all within bounds)."""
    bad = []
    for r in rows:
        if r["path"] not in paths:
            continue
        tag = f"{r['model']}/{r.get('mode', 'fpa')}/{r['schedule']}/{r['path']}"
        if max_ratio is not None and r["x_bp_bytes"] > max_ratio:
            bad.append(f"{tag}: {r['x_bp_bytes']:.3f} x BP bytes > {max_ratio}")
        if max_ops is not None and r["ops_per_step"] > max_ops:
            bad.append(f"{tag}: {r['ops_per_step']:g} ops/step > {max_ops:g}")
    return bad


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["resdualnet"])
    ap.add_argument("--schedules", nargs="+", default=["jacobi", "sequential"],
                    choices=["jacobi", "sequential"])
    ap.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    ap.add_argument("--modes", nargs="+", default=["fpa"], choices=MODES,
                    help="PC variants (epc: jacobi only)")
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[2, 4, 3],
                    help="CPU batch sizes; the line is fitted through the smallest and largest, "
                         "the others check it")
    ap.add_argument("--k", type=int, default=2, help="steps counted after the first one")
    ap.add_argument("--rate", type=float, default=0.5)
    ap.add_argument("--kernels", default="auto", choices=["auto", "torch"],
                    help="fast path kernels (auto: the registered ops)")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 when a --check-paths row exceeds --max-ratio or --max-ops")
    ap.add_argument("--check-paths", nargs="+", default=["fast"], choices=PATHS)
    ap.add_argument("--max-ratio", type=float, default=None,
                    help="largest inference-step bytes / BP-step bytes allowed by --check")
    ap.add_argument("--max-ops", type=float, default=None,
                    help="largest ops per inference step allowed by --check")
    ap.add_argument("--relax-T", nargs="*", type=int, default=[10, 100],
                    help="FPA on the fast path: also count whole relaxations of these many steps "
                         "by both solvers (stepped, and by path length)")
    ap.add_argument("--no-write", action="store_true", help="print only; write no JSON")
    args = ap.parse_args(argv)
    if args.check and args.max_ratio is None and args.max_ops is None:
        ap.error("--check needs --max-ratio and/or --max-ops")
    if len(set(args.batch_sizes)) < 2 or min(args.batch_sizes) < 2:
        ap.error("--batch-sizes needs two different sizes, each >= 2 (BatchNorm)")

    torch.set_num_threads(min(2, torch.get_num_threads()))
    env = environment("cpu")
    all_rows, relax_rows = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("once")
        for name in args.models:
            payload = measure_model(name, args.schedules, args.paths, args.batch_sizes, args.k,
                                    args.rate, args.kernels, args.modes, args.relax_T)
            payload["environment"] = env
            all_rows += payload["rows"]
            relax_rows += payload["relaxation"]
            if not args.no_write:
                RESULTS_DIR.mkdir(parents=True, exist_ok=True)
                path = RESULTS_DIR / f"cost-{name}.json"
                path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
                print(f"# {name}: counted in {payload['count_seconds']:.1f} s -> {path}",
                      file=sys.stderr)
    print(f"# one inference step vs one BP training step (forward + CE + backward + Adam), "
          f"ops and bytes dispatched, bytes at batch {TARGET_BATCH} fp32; commit "
          f"{env['commit'][:10]}, torch {env['torch']}")
    print_table(all_rows, COLUMNS)
    if relax_rows:
        print("\n# whole FPA relaxations of T steps on the fast path, stepped and solved by path "
              "length (fpa_solver), vs one BP training step")
        print_table(relax_rows, RELAX_COLUMNS)
    if args.check:
        bad = check_rows(all_rows, args.max_ratio, args.max_ops, args.check_paths)
        for line in bad:
            print(f"CHECK FAILED: {line}", file=sys.stderr)
        if bad:
            return 1
        print("check passed", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["Count", "Fit", "OpCounter", "StepCost", "bp_step_cost", "check_rows", "count_ops",
           "excluded_reason", "fit_linear", "op_bytes", "pc_step_cost", "relaxation_cost", "tensor_bytes"]
