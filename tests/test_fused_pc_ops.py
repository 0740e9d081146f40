"""The fast PC backend's fused ops against their references: ``pc_relax`` (sum, clamp, lerp,
write elsewhere) and ``dw_bn_relu_vjp`` / ``dw_bn_relu_vjp_relax`` (ReLU mask + training
BatchNorm VJP + dual-path depthwise input-VJP, optionally with the PC update as epilogue).

On CPU the registered ops run the C++ kernels of ``pcfast._C`` when it is built and current (the
PyTorch composition otherwise); both are checked against the autograd oracle. Tolerance: the
oracle in float64; a float32 result may be off by at most twice the error of the oracle run in
float32, plus a few float32 ulps of the output scale.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _assert import assert_within
from _dw_case import dw_case

from pcfast.ops import _ext
from pcfast.ops.bn_relu_vjp import bn_saved_stats
from pcfast.ops.dw_bn_relu_vjp import (
    dw_bn_relu_vjp,
    dw_bn_relu_vjp_ref,
    dw_bn_relu_vjp_relax,
    dw_bn_relu_vjp_relax_ref,
)
from pcfast.ops.pc_relax import pc_relax, pc_relax_ref

EPS = 1e-5


def _close(got, want, lowp, what):
    got, want, lowp = got.double(), want.double(), lowp.double()
    scale = want.abs().max().clamp_min(1e-6)
    tol = 2 * (lowp - want).abs() + 8 * torch.finfo(torch.float32).eps * scale
    assert_within(got, want, tol, what)


# ------------------------------------------------------------------------------- pc_relax
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n_backs", [1, 2, 3, 4])
@pytest.mark.parametrize("rate, clamp", [(0.3, None), (0.5, 0.4), (0.8, None), (1.0, 0.2)])
def test_pc_relax_matches_reference(dtype, n_backs, rate, clamp):
    g = torch.Generator().manual_seed(0)
    e = torch.randn(3, 5, 7, 9, generator=g, dtype=torch.float64).to(dtype)
    backs = [torch.randn(3, 5, 7, 9, generator=g, dtype=torch.float64).to(dtype)
             for _ in range(n_backs)]
    got, want = torch.empty_like(e), torch.empty_like(e)
    pc_relax(e, backs, rate, clamp, got)
    pc_relax_ref(e, backs, rate, clamp, want)
    tol = 4 * torch.finfo(dtype).eps  # torch.lerp may fuse its multiply-add (one rounding less)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    # the math itself, in float64
    b = sum(x.double() for x in backs)
    if clamp is not None:
        b = b.clamp(-clamp, clamp)
    expect = e.double() + rate * (b - e.double())
    torch.testing.assert_close(got.double(), expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_backs", [1, 2, 4])
def test_pc_relax_cpu_kernel_large_and_low_precision(dtype, n_backs):
    """The C++ kernel's vectorised loop over several parallel chunks (100,003 values: chunks of
    32,768 and an odd tail) and in half precision: equal to the reference, which sums in the
    dtype and lerps like torch.lerp, up to one rounding of the result."""
    if not _ext.has_kernel("pc_relax_cpu", "cpu"):
        pytest.skip("pcfast._C is not built")
    g = torch.Generator().manual_seed(1)
    e = torch.randn(100_003, generator=g).to(dtype)
    backs = [torch.randn(100_003, generator=g).to(dtype) for _ in range(n_backs)]
    for rate, clamp in ((0.3, None), (0.7, 0.5), (1.0, None)):
        got, want = torch.empty_like(e), torch.empty_like(e)
        torch.ops.pcfast.pc_relax_cpu(e, backs, rate, clamp, got)
        pc_relax_ref(e, backs, rate, clamp, want)
        ulp = torch.finfo(dtype).eps * want.double().abs().clamp_min(1.0)
        assert_within(got.double(), want.double(), 2 * ulp, f"{dtype} rate {rate}")


def test_pc_relax_eager_cpu_calls_the_kernel_and_counting_sees_the_op():
    """Eager CPU calls go straight to ``pcfast::pc_relax_cpu``; under a dispatch mode (how
    bench/cost.py counts) and with autograd inputs the public ``pcfast::pc_relax`` runs; all
    three give the same bits."""
    if not _ext.has_kernel("pc_relax_cpu", "cpu"):
        pytest.skip("pcfast._C is not built")
    from torch.utils._python_dispatch import TorchDispatchMode

    class Names(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    e, b1, b2 = (torch.randn(64, 33) for _ in range(3))
    eager, counted, tracked = (torch.empty_like(e) for _ in range(3))
    pc_relax(e, [b1, b2], 0.3, None, eager)
    with Names() as mode:
        pc_relax(e, [b1, b2], 0.3, None, counted)
    assert mode.names == ["pcfast.pc_relax.default"]
    pc_relax(e.clone().requires_grad_(True), [b1, b2], 0.3, None, tracked)
    torch.testing.assert_close(eager, counted, rtol=0, atol=0)
    torch.testing.assert_close(eager, tracked, rtol=0, atol=0)
    want = torch.empty_like(e)
    pc_relax_ref(e, [b1, b2], 0.3, None, want)
    torch.testing.assert_close(eager, want, rtol=4e-7, atol=4e-7)


def test_pc_relax_without_the_extension_runs_the_reference(monkeypatch):
    """A missing or stale ``pcfast._C`` (simulated, after calls that found it): both routes
    run the PyTorch reference."""
    e, b = torch.randn(8, 5), torch.randn(8, 5)
    pc_relax(e, [b], 0.3, None, torch.empty_like(e))  # whatever it found is remembered
    monkeypatch.setattr(_ext, "_loaded", True)
    monkeypatch.setattr(_ext, "_module", None)
    monkeypatch.setattr(_ext, "_reason", "pcfast._C could not be imported (simulated)")
    calls = []
    monkeypatch.setattr(torch.ops.pcfast, "pc_relax_cpu", lambda *a: calls.append(a),
                        raising=False)
    got, want = torch.empty_like(e), torch.empty_like(e)
    pc_relax(e, [b], 0.3, None, got)
    pc_relax_ref(e, [b], 0.3, None, want)
    assert not calls
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_pc_relax_broadcast_and_strided_backs_use_the_reference_form():
    e = torch.randn(4, 6, 3, 3, dtype=torch.float64)
    full = torch.randn(4, 12, 3, 3, dtype=torch.float64)
    backs = [full[:, :6], torch.randn(4, 6, dtype=torch.float64)[:, :, None, None].expand(4, 6, 3, 3)]
    got = torch.empty_like(e)
    pc_relax(e, backs, 0.5, None, got)
    torch.testing.assert_close(got, torch.lerp(e, backs[0] + backs[1], 0.5))


def test_pc_relax_opcheck_and_errors():
    e, b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    torch.library.opcheck(torch.ops.pcfast.pc_relax.default, (e, [b, b], 0.5, 1.0, torch.empty_like(e)))
    torch.library.opcheck(torch.ops.pcfast.pc_relax.default, (e, [b], 1.0, None, torch.empty_like(e)))
    with pytest.raises(ValueError, match="at least one"):
        pc_relax(e, [], 0.5, None, torch.empty_like(e))
    with pytest.raises(ValueError, match="pass a tensor like e"):
        pc_relax(e, [b], 0.5, None, torch.empty(3))


# ------------------------------------------------------------------------- dw_bn_relu_vjp
def _case(shape, stride, dtype, affine=True, seed=0):
    cast = (lambda t: None if t is None else t.to(dtype))  # noqa: E731
    return {k: cast(v) for k, v in dw_case(shape, stride, affine, seed).items()}


SHAPES = [(2, 3, 7, 9), (3, 1, 5, 5), (2, 5, 8, 6), (1, 4, 3, 5), (4, 2, 9, 1)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("affine", [True, False])
def test_dw_bn_relu_vjp_matches_autograd(dtype, shape, stride, affine):
    t = _case(shape, stride, dtype, affine)
    mean, invstd = bn_saved_stats(t["z"], EPS)
    dead = t["out"] <= 0
    got = dw_bn_relu_vjp(t["g"], t["z"], dead, t["gamma"], mean, invstd, t["w"], stride,
                         shape[2], shape[3])
    d = {k: (v.double() if v is not None else None) for k, v in t.items()}
    want = dw_bn_relu_vjp_ref(d["g"], None, None, d["gamma"], d["beta"], d["w"], d["x"], stride)
    lowp = dw_bn_relu_vjp_ref(t["g"], None, None, t["gamma"], t["beta"], t["w"], t["x"], stride)
    assert got.dtype == dtype and got.shape == shape
    _close(got, want, lowp, f"dx {dtype} {shape} s{stride}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("with_other", [False, True])
@pytest.mark.parametrize("rate, clamp", [(0.5, None), (0.3, 0.05), (1.0, None)])
def test_dw_bn_relu_vjp_relax_matches_the_unfused_ops(dtype, stride, with_other, rate, clamp):
    shape = (2, 3, 7, 9)
    t = _case(shape, stride, dtype)
    mean, invstd = bn_saved_stats(t["z"], EPS)
    dead = t["out"] <= 0
    gen = torch.Generator().manual_seed(5)
    e = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) * 0.1
    other = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) * 0.1 \
        if with_other else None
    got, want = torch.empty_like(e), torch.empty_like(e)
    args = (t["g"], t["z"], dead, t["gamma"], mean, invstd, t["w"], stride, e, other, rate, clamp)
    dw_bn_relu_vjp_relax(*args, got)
    dw_bn_relu_vjp_relax_ref(*args, want)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("rate, clamp", [(0.5, None), (0.3, 0.05)])
def test_dw_bn_relu_vjp_relax_reads_a_masked_other_as_its_masked_copy(dtype, stride, rate, clamp):
    """``other_dead``: the op reads a merge's error and mask and must give exactly what it gives
    for the stored masked copy (masking is exact), on the registered op (C++ where built) and the
    reference; the mask must matter (a different result without it)."""
    shape = (2, 3, 7, 9)
    t = _case(shape, stride, dtype)
    mean, invstd = bn_saved_stats(t["z"], EPS)
    gen = torch.Generator().manual_seed(8)
    r = lambda: torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    e, merge_err = r() * 0.1, r()
    merge_dead = torch.rand(shape, generator=gen) < 0.5
    head = (t["g"], t["z"], t["out"] <= 0, t["gamma"], mean, invstd, t["w"], stride, e)
    for fn in (dw_bn_relu_vjp_relax, dw_bn_relu_vjp_relax_ref):
        got, want, unmasked = (torch.empty_like(e) for _ in range(3))
        fn(*head, merge_err, rate, clamp, got, other_dead=merge_dead)
        fn(*head, merge_err.masked_fill(merge_dead, 0.0), rate, clamp, want)
        fn(*head, merge_err, rate, clamp, unmasked)
        assert torch.equal(got, want), fn.__name__
        assert not torch.equal(got, unmasked)
    with pytest.raises(ValueError, match="other_dead"):
        dw_bn_relu_vjp_relax(*head, None, rate, clamp, torch.empty_like(e),
                             other_dead=merge_dead)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_add_relu_vjp_relax_without_g_relaxes_the_same_and_stores_nothing(dtype):
    from pcfast.ops.vjp_relax import add_relu_vjp_relax, add_relu_vjp_relax_ref

    gen = torch.Generator().manual_seed(4)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    e, dead, e_a = r(3, 5, 40, 41), r(3, 5, 40, 41) > 0, r(3, 5, 40, 41)  # several 4096 chunks
    for fn in (add_relu_vjp_relax, add_relu_vjp_relax_ref):
        with_g, without_g = torch.empty_like(e_a), torch.full_like(e_a, float("nan"))
        g = fn(e, dead, e_a, 0.4, 0.7, with_g)
        none = fn(e, dead, e_a, 0.4, 0.7, without_g, store_g=False)
        assert torch.equal(without_g, with_g) and g.shape == e.shape, fn.__name__
        assert none.numel() == 0
    torch.library.opcheck(torch.ops.pcfast.add_relu_vjp_relax.default,
                          (e, dead, e_a, 0.5, None, torch.empty_like(e_a), False))


def test_dw_bn_relu_ops_opcheck():
    t = _case((2, 3, 6, 5), 2, torch.float32)
    mean, invstd = bn_saved_stats(t["z"], EPS)
    dead = t["out"] <= 0
    torch.library.opcheck(torch.ops.pcfast.dw_bn_relu_vjp.default,
                          (t["g"], t["z"], dead, t["gamma"], mean, invstd, t["w"], 2, 6, 5))
    e = torch.randn(2, 3, 6, 5)
    torch.library.opcheck(torch.ops.pcfast.dw_bn_relu_vjp_relax.default,
                          (t["g"], t["z"], dead, None, mean, invstd, t["w"], 2, e, e.clone(), 0.5,
                           None, torch.empty_like(e)))
    torch.library.opcheck(torch.ops.pcfast.dw_bn_relu_vjp_relax.default,
                          (t["g"], t["z"], dead, None, mean, invstd, t["w"], 2, e, e.clone(), 0.5,
                           None, torch.empty_like(e), e > 0))


def test_dw_bn_relu_vjp_clear_errors():
    t = _case((2, 3, 6, 5), 1, torch.float32)
    mean, invstd = bn_saved_stats(t["z"], EPS)
    with pytest.raises(ValueError, match="bool tensor"):
        dw_bn_relu_vjp(t["g"], t["z"], t["out"], None, mean, invstd, t["w"], 1, 6, 5)
    with pytest.raises(ValueError, match=r"\(2C, 1, 3, 3\)"):
        dw_bn_relu_vjp(t["g"], t["z"], t["out"] <= 0, None, mean, invstd, t["w"][:4], 1, 6, 5)
    with pytest.raises(ValueError, match="stride 1 or 2"):
        dw_bn_relu_vjp(t["g"], t["z"], t["out"] <= 0, None, mean, invstd, t["w"], 3, 6, 5)


def test_cpp_kernels_are_the_ones_tested_when_built():
    """Where ``pcfast._C`` is built and current the registered ops above ran its C++ kernels."""
    if _ext.unavailable_reason() is not None:
        pytest.skip(f"pcfast._C not usable: {_ext.unavailable_reason()}")
    assert _ext.has_kernel("dw_bn_relu_vjp_cpu", "cpu") and _ext.has_kernel("pc_relax_cpu", "cpu")


# ------------------------------------------------------------ merges and 1x1 conv with relax
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("rate, clamp", [(0.5, None), (0.3, 0.1), (1.0, None)])
def test_merge_and_conv1x1_relax_ops_match_their_references(dtype, rate, clamp):
    from pcfast.ops.vjp_relax import (
        add_relu_vjp_relax,
        add_relu_vjp_relax_ref,
        concat_relu_vjp_relax,
        concat_relu_vjp_relax_ref,
        conv1x1_vjp_relax,
        conv1x1_vjp_relax_ref,
    )

    gen = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    e, dead = r(3, 5, 4, 7), r(3, 5, 4, 7) > 0
    e_a = r(3, 5, 4, 7)
    got_a, want_a = torch.empty_like(e_a), torch.empty_like(e_a)
    g_got = add_relu_vjp_relax(e, dead, e_a, rate, clamp, got_a)
    g_want = add_relu_vjp_relax_ref(e, dead, e_a, rate, clamp, want_a)
    tol = 4 * torch.finfo(dtype).eps
    torch.testing.assert_close(g_got, g_want, rtol=0, atol=0)
    torch.testing.assert_close(got_a, want_a, rtol=tol, atol=tol)

    ea, eb = r(3, 2, 4, 7), r(3, 3, 4, 7)
    outs = [torch.empty_like(t) for t in (ea, eb, ea, eb)]
    concat_relu_vjp_relax(e, dead, ea, eb, rate, clamp, outs[0], outs[1])
    concat_relu_vjp_relax_ref(e, dead, ea, eb, rate, clamp, outs[2], outs[3])
    torch.testing.assert_close(outs[0], outs[2], rtol=tol, atol=tol)
    torch.testing.assert_close(outs[1], outs[3], rtol=tol, atol=tol)

    g, wt, e_in, other = r(3, 5, 4, 7), r(6, 5), r(3, 6, 4, 7), r(3, 6, 4, 7)
    for oth in (None, other):
        got, want = torch.empty_like(e_in), torch.empty_like(e_in)
        conv1x1_vjp_relax(g, wt, e_in, oth, rate, clamp, got)
        conv1x1_vjp_relax_ref(g, wt, e_in, oth, rate, clamp, want)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    # against autograd of a 1x1 conv
    x = r(3, 6, 4, 7).requires_grad_(True)
    w4 = wt.t().reshape(5, 6, 1, 1)
    (gx,) = torch.autograd.grad(F.conv2d(x, w4), x, g)
    got = torch.empty_like(e_in)
    conv1x1_vjp_relax(g, wt, torch.zeros_like(e_in), None, 1.0, None, got)
    torch.testing.assert_close(got, gx, rtol=1e-5, atol=1e-5)


def test_merge_and_conv1x1_relax_opcheck():
    e, dead, ea = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3) > 0, torch.randn(2, 4, 3, 3)
    torch.library.opcheck(torch.ops.pcfast.add_relu_vjp_relax.default,
                          (e, dead, ea, 0.5, None, torch.empty_like(ea)))
    a, b = torch.randn(2, 1, 3, 3), torch.randn(2, 3, 3, 3)
    torch.library.opcheck(torch.ops.pcfast.concat_relu_vjp_relax.default,
                          (e, dead, a, b, 0.5, 0.2, torch.empty_like(a), torch.empty_like(b)))
    g, wt, e_in = torch.randn(2, 4, 3, 3), torch.randn(5, 4), torch.randn(2, 5, 3, 3)
    torch.library.opcheck(torch.ops.pcfast.conv1x1_vjp_relax.default,
                          (g, wt, e_in, e_in.clone(), 0.5, None, torch.empty_like(e_in)))
