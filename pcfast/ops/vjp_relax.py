"""Input-VJPs of PC nodes with the PC update of the node they feed as epilogue.

The fast PC backend calls these when a node's VJP is the last contribution to a parent: the
parent's new error ``out = lerp(e_dest, clamp(J^T e + other), rate)`` is written by the same op,
so the contribution is never stored and re-read by a separate update.

- ``add_relu_vjp_relax(e, dead, e_a, rate, clamp, out_a, store_g=True) -> g``: merge
  ``ReLU(a + b)``: ``g = e * [out > 0]``; parent ``a`` relaxed (``out_a``); ``g`` returned for
  parent ``b`` (``store_g=False``: not stored, an empty tensor returned, where ``b``'s last
  writer reads ``e`` and ``dead`` itself, e.g. ``dw_bn_relu_vjp_relax(..., other_dead=dead)``).
- ``concat_relu_vjp_relax(e, dead, e_a, e_b, rate, clamp, out_a, out_b)``: merge
  ``ReLU(cat(a, b))``: both parents relaxed.
- ``conv1x1_vjp_relax(g, wt, e, other, rate, clamp, out)``: 1x1 stride-1 conv, ``J^T g =
  wt @ g`` per pixel (``wt``: ``(C_in, C_out)``).

CPU: C++ kernels of ``pcfast._C`` (one pass for the merges; matmul + one epilogue pass for the
1x1 conv) when built, else the PyTorch reference (``*_ref``, the unfused ops). CUDA: the Triton
kernels of ``kernels/relax.py`` (one pass for each merge) and ``kernels/conv1x1_relax.py`` (the
1x1 conv's matmul with the relax epilogue, one launch; float64: cuBLAS matmul + the relax pass)
on contiguous tensors, else the reference.
"""

from __future__ import annotations

import torch

from pcfast.ops import _ext
from pcfast.ops.pc_relax import pc_relax_ref, triton_kernels, triton_relax

__all__ = ["add_relu_vjp_relax", "add_relu_vjp_relax_ref", "concat_relu_vjp_relax",
           "concat_relu_vjp_relax_ref", "conv1x1_vjp_relax", "conv1x1_vjp_relax_ref"]


def _cpp(name: str, *tensors: torch.Tensor | None) -> bool:
    t = tensors[0]
    return (t.device.type == "cpu" and _ext.has_kernel(name, "cpu")
            and all(x is None or (x.is_contiguous() and x.dtype in (t.dtype, torch.bool))
                    for x in tensors))


# ----------------------------------------------------------------------------- references
def add_relu_vjp_relax_ref(e, dead, e_a, rate, clamp, out_a, store_g=True) -> torch.Tensor:
    """Reference: ``g = e.masked_fill(dead, 0)``; ``pc_relax(e_a, [g]) -> out_a``; returns g
    (an empty tensor without ``store_g``)."""
    g = e.masked_fill(dead, 0.0)
    pc_relax_ref(e_a, [g], rate, clamp, out_a)
    return g if store_g else e.new_empty(0)


def concat_relu_vjp_relax_ref(e, dead, e_a, e_b, rate, clamp, out_a, out_b) -> None:
    """Reference: mask, split along channels, relax both parents."""
    g = e.masked_fill(dead, 0.0)
    split = e_a.shape[1]
    pc_relax_ref(e_a, [g[:, :split]], rate, clamp, out_a)
    pc_relax_ref(e_b, [g[:, split:]], rate, clamp, out_b)


def conv1x1_vjp_relax_ref(g, wt, e, other, rate, clamp, out) -> None:
    """Reference: ``gx = wt @ g`` per pixel, then ``pc_relax(e, [gx, other]) -> out``."""
    n, _, h, w = g.shape
    gx = torch.matmul(wt, g.reshape(n, g.shape[1], h * w)).view(e.shape)
    pc_relax_ref(e, [gx] if other is None else [gx, other], rate, clamp, out)


# ------------------------------------------------------------------------- registered ops
@torch.library.custom_op("pcfast::add_relu_vjp_relax", mutates_args=("out_a",))
def _add_op(e: torch.Tensor, dead: torch.Tensor, e_a: torch.Tensor, rate: float,
            clamp: float | None, out_a: torch.Tensor, store_g: bool = True) -> torch.Tensor:
    if _cpp("add_relu_vjp_relax_cpu", e, dead, e_a, out_a):
        return torch.ops.pcfast.add_relu_vjp_relax_cpu(e, dead, e_a, rate, clamp, out_a, store_g)
    return add_relu_vjp_relax_ref(e, dead, e_a, rate, clamp, out_a, store_g)


