"""``pcfast.ops.bn_relu_vjp`` (Triton kernels through the interpreter on CPU, the PyTorch closed
form, the registered op) against the autograd oracle ``bn_relu_vjp_ref``.

Tolerance: the oracle runs in float64; a low-precision result may be off by at most twice the
error of the oracle run in that same precision, plus a few float32 ulps of the output scale.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _assert import assert_within

from pcfast.ops.bn_relu_vjp import bn_relu_vjp, bn_relu_vjp_ref, bn_saved_stats

EPS = 1e-5


def _case(shape, dtype, affine=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    z = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)
    grad = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(dtype) if affine else None
    b = torch.randn(c, generator=g, dtype=torch.float64).to(dtype) if affine else None
    return grad, z, w, b


def _saved(z, w, b):
    """What the feedforward pass saves: the ReLU output and the batch statistics."""
    out = torch.relu(F.batch_norm(z, None, None, w, b, training=True, eps=EPS))
    mean, invstd = bn_saved_stats(z, EPS)
    return out, mean, invstd


def _oracle(grad, z, w, b):
    d = lambda t: None if t is None else t.double()  # noqa: E731
    return bn_relu_vjp_ref(grad.double(), z.double(), d(w), d(b), EPS)


def _assert_close(got, want, lowp, what):
    """``|got - want| <= 2 |lowp - want| + slack``; slack: a few float32 ulps of the output
    scale (fp32 accumulation order) plus one ulp of ``got``'s dtype (the final rounding, which
    Triton's CPU interpreter does by truncation for bfloat16)."""
    ulp = torch.finfo(got.dtype).eps if got.dtype != torch.float64 else 0.0
    got, want, lowp = got.double(), want.double(), lowp.double()
    scale = want.abs().max().clamp_min(1e-6)
    tol = 2 * (lowp - want).abs() + 8 * torch.finfo(torch.float32).eps * scale + ulp * want.abs()
    assert_within(got, want, tol, what)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (3, 65, 3, 3), (1, 1, 1, 1 + 128), (4, 17, 1, 1)])
@pytest.mark.parametrize("backend", ["triton", "torch", "auto"])
def test_matches_autograd(dtype, shape, backend):
    grad, z, w, b = _case(shape, dtype)
    out, mean, invstd = _saved(z, w, b)
    want = _oracle(grad, z, w, b)
    lowp = bn_relu_vjp_ref(grad, z, w, b, EPS)
    got = bn_relu_vjp(grad, z, out, w, mean, invstd, backend=backend)
    assert got.dtype == dtype and got.shape == grad.shape
    # Mask decisions made in low precision can flip where the BN output is ~0; the oracle's
    # float64 output may then disagree on a few elements with both low-precision results.
    if dtype in (torch.bfloat16, torch.float16):
        want = torch.where((lowp.double() - want).abs() > 0.05 * want.abs().max(), lowp.double(),
                           want)
    _assert_close(got, want, lowp, f"{backend} {dtype} {shape}")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_channels_last_strided_and_no_affine(backend):
    grad, z, _, _ = _case((3, 6, 4, 5), torch.float64, affine=False)
    want = _oracle(grad, z, None, None)
    out, mean, invstd = _saved(z, None, None)
    cl = lambda t: t.contiguous(memory_format=torch.channels_last)  # noqa: E731
    got = bn_relu_vjp(cl(grad), cl(z), cl(out), None, mean, invstd, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if backend == "triton":
        assert got.is_contiguous(memory_format=torch.channels_last)
    # A strided (every other column) and offset view, mixed with contiguous saved tensors.
    big = torch.randn(3, 6, 4, 11, dtype=torch.float64)
    view = big[..., 1::2]
    want = _oracle(view, z, None, None)
    got = bn_relu_vjp(view, z, out, None, mean, invstd, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_opcheck_cpu():
    grad, z, w, b = _case((2, 3, 4, 4), torch.float32)
    out, mean, invstd = _saved(z, w, b)
    torch.library.opcheck(torch.ops.pcfast.bn_relu_vjp.default, (grad, z, out, w, mean, invstd))
    torch.library.opcheck(torch.ops.pcfast.bn_relu_vjp.default,
                          (grad, z, out, None, mean, invstd))


def test_clear_errors():
    grad, z, w, b = _case((2, 3, 4, 4), torch.float32)
    out, mean, invstd = _saved(z, w, b)
    with pytest.raises(ValueError, match="z has shape"):
        bn_relu_vjp(grad, z[:1], out, w, mean, invstd)
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
        bn_relu_vjp(grad, z, out, w[:2], mean, invstd)
    with pytest.raises(ValueError, match="backend must be one of"):
        bn_relu_vjp(grad, z, out, w, mean, invstd, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_matches_autograd(dtype, channels_last):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    grad, z, w, b = _case((64, 67, 17, 17), dtype)
    want = _oracle(grad, z, w, b)
    lowp = bn_relu_vjp_ref(grad, z, w, b, EPS)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    cuda = lambda t: t.cuda().contiguous(memory_format=fmt)  # noqa: E731
    out, mean, invstd = _saved(cuda(z), w.cuda(), b.cuda())
    got = bn_relu_vjp(cuda(grad), cuda(z), out, w.cuda(), mean, invstd)
    if dtype != torch.float32:
        want = torch.where((lowp.double() - want).abs() > 0.05 * want.abs().max(), lowp.double(),
                           want)
    _assert_close(got.cpu(), want, lowp, f"cuda {dtype}")
    torch.library.opcheck(torch.ops.pcfast.bn_relu_vjp.default,
                          (cuda(grad), cuda(z), out, w.cuda(), mean, invstd))
