"""Dual-path depthwise conv op (pcfast._C) against the two-path PyTorch reference.

Tolerances follow the low-precision reference's own error: the reference runs in float64 (the
oracle) and again in the tested dtype; the op's error must be at most twice the latter plus a
small epsilon. CUDA cases skip cleanly without a GPU (checked at run time, not collection).
"""

from __future__ import annotations

import pytest
import torch
from _assert import assert_close_verbose

from pcfast.models.dualpath import DualPathDWConv
from pcfast.ops import _ext, dual_path_dwconv, dual_path_dwconv_ref, summed_kernel

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-4, torch.float64: 1e-12}
SHAPES = [(2, 1, 7, 9), (2, 3, 9, 7), (1, 63, 32, 33), (2, 3, 33, 32)]
LAYOUTS = ["nchw", "channels_last", "strided"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if _ext.load() is None:
        pytest.skip(f"pcfast._C not usable: {_ext.unavailable_reason()}")
    return torch.device(name)


def _make_x(shape: tuple[int, int, int, int], layout: str, dtype: torch.dtype,
            device: torch.device, gen: torch.Generator) -> torch.Tensor:
    n, c, h, w = shape
    if layout == "strided":
        # A view with an offset and steps in C and W: neither NCHW- nor channels_last-contiguous.
        base = torch.randn(n, 2 * c + 1, h + 2, 2 * w + 1, generator=gen, dtype=torch.float64)
        x = base[:, 1::2, 1 : h + 1, 1::2]
    else:
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
    x = x.to(device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _grads(fn, x: torch.Tensor, w: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    y = fn(x, w)
    gx, gw = torch.autograd.grad(y, (x, w), g.to(y.dtype))
    return y.detach(), gx, gw


def _check(actual: torch.Tensor, oracle: torch.Tensor, low_ref: torch.Tensor, dtype: torch.dtype,
           name: str) -> None:
    ref_err = (low_ref.double().cpu() - oracle.cpu()).abs().max().item()
    atol = 2 * ref_err + EPS[dtype] * (1 + oracle.abs().max().item())
    assert_close_verbose(actual, oracle, atol=atol, name=f"{name} ({dtype})")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(device: str, layout: str, shape: tuple, stride: int,
                           dtype: torch.dtype) -> None:
    dev = _device(device)
    gen = torch.Generator().manual_seed(hash((shape, stride, layout)) % 2**31)
    x = _make_x(shape, layout, dtype, dev, gen)
    w = torch.randn(2 * shape[1], 1, 3, 3, generator=gen, dtype=torch.float64).to(dev, dtype)
    n, c, h, wd = shape
    # Rounded to the tested dtype first so that oracle and op see identical inputs.
    g = torch.randn(n, c, (h - 1) // stride + 1, (wd - 1) // stride + 1, generator=gen,
                    dtype=torch.float64).to(dev, dtype).double()

    def op(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return dual_path_dwconv(a, b, stride, backend=device)

    def ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return dual_path_dwconv_ref(a, b, stride)

    got = _grads(op, x, w, g)
    oracle = _grads(ref, x.double(), w.double(), g)
    low = _grads(ref, x, w, g)
    for a, o, lo, name in zip(got, oracle, low, ("forward", "grad_x", "grad_weight")):
        assert a.dtype == dtype, f"{name} dtype {a.dtype} != {dtype}"
        _check(a, o, lo, dtype, name)
    if c > 1:  # with C == 1 both layouts coincide
        is_cl = got[0].is_contiguous(memory_format=torch.channels_last)
        assert is_cl == (layout == "channels_last"), "output should keep channels_last"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stride", [1, 2])
def test_gradcheck_float64(device: str, stride: int) -> None:
    dev = _device(device)
    gen = torch.Generator().manual_seed(stride)
    x = torch.randn(2, 2, 5, 4, generator=gen, dtype=torch.float64).to(dev).requires_grad_()
    w = torch.randn(4, 1, 3, 3, generator=gen, dtype=torch.float64).to(dev).requires_grad_()

    def op(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return dual_path_dwconv(a, b, stride, backend=device)

    assert torch.autograd.gradcheck(op, (x, w))
    assert torch.autograd.gradgradcheck(op, (x, w))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("stride", [1, 2])
def test_opcheck(device: str, layout: str, stride: int) -> None:
    dev = _device(device)
    gen = torch.Generator().manual_seed(7)
    x = _make_x((2, 3, 7, 6), layout, torch.float32, dev, gen).requires_grad_()
    w = torch.randn(6, 1, 3, 3, generator=gen).to(dev).requires_grad_()
    h_out, w_out = (7 - 1) // stride + 1, (6 - 1) // stride + 1
    g = torch.randn(2, 3, h_out, w_out, generator=gen).to(dev).requires_grad_()
    ops = torch.ops.pcfast
    torch.library.opcheck(ops.dwconv_fwd.default, (x, w, stride))
    torch.library.opcheck(ops.dwconv_bwd_input.default, (g, w, stride, 7, 6))
    torch.library.opcheck(ops.dwconv_bwd_weight.default, (g, x, stride))


def test_weight_grad_is_shared_and_difference_stays() -> None:
    _device("cpu")
    x = torch.randn(3, 4, 8, 8)
    w = torch.randn(8, 1, 3, 3, requires_grad=True)
    (gw,) = torch.autograd.grad(dual_path_dwconv(x, w, 1, backend="cpu").square().sum(), w)
    assert torch.equal(gw[0::2], gw[1::2])
    assert_close_verbose(summed_kernel(w).detach(), w.detach()[0::2] + w.detach()[1::2], atol=0.0)


def test_module_uses_compiled_op() -> None:
    _device("cpu")
    conv = DualPathDWConv(5, stride=2)
    x = torch.randn(2, 5, 9, 9, requires_grad=True)
    y = conv(x)
    assert "Dwconv" in y.grad_fn.name()
    assert_close_verbose(y, dual_path_dwconv_ref(x, conv.weight, 2), atol=1e-5)


def _ops_run(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("pcfast::")}


def test_backward_runs_only_the_kernels_the_pass_needs() -> None:
    """A backward-data pass (a PC inference step) runs no weight-gradient kernel, and a
    weight-only pass no input-gradient kernel: the C++ autograd asks the engine what it needs."""
    _device("cpu")
    conv = DualPathDWConv(3)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    y = conv(x)
    g = torch.randn_like(y)
    ran = _ops_run(lambda: torch.autograd.grad(y, x, g, retain_graph=True))
    assert ran == {"pcfast::dwconv_bwd_input"}
    ran = _ops_run(lambda: torch.autograd.grad(y, conv.weight, g, retain_graph=True))
    assert ran == {"pcfast::dwconv_bwd_weight"}
    gx, gw = torch.autograd.grad(y, (x, conv.weight), g)
    rx, rw = torch.autograd.grad(dual_path_dwconv_ref(x, conv.weight, 1), (x, conv.weight), g)
    assert_close_verbose(gx, rx, atol=1e-5)
    assert_close_verbose(gw, rw, atol=1e-5)


def test_bad_arguments_name_what_is_supported() -> None:
    _device("cpu")
    x = torch.randn(1, 2, 6, 6)
    with pytest.raises(RuntimeError, match="kernel 3x3 only, got 5x5"):
        torch.ops.pcfast.dwconv_fwd(x, torch.randn(4, 1, 5, 5), 1)
    with pytest.raises(RuntimeError, match="stride 1 or 2, got 3"):
        torch.ops.pcfast.dwconv_fwd(x, torch.randn(4, 1, 3, 3), 3)
    with pytest.raises(RuntimeError, match=r"\(2C, 1, 3, 3\)"):
        torch.ops.pcfast.dwconv_fwd(x, torch.randn(2, 1, 3, 3), 1)


def test_backend_selection_errors() -> None:
    x, w = torch.randn(1, 2, 5, 5), torch.randn(4, 1, 3, 3)
    with pytest.raises(RuntimeError, match="backend 'cuda' runs on cuda tensors"):
        dual_path_dwconv(x, w, 1, backend="cuda")
    with pytest.raises(ValueError, match="must be one of"):
        dual_path_dwconv(x, w, 1, backend="triton")


def test_missing_extension_falls_back_once_and_explicit_request_says_how_to_rebuild(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_ext, "_loaded", True)
    monkeypatch.setattr(_ext, "_module", None)
    monkeypatch.setattr(_ext, "_reason", "pcfast._C could not be imported (simulated)")
    monkeypatch.setattr(_ext, "_warned", False)
    x, w = torch.randn(1, 2, 5, 5), torch.randn(4, 1, 3, 3)
    with pytest.raises(RuntimeError, match=r"pip install --no-build-isolation -e \."):
        dual_path_dwconv(x, w, 1, backend="cpu")
    with pytest.warns(RuntimeWarning, match="reference path") as record:
        y = dual_path_dwconv(x, w, 1)
        dual_path_dwconv(x, w, 2)
    assert len([r for r in record if "reference path" in str(r.message)]) == 1
    assert torch.equal(y, dual_path_dwconv_ref(x, w, 1))


def test_autocast_casts_both_operands_like_conv2d():
    torch.manual_seed(0)
    x, w = torch.randn(2, 3, 9, 9), torch.randn(6, 1, 3, 3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = dual_path_dwconv(x, w, stride=2)
    ref = dual_path_dwconv_ref(x.bfloat16().double(), w.detach().bfloat16().double(), 2)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), ref, rtol=1e-2, atol=2e-2)  # bf16 output rounding
    y.float().sum().backward()
    assert w.grad is not None and w.grad.dtype == torch.float32
