"""Triton kernels of the fast PC backend's relax ops on CUDA (``pcfast.ops.pc_relax``,
``pcfast.ops.vjp_relax``): one elementwise pass per op, each the last writer of the node(s) it
updates.

``_relax_kernel`` (``pc_relax``, ``add_relu_vjp_relax``, and the epilogue of the VJP ops)::

    b = b0 * [not dead] (HAS_DEAD)      g <- b (STORE_G, the masked error add_relu returns)
    b = clamp(b + b1 + b2 + b3)         out <- lerp(e, b, rate)    (out <- b at rate 1)

``_concat_relax_kernel`` (``concat_relu_vjp_relax``): one pass over the merge node's error
``(N, Ca + Cb, H, W)``; each element is masked, then relaxes parent ``a`` (channels ``< Ca``) or
parent ``b`` (the rest) at its own index.

``lerp`` is evaluated as ``torch.lerp`` does (``e + w (b - e)`` for ``w < 0.5``, else
``b - (b - e)(1 - w)``); sums are taken in ``ACC_DTYPE`` (float32, float64 for float64 tensors).
All tensors are contiguous and of one shape (``dead``: bool); the launchers check it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pcfast.kernels import for_device, scalar_parts

BLOCK_SIZE = 1024


@triton.jit
def _relax_kernel(
    # pointers
    e_ptr, out_ptr, b0_ptr, b1_ptr, b2_ptr, b3_ptr, dead_ptr, g_ptr,
    # sizes
    n_elements,
    # scalars, each as three float32 parts hi + mid + lo (exact for float64 tensors)
    rate_hi, rate_mid, rate_lo, clamp_hi, clamp_mid, clamp_lo,
    # constexpr
    NB: tl.constexpr, HAS_DEAD: tl.constexpr, STORE_G: tl.constexpr, HAS_CLAMP: tl.constexpr,
    RATE_ONE: tl.constexpr, LERP_HIGH: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < n_elements
    rate = tl.cast(rate_hi, ACC_DTYPE) + tl.cast(rate_mid, ACC_DTYPE)
    rate = rate + tl.cast(rate_lo, ACC_DTYPE)
    clamp_val = tl.cast(clamp_hi, ACC_DTYPE) + tl.cast(clamp_mid, ACC_DTYPE)
    clamp_val = clamp_val + tl.cast(clamp_lo, ACC_DTYPE)
    b = tl.load(b0_ptr + offs, mask=mask, other=0.0)
    if HAS_DEAD:
        dead = tl.load(dead_ptr + offs, mask=mask, other=1)
        b = tl.where(dead != 0, 0.0, b)
    if STORE_G:
        tl.store(g_ptr + offs, b.to(g_ptr.dtype.element_ty), mask=mask)
    b = b.to(ACC_DTYPE)
    if NB > 1:
        b = b + tl.load(b1_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    if NB > 2:
        b = b + tl.load(b2_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    if NB > 3:
        b = b + tl.load(b3_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    if HAS_CLAMP:
        b = tl.minimum(tl.maximum(b, -clamp_val), clamp_val)
    e = tl.load(e_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    # lerp inline (a helper @triton.jit is not callable from an interpreted kernel)
    if RATE_ONE:
        new = b
    elif LERP_HIGH:
        new = b - (b - e) * (1.0 - rate)
    else:
        new = e + rate * (b - e)
    tl.store(out_ptr + offs, new.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _concat_relax_kernel(
    # pointers: the merge's error and mask (N, Ca + Cb, H, W); parents a (N, Ca, ...), b
    e_ptr, dead_ptr, ea_ptr, eb_ptr, outa_ptr, outb_ptr,
    # sizes: elements of e; per-sample elements of a (Ca * HW) and of b (Cb * HW)
    n_elements, a_numel, b_numel,
    # scalars, each as three float32 parts hi + mid + lo
    rate_hi, rate_mid, rate_lo, clamp_hi, clamp_mid, clamp_lo,
    # constexpr
    HAS_CLAMP: tl.constexpr, RATE_ONE: tl.constexpr, LERP_HIGH: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < n_elements
    rate = tl.cast(rate_hi, ACC_DTYPE) + tl.cast(rate_mid, ACC_DTYPE)
    rate = rate + tl.cast(rate_lo, ACC_DTYPE)
    clamp_val = tl.cast(clamp_hi, ACC_DTYPE) + tl.cast(clamp_mid, ACC_DTYPE)
    clamp_val = clamp_val + tl.cast(clamp_lo, ACC_DTYPE)
    row = a_numel + b_numel
    n = offs // row
    r = offs % row
    is_a = r < a_numel
    a_idx = n * a_numel + r
    b_idx = n * b_numel + (r - a_numel)
    mask_a = mask & is_a
    mask_b = mask & (r >= a_numel)
    g = tl.load(e_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    dead = tl.load(dead_ptr + offs, mask=mask, other=1)
    g = tl.where(dead != 0, 0.0, g)
    if HAS_CLAMP:
        g = tl.minimum(tl.maximum(g, -clamp_val), clamp_val)
    ea = tl.load(ea_ptr + a_idx, mask=mask_a, other=0.0).to(ACC_DTYPE)
    eb = tl.load(eb_ptr + b_idx, mask=mask_b, other=0.0).to(ACC_DTYPE)
    e = tl.where(is_a, ea, eb)
    if RATE_ONE:
        new = g
    elif LERP_HIGH:
        new = g - (g - e) * (1.0 - rate)
    else:
        new = e + rate * (g - e)
    tl.store(outa_ptr + a_idx, new.to(outa_ptr.dtype.element_ty), mask=mask_a)
    tl.store(outb_ptr + b_idx, new.to(outb_ptr.dtype.element_ty), mask=mask_b)


def _acc_tl(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32



def _flags(rate: float, clamp: float | None, dtype: torch.dtype) -> dict:
    return dict(HAS_CLAMP=clamp is not None, RATE_ONE=rate == 1.0, LERP_HIGH=rate >= 0.5,
                ACC_DTYPE=_acc_tl(dtype))


def fits(*tensors: torch.Tensor | None) -> bool:
    """Whether the kernels take these tensors: contiguous, one shape, one device (``None``
    entries are skipped; bool tensors may differ in dtype only)."""
    ts = [t for t in tensors if t is not None]
    first = ts[0]
    return all(t.is_contiguous() and t.shape == first.shape and t.device == first.device
               for t in ts)


def relax_fwd(e: torch.Tensor, backs: list[torch.Tensor], rate: float, clamp: float | None,
              out: torch.Tensor, dead: torch.Tensor | None = None,
              g: torch.Tensor | None = None, block: int = BLOCK_SIZE) -> None:
    """Launch :func:`_relax_kernel`: ``out = lerp(e, clamp(sum(backs)), rate)``, ``backs[0]``
    masked by ``~dead`` when ``dead`` is given and then stored into ``g`` when ``g`` is given.

    Shapes: every tensor contiguous with ``e``'s shape; 1 to 4 ``backs``.
    """
    if not 1 <= len(backs) <= 4:
        raise ValueError(f"relax_fwd takes 1 to 4 propagated errors, got {len(backs)}")
    n = e.numel()
    pad = list(backs) + [backs[0]] * (4 - len(backs))
    grid = (max(1, triton.cdiv(n, block)),)
    for_device(_relax_kernel, e.device)[grid](
        e, out, *pad, dead if dead is not None else e, g if g is not None else out,
        n, *scalar_parts(rate), *scalar_parts(clamp),
        NB=len(backs), HAS_DEAD=dead is not None, STORE_G=g is not None,
        BLOCK=block, **_flags(rate, clamp, e.dtype),
    )


def concat_relax_fwd(e: torch.Tensor, dead: torch.Tensor, e_a: torch.Tensor, e_b: torch.Tensor,
                     rate: float, clamp: float | None, out_a: torch.Tensor,
                     out_b: torch.Tensor, block: int = BLOCK_SIZE) -> None:
    """Launch :func:`_concat_relax_kernel` (all tensors contiguous ``(N, C, H, W)``)."""
    n = e.numel()
    grid = (max(1, triton.cdiv(n, block)),)
    for_device(_concat_relax_kernel, e.device)[grid](
        e, dead, e_a, e_b, out_a, out_b,
        n, e_a[0].numel(), e_b[0].numel(), *scalar_parts(rate), *scalar_parts(clamp),
        BLOCK=block, **_flags(rate, clamp, e.dtype),
    )
