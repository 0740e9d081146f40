"""Fused input-VJP of Res-DualNet's depthwise sub-layer ``ReLU(BN_train(dual_path_dwconv(x)))``.

``dw_bn_relu_vjp(g, z, dead, gamma, mean, invstd, weight, stride, in_h, in_w)`` returns
``dx = dwconv_bwd_input(bn_relu_vjp(g))``: the ReLU mask (``dead = out <= 0``, a bool tensor
derived once per batch), the training-BatchNorm VJP with the batch statistics ``mean``,
``invstd`` of the conv output ``z``, and the transposed dual-path depthwise conv (summed
kernel), in one op. ``dw_bn_relu_vjp_relax(..., e, other, rate, clamp, out)`` adds the PC
update of the node it feeds as epilogue: ``out = lerp(e, clamp(dx + other), rate)`` (the fast
backend calls it when this VJP is the last contribution to that node); with ``other_dead`` the
summand is ``other * ~other_dead`` (a ReLU merge's error and mask, read here instead of a
masked copy stored by the merge).

Backends: C++ on CPU (``pcfast._C``, one pass per plane after a per-channel reduction; the
PyTorch reference when the extension is missing or stale); on CUDA two Triton passes, each a
registered op of :mod:`pcfast.ops.dw_bn_relu_passes` (a per-channel reduction, then the
transposed depthwise conv forming the BatchNorm VJP on the fly, with the relax epilogue), for
NCHW-contiguous tensors; the PyTorch composition otherwise.

Registered ops: ``pcfast::dw_bn_relu_vjp`` (returns ``dx``) and ``pcfast::dw_bn_relu_vjp_relax``
(mutates ``out``).
"""

from __future__ import annotations

import torch

from pcfast.ops import _ext
from pcfast.ops.dw_bn_relu_passes import triton_fits
from pcfast.ops.dwconv import dual_path_dwconv_ref, summed_kernel
from pcfast.ops.pc_relax import pc_relax_ref

__all__ = ["dw_bn_relu_vjp", "dw_bn_relu_vjp_ref", "dw_bn_relu_vjp_relax",
           "dw_bn_relu_vjp_relax_ref"]


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _bn_relu_masked(g, z, dead, gamma, mean, invstd) -> torch.Tensor:
    """Closed-form training BN VJP of ``g`` masked by ``~dead`` (accumulated in float32/64)."""
    acc = _acc(g.dtype)
    dy = g.masked_fill(dead, 0.0).to(acc)
    shape = (1, -1, 1, 1)
    xhat = (z.to(acc) - mean.to(acc).view(shape)) * invstd.to(acc).view(shape)
    m = g.shape[0] * g.shape[2] * g.shape[3]
    k1 = dy.sum((0, 2, 3)) / m
    k2 = (dy * xhat).sum((0, 2, 3)) / m
    scale = invstd.to(acc) if gamma is None else gamma.to(acc) * invstd.to(acc)
    return (scale.view(shape) * (dy - k1.view(shape) - xhat * k2.view(shape))).to(g.dtype)


def _dwconv_input(dz, weight, stride, in_h, in_w) -> torch.Tensor:
    if _ext.has_kernel("dwconv_bwd_input", dz.device.type):
        return torch.ops.pcfast.dwconv_bwd_input(dz, weight, stride, in_h, in_w)
    c = dz.shape[1]
    return torch.nn.grad.conv2d_input((dz.shape[0], c, in_h, in_w), summed_kernel(weight), dz,
                                      stride=stride, padding=1, groups=c)


def _composite(g, z, dead, gamma, mean, invstd, weight, stride, in_h, in_w) -> torch.Tensor:
    return _dwconv_input(_bn_relu_masked(g, z, dead, gamma, mean, invstd), weight, stride,
                         in_h, in_w)


