"""Fused input-VJP of training-mode BatchNorm followed by ReLU.

``bn_relu_vjp(g, z, out, weight, mean, invstd)`` returns ``dz``, the gradient w.r.t. the
BatchNorm input ``z`` of ``<g, relu(batch_norm(z))>``, with BatchNorm in training mode (batch
statistics ``mean``, ``invstd = 1/sqrt(var + eps)`` saved from the feedforward pass, see
:func:`bn_saved_stats`) and ``out`` the saved ReLU output (its sign is the ReLU mask)::

    dy = g * [out > 0];  xhat = (z - mean) * invstd;  M = N * H * W
    dz = weight * invstd * (dy - mean_M(dy) - xhat * mean_M(dy * xhat))     (per channel)

Backends: ``"triton"`` (``kernels/bn_relu_vjp.py``: a per-channel partial-sum kernel, then an
elementwise kernel; CUDA compiled, CPU through the Triton interpreter), ``"torch"`` (the same
closed form in PyTorch ops), ``"auto"`` (the registered op ``pcfast::bn_relu_vjp``: Triton on
CUDA; on CPU the mask and aten's fused BatchNorm backward for float32/float64 tensors of one
dtype, else the closed form). :func:`bn_relu_vjp_ref` is the autograd oracle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "triton", "torch")


def bn_relu_vjp_ref(g: torch.Tensor, z: torch.Tensor, weight: torch.Tensor | None,
                    bias: torch.Tensor | None, eps: float = 1e-5) -> torch.Tensor:
    """Oracle: autograd of ``relu(F.batch_norm(z, training=True))`` w.r.t. ``z`` along ``g``.

    Example::

        dz = bn_relu_vjp_ref(torch.randn(8, 4, 5, 5), torch.randn(8, 4, 5, 5), None, None)
    """
    with torch.enable_grad():
        zz = z.detach().requires_grad_(True)
        y = torch.relu(F.batch_norm(zz, None, None, weight, bias, training=True, eps=eps))
        (dz,) = torch.autograd.grad(y, zz, g)
    return dz


def bn_saved_stats(z: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``mean`` and ``invstd`` ``(C,)`` of ``z`` ``(N, C, ...)``, as training BN uses them.

    Statistics of low-precision inputs are computed in float32. On the CPU they come from aten's
    own batch-norm kernel (the statistics training BN saves for its backward, and about 3x faster
    there than a ``var_mean`` over the strided dimensions); elsewhere from ``var_mean``.
    """
    zc = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
    if zc.device.type == "cpu":
        with torch.no_grad():
            _, mean, invstd = torch.ops.aten.native_batch_norm(zc, None, None, None, None, True,
                                                               0.0, eps)
        return mean, invstd
    dims = [0, *range(2, zc.dim())]
    var, mean = torch.var_mean(zc, dim=dims, unbiased=False)
    return mean, torch.rsqrt(var + eps)


def _bn_relu_vjp_torch(g: torch.Tensor, z: torch.Tensor, out: torch.Tensor,
                       weight: torch.Tensor | None, mean: torch.Tensor,
                       invstd: torch.Tensor) -> torch.Tensor:
    acc = torch.float64 if g.dtype == torch.float64 else torch.float32
    dy = torch.where(out > 0, g, torch.zeros((), dtype=g.dtype, device=g.device)).to(acc)
    shape = (1, -1, 1, 1)
    xhat = (z.to(acc) - mean.to(acc).view(shape)) * invstd.to(acc).view(shape)
    m = g.shape[0] * g.shape[2] * g.shape[3]
    k1 = dy.sum((0, 2, 3)) / m
    k2 = (dy * xhat).sum((0, 2, 3)) / m
    scale = invstd.to(acc) if weight is None else weight.to(acc) * invstd.to(acc)
    dz = scale.view(shape) * (dy - k1.view(shape) - xhat * k2.view(shape))
    return dz.to(g.dtype)


