"""``pcfast doctor`` entries for the fused ops of the fast PC backend.

Each op (``pcfast.ops.pc_relax``, ``dw_bn_relu_vjp_relax``, the merge and 1x1-conv relax ops) is
run through its registered op (``auto``: the C++ kernel on CPU where ``pcfast._C`` is current, the
Triton kernels on CUDA) and through its ``*_ref`` on the device, in float32, and compared with the
``*_ref`` in float64 on the CPU, with the tolerance rule of :mod:`pcfast.doctor.ops`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from pcfast.doctor.ops import FP32_EPS, CheckFn, Comparison, OpCheck

SLACK = 16 * FP32_EPS
RATE, CLAMP = 0.5, 0.8
# run(tensors, mode) -> the op's outputs; mode "oracle" (float64 on the CPU, and for the float32
# reference), "reference" (the op's *_ref on the device) or "op" (the registered op).
Outputs = Callable[[dict[str, torch.Tensor], str], list[torch.Tensor]]


def _inputs(seed: int, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in shapes.items()}


def _check(make: Callable[[], dict[str, torch.Tensor]], run: Outputs) -> CheckFn:
    """``run(tensors, mode)`` returns the op's outputs for the float tensors ``tensors``."""
    def check(device: torch.device, backend: str) -> list[Comparison]:
        t64 = make()
        t32 = {k: v.float() if v.is_floating_point() else v for k, v in t64.items()}
        oracle = run(t64, "oracle")
        lowp = run(t32, "oracle")
        on_dev = {k: v.to(device) for k, v in t32.items()}
        got = run(on_dev, "reference" if backend == "reference" else "op")
        return [(g, o, lo, SLACK) for g, o, lo in zip(got, oracle, lowp)]

    return check


def _pc_relax(t: dict[str, torch.Tensor], mode: str) -> list[torch.Tensor]:
    from pcfast import ops

    out = torch.empty_like(t["e"])
    fn = ops.pc_relax_ref if mode != "op" else ops.pc_relax
    fn(t["e"], [t["a"], t["b"]], RATE, CLAMP, out)
    return [out]


def _dw(t: dict[str, torch.Tensor], mode: str) -> list[torch.Tensor]:
    from pcfast.ops import dual_path_dwconv_ref, pc_relax_ref
    from pcfast.ops import dw_bn_relu_vjp as m

    x, weight, stride = t["x"], t["weight"], 2
    gamma, beta = t["gamma"].abs() + 0.5, t["beta"]
    z = dual_path_dwconv_ref(x, weight, stride)
    mean = z.mean((0, 2, 3))
    invstd = torch.rsqrt(z.var((0, 2, 3), unbiased=False) + 1e-5)
    dead = F.batch_norm(z, None, None, gamma, beta, training=True) <= 0
    g = t["g"][:, :, :z.shape[2], :z.shape[3]].contiguous()
    e, other = t["e"], t["other"]
    out = torch.empty_like(e)
    if mode == "oracle":  # autograd through the layer, then the plain update
        dx = m.dw_bn_relu_vjp_ref(g, z, dead, gamma, beta, weight, x, stride)
        pc_relax_ref(e, [dx, other], RATE, CLAMP, out)
        return [out]
    fn = m.dw_bn_relu_vjp_relax_ref if mode == "reference" else m.dw_bn_relu_vjp_relax
    fn(g, z, dead, gamma, mean, invstd, weight, stride, e, other, RATE, CLAMP, out)
    return [out]


def _add(t: dict[str, torch.Tensor], mode: str) -> list[torch.Tensor]:
    from pcfast.ops import vjp_relax as m

    dead = t["merge"] <= 0
    out_a = torch.empty_like(t["e_a"])
    fn = m.add_relu_vjp_relax_ref if mode != "op" else m.add_relu_vjp_relax
    g = fn(t["e"], dead, t["e_a"], RATE, CLAMP, out_a)
    return [out_a, g]


def _concat(t: dict[str, torch.Tensor], mode: str) -> list[torch.Tensor]:
    from pcfast.ops import vjp_relax as m

    dead = t["merge"] <= 0
    out_a, out_b = torch.empty_like(t["e_a"]), torch.empty_like(t["e_b"])
    fn = m.concat_relu_vjp_relax_ref if mode != "op" else m.concat_relu_vjp_relax
    fn(t["e"], dead, t["e_a"], t["e_b"], RATE, CLAMP, out_a, out_b)
    return [out_a, out_b]


def _conv1x1(t: dict[str, torch.Tensor], mode: str) -> list[torch.Tensor]:
    from pcfast.ops import vjp_relax as m

    out = torch.empty_like(t["e"])
    fn = m.conv1x1_vjp_relax_ref if mode != "op" else m.conv1x1_vjp_relax
    fn(t["g"], t["wt"], t["e"], t["other"], RATE, CLAMP, out)
    return [out]


N, C, H, W = 2, 3, 6, 5
_BACKENDS = {"cpu": ("reference", "auto"), "cuda": ("reference", "auto")}

FUSED_CHECKS: list[OpCheck] = [
    OpCheck("pc_relax", _BACKENDS, _check(lambda: _inputs(40, {
        "e": (N, C, H, W), "a": (N, C, H, W), "b": (N, C, H, W)}), _pc_relax)),
    OpCheck("dw_bn_relu_vjp_relax", _BACKENDS, _check(lambda: _inputs(41, {
        "x": (N, C, H, W), "g": (N, C, H, W), "gamma": (C,), "beta": (C,),
        "weight": (2 * C, 1, 3, 3), "e": (N, C, H, W), "other": (N, C, H, W)}), _dw)),
    OpCheck("add_relu_vjp_relax", _BACKENDS, _check(lambda: _inputs(42, {
        "e": (N, C, H, W), "merge": (N, C, H, W), "e_a": (N, C, H, W)}), _add)),
    OpCheck("concat_relu_vjp_relax", _BACKENDS, _check(lambda: _inputs(43, {
        "e": (N, 2 * C, H, W), "merge": (N, 2 * C, H, W), "e_a": (N, C, H, W),
        "e_b": (N, C, H, W)}), _concat)),
    OpCheck("conv1x1_vjp_relax", _BACKENDS, _check(lambda: _inputs(44, {
        "g": (N, 2 * C, H, W), "wt": (C, 2 * C), "e": (N, C, H, W),
        "other": (N, C, H, W)}), _conv1x1)),
]
