"""Engine checks of ``pcfast doctor``: the fast PC engine against the reference one, and timings.

Both engines get identical copies of one small Res-DualNet and one batch; the comparison runs in
float64 (their results agree to ~1e-15 there), the timing in float32. Only public names are used:
``pcfast.pc.PCEngine`` (looked up at call time) and ``pcfast.models.ResDualNet``.
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

import pcfast.pc
from pcfast.doctor.report import FAIL, PASS, TIME, Row
from pcfast.models import ResDualNet

COMPARE_T = 4
COMPARE_BATCH = (4, 16)  # batch size, image side
COMPARE_RTOL = 1e-9  # float64: the engines agree to ~1e-15; this leaves a wide margin
TIME_T = 10
TIME_BATCH = (8, 32)
TIME_REPEATS = 3


def small_net(dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A two-stage Res-DualNet, seeded without touching the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = ResDualNet(stages=((8, 1), (16, 2)), blocks_per_stage=1, stem_channels=4)
    return net.to(device=device, dtype=dtype)


def batch(size: tuple[int, int], dtype: torch.dtype,
          device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random batch ``(n, 3, s, s)`` with labels in ``[0, 10)``."""
    n, side = size
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, side, side, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (n,), generator=gen)
    return x.to(device, dtype), y.to(device)


def engine(model: nn.Module, backend: str, T: int) -> pcfast.pc.PCEngine:
    """A PC engine over ``model``'s graph (FPA, Jacobi, rate 0.5)."""
    return pcfast.pc.PCEngine(model.pc_graph(), T=T, rate=0.5, backend=backend)


def _max_diff(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    err = scale = 0.0
    for got, want in pairs:
        d = (got.detach().double() - want.detach().double()).abs().max().item()
        err = max(err, float("inf") if d != d else d)
        scale = max(scale, want.detach().abs().max().item())
    return err, COMPARE_RTOL * (1 + scale)


def _row(name: str, err: float, tol: float, device: torch.device, detail: str = "") -> Row:
    return Row("engine", name, PASS if err <= tol else FAIL, detail, err=err, tol=tol,
               device=str(device))


def compare(device: torch.device) -> list[Row]:
    """Relaxed errors and ``.grad`` of the fast engine vs the reference engine on ``device``."""
    name = f"PC engine fast vs reference on {device}"
    model = small_net(torch.float64, device)
    ref_model, fast_model = copy.deepcopy(model), copy.deepcopy(model)
    x, y = batch(COMPARE_BATCH, torch.float64, device)
    ref = engine(ref_model, "reference", COMPARE_T).compute_gradients(x, y)
    fast = engine(fast_model, "fast", COMPARE_T).compute_gradients(x, y)
    what = f"(float64, T={COMPARE_T}, batch {x.shape[0]}x3x{x.shape[2]}x{x.shape[3]})"
    if ref.errors.keys() != fast.errors.keys():
        rows = [Row("engine", f"{name}: relaxed errors", FAIL,
                    f"different nodes: {sorted(ref.errors)} vs {sorted(fast.errors)}",
                    device=str(device))]
    else:
        err, tol = _max_diff([(fast.errors[k], ref.errors[k]) for k in ref.errors])
        rows = [_row(f"{name}: relaxed errors", err, tol, device, what)]
    pairs, missing = [], []
    for (pname, p), q in zip(ref_model.named_parameters(), fast_model.parameters()):
        if p.grad is None or q.grad is None:
            missing.append(pname)
        else:
            pairs.append((q.grad, p.grad))
    if missing:
        rows.append(Row("engine", f"{name}: weight gradients", FAIL,
                        f"no .grad written for {', '.join(missing)}", device=str(device)))
    else:
        err, tol = _max_diff(pairs)
        rows.append(_row(f"{name}: weight gradients", err, tol, device, what))
    return rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_time(eng: pcfast.pc.PCEngine, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
               device: torch.device) -> float:
    """Fastest of a few ``compute_gradients`` calls, after two warm-ups (CUDA-graph capture)."""
    best = float("inf")
    for i in range(2 + TIME_REPEATS):
        model.zero_grad(set_to_none=True)
        _sync(device)
        start = time.perf_counter()
        eng.compute_gradients(x, y)
        _sync(device)
        if i >= 2:
            best = min(best, time.perf_counter() - start)
    return best


def device_label(device: torch.device) -> str:
    """``cpu (2 threads)`` or ``cuda:0 (GPU name)``."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def timing(device: torch.device, backend: str) -> Row:
    """Wall-clock time per inference step: ``(t(T) - t(0)) / T``, best of a few runs each, so
    that the feedforward and weight-gradient pass of each batch is not counted."""
    model = small_net(torch.float32, device)
    x, y = batch(TIME_BATCH, torch.float32, device)
    t0 = _best_time(engine(model, backend, 0), model, x, y, device)
    t_full = _best_time(engine(model, backend, TIME_T), model, x, y, device)
    per_step: float | None = (t_full - t0) / TIME_T
    shape = f"float32, batch {x.shape[0]}x3x{x.shape[2]}x{x.shape[3]}"
    totals = f"T={TIME_T}: {t_full * 1e3:.1f} ms per batch, T=0: {t0 * 1e3:.1f} ms"
    if per_step > 0:
        head = f"{per_step * 1e3:.2f} ms per inference step"
    else:  # the steps took less than the run-to-run noise of the feedforward and weight pass
        per_step, head = None, "per-step time lost in timing noise"
    detail = f"{head} on {device_label(device)} ({shape}; {totals})"
    return Row(TIME, f"PC engine {backend} on {device}", TIME, detail, seconds=per_step,
               device=str(device))
