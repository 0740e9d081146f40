"""Dual-path depthwise 3x3 convolution (Res-DualNet): public op, autograd glue, reference.

``y[:, c] = conv3x3(x[:, c], w[2c]) + conv3x3(x[:, c], w[2c + 1])`` with padding 1 and stride 1
or 2, weight shape ``(2C, 1, 3, 3)``. The op is linear, so the compiled backends run one
depthwise conv with the summed kernel ``w[2c] + w[2c + 1]`` (forward and input-VJP) and return
the shared depthwise weight gradient for both paths (weight-VJP). Both weights per channel stay
parameters: their sum trains, their difference keeps its initial value, exactly as in the
two-path reference :func:`dual_path_dwconv_ref`.

Backends: ``"ref"`` (PyTorch), ``"cpu"`` (C++ in ``pcfast._C``), ``"cuda"`` (CUDA in
``pcfast._C``), ``"auto"`` (the compiled op for the tensor's device when built, else ``ref``
with one warning). Compiled ops accept float32/float64/float16/bfloat16 (float32 accumulation
for the half types), NCHW or channels_last (outputs keep channels_last) and any strides; the CUDA
kernels run on NCHW-contiguous data and convert other layouts first.

Registered ops (``torch.ops.pcfast``; schemas in ``csrc/registration.cpp``):

- ``dwconv_fwd(x, weight, stride) -> y``
- ``dwconv_bwd_input(grad_out, weight, stride, in_h, in_w) -> grad_x``
- ``dwconv_bwd_weight(grad_out, x, stride) -> grad_weight`` (shape ``(2C, 1, 3, 3)``)

This module adds their fake (meta) implementations and autograd formulas, including double
backward: all three are bilinear, so each one's VJP is another of the three.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pcfast.ops import _ext

BACKENDS = ("auto", "ref", "cpu", "cuda")

__all__ = ["BACKENDS", "dual_path_dwconv", "dual_path_dwconv_ref", "summed_kernel"]


def dual_path_dwconv_ref(x: torch.Tensor, weight: torch.Tensor, stride: int) -> torch.Tensor:
    """Reference dual-path depthwise conv: grouped conv to 2C channels, then pairwise sum.

    Shapes: ``x (N, C, H, W)``, ``weight (2C, 1, 3, 3)`` -> ``(N, C, (H-1)//stride+1,
    (W-1)//stride+1)``.

    Example::

        y = dual_path_dwconv_ref(torch.randn(2, 4, 8, 8), torch.randn(8, 1, 3, 3), 1)
    """
    c = x.shape[1]
    y = F.conv2d(x, weight, stride=stride, padding=1, groups=c)
    n, _, h, w = y.shape
    return y.view(n, c, 2, h, w).sum(2)


def summed_kernel(weight: torch.Tensor) -> torch.Tensor:
    """Sum each channel's two path kernels: ``(2C, 1, 3, 3) -> (C, 1, 3, 3)``.

    ``conv2d(x, summed_kernel(w), stride=s, padding=1, groups=C)`` equals
    ``dual_path_dwconv_ref(x, w, s)`` up to rounding.

    Example::

        w = torch.randn(32, 1, 3, 3)
        k = summed_kernel(w)   # (16, 1, 3, 3), k[c] = w[2c] + w[2c + 1]
    """
    if weight.dim() != 4 or weight.shape[0] % 2 or weight.shape[1] != 1:
        raise ValueError(
            f"summed_kernel expects a (2C, 1, kh, kw) weight, got {tuple(weight.shape)}")
    c2, _, kh, kw = weight.shape
    return weight.reshape(c2 // 2, 2, kh, kw).sum(1).unsqueeze(1)


def _resolve_backend(x: torch.Tensor, backend: str) -> str:
    """Return ``"ref"`` or ``"compiled"`` for this input, raising on an impossible request."""
    if backend not in BACKENDS:
        raise ValueError(f"dual_path_dwconv backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "ref":
        return "ref"
    device = x.device.type
    if backend == "auto":
        if _ext.has_kernel("dwconv_fwd", device):
            if device == "cuda":
                _ext.check_cuda_device(x.device)
            return "compiled"
        _ext.warn_fallback("dwconv_fwd", device)
        return "ref"
    if device != backend:
        raise RuntimeError(
            f"dual_path_dwconv backend {backend!r} runs on {backend} tensors, got x on "
            f"{x.device}; move the tensors to {backend} or pass backend='auto'")
    _ext.require("dwconv_fwd", device)
    if device == "cuda":
        _ext.check_cuda_device(x.device)
    return "compiled"


def dual_path_dwconv(x: torch.Tensor, weight: torch.Tensor, stride: int = 1,
                     backend: str = "auto") -> torch.Tensor:
    """Dual-path depthwise 3x3 conv, padding 1, stride 1 or 2, differentiable in x and weight.

    Shapes: ``x (N, C, H, W)``, ``weight (2C, 1, 3, 3)`` -> ``(N, C, (H-1)//stride+1,
    (W-1)//stride+1)``.

    Example::

        x, w = torch.randn(8, 16, 32, 32), torch.randn(32, 1, 3, 3)
        y = dual_path_dwconv(x, w, stride=2)   # (8, 16, 16, 16)

    Under autocast both operands are cast to the autocast dtype, as ``F.conv2d`` does.
    """
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    if _resolve_backend(x, backend) == "ref":
        return dual_path_dwconv_ref(x, weight, stride)
    return torch.ops.pcfast.dwconv_fwd(x, weight, stride)


def _out_format(t: torch.Tensor) -> torch.memory_format:
    # Mirrors pcfast::dwconv_out_format in csrc/dwconv.h.
    if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _empty_like_format(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device,
                       memory_format=_out_format(like))


def _fwd_fake(x: torch.Tensor, weight: torch.Tensor, stride: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return _empty_like_format((n, c, (h - 1) // stride + 1, (w - 1) // stride + 1), x)


def _bwd_input_fake(grad_out: torch.Tensor, weight: torch.Tensor, stride: int, in_h: int,
                    in_w: int) -> torch.Tensor:
    n, c = grad_out.shape[:2]
    return _empty_like_format((n, c, in_h, in_w), grad_out)


def _bwd_weight_fake(grad_out: torch.Tensor, x: torch.Tensor, stride: int) -> torch.Tensor:
    return x.new_empty((2 * x.shape[1], 1, 3, 3))


# Autograd. With K(w)[c] = w[2c] + w[2c+1] and D(g, x)[2c] = D(g, x)[2c+1] = corr(x[c], g[c]):
#   fwd(x, w) = conv(x, K(w));  bwd_input(g, w) = conv^T(g, K(w));  bwd_weight(g, x) = D(g, x).
# <ĝ, fwd(x, w)> = <x, conv^T(ĝ, K(w))> = <w, D(ĝ, x)>, and likewise for the other two.
# The autograd of dwconv_fwd itself is in C++ (csrc/dwconv_autograd.cpp): it computes only the
# gradients the current backward pass needs. The two backward ops' autograd below gives double
# backward.


def _save_bwd_input(ctx: torch.autograd.function.FunctionCtx, inputs: tuple,
                    output: torch.Tensor) -> None:
    grad_out, weight, stride, _, _ = inputs
    ctx.save_for_backward(grad_out, weight)
    ctx.stride = stride


def _bwd_input_backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple:
    grad_out, weight = ctx.saved_tensors
    gg = gw = None
    if ctx.needs_input_grad[0]:
        gg = torch.ops.pcfast.dwconv_fwd(grad, weight, ctx.stride)
    if ctx.needs_input_grad[1]:
        gw = torch.ops.pcfast.dwconv_bwd_weight(grad_out, grad, ctx.stride)
    return gg, gw, None, None, None


def _save_bwd_weight(ctx: torch.autograd.function.FunctionCtx, inputs: tuple,
                     output: torch.Tensor) -> None:
    grad_out, x, stride = inputs
    ctx.save_for_backward(grad_out, x)
    ctx.stride = stride


def _bwd_weight_backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple:
    grad_out, x = ctx.saved_tensors
    gg = gx = None
    if ctx.needs_input_grad[0]:
        gg = torch.ops.pcfast.dwconv_fwd(x, grad, ctx.stride)
    if ctx.needs_input_grad[1]:
        gx = torch.ops.pcfast.dwconv_bwd_input(grad_out, grad, ctx.stride, x.shape[2], x.shape[3])
    return gg, gx, None


def _register() -> None:
    """Attach fake implementations, and the backward ops' autograd formulas, to the compiled ops."""
    lib = torch.library
    lib.register_fake("pcfast::dwconv_fwd")(_fwd_fake)
    lib.register_fake("pcfast::dwconv_bwd_input")(_bwd_input_fake)
    lib.register_fake("pcfast::dwconv_bwd_weight")(_bwd_weight_fake)
    lib.register_autograd("pcfast::dwconv_bwd_input", _bwd_input_backward,
                          setup_context=_save_bwd_input)
    lib.register_autograd("pcfast::dwconv_bwd_weight", _bwd_weight_backward,
                          setup_context=_save_bwd_weight)


if _ext.load() is not None:
    _register()
