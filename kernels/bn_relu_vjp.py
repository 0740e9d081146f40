"""Triton kernels of the fused BatchNorm(train) + ReLU input-VJP (``pcfast.ops.bn_relu_vjp``).

Forward (saved from the feedforward pass): ``xhat = (z - mean_c) * invstd_c``,
``out = relu(gamma_c * xhat + beta_c)``. Given ``g = dL/d out``, with ``dy = g * [out > 0]`` and
``M = N * H * W`` elements per channel, the input-VJP of training-mode BatchNorm is::

    dz = gamma_c * invstd_c * (dy - sum_c(dy) / M - xhat * sum_c(dy * xhat) / M)

Two phases: :func:`_bn_relu_vjp_reduce_kernel` writes per-tile partial channel sums of ``dy`` and
``dy * xhat``; the launcher folds them into two per-channel coefficients; then
:func:`_bn_relu_vjp_kernel` computes ``dz`` elementwise. Both work on tiles of
``BLOCK_M`` rows (``m = n * HW + hw``) by ``BLOCK_C`` channels addressed through strides, so
NCHW (rows contiguous) and channels_last (channels contiguous) layouts are read in place.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pcfast.kernels import for_device, sum_combine


@triton.jit
def _bn_relu_vjp_reduce_kernel(
    # pointers
    g_ptr, out_ptr, z_ptr, mean_ptr, invstd_ptr, psum_dy_ptr, psum_dyx_ptr,
    # sizes
    M, C, HW,
    # strides (elements)
    stride_n, stride_c, stride_hw,
    # constexpr
    ACC_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    row_off = (rows // HW) * stride_n + (rows % HW) * stride_hw
    offs = row_off[:, None] + cols[None, :] * stride_c
    mask = (rows < M)[:, None] & (cols < C)[None, :]
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    out = tl.load(out_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    mean = tl.load(mean_ptr + cols, mask=cols < C, other=0.0).to(ACC_DTYPE)
    invstd = tl.load(invstd_ptr + cols, mask=cols < C, other=0.0).to(ACC_DTYPE)
    dy = tl.where(out > 0, g, 0.0)
    xhat = (z - mean[None, :]) * invstd[None, :]
    dyx = tl.where(mask, dy * xhat, 0.0)
    part = pid_m * C + cols
    tl.store(psum_dy_ptr + part, tl.reduce(dy, 0, sum_combine), mask=cols < C)
    tl.store(psum_dyx_ptr + part, tl.reduce(dyx, 0, sum_combine), mask=cols < C)


@triton.jit
def _bn_relu_vjp_kernel(
    # pointers
    g_ptr, out_ptr, z_ptr, mean_ptr, invstd_ptr, scale_ptr, k1_ptr, k2_ptr, dz_ptr,
    # sizes
    M, C, HW,
    # strides (elements): inputs, then the output
    stride_n, stride_c, stride_hw, dz_stride_n, dz_stride_c, dz_stride_hw,
    # constexpr
    ACC_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    n_idx = rows // HW
    hw_idx = rows % HW
    offs = (n_idx * stride_n + hw_idx * stride_hw)[:, None] + cols[None, :] * stride_c
    dz_offs = (n_idx * dz_stride_n + hw_idx * dz_stride_hw)[:, None] + cols[None, :] * dz_stride_c
    cmask = cols < C
    mask = (rows < M)[:, None] & cmask[None, :]
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    out = tl.load(out_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0).to(ACC_DTYPE)
    invstd = tl.load(invstd_ptr + cols, mask=cmask, other=0.0).to(ACC_DTYPE)
    scale = tl.load(scale_ptr + cols, mask=cmask, other=0.0).to(ACC_DTYPE)
    k1 = tl.load(k1_ptr + cols, mask=cmask, other=0.0).to(ACC_DTYPE)
    k2 = tl.load(k2_ptr + cols, mask=cmask, other=0.0).to(ACC_DTYPE)
    dy = tl.where(out > 0, g, 0.0)
    xhat = (z - mean[None, :]) * invstd[None, :]
    dz = scale[None, :] * (dy - k1[None, :] - xhat * k2[None, :])
    tl.store(dz_ptr + dz_offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)


def _nc_hw_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """``(stride_n, stride_c, stride_hw)`` of an ``(N, C, H, W)`` tensor whose H and W flatten."""
    sn, sc, sh, sw = t.stride()
    if t.shape[2] > 1 and sh != t.shape[3] * sw:
        raise ValueError("H and W do not flatten into one stride; pass a contiguous tensor")
    return sn, sc, sw


def _bn_relu_vjp_bwd(g: torch.Tensor, z: torch.Tensor, out: torch.Tensor,
                     weight: torch.Tensor | None, mean: torch.Tensor, invstd: torch.Tensor,
                     block_m: int = 64, block_c: int = 16) -> torch.Tensor:
    """Launch both phases. ``g``, ``z``, ``out``: ``(N, C, H, W)`` with one common layout whose
    H, W flatten (NCHW or channels_last); ``weight``, ``mean``, ``invstd``: ``(C,)``.
    Returns ``dz`` ``(N, C, H, W)`` in the layout of ``g``.
    """
    n, c, h, w = g.shape
    hw, m = h * w, n * h * w
    acc = torch.float64 if g.dtype == torch.float64 else torch.float32
    acc_tl = tl.float64 if acc == torch.float64 else tl.float32
    strides = _nc_hw_strides(g)
    grid = (triton.cdiv(m, block_m), triton.cdiv(c, block_c))
    psum_dy = torch.empty(grid[0], c, dtype=acc, device=g.device)
    psum_dyx = torch.empty(grid[0], c, dtype=acc, device=g.device)
    mean = mean.to(acc).contiguous()
    invstd = invstd.to(acc).contiguous()
    for_device(_bn_relu_vjp_reduce_kernel, g.device)[grid](
        g, out, z, mean, invstd, psum_dy, psum_dyx,
        m, c, hw, *strides,
        ACC_DTYPE=acc_tl, BLOCK_M=block_m, BLOCK_C=block_c,
    )
    gamma = weight.to(acc) if weight is not None else torch.ones_like(mean)
    scale = (gamma * invstd).contiguous()
    k1 = (psum_dy.sum(0) / m).contiguous()
    k2 = (psum_dyx.sum(0) / m).contiguous()
    dz = torch.empty_like(g)
    for_device(_bn_relu_vjp_kernel, g.device)[grid](
        g, out, z, mean, invstd, scale, k1, k2, dz,
        m, c, hw, *strides, *_nc_hw_strides(dz),
        ACC_DTYPE=acc_tl, BLOCK_M=block_m, BLOCK_C=block_c,
    )
    return dz