def dw_bn_relu_vjp_ref(g: torch.Tensor, z: torch.Tensor, dead: torch.Tensor,
                       gamma: torch.Tensor | None, beta: torch.Tensor | None, weight: torch.Tensor,
                       x: torch.Tensor, stride: int, eps: float = 1e-5) -> torch.Tensor:
    """Oracle: autograd of ``relu(batch_norm_train(dual_path_dwconv_ref(x, weight)))`` w.r.t.
    ``x`` along ``g`` (``dead`` is unused: the oracle derives its own mask; kept so that the
    signature reads like the op's).

    Example::

        dx = dw_bn_relu_vjp_ref(g, z, dead, bn.weight, bn.bias, conv.weight, x, stride=2)
    """
    del dead
    with torch.enable_grad():
        xx = x.detach().requires_grad_(True)
        zz = dual_path_dwconv_ref(xx, weight.detach(), stride)
        y = torch.relu(torch.nn.functional.batch_norm(zz, None, None, gamma, beta,
                                                      training=True, eps=eps))
        (dx,) = torch.autograd.grad(y, xx, g)
    return dx


def dw_bn_relu_vjp_relax_ref(g, z, dead, gamma, mean, invstd, weight, stride, e, other, rate,
                             clamp, out, other_dead=None) -> None:
    """Reference of :func:`dw_bn_relu_vjp_relax`: the unfused ops, one after the other."""
    dx = _composite(g, z, dead, gamma, mean, invstd, weight, stride, e.shape[2], e.shape[3])
    if other is not None and other_dead is not None:
        other = other.masked_fill(other_dead, 0.0)
    pc_relax_ref(e, [dx] if other is None else [dx, other], rate, clamp, out)


def _use_cpp(*tensors: torch.Tensor | None) -> bool:
    """The C++ kernel takes contiguous CPU tensors of one dtype (``dead``: bool)."""
    t = tensors[0]
    return (t.device.type == "cpu" and _ext.has_kernel("dw_bn_relu_vjp_cpu", "cpu")
            and all(x is None or (x.is_contiguous() and x.dtype in (t.dtype, torch.bool))
                    for x in tensors))


@torch.library.custom_op("pcfast::dw_bn_relu_vjp", mutates_args=())
def _dw_bn_relu_vjp_op(g: torch.Tensor, z: torch.Tensor, dead: torch.Tensor,
                       gamma: torch.Tensor | None, mean: torch.Tensor, invstd: torch.Tensor,
                       weight: torch.Tensor, stride: int, in_h: int, in_w: int) -> torch.Tensor:
    if _use_cpp(g, z, dead, weight):
        return torch.ops.pcfast.dw_bn_relu_vjp_cpu(g, z, dead, gamma, mean, invstd, weight,
                                                   stride, in_h, in_w)
    return _composite(g, z, dead, gamma, mean, invstd, weight, stride, in_h, in_w)


@_dw_bn_relu_vjp_op.register_fake
def _dw_bn_relu_vjp_fake(g, z, dead, gamma, mean, invstd, weight, stride, in_h, in_w):
    return g.new_empty((g.shape[0], g.shape[1], in_h, in_w))


@torch.library.custom_op("pcfast::dw_bn_relu_vjp_relax", mutates_args=("out",))
def _dw_bn_relu_vjp_relax_op(g: torch.Tensor, z: torch.Tensor, dead: torch.Tensor,
                             gamma: torch.Tensor | None, mean: torch.Tensor,
                             invstd: torch.Tensor, weight: torch.Tensor, stride: int,
                             e: torch.Tensor, other: torch.Tensor | None, rate: float,
                             clamp: float | None, out: torch.Tensor,
                             other_dead: torch.Tensor | None = None) -> None:
    if _use_cpp(g, z, dead, weight, e, other, out, other_dead):
        torch.ops.pcfast.dw_bn_relu_vjp_relax_cpu(g, z, dead, gamma, mean, invstd, weight,
                                                  stride, e, other, other_dead, rate, clamp, out)
        return
    dw_bn_relu_vjp_relax_ref(g, z, dead, gamma, mean, invstd, weight, stride, e, other, rate,
                             clamp, out, other_dead)


