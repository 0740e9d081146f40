"""Triton kernels of Res-DualNet's depthwise sub-layer input-VJP on CUDA
(``pcfast.ops.dw_bn_relu_vjp``): ``dx = dwconv_bwd_input(bn_relu_vjp(g))`` with the PC update
of the node it feeds as optional epilogue, in two passes over NCHW-contiguous tensors.

1. :func:`_bn_partials_kernel`, grid ``(C, SPLIT)``: per channel, ``SPLIT`` partial sums of
   ``dy = g * [not dead]`` and of ``dy * xhat`` (``xhat = (z - mean) * invstd``) over the
   ``M = N * Ho * Wo`` elements of the channel.
2. :func:`_dw_bn_relu_apply_kernel`, grid ``(N * C, cdiv(H * W, BLOCK))``: each program owns a
   block of one input plane; it folds the channel's partials into ``k1 = sum(dy) / M`` and
   ``k2 = sum(dy * xhat) / M``, and for each input pixel gathers the (up to 9) conv-output
   pixels it feeds, forming ``dz = gamma * invstd * (dy - k1 - xhat * k2)`` on the fly
   (never stored), weighted by the summed dual-path kernel ``w[2c] + w[2c + 1]``. Epilogue
   (``RELAX``): ``out = lerp(e, clamp(dx + other), rate)``; else ``out = dx``.

The transposed conv (padding 1, stride 1 or 2): input pixel ``i`` receives output pixel
``o = (i + 1 - kh) / stride`` when that division is exact and ``0 <= o < Ho``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pcfast.kernels import for_device, scalar_parts, sum_combine

SPLIT = 16
BLOCK_REDUCE = 1024
BLOCK_APPLY = 256


@triton.jit
def _bn_partials_kernel(
    g_ptr, z_ptr, dead_ptr, mean_ptr, invstd_ptr, part_ptr,
    C, HWo, M, chunk,
    ACC_DTYPE: tl.constexpr, SPLIT_: tl.constexpr, BLOCK: tl.constexpr,
):
    c = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1).to(tl.int64)
    mean = tl.load(mean_ptr + c).to(ACC_DTYPE)
    invstd = tl.load(invstd_ptr + c).to(ACC_DTYPE)
    acc_dy = tl.full([BLOCK], 0.0, ACC_DTYPE)
    acc_dyx = tl.full([BLOCK], 0.0, ACC_DTYPE)
    lo = s * chunk
    # a while loop, not range(0, chunk, BLOCK): older Triton interpreters cannot take a
    # runtime scalar as a range bound (they call int() on a one-element array)
    start = 0
    while start < chunk:
        m = lo + start + tl.arange(0, BLOCK).to(tl.int64)
        mask = (m < M) & (m < lo + chunk)
        offs = (m // HWo) * (C * HWo) + c * HWo + (m % HWo)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
        z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
        dead = tl.load(dead_ptr + offs, mask=mask, other=1)
        dy = tl.where(dead != 0, 0.0, g)
        acc_dy += dy
        acc_dyx += dy * ((z - mean) * invstd)
        start += BLOCK
    tl.store(part_ptr + c * SPLIT_ + s, tl.reduce(acc_dy, 0, sum_combine))
    tl.store(part_ptr + (C + c) * SPLIT_ + s, tl.reduce(acc_dyx, 0, sum_combine))


@triton.jit
def _dw_bn_relu_apply_kernel(
    # pointers
    g_ptr, z_ptr, dead_ptr, gamma_ptr, mean_ptr, invstd_ptr, part_ptr, w_ptr,
    e_ptr, other_ptr, other_dead_ptr, out_ptr,
    # sizes: channels, input plane H x W, output plane Ho x Wo, elements per channel
    C, H, W, Ho, Wo, M,
    # scalars, each as three float32 parts hi + mid + lo
    rate_hi, rate_mid, rate_lo, clamp_hi, clamp_mid, clamp_lo,
    # constexpr
    STRIDE: tl.constexpr, HAS_GAMMA: tl.constexpr, RELAX: tl.constexpr,
    HAS_OTHER: tl.constexpr, OTHER_DEAD: tl.constexpr, HAS_CLAMP: tl.constexpr,
    RATE_ONE: tl.constexpr,
    LERP_HIGH: tl.constexpr, ACC_DTYPE: tl.constexpr, SPLIT_: tl.constexpr,
    BLOCK: tl.constexpr,
):
    plane = tl.program_id(0).to(tl.int64)
    c = plane % C
    idx = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    in_plane = idx < H * W
    i = idx // W
    j = idx % W
    # per-channel coefficients
    parts = tl.arange(0, SPLIT_)
    k1 = tl.reduce(tl.load(part_ptr + c * SPLIT_ + parts).to(ACC_DTYPE), 0, sum_combine) / M
    k2 = tl.reduce(tl.load(part_ptr + (C + c) * SPLIT_ + parts).to(ACC_DTYPE), 0,
                   sum_combine) / M
    mean = tl.load(mean_ptr + c).to(ACC_DTYPE)
    invstd = tl.load(invstd_ptr + c).to(ACC_DTYPE)
    scale = invstd
    if HAS_GAMMA:
        scale = tl.load(gamma_ptr + c).to(ACC_DTYPE) * invstd
    src_plane = plane * (Ho * Wo)
    dx = tl.full([BLOCK], 0.0, ACC_DTYPE)
    for kh in tl.static_range(3):
        for kw in tl.static_range(3):
            w = (tl.load(w_ptr + (2 * c) * 9 + kh * 3 + kw).to(ACC_DTYPE)
                 + tl.load(w_ptr + (2 * c + 1) * 9 + kh * 3 + kw).to(ACC_DTYPE))
            oh_num = i + 1 - kh
            ow_num = j + 1 - kw
            valid = in_plane & (oh_num >= 0) & (ow_num >= 0)
            if STRIDE == 2:
                valid = valid & (oh_num % 2 == 0) & (ow_num % 2 == 0)
            oh = oh_num // STRIDE
            ow = ow_num // STRIDE
            valid = valid & (oh < Ho) & (ow < Wo)
            src = src_plane + oh * Wo + ow
            g = tl.load(g_ptr + src, mask=valid, other=0.0).to(ACC_DTYPE)
            z = tl.load(z_ptr + src, mask=valid, other=0.0).to(ACC_DTYPE)
            dead = tl.load(dead_ptr + src, mask=valid, other=1)
            dy = tl.where(dead != 0, 0.0, g)
            dz = scale * (dy - k1 - (z - mean) * invstd * k2)
            dx += tl.where(valid, w * dz, 0.0)
    dst = plane * (H * W) + idx
    if RELAX:
        rate = tl.cast(rate_hi, ACC_DTYPE) + tl.cast(rate_mid, ACC_DTYPE)
        rate = rate + tl.cast(rate_lo, ACC_DTYPE)
        b = dx
        if HAS_OTHER:
            o = tl.load(other_ptr + dst, mask=in_plane, other=0.0)
            if OTHER_DEAD:  # other * [other_dead == 0]: a merge's error under its ReLU mask
                o = tl.where(tl.load(other_dead_ptr + dst, mask=in_plane, other=1) != 0, 0.0, o)
            b = b + o.to(ACC_DTYPE)
        if HAS_CLAMP:
            clamp_val = tl.cast(clamp_hi, ACC_DTYPE) + tl.cast(clamp_mid, ACC_DTYPE)
            clamp_val = clamp_val + tl.cast(clamp_lo, ACC_DTYPE)
            b = tl.minimum(tl.maximum(b, -clamp_val), clamp_val)
        e = tl.load(e_ptr + dst, mask=in_plane, other=0.0).to(ACC_DTYPE)
        if RATE_ONE:
            new = b
        elif LERP_HIGH:
            new = b - (b - e) * (1.0 - rate)
        else:
            new = e + rate * (b - e)
        tl.store(out_ptr + dst, new.to(out_ptr.dtype.element_ty), mask=in_plane)
    else:
        tl.store(out_ptr + dst, dx.to(out_ptr.dtype.element_ty), mask=in_plane)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def bn_partials_fwd(g: torch.Tensor, z: torch.Tensor, dead: torch.Tensor, mean: torch.Tensor,
                    invstd: torch.Tensor, split: int = SPLIT,
                    block: int = BLOCK_REDUCE) -> torch.Tensor:
    """Launch :func:`_bn_partials_kernel`; returns ``(2, C, split)`` partial sums (float32,
    float64 for float64 ``g``) of ``dy`` (``[0]``) and ``dy * xhat`` (``[1]``); ``split`` a
    power of two."""
    n, c, ho, wo = g.shape
    m = n * ho * wo
    acc = acc_dtype(g.dtype)
    part = torch.empty(2, c, split, dtype=acc, device=g.device)
    chunk = triton.cdiv(m, split)
    for_device(_bn_partials_kernel, g.device)[(c, split)](
        g, z, dead, mean.contiguous(), invstd.contiguous(), part,
        c, ho * wo, m, chunk,
        ACC_DTYPE=tl.float64 if acc == torch.float64 else tl.float32, SPLIT_=split, BLOCK=block,
    )
    return part



def dw_bn_relu_apply_fwd(g, z, dead, gamma, mean, invstd, part, weight, stride, e, other, rate,
                         clamp, out, other_dead=None, block: int = BLOCK_APPLY) -> None:
    """Launch :func:`_dw_bn_relu_apply_kernel` into ``out`` ``(N, C, H, W)`` (``e is None``:
    ``out = dx``; else the relax epilogue with ``other`` (masked by ``~other_dead`` when
    given), ``rate``, ``clamp``)."""
    n, c, ho, wo = g.shape
    h, w = out.shape[2], out.shape[3]
    acc = acc_dtype(g.dtype)
    grid = (n * c, triton.cdiv(h * w, block))
    for_device(_dw_bn_relu_apply_kernel, g.device)[grid](
        g, z, dead, gamma if gamma is not None else mean, mean.contiguous(), invstd.contiguous(),
        part, weight.contiguous(),
        e if e is not None else out, other if other is not None else out,
        other_dead if other_dead is not None else dead, out,
        c, h, w, ho, wo, n * ho * wo,
        *scalar_parts(rate if e is not None else 1.0), *scalar_parts(clamp),
        STRIDE=stride, HAS_GAMMA=gamma is not None, RELAX=e is not None,
        HAS_OTHER=other is not None, OTHER_DEAD=other is not None and other_dead is not None,
        HAS_CLAMP=clamp is not None,
        RATE_ONE=e is None or rate == 1.0, LERP_HIGH=e is not None and rate >= 0.5,
        ACC_DTYPE=tl.float64 if acc == torch.float64 else tl.float32, SPLIT_=part.shape[-1],
        BLOCK=block,
    )
