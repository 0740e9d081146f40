"""The two passes that run ``dw_bn_relu_vjp`` / ``dw_bn_relu_vjp_relax`` on CUDA, as registered ops.

- ``bn_relu_partials(g, z, dead, mean, invstd) -> part`` ``(2, C, S)``: partial per-channel sums
  of ``dy = g * [not dead]`` (``part[0]``) and ``dy * xhat`` (``part[1]``, ``xhat = (z - mean) *
  invstd``); the channel sums are ``part.sum(-1)``. CUDA: the Triton reduction
  (``kernels/dw_bn_relu_vjp.py``, ``S = PARTIALS = 16`` partials per channel); elsewhere the PyTorch
  reference (the whole sum in ``part[..., 0]``, zeros after it).
- ``dw_bn_relu_apply(g, z, dead, gamma, mean, invstd, part, weight, stride, e, other, rate,
  clamp, out, other_dead=None)``: ``dx = dwconv_bwd_input(gamma * invstd * (dy - k1 - xhat *
  k2))`` with ``k1, k2 = part.sum(-1) / M``, written to ``out`` (``e is None``) or relaxed into
  it: ``out = lerp(e, clamp(dx + other), rate)`` (``other * ~other_dead`` with ``other_dead``).
  CUDA: one Triton pass that forms the BatchNorm VJP on the fly inside the transposed depthwise
  conv (it is never stored); elsewhere the PyTorch reference.

Two registered ops, so that ``bench/cost.py`` counts a GPU step as the two launches it is, each
with its own traffic (the reduction reads ``g``, ``z`` and ``dead`` once more).
"""

from __future__ import annotations

import torch

from pcfast.ops.dwconv import summed_kernel
from pcfast.ops.pc_relax import pc_relax_ref

__all__ = ["PARTIALS", "bn_relu_partials", "dw_bn_relu_apply", "triton_fits"]

PARTIALS = 16  # partial sums per channel (a power of two)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _xhat(z, mean, invstd, acc):
    shape = (1, -1, 1, 1)
    return (z.to(acc) - mean.to(acc).view(shape)) * invstd.to(acc).view(shape)


def bn_relu_partials_ref(g, z, dead, mean, invstd) -> torch.Tensor:
    """Reference of ``bn_relu_partials``: the channel sums in ``part[..., 0]``, zeros after."""
    acc = _acc(g.dtype)
    dy = g.masked_fill(dead, 0.0).to(acc)
    part = torch.zeros(2, g.shape[1], PARTIALS, dtype=acc, device=g.device)
    part[0, :, 0] = dy.sum((0, 2, 3))
    part[1, :, 0] = (dy * _xhat(z, mean, invstd, acc)).sum((0, 2, 3))
    return part


def dw_bn_relu_apply_ref(g, z, dead, gamma, mean, invstd, part, weight, stride, e, other, rate,
                         clamp, out, other_dead=None) -> None:
    """Reference of ``dw_bn_relu_apply`` (the unfused PyTorch ops)."""
    if other is not None and other_dead is not None:
        other = other.masked_fill(other_dead, 0.0)
    acc = _acc(g.dtype)
    shape = (1, -1, 1, 1)
    m = g.shape[0] * g.shape[2] * g.shape[3]
    k1, k2 = (part.to(acc).sum(-1) / m).unbind(0)
    scale = invstd.to(acc) if gamma is None else gamma.to(acc) * invstd.to(acc)
    dy = g.masked_fill(dead, 0.0).to(acc)
    dz = scale.view(shape) * (dy - k1.view(shape) - _xhat(z, mean, invstd, acc) * k2.view(shape))
    c = g.shape[1]
    dx = torch.nn.grad.conv2d_input(tuple(out.shape), summed_kernel(weight).to(acc), dz,
                                    stride=stride, padding=1, groups=c)
    with torch.no_grad():
        if e is None:
            out.copy_(dx)
        else:
            pc_relax_ref(e, [dx] if other is None else [dx, other], rate, clamp, out)


@torch.library.custom_op("pcfast::bn_relu_partials", mutates_args=())
def _partials_op(g: torch.Tensor, z: torch.Tensor, dead: torch.Tensor, mean: torch.Tensor,
                 invstd: torch.Tensor) -> torch.Tensor:
    return bn_relu_partials_ref(g, z, dead, mean, invstd)


@_partials_op.register_kernel("cuda")
def _partials_cuda(g, z, dead, mean, invstd):
    from pcfast.kernels.dw_bn_relu_vjp import bn_partials_fwd

    return bn_partials_fwd(g, z, dead, mean, invstd, PARTIALS)


@_partials_op.register_fake
def _partials_fake(g, z, dead, mean, invstd):
    return g.new_empty((2, g.shape[1], PARTIALS), dtype=_acc(g.dtype))


@torch.library.custom_op("pcfast::dw_bn_relu_apply", mutates_args=("out",))
def _apply_op(g: torch.Tensor, z: torch.Tensor, dead: torch.Tensor, gamma: torch.Tensor | None,
              mean: torch.Tensor, invstd: torch.Tensor, part: torch.Tensor,
              weight: torch.Tensor, stride: int, e: torch.Tensor | None,
              other: torch.Tensor | None, rate: float, clamp: float | None,
              out: torch.Tensor, other_dead: torch.Tensor | None = None) -> None:
    dw_bn_relu_apply_ref(g, z, dead, gamma, mean, invstd, part, weight, stride, e, other, rate,
                         clamp, out, other_dead)


@_apply_op.register_kernel("cuda")
def _apply_cuda(g, z, dead, gamma, mean, invstd, part, weight, stride, e, other, rate, clamp,
                out, other_dead=None):
    from pcfast.kernels.dw_bn_relu_vjp import dw_bn_relu_apply_fwd

    dw_bn_relu_apply_fwd(g, z, dead, gamma, mean, invstd, part, weight, stride, e, other, rate,
                         clamp, out, other_dead)


@_apply_op.register_fake
def _apply_fake(g, z, dead, gamma, mean, invstd, part, weight, stride, e, other, rate, clamp,
                out, other_dead=None) -> None:
    return None


# Destinations every backend only writes (see pcfast.ops.write_only_args).
WRITE_ONLY = {"pcfast::dw_bn_relu_apply": ("out",)}


def triton_fits(*tensors: torch.Tensor | None) -> bool:
    """Whether the Triton passes take these tensors (NCHW-contiguous, Triton importable)."""
    try:
        import pcfast.kernels.dw_bn_relu_vjp  # noqa: F401
    except ImportError:
        return False
    return all(t is None or t.is_contiguous() for t in tensors)


def bn_relu_partials(g, z, dead, mean, invstd) -> torch.Tensor:
    """Pass 1 (see the module docstring); returns ``(2, C, S)`` partial sums."""
    return _partials_op(g, z, dead, mean, invstd)


def dw_bn_relu_apply(g, z, dead, gamma, mean, invstd, part, weight, stride, e, other, rate,
                     clamp, out, other_dead=None) -> None:
    """Pass 2 (see the module docstring): ``dx`` into ``out``, or relaxed into it."""
    _apply_op(g, z, dead, gamma, mean, invstd, part, weight, int(stride), e, other, float(rate),
              None if clamp is None else float(clamp), out, other_dead)