@_dw_bn_relu_vjp_relax_op.register_fake
def _dw_bn_relu_vjp_relax_fake(g, z, dead, gamma, mean, invstd, weight, stride, e, other, rate,
                               clamp, out, other_dead=None) -> None:
    return None


# ---------------------------------------------------- CUDA: two Triton passes (ops)
def dw_bn_relu_vjp_cuda(g, z, dead, gamma, mean, invstd, weight, stride, in_h, in_w):
    """What CUDA runs for ``pcfast::dw_bn_relu_vjp``: ``bn_relu_partials``, then
    ``dw_bn_relu_apply`` into a new tensor (the composition for non-contiguous tensors)."""
    if not triton_fits(g, z, dead, weight):
        return _composite(g, z, dead, gamma, mean, invstd, weight, stride, in_h, in_w)
    dx = g.new_empty((g.shape[0], g.shape[1], in_h, in_w))
    part = torch.ops.pcfast.bn_relu_partials(g, z, dead, mean, invstd)
    torch.ops.pcfast.dw_bn_relu_apply(g, z, dead, gamma, mean, invstd, part, weight, stride, None,
                                      None, 1.0, None, dx)
    return dx


def dw_bn_relu_vjp_relax_cuda(g, z, dead, gamma, mean, invstd, weight, stride, e, other, rate,
                              clamp, out, other_dead=None) -> None:
    """What CUDA runs for ``pcfast::dw_bn_relu_vjp_relax``: ``bn_relu_partials``, then
    ``dw_bn_relu_apply`` with the relax epilogue (the reference for non-contiguous tensors)."""
    if not triton_fits(g, z, dead, weight, e, other, out, other_dead):
        dw_bn_relu_vjp_relax_ref(g, z, dead, gamma, mean, invstd, weight, stride, e, other, rate,
                                 clamp, out, other_dead)
        return
    part = torch.ops.pcfast.bn_relu_partials(g, z, dead, mean, invstd)
    torch.ops.pcfast.dw_bn_relu_apply(g, z, dead, gamma, mean, invstd, part, weight, stride, e,
                                      other, rate, clamp, out, other_dead)


@_dw_bn_relu_vjp_op.register_kernel("cuda")
def _dw_bn_relu_vjp_cuda(g, z, dead, gamma, mean, invstd, weight, stride, in_h, in_w):
    return dw_bn_relu_vjp_cuda(g, z, dead, gamma, mean, invstd, weight, stride, in_h, in_w)


@_dw_bn_relu_vjp_relax_op.register_kernel("cuda")
def _dw_bn_relu_vjp_relax_cuda(g, z, dead, gamma, mean, invstd, weight, stride, e, other, rate,
                               clamp, out, other_dead=None):
    dw_bn_relu_vjp_relax_cuda(g, z, dead, gamma, mean, invstd, weight, stride, e, other, rate,
                              clamp, out, other_dead)


# What CUDA runs for each op as several launches: bench/cost.py counts these (two registered
# passes each), not one op, for a GPU's step.
CUDA_COMPOSITES = {"pcfast::dw_bn_relu_vjp": dw_bn_relu_vjp_cuda,
                   "pcfast::dw_bn_relu_vjp_relax": dw_bn_relu_vjp_relax_cuda}

# Destinations every backend only writes (see pcfast.ops.write_only_args).
WRITE_ONLY = {"pcfast::dw_bn_relu_vjp_relax": ("out",)}


