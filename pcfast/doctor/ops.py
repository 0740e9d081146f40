"""Op checks of ``pcfast doctor``: a registry, one entry per op (or op direction).

Every entry runs its op on small random float32 inputs on one device and backend and compares
it with the op's PyTorch reference run in float64 on the CPU (the oracle). The tolerance follows
the op tests (``tests/test_*_op.py``): twice the error of the reference itself run in float32,
plus a small slack relative to the output's scale::

    tol = 2 * max|ref_float32 - oracle| + slack * (1 + max|oracle|)

Adding an op is one :class:`OpCheck` in :data:`CHECKS`. Only public names are used
(``pcfast.ops.*``, ``torch.ops.pcfast.*``), looked up at call time.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

import pcfast.ops as ops
from pcfast.doctor.env import device_unavailable, triton_version

DTYPE = torch.float32
FP32_EPS = torch.finfo(torch.float32).eps
# (got, oracle, low-precision reference, slack)
Comparison = tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]
CheckFn = Callable[[torch.device, str], list[Comparison]]


@dataclasses.dataclass(frozen=True)
class OpCheck:
    """One registry entry.

    ``backends`` maps a device type to the backends checked there; ``run(device, backend)``
    returns the comparisons (got, oracle, float32 reference, slack); ``ext_op`` names the
    ``pcfast._C`` op whose kernel the compiled backends (``"cpu"``, ``"cuda"``) need.
    """

    name: str
    backends: dict[str, tuple[str, ...]]
    run: CheckFn
    ext_op: str | None = None


def measure(comparisons: list[Comparison]) -> tuple[float, float]:
    """``(max err, tol)`` of the comparison closest to (or furthest beyond) its tolerance."""
    worst = (0.0, 1.0)
    for got, oracle, lowp, slack in comparisons:
        o = oracle.detach().to("cpu", torch.float64)
        g = got.detach().to("cpu", torch.float64)
        if g.shape != o.shape:
            raise ValueError(f"shape {tuple(g.shape)} != reference shape {tuple(o.shape)}")
        err = (g - o).abs().max().item() if g.numel() else 0.0
        err = float("inf") if err != err else err  # NaN fails
        ref_err = (lowp.detach().to("cpu", torch.float64) - o).abs().max().item()
        tol = 2 * ref_err + slack * (1 + o.abs().max().item())
        if err / tol >= worst[0] / worst[1]:
            worst = (err, tol)
    return worst


def unavailable(check: OpCheck, device: torch.device, backend: str) -> str | None:
    """Why ``backend`` cannot run on ``device`` here, or None when it can."""
    from pcfast.ops import _ext

    reason = device_unavailable(device)
    if reason is not None:
        return reason
    if backend in ("cpu", "cuda") and check.ext_op is not None:
        if _ext.load() is None:
            return f"{_ext.unavailable_reason()}; the op runs its PyTorch reference instead"
        if not _ext.has_kernel(check.ext_op, device.type):
            return f"pcfast._C has no {device.type} kernel for pcfast::{check.ext_op}"
    if backend == "triton":
        if triton_version() is None:
            return "Triton is not installed (pip install 'pcfast[kernels]')"
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "needs a GPU (or TRITON_INTERPRET=1)"
    return None


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(gen: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float64) * scale


# --------------------------------------------------------------------------- dual-path dwconv
DWCONV_EPS = 1e-5  # tests/test_dwconv_op.py, float32
DWCONV_SHAPE = (2, 3, 9, 8)


def _dwconv_ref(x: torch.Tensor, w: torch.Tensor, g: torch.Tensor,
                stride: int) -> dict[str, torch.Tensor]:
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    with torch.enable_grad():
        y = ops.dual_path_dwconv_ref(x, w, stride)
        gx, gw = torch.autograd.grad(y, (x, w), g)
    return {"forward": y.detach(), "input-VJP": gx, "weight-VJP": gw}


def _dwconv_compiled(part: str, x: torch.Tensor, w: torch.Tensor, g: torch.Tensor,
                     stride: int) -> torch.Tensor:
    if x.is_cuda:
        from pcfast.ops import _ext

        check = getattr(_ext, "check_cuda_device", None)
        if check is not None:
            check(x.device)  # raises, naming GPU and compiled archs, when no code runs on it
    if part == "forward":
        return torch.ops.pcfast.dwconv_fwd(x, w, stride)
    if part == "input-VJP":
        return torch.ops.pcfast.dwconv_bwd_input(g, w, stride, x.shape[2], x.shape[3])
    return torch.ops.pcfast.dwconv_bwd_weight(g, x, stride)


def _dwconv_check(part: str) -> CheckFn:
    def run(device: torch.device, backend: str) -> list[Comparison]:
        out = []
        for stride in (1, 2):
            gen = _gen(10 + stride)
            n, c, h, wd = DWCONV_SHAPE
            x, w = _randn(gen, n, c, h, wd), _randn(gen, 2 * c, 1, 3, 3)
            g = _randn(gen, n, c, (h - 1) // stride + 1, (wd - 1) // stride + 1)
            x, w, g = (t.to(DTYPE).double() for t in (x, w, g))  # identical inputs for all
            oracle = _dwconv_ref(x, w, g, stride)[part]
            lowp = _dwconv_ref(x.to(DTYPE), w.to(DTYPE), g.to(DTYPE), stride)[part]
            xd, wdv, gd = (t.to(device, DTYPE) for t in (x, w, g))
            if backend == "reference":
                got = _dwconv_ref(xd, wdv, gd, stride)[part]
            else:
                got = _dwconv_compiled(part, xd, wdv, gd, stride)
            out.append((got, oracle, lowp, DWCONV_EPS))
        return out

    return run


# --------------------------------------------------------------------------------- pc_update
PC_UPDATE_N = 1031
PC_STATE_SLACK = 4 * FP32_EPS  # tests/test_pc_update_op.py: fp32 ulps of the state
PC_ENERGY_SLACK = 1e-5  # tests/test_pc_update_op.py: relative energy slack (fp32 sums)


def _pc_update_run(fn: Callable[..., torch.Tensor], state: torch.Tensor, back: torch.Tensor,
                   mu: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    s = state.clone()
    energy = fn(s, back, 0.5, 0.7, mu)
    return s, energy.reshape(1)


def _pc_update_check(device: torch.device, backend: str) -> list[Comparison]:
    out = []
    for value_space in (False, True):
        gen = _gen(20 + value_space)
        state, back = _randn(gen, PC_UPDATE_N), _randn(gen, PC_UPDATE_N, scale=2.0)
        mu = _randn(gen, PC_UPDATE_N) if value_space else None
        state, back = state.to(DTYPE), back.to(DTYPE)
        mu = mu.to(DTYPE) if mu is not None else None
        d64 = [t.double() if t is not None else None for t in (state, back, mu)]
        oracle = _pc_update_run(ops.pc_update_ref, *d64)
        lowp = _pc_update_run(ops.pc_update_ref, state, back, mu)
        dev = [t.to(device) if t is not None else None for t in (state, back, mu)]
        if backend == "reference":
            got = _pc_update_run(ops.pc_update_ref, *dev)
        else:
            got = _pc_update_run(functools.partial(ops.pc_update, backend=backend), *dev)
        out.append((got[0], oracle[0], lowp[0], PC_STATE_SLACK))
        out.append((got[1], oracle[1], lowp[1], PC_ENERGY_SLACK))
    return out


# ------------------------------------------------------------------------------- bn_relu_vjp
BN_EPS = 1e-5
BN_SHAPE = (3, 5, 4, 6)
BN_SLACK = 16 * FP32_EPS  # tests/test_bn_relu_vjp_op.py: fp32 ulps of the output scale


def _bn_relu_vjp_check(device: torch.device, backend: str) -> list[Comparison]:
    gen = _gen(30)
    n, c, h, w = BN_SHAPE
    z = (_randn(gen, n, c, h, w) * 2 + 0.5).to(DTYPE)
    g = _randn(gen, n, c, h, w).to(DTYPE)
    weight = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).to(DTYPE)
    bias = _randn(gen, c).to(DTYPE)
    oracle = ops.bn_relu_vjp_ref(g.double(), z.double(), weight.double(), bias.double(), BN_EPS)
    lowp = ops.bn_relu_vjp_ref(g, z, weight, bias, BN_EPS)
    g, z, weight, bias = (t.to(device) for t in (g, z, weight, bias))
    if backend == "reference":
        got = ops.bn_relu_vjp_ref(g, z, weight, bias, BN_EPS)
    else:
        out = torch.relu(F.batch_norm(z, None, None, weight, bias, training=True, eps=BN_EPS))
        mean, invstd = ops.bn_saved_stats(z, BN_EPS)
        got = ops.bn_relu_vjp(g, z, out, weight, mean, invstd, backend=backend)
    return [(got, oracle, lowp, BN_SLACK)]


# ---------------------------------------------------------------------------------- registry
_DWCONV_BACKENDS = {"cpu": ("reference", "cpu"), "cuda": ("reference", "cuda")}
_PC_BACKENDS = ("reference", "auto", "triton")
_BN_BACKENDS = ("reference", "torch", "auto", "triton")

CHECKS: list[OpCheck] = [
    OpCheck("dwconv forward", _DWCONV_BACKENDS, _dwconv_check("forward"), "dwconv_fwd"),
    OpCheck("dwconv input-VJP", _DWCONV_BACKENDS, _dwconv_check("input-VJP"), "dwconv_bwd_input"),
    OpCheck("dwconv weight-VJP", _DWCONV_BACKENDS, _dwconv_check("weight-VJP"),
            "dwconv_bwd_weight"),
    OpCheck("pc_update", {"cpu": _PC_BACKENDS, "cuda": _PC_BACKENDS}, _pc_update_check),
    OpCheck("bn_relu_vjp", {"cpu": _BN_BACKENDS, "cuda": _BN_BACKENDS}, _bn_relu_vjp_check),
]