def _same_layout(g: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Bring every tensor into one layout the kernel reads in place (NCHW or channels_last)."""
    fmt = (torch.channels_last if g.is_contiguous(memory_format=torch.channels_last)
           and not g.is_contiguous() else torch.contiguous_format)
    return tuple(t.contiguous(memory_format=fmt) for t in (g, *others))


def _bn_relu_vjp_triton(g, z, out, weight, mean, invstd) -> torch.Tensor:
    try:
        from pcfast.kernels.bn_relu_vjp import _bn_relu_vjp_bwd
    except ImportError as exc:
        raise RuntimeError("bn_relu_vjp backend='triton' needs Triton: pip install "
                           "'pcfast[kernels]', or pass backend='torch'") from exc
    g, z, out = _same_layout(g, z, out)
    return _bn_relu_vjp_bwd(g, z, out, weight, mean, invstd)


def _bn_relu_vjp_aten(g: torch.Tensor, z: torch.Tensor, out: torch.Tensor,
                      weight: torch.Tensor | None, mean: torch.Tensor,
                      invstd: torch.Tensor) -> torch.Tensor:
    """The ReLU's and BatchNorm's backward as autograd runs them on the CPU
    (``threshold_backward``, then aten's fused training BatchNorm backward): several times
    faster there than the closed form's separate passes (and than a boolean ``masked_fill``)."""
    dy = torch.ops.aten.threshold_backward(g, out, 0.0)
    return torch.ops.aten.native_batch_norm_backward(dy, z, weight, None, None, mean, invstd,
                                                     True, 0.0, [True, False, False])[0]


@torch.library.custom_op("pcfast::bn_relu_vjp", mutates_args=())
def _bn_relu_vjp_op(g: torch.Tensor, z: torch.Tensor, out: torch.Tensor,
                    weight: torch.Tensor | None, mean: torch.Tensor,
                    invstd: torch.Tensor) -> torch.Tensor:
    same = {g.dtype, z.dtype, mean.dtype, invstd.dtype} | (
        set() if weight is None else {weight.dtype})
    if g.device.type == "cpu" and len(same) == 1 and g.dtype in (torch.float32, torch.float64):
        return _bn_relu_vjp_aten(g, z, out, weight, mean, invstd)
    return _bn_relu_vjp_torch(g, z, out, weight, mean, invstd)


@_bn_relu_vjp_op.register_kernel("cuda")
def _bn_relu_vjp_op_cuda(g: torch.Tensor, z: torch.Tensor, out: torch.Tensor,
                         weight: torch.Tensor | None, mean: torch.Tensor,
                         invstd: torch.Tensor) -> torch.Tensor:
    return _bn_relu_vjp_triton(g, z, out, weight, mean, invstd)


@_bn_relu_vjp_op.register_fake
def _bn_relu_vjp_fake(g, z, out, weight, mean, invstd) -> torch.Tensor:
    return torch.empty_like(g)


def _check(g, z, out, weight, mean, invstd) -> None:
    if g.dim() != 4:
        raise ValueError(f"bn_relu_vjp expects (N, C, H, W) tensors, got g of shape "
                         f"{tuple(g.shape)}")
    for name, t in (("z", z), ("out", out)):
        if t.shape != g.shape:
            raise ValueError(f"bn_relu_vjp: {name} has shape {tuple(t.shape)} but g has "
                             f"{tuple(g.shape)}; pass the saved tensors of the same layer")
    c = g.shape[1]
    for name, t in (("weight", weight), ("mean", mean), ("invstd", invstd)):
        if t is not None and t.shape != (c,):
            raise ValueError(f"bn_relu_vjp: {name} must have shape ({c},), got {tuple(t.shape)}")


def bn_relu_vjp(g: torch.Tensor, z: torch.Tensor, out: torch.Tensor,
                weight: torch.Tensor | None, mean: torch.Tensor, invstd: torch.Tensor,
                backend: str = "auto") -> torch.Tensor:
    """Input-VJP of ``relu(batch_norm_train(z))`` along ``g``, fused.

    Args:
        g: ``(N, C, H, W)`` gradient w.r.t. the ReLU output (NCHW or channels_last; any other
            strides are copied into one of those).
        z: ``(N, C, H, W)`` saved BatchNorm input.
        out: ``(N, C, H, W)`` saved ReLU output.
        weight: ``(C,)`` BatchNorm gamma, or ``None`` (affine=False).
        mean, invstd: ``(C,)`` batch statistics of ``z`` (:func:`bn_saved_stats`).
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.

    Returns:
        ``dz`` ``(N, C, H, W)`` in ``g``'s dtype; float32 accumulation for 16-bit inputs.

    Example::

        mean, invstd = bn_saved_stats(z, bn.eps)
        out = torch.relu(bn(z))
        dz = bn_relu_vjp(g, z, out, bn.weight, mean, invstd)
    """
    if backend not in BACKENDS:
        raise ValueError(f"bn_relu_vjp backend must be one of {BACKENDS}, got {backend!r}")
    _check(g, z, out, weight, mean, invstd)
    if weight is not None:
        weight = weight.detach()
    if backend == "torch":
        return _bn_relu_vjp_torch(g, z, out, weight, mean, invstd)
    if backend == "triton":
        return _bn_relu_vjp_triton(g, z, out, weight, mean, invstd)
    return _bn_relu_vjp_op(g, z, out, weight, mean, invstd)