def _check(g, z, dead, weight, stride) -> None:
    if g.dim() != 4:
        raise ValueError(f"dw_bn_relu_vjp expects (N, C, H, W) tensors, got g of shape "
                         f"{tuple(g.shape)}")
    if z.shape != g.shape or dead.shape != g.shape or dead.dtype != torch.bool:
        raise ValueError("dw_bn_relu_vjp: z must have g's shape and dead must be a bool tensor "
                         "of g's shape (the saved ReLU mask out <= 0)")
    if weight.shape != (2 * g.shape[1], 1, 3, 3):
        raise ValueError(f"dw_bn_relu_vjp: weight must be (2C, 1, 3, 3) = "
                         f"{(2 * g.shape[1], 1, 3, 3)}, got {tuple(weight.shape)}")
    if stride not in (1, 2):
        raise ValueError(f"dw_bn_relu_vjp supports stride 1 or 2, got {stride}")


def dw_bn_relu_vjp(g: torch.Tensor, z: torch.Tensor, dead: torch.Tensor,
                   gamma: torch.Tensor | None, mean: torch.Tensor, invstd: torch.Tensor,
                   weight: torch.Tensor, stride: int, in_h: int, in_w: int) -> torch.Tensor:
    """Input-VJP of ``ReLU(BN_train(dual_path_dwconv(x, weight, stride)))`` along ``g``.

    Args:
        g: ``(N, C, Ho, Wo)`` gradient w.r.t. the ReLU output.
        z: ``(N, C, Ho, Wo)`` the conv output (BatchNorm input) of the feedforward pass.
        dead: ``(N, C, Ho, Wo)`` bool, ``relu_out <= 0``.
        gamma: ``(C,)`` BatchNorm weight or None; mean, invstd: ``(C,)`` batch statistics of z.
        weight: ``(2C, 1, 3, 3)`` dual-path kernel; stride: 1 or 2; in_h, in_w: input size.

    Returns:
        ``dx`` ``(N, C, in_h, in_w)`` in ``g``'s dtype.

    Example::

        dx = dw_bn_relu_vjp(g, z, out <= 0, bn.weight, mean, invstd, conv.weight, 1, 32, 32)
    """
    _check(g, z, dead, weight, stride)
    return _dw_bn_relu_vjp_op(g, z, dead, gamma, mean, invstd, weight, int(stride), int(in_h),
                              int(in_w))


def dw_bn_relu_vjp_relax(g: torch.Tensor, z: torch.Tensor, dead: torch.Tensor,
                         gamma: torch.Tensor | None, mean: torch.Tensor, invstd: torch.Tensor,
                         weight: torch.Tensor, stride: int, e: torch.Tensor,
                         other: torch.Tensor | None, rate: float, clamp: float | None,
                         out: torch.Tensor, other_dead: torch.Tensor | None = None) -> None:
    """:func:`dw_bn_relu_vjp` with the PC update of the node it feeds as epilogue:
    ``out = lerp(e, clamp(dx + other), rate)`` (``out = clamp(dx + other)`` at ``rate == 1``).

    ``e``, ``out`` (and ``other`` if given): ``(N, C, in_h, in_w)`` like ``dx``; ``other_dead``
    (bool, ``other``'s shape): ``other`` counts as ``other * ~other_dead``.

    Example::

        dw_bn_relu_vjp_relax(g, z, dead, gamma, mean, invstd, w, 2, e_in, None, 0.5, None, out)
    """
    _check(g, z, dead, weight, stride)
    if out.shape != e.shape or (other is not None and other.shape != e.shape):
        raise ValueError("dw_bn_relu_vjp_relax: e, out and other must have one shape")
    if other_dead is not None and (other is None or other_dead.shape != other.shape
                                   or other_dead.dtype != torch.bool):
        raise ValueError("dw_bn_relu_vjp_relax: other_dead must be a bool tensor of other's "
                         "shape, and needs other")
    _dw_bn_relu_vjp_relax_op(g, z, dead, gamma, mean, invstd, weight, int(stride), e, other,
                             float(rate), None if clamp is None else float(clamp), out,
                             other_dead)
