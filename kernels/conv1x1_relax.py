"""Triton kernel of ``conv1x1_vjp_relax`` on CUDA: the 1x1 conv's input-VJP with the PC update of
the node it feeds as epilogue, in one launch (``pcfast.ops.vjp_relax``).

Per sample ``n`` the VJP is a matmul over channels, ``gx[n] = wt @ g[n]`` (``wt`` ``(C_in,
C_out)``, ``g[n]`` ``(C_out, H*W)``); each program computes a ``BM x BN`` tile of it (input
channels x pixels) in float32, looping over ``C_out`` in ``BK`` chunks, and writes

    out[n] = lerp(e[n], clamp(gx[n] + other[n]), rate)        (out = clamp(...) at rate 1)

for the tile, so ``gx`` is never stored (the unfused form writes it and reads it back). Tiles are
widened to float32 (exact for half and bfloat16) and multiplied at IEEE precision (no TF32, like
PyTorch's default float32 matmul); the result rounds once, at the end. Float64 is not taken (the op runs its
reference there). Every tensor contiguous; the launcher's caller checks it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pcfast.kernels import for_device, scalar_parts

BM, BN, BK = 32, 64, 32


@triton.jit
def _conv1x1_relax_kernel(
    # pointers: wt (C_in, C_out); g (N, C_out, HW); e, other, out (N, C_in, HW)
    wt_ptr, g_ptr, e_ptr, other_ptr, out_ptr,
    # sizes
    C_in, C_out, HW,
    # scalars, each as three float32 parts hi + mid + lo
    rate_hi, rate_mid, rate_lo, clamp_hi, clamp_mid, clamp_lo,
    # constexpr
    HAS_OTHER: tl.constexpr, HAS_CLAMP: tl.constexpr, RATE_ONE: tl.constexpr,
    LERP_HIGH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_STEPS: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(2).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    rows = rm < C_in
    cols = rn < HW
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    g_base = g_ptr + n * C_out * HW
    # K_STEPS = cdiv(C_out, BLOCK_K) as a constexpr bound: older Triton interpreters cannot take
    # a runtime scalar as a range bound (they call int() on a one-element array), and a
    # for loop, unlike a while loop, can be software-pipelined when compiled
    for kk in range(K_STEPS):
        rk = kk * BLOCK_K + tl.arange(0, BLOCK_K)
        inner = rk < C_out
        a = tl.load(wt_ptr + rm[:, None] * C_out + rk[None, :],
                    mask=rows[:, None] & inner[None, :], other=0.0)
        b = tl.load(g_base + rk[:, None].to(tl.int64) * HW + rn[None, :],
                    mask=inner[:, None] & cols[None, :], other=0.0)
        # float32 products of float32 (or exactly widened half/bfloat16) values, no TF32
        acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    at = n * C_in * HW + rm[:, None].to(tl.int64) * HW + rn[None, :]
    inside = rows[:, None] & cols[None, :]
    rate = tl.cast(rate_hi, tl.float32) + tl.cast(rate_mid, tl.float32)
    rate = rate + tl.cast(rate_lo, tl.float32)
    b = acc
    if HAS_OTHER:
        b = b + tl.load(other_ptr + at, mask=inside, other=0.0).to(tl.float32)
    if HAS_CLAMP:
        clamp_val = tl.cast(clamp_hi, tl.float32) + tl.cast(clamp_mid, tl.float32)
        clamp_val = clamp_val + tl.cast(clamp_lo, tl.float32)
        b = tl.minimum(tl.maximum(b, -clamp_val), clamp_val)
    e = tl.load(e_ptr + at, mask=inside, other=0.0).to(tl.float32)
    # lerp inline, as in kernels/relax.py (a helper @triton.jit is not callable from an
    # interpreted kernel)
    if RATE_ONE:
        new = b
    elif LERP_HIGH:
        new = b - (b - e) * (1.0 - rate)
    else:
        new = e + rate * (b - e)
    tl.store(out_ptr + at, new.to(out_ptr.dtype.element_ty), mask=inside)


def takes(*tensors: torch.Tensor | None) -> bool:
    """Whether the kernel takes these tensors: contiguous, float32/float16/bfloat16, one
    device (``None`` entries skipped)."""
    ts = [t for t in tensors if t is not None]
    return all(t.is_contiguous() and t.dtype in (torch.float32, torch.float16, torch.bfloat16)
               and t.dtype == ts[0].dtype and t.device == ts[0].device for t in ts)


def conv1x1_relax_fwd(g: torch.Tensor, wt: torch.Tensor, e: torch.Tensor,
                      other: torch.Tensor | None, rate: float, clamp: float | None,
                      out: torch.Tensor, blocks: tuple[int, int, int] = (BM, BN, BK)) -> None:
    """Launch :func:`_conv1x1_relax_kernel` (shapes as ``conv1x1_vjp_relax``: ``g`` ``(N, C_out,
    H, W)``, ``wt`` ``(C_in, C_out)``, ``e``/``other``/``out`` ``(N, C_in, H, W)``).
    ``blocks``: ``(BM, BN, BK)``, powers of two, each at least 16."""
    n, c_out, h, w = g.shape
    c_in, hw = wt.shape[0], h * w
    bm, bn, bk = blocks
    grid = (n, triton.cdiv(c_in, bm), triton.cdiv(hw, bn))
    for_device(_conv1x1_relax_kernel, g.device)[grid](
        wt, g, e, other if other is not None else e, out,
        c_in, c_out, hw, *scalar_parts(rate), *scalar_parts(clamp),
        HAS_OTHER=other is not None, HAS_CLAMP=clamp is not None, RATE_ONE=rate == 1.0,
        LERP_HIGH=rate >= 0.5,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, K_STEPS=triton.cdiv(c_out, bk),
    )
