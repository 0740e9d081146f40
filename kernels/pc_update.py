"""Triton kernel of the fused PC state update over one flat buffer (``pcfast.ops.pc_update``).

One launch updates every element of a flat buffer that holds the states of all hidden nodes
(the engine keeps them as views of that buffer) and writes one partial energy sum per program;
the launcher reduces the partials with one tiny ``sum``.

Error space (``HAS_MU=False``, the FPA engine's form; ``b = clamp(back)``)::

    e <- lerp(e, b, rate) = e + rate * (b - e)            energy += 0.5 * e_new^2

Value space (``HAS_MU=True``)::

    e = x - mu;  x <- x - rate * (e - b)                  energy += 0.5 * (x_new - mu)^2

``lerp`` is evaluated as ``torch.lerp`` does (``e + w (b - e)`` for ``w < 0.5``, else
``b - (b - e)(1 - w)``) so the kernel reproduces the PyTorch reference to the last bit in float64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pcfast.kernels import for_device, sum_combine

BLOCK_SIZE = 1024


@triton.jit
def _pc_update_kernel(
    # pointers
    state_ptr, back_ptr, mu_ptr, partial_ptr,
    # sizes
    n_elements,
    # scalars
    rate, clamp_val,
    # constexpr
    HAS_MU: tl.constexpr, HAS_CLAMP: tl.constexpr, LERP_HIGH: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < n_elements
    s = tl.load(state_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    b = tl.load(back_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    if HAS_CLAMP:
        b = tl.minimum(tl.maximum(b, -clamp_val), clamp_val)
    if HAS_MU:
        mu = tl.load(mu_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
        e = s - mu
        new = s - rate * (e - b)
        new_store = new.to(state_ptr.dtype.element_ty)
        e_new = new_store.to(ACC_DTYPE) - mu
    else:
        new = b - (b - s) * (1.0 - rate) if LERP_HIGH else s + rate * (b - s)
        new_store = new.to(state_ptr.dtype.element_ty)
        e_new = new_store.to(ACC_DTYPE)
    tl.store(state_ptr + offs, new_store, mask=mask)
    e_new = tl.where(mask, e_new, 0.0)
    tl.store(partial_ptr + pid, 0.5 * tl.reduce(e_new * e_new, 0, sum_combine))


def _pc_update_fwd(state: torch.Tensor, back: torch.Tensor, mu: torch.Tensor | None,
                   rate: float, clamp: float | None, block: int = BLOCK_SIZE) -> torch.Tensor:
    """Launch :func:`_pc_update_kernel` on flat contiguous buffers; update ``state`` in place.

    Shapes: ``state``, ``back``, ``mu`` contiguous with ``n`` elements each. Returns the energy
    ``0.5 * ||e_new||^2`` as a 0-d tensor, float64 for float64 states, else float32.
    """
    n = state.numel()
    acc = torch.float64 if state.dtype == torch.float64 else torch.float32
    grid = (max(1, triton.cdiv(n, block)),)
    partial = torch.empty(grid[0], dtype=acc, device=state.device)
    kernel = for_device(_pc_update_kernel, state.device)
    kernel[grid](
        state, back, mu if mu is not None else state, partial,
        n,
        float(rate), float(clamp) if clamp is not None else 0.0,
        HAS_MU=mu is not None, HAS_CLAMP=clamp is not None, LERP_HIGH=rate >= 0.5,
        ACC_DTYPE=tl.float64 if acc == torch.float64 else tl.float32, BLOCK=block,
    )
    return partial.sum()