@_add_op.register_fake
def _add_fake(e, dead, e_a, rate, clamp, out_a, store_g=True) -> torch.Tensor:
    return torch.empty_like(e) if store_g else e.new_empty(0)


@torch.library.custom_op("pcfast::concat_relu_vjp_relax", mutates_args=("out_a", "out_b"))
def _concat_op(e: torch.Tensor, dead: torch.Tensor, e_a: torch.Tensor, e_b: torch.Tensor,
               rate: float, clamp: float | None, out_a: torch.Tensor,
               out_b: torch.Tensor) -> None:
    if _cpp("concat_relu_vjp_relax_cpu", e, dead, e_a, e_b, out_a, out_b):
        torch.ops.pcfast.concat_relu_vjp_relax_cpu(e, dead, e_a, e_b, rate, clamp, out_a, out_b)
        return
    concat_relu_vjp_relax_ref(e, dead, e_a, e_b, rate, clamp, out_a, out_b)


@_concat_op.register_fake
def _concat_fake(e, dead, e_a, e_b, rate, clamp, out_a, out_b) -> None:
    return None


@torch.library.custom_op("pcfast::conv1x1_vjp_relax", mutates_args=("out",))
def _conv1x1_op(g: torch.Tensor, wt: torch.Tensor, e: torch.Tensor, other: torch.Tensor | None,
                rate: float, clamp: float | None, out: torch.Tensor) -> None:
    if _cpp("conv1x1_vjp_relax_cpu", g, wt, e, other, out):
        torch.ops.pcfast.conv1x1_vjp_relax_cpu(g, wt, e, other, rate, clamp, out)
        return
    conv1x1_vjp_relax_ref(g, wt, e, other, rate, clamp, out)


@_conv1x1_op.register_fake
def _conv1x1_fake(g, wt, e, other, rate, clamp, out) -> None:
    return None


# ------------------------------------------------------- CUDA: Triton (CPU: interpreter)
def add_relu_vjp_relax_triton(e, dead, e_a, rate, clamp, out_a, store_g=True) -> torch.Tensor:
    """What CUDA runs for ``pcfast::add_relu_vjp_relax``: one Triton pass writing ``out_a`` and
    ``g`` if ``store_g`` (the reference for non-contiguous tensors)."""
    relax = triton_relax()
    if relax is None or not relax.fits(e, dead, e_a, out_a):
        return add_relu_vjp_relax_ref(e, dead, e_a, rate, clamp, out_a, store_g)
    g = torch.empty_like(e) if store_g else e.new_empty(0)
    relax.relax_fwd(e_a, [e], rate, clamp, out_a, dead=dead, g=g if store_g else None)
    return g


def concat_relu_vjp_relax_triton(e, dead, e_a, e_b, rate, clamp, out_a, out_b) -> None:
    """What CUDA runs for ``pcfast::concat_relu_vjp_relax``: one Triton pass over the merge."""
    relax = triton_relax()
    if (relax is None or not relax.fits(e, dead) or not relax.fits(e_a, out_a)
            or not relax.fits(e_b, out_b)):
        concat_relu_vjp_relax_ref(e, dead, e_a, e_b, rate, clamp, out_a, out_b)
        return
    relax.concat_relax_fwd(e, dead, e_a, e_b, rate, clamp, out_a, out_b)


def conv1x1_vjp_relax_cuda(g, wt, e, other, rate, clamp, out) -> None:
    """What CUDA runs for ``pcfast::conv1x1_vjp_relax``: one Triton launch, the matmul with the
    relax epilogue (``kernels/conv1x1_relax.py``; float32/16, bfloat16, contiguous), else the
    matmul and then the relax as one ``pcfast::pc_relax``."""
    kernel = triton_kernels("conv1x1_relax")
    if kernel is not None and kernel.takes(g, wt, e, other, out):
        kernel.conv1x1_relax_fwd(g, wt, e, other, rate, clamp, out)
        return
    conv1x1_vjp_relax_unfused(g, wt, e, other, rate, clamp, out)


def conv1x1_vjp_relax_unfused(g, wt, e, other, rate, clamp, out) -> None:
    """The matmul, then the relax epilogue as one ``pcfast::pc_relax`` (CUDA's form for float64
    and strided tensors)."""
    n, _, h, w = g.shape
    gx = torch.matmul(wt, g.reshape(n, g.shape[1], h * w)).view(e.shape)
    torch.ops.pcfast.pc_relax(e, [gx] if other is None else [gx, other], rate, clamp, out)


@_add_op.register_kernel("cuda")
def _add_cuda(e, dead, e_a, rate, clamp, out_a, store_g=True):
    return add_relu_vjp_relax_triton(e, dead, e_a, rate, clamp, out_a, store_g)


@_concat_op.register_kernel("cuda")
def _concat_cuda(e, dead, e_a, e_b, rate, clamp, out_a, out_b):
    concat_relu_vjp_relax_triton(e, dead, e_a, e_b, rate, clamp, out_a, out_b)


@_conv1x1_op.register_kernel("cuda")
def _conv1x1_cuda(g, wt, e, other, rate, clamp, out):
    conv1x1_vjp_relax_cuda(g, wt, e, other, rate, clamp, out)


# What CUDA runs for each op as several kernels: bench/cost.py counts these, not one op, for a
# GPU's step. None here: the merges and the 1x1 conv (float32, as counted) are one Triton
# kernel each there.
CUDA_COMPOSITES: dict = {}

# Destinations every backend only writes (see pcfast.ops.write_only_args).
WRITE_ONLY = {"pcfast::add_relu_vjp_relax": ("out_a",),
              "pcfast::concat_relu_vjp_relax": ("out_a", "out_b"),
              "pcfast::conv1x1_vjp_relax": ("out",)}


# ------------------------------------------------------------------------------ public API
def _check_like(name: str, t: torch.Tensor, like: torch.Tensor) -> None:
    if t.shape != like.shape or t.dtype != like.dtype:
        raise ValueError(f"{name} is {tuple(t.shape)} {t.dtype}, expected "
                         f"{tuple(like.shape)} {like.dtype}")


def add_relu_vjp_relax(e: torch.Tensor, dead: torch.Tensor, e_a: torch.Tensor, rate: float,
                       clamp: float | None, out_a: torch.Tensor,
                       store_g: bool = True) -> torch.Tensor:
    """Merge ``ReLU(a + b)``: relax parent ``a`` into ``out_a``, return ``g`` for parent ``b``
    (``store_g=False``: ``g`` not stored; returns an empty tensor).

    Shapes: all ``(N, C, H, W)``; ``dead`` bool (``merge_out <= 0``).

    Example::

        g = add_relu_vjp_relax(e_merge, dead, e_dw2, 0.5, None, e_dw2_next)
    """
    _check_like("e_a", e_a, e)
    _check_like("out_a", out_a, e)
    return _add_op(e, dead, e_a, float(rate), None if clamp is None else float(clamp), out_a,
                   bool(store_g))


def concat_relu_vjp_relax(e: torch.Tensor, dead: torch.Tensor, e_a: torch.Tensor,
                          e_b: torch.Tensor, rate: float, clamp: float | None,
                          out_a: torch.Tensor, out_b: torch.Tensor) -> None:
    """Merge ``ReLU(cat(a, b))``: relax both parents (``e_a`` ``(N, Ca, H, W)``, ``e_b``
    ``(N, Cb, H, W)``, ``e`` ``(N, Ca + Cb, H, W)``).

    Example::

        concat_relu_vjp_relax(e_merge, dead, e_dw2, e_short, 0.5, None, dw2_next, short_next)
    """
    if e_a.shape[1] + e_b.shape[1] != e.shape[1]:
        raise ValueError("concat_relu_vjp_relax: e_a and e_b channels must add up to e's")
    _check_like("out_a", out_a, e_a)
    _check_like("out_b", out_b, e_b)
    _concat_op(e, dead, e_a, e_b, float(rate), None if clamp is None else float(clamp), out_a,
               out_b)


def conv1x1_vjp_relax(g: torch.Tensor, wt: torch.Tensor, e: torch.Tensor,
                      other: torch.Tensor | None, rate: float, clamp: float | None,
                      out: torch.Tensor) -> None:
    """1x1 stride-1 conv input-VJP ``wt @ g`` with the relax epilogue into ``out``.

    Shapes: ``g`` ``(N, C_out, H, W)``, ``wt`` ``(C_in, C_out)``, ``e``/``out``/``other``
    ``(N, C_in, H, W)``.

    Example::

        conv1x1_vjp_relax(e_pw, w.view(c, c).t().contiguous(), e_dw1, None, 0.5, None, nxt)
    """
    _check_like("out", out, e)
    _conv1x1_op(g, wt, e, other, float(rate), None if clamp is None else float(clamp), out)
