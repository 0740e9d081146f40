"""The Triton kernels that run the fast PC backend's fused ops on CUDA, checked on CPU through
Triton's interpreter against the ops' PyTorch references and the autograd oracle.

Covered: ``kernels/relax.py`` (``pc_relax``, ``add_relu_vjp_relax``, ``concat_relu_vjp_relax``
and the epilogue of ``conv1x1_vjp_relax``) and ``kernels/dw_bn_relu_vjp.py`` (the two passes of
``dw_bn_relu_vjp`` / ``dw_bn_relu_vjp_relax``, registered as ``pcfast::bn_relu_partials`` and
``pcfast::dw_bn_relu_apply``). Tolerances: float64 and float32 a few ulps of the output scale
(the kernels accumulate in float64 / float32 like the references, in another order); bfloat16
twice the error of the bfloat16 reference against float64 plus one bfloat16 ulp of the scale.
"""

from __future__ import annotations

import pytest
import torch
from _assert import assert_within
from _dw_case import dw_case

pytest.importorskip("triton")

from pcfast.kernels import dw_bn_relu_vjp as dwk  # noqa: E402
from pcfast.kernels import relax as rk  # noqa: E402
from pcfast.ops import dw_bn_relu_passes as passes  # noqa: E402
from pcfast.ops import vjp_relax  # noqa: E402
from pcfast.ops.bn_relu_vjp import bn_saved_stats  # noqa: E402
from pcfast.ops.dw_bn_relu_vjp import (  # noqa: E402
    dw_bn_relu_vjp_ref,
    dw_bn_relu_vjp_relax_cuda,
    dw_bn_relu_vjp_relax_ref,
)
from pcfast.ops.pc_relax import pc_relax_ref, pc_relax_triton  # noqa: E402

EPS = 1e-5
DTYPES = [torch.float64, torch.float32, torch.bfloat16]


def _randn(shape, gen, dtype):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def _check(got, want64, lowp, dtype, what):
    """``got`` against the float64 result ``want64``; ``lowp``: the reference in ``dtype``."""
    scale = want64.abs().max().clamp_min(1e-6)
    if dtype == torch.bfloat16:
        tol = 2 * (lowp.double() - want64).abs() + torch.finfo(dtype).eps * scale
    else:
        tol = 8 * torch.finfo(dtype).eps * scale * torch.ones_like(want64)
    assert_within(got.double(), want64, tol, what)


def _relax_math(e, b, rate, clamp):
    """``lerp(e, clamp(b), rate)`` in float64."""
    b = b.double() if clamp is None else b.double().clamp(-clamp, clamp)
    return e.double() + rate * (b - e.double())


# ------------------------------------------------------------------------------ relax
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_backs", [1, 2, 4])
@pytest.mark.parametrize("rate, clamp", [(0.3, None), (0.5, 0.4), (0.8, None), (1.0, 0.2)])
def test_pc_relax_kernel(dtype, n_backs, rate, clamp):
    gen = torch.Generator().manual_seed(n_backs)
    e = _randn((3, 5, 7, 9), gen, dtype)
    backs = [_randn((3, 5, 7, 9), gen, dtype) for _ in range(n_backs)]
    got, lowp = torch.full_like(e, float("nan")), torch.empty_like(e)
    pc_relax_triton(e, backs, rate, clamp, got)
    pc_relax_ref(e, backs, rate, clamp, lowp)
    want = _relax_math(e, sum(b.double() for b in backs), rate, clamp)
    _check(got, want, lowp, dtype, f"pc_relax {dtype} {n_backs} backs rate {rate} clamp {clamp}")


def test_pc_relax_kernel_float64_is_the_reference_to_an_ulp():
    gen = torch.Generator().manual_seed(3)
    e, b = _randn((4, 300), gen, torch.float64), _randn((4, 300), gen, torch.float64) * 3
    for rate, clamp in [(0.3, None), (0.7, 0.4), (1.0, 1.3)]:
        got, want = torch.empty_like(e), torch.empty_like(e)
        pc_relax_triton(e, [b], rate, clamp, got)
        pc_relax_ref(e, [b], rate, clamp, want)
        # rate and clamp reach the kernel as three float32 parts that sum to them exactly
        torch.testing.assert_close(got, want, rtol=4e-16, atol=4e-16)


def test_pc_relax_with_broadcast_backs_falls_back_to_the_reference():
    e = torch.randn(4, 6, 3, 3, dtype=torch.float64)
    b = torch.randn(4, 6, dtype=torch.float64)[:, :, None, None].expand(4, 6, 3, 3)
    got = torch.empty_like(e)
    pc_relax_triton(e, [b], 0.5, None, got)
    torch.testing.assert_close(got, torch.lerp(e, b, 0.5))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rate, clamp", [(0.3, None), (0.5, 0.4), (1.0, None)])
def test_add_relu_vjp_relax_kernel(dtype, rate, clamp):
    gen = torch.Generator().manual_seed(1)
    e, e_a = _randn((2, 6, 5, 7), gen, dtype), _randn((2, 6, 5, 7), gen, dtype)
    dead = torch.rand(2, 6, 5, 7, generator=gen) < 0.4
    got_a, lowp_a = torch.full_like(e, float("nan")), torch.empty_like(e)
    g = vjp_relax.add_relu_vjp_relax_triton(e, dead, e_a, rate, clamp, got_a)
    g_ref = vjp_relax.add_relu_vjp_relax_ref(e, dead, e_a, rate, clamp, lowp_a)
    assert torch.equal(g, g_ref)  # a masked copy: exact in every dtype
    assert bool((g[dead] == 0).all()) and torch.equal(g[~dead], e[~dead])
    want = _relax_math(e_a, e.double().masked_fill(dead, 0.0), rate, clamp)
    _check(got_a, want, lowp_a, dtype, f"add_relu out_a {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("split", [1, 4, 5])
@pytest.mark.parametrize("rate, clamp", [(0.3, None), (0.6, 0.3), (1.0, None)])
def test_concat_relu_vjp_relax_kernel(dtype, split, rate, clamp):
    gen = torch.Generator().manual_seed(split)
    shape = (3, 6, 5, 7)
    e = _randn(shape, gen, dtype)
    dead = torch.rand(shape, generator=gen) < 0.4
    e_a = _randn((3, split, 5, 7), gen, dtype)
    e_b = _randn((3, 6 - split, 5, 7), gen, dtype)
    got_a, got_b = torch.full_like(e_a, float("nan")), torch.full_like(e_b, float("nan"))
    lowp_a, lowp_b = torch.empty_like(e_a), torch.empty_like(e_b)
    vjp_relax.concat_relu_vjp_relax_triton(e, dead, e_a, e_b, rate, clamp, got_a, got_b)
    vjp_relax.concat_relu_vjp_relax_ref(e, dead, e_a, e_b, rate, clamp, lowp_a, lowp_b)
    masked = e.double().masked_fill(dead, 0.0)
    _check(got_a, _relax_math(e_a, masked[:, :split], rate, clamp), lowp_a, dtype, "concat a")
    _check(got_b, _relax_math(e_b, masked[:, split:], rate, clamp), lowp_b, dtype, "concat b")


@pytest.mark.parametrize("block", [64, 1024])
def test_relax_kernels_cover_partial_blocks(block):
    """Sizes that are not a multiple of the block: every element written, nothing beyond."""
    gen = torch.Generator().manual_seed(0)
    e, b = _randn((1000,), gen, torch.float32), _randn((1000,), gen, torch.float32)
    buf = torch.full((1100,), 7.0)
    rk.relax_fwd(e, [b], 0.5, None, buf[:1000], block=block)
    torch.testing.assert_close(buf[:1000], torch.lerp(e, b, 0.5))
    assert bool((buf[1000:] == 7.0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("c_in, c_out, hw, blocks", [(40, 20, (7, 9), (16, 16, 16)),
                                                     (5, 3, (4, 3), (16, 16, 16)),
                                                     (33, 70, (5, 5), (32, 64, 32))])
@pytest.mark.parametrize("with_other, rate, clamp", [(False, 0.5, None), (True, 0.3, 0.8),
                                                     (True, 1.0, None)])
def test_conv1x1_relax_kernel(dtype, c_in, c_out, hw, blocks, with_other, rate, clamp):
    """The matmul with the relax epilogue in one launch, partial tiles in every dimension and a
    K loop of several chunks (c_out 70, BK 32), against float64 math."""
    from pcfast.kernels.conv1x1_relax import conv1x1_relax_fwd

    gen = torch.Generator().manual_seed(c_in)
    g = _randn((2, c_out, *hw), gen, dtype)
    wt = _randn((c_in, c_out), gen, dtype) * 0.3
    e = _randn((2, c_in, *hw), gen, dtype)
    other = _randn((2, c_in, *hw), gen, dtype) if with_other else None
    got, lowp = torch.full_like(e, float("nan")), torch.empty_like(e)
    conv1x1_relax_fwd(g, wt, e, other, rate, clamp, got, blocks=blocks)
    vjp_relax.conv1x1_vjp_relax_ref(g, wt, e, other, rate, clamp, lowp)
    gx = torch.matmul(wt.double(), g.double().reshape(2, c_out, -1)).view(e.shape)
    b = gx if other is None else gx + other.double()
    _check(got, _relax_math(e, b, rate, clamp), lowp, dtype, f"conv1x1 {dtype}")


@pytest.mark.parametrize("dtype, strided, route", [
    (torch.float64, False, "unfused"),   # float64: matmul + pc_relax
    (torch.float32, False, "kernel"),    # the one-launch Triton kernel
    (torch.float32, True, "unfused"),    # a strided g: matmul + pc_relax
])
def test_conv1x1_vjp_relax_cuda_form_matches_the_reference(monkeypatch, dtype, strided, route):
    gen = torch.Generator().manual_seed(2)
    g = _randn((2, 5, 3, 4), gen, dtype).transpose(2, 3) if strided else \
        _randn((2, 5, 4, 3), gen, dtype)
    wt = _randn((6, 5), gen, dtype)
    e, other = _randn((2, 6, 4, 3), gen, dtype), _randn((2, 6, 4, 3), gen, dtype)
    routes = []
    unfused = vjp_relax.conv1x1_vjp_relax_unfused
    monkeypatch.setattr(vjp_relax, "conv1x1_vjp_relax_unfused",
                        lambda *a: (routes.append("unfused"), unfused(*a)))
    got, want = torch.full_like(e, float("nan")), torch.empty_like(e)
    vjp_relax.conv1x1_vjp_relax_cuda(g, wt, e, other, 0.4, 0.8, got)
    assert routes == ([] if route == "kernel" else ["unfused"])
    vjp_relax.conv1x1_vjp_relax_ref(g, wt, e, other, 0.4, 0.8, want)
    tol = 1e-13 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


# ---------------------------------------------------------------- dw_bn_relu two passes
def _dw_case(shape, stride, dtype, affine=True, seed=0):
    """(float64 case, the case in ``dtype``), both with the ReLU mask ``dead``."""
    t = dw_case(shape, stride, affine, seed)
    low = {k: None if v is None else v.to(dtype) for k, v in t.items()}
    low["dead"] = t["dead"] = t["out"] <= 0
    return t, low


SHAPES = [(2, 3, 7, 9), (3, 1, 5, 5), (2, 5, 8, 6), (1, 4, 3, 5), (4, 2, 9, 1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("affine", [True, False])
def test_dw_bn_relu_passes_match_autograd(dtype, shape, stride, affine):
    t, lo = _dw_case(shape, stride, dtype, affine)
    mean, invstd = bn_saved_stats(lo["z"], EPS)
    # small blocks and few partials: the reduction loops, planes span several programs
    part = dwk.bn_partials_fwd(lo["g"], lo["z"], lo["dead"], mean, invstd, split=4, block=8)
    torch.testing.assert_close(part.sum(-1), passes.bn_relu_partials_ref(
        lo["g"], lo["z"], lo["dead"], mean, invstd).sum(-1), rtol=1e-5, atol=1e-5)
    dx = torch.full((shape[0], shape[1], shape[2], shape[3]), float("nan"), dtype=dtype)
    dwk.dw_bn_relu_apply_fwd(lo["g"], lo["z"], lo["dead"], lo["gamma"], mean, invstd, part,
                             lo["w"], stride, None, None, 1.0, None, dx, block=16)
    want = dw_bn_relu_vjp_ref(t["g"], None, None, t["gamma"], t["beta"], t["w"], t["x"], stride)
    lowp = dw_bn_relu_vjp_ref(lo["g"], None, None, lo["gamma"], lo["beta"], lo["w"], lo["x"],
                              stride)
    scale = want.abs().max()
    tol = 2 * (lowp.double() - want).abs() + 8 * torch.finfo(dtype).eps * scale
    assert_within(dx.double(), want, tol, f"dx {dtype} {shape} s{stride}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("with_other", [False, True])
@pytest.mark.parametrize("rate, clamp", [(0.5, None), (0.3, 0.05), (1.0, None)])
def test_dw_bn_relu_relax_passes_match_the_unfused_ops(dtype, stride, with_other, rate, clamp):
    shape = (2, 3, 7, 9)
    _, lo = _dw_case(shape, stride, dtype)
    mean, invstd = bn_saved_stats(lo["z"], EPS)
    gen = torch.Generator().manual_seed(5)
    e = _randn(shape, gen, dtype) * 0.1
    other = _randn(shape, gen, dtype) * 0.1 if with_other else None
    args = (lo["g"], lo["z"], lo["dead"], lo["gamma"], mean, invstd, lo["w"], stride, e, other,
            rate, clamp)
    want = torch.empty_like(e)
    dw_bn_relu_vjp_relax_ref(*args, want)
    part = dwk.bn_partials_fwd(lo["g"], lo["z"], lo["dead"], mean, invstd)
    got = torch.full_like(e, float("nan"))
    dwk.dw_bn_relu_apply_fwd(*args[:6], part, *args[6:], got)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())
    # the CUDA form (two registered ops, their CPU references here) agrees too
    via_ops = torch.empty_like(e)
    dw_bn_relu_vjp_relax_cuda(*args, via_ops)
    torch.testing.assert_close(via_ops, want, rtol=tol, atol=tol * want.abs().max().item())


@pytest.mark.parametrize("stride", [1, 2])
def test_dw_bn_relu_apply_kernel_reads_a_masked_other_as_its_masked_copy(stride):
    shape = (2, 3, 7, 9)
    _, lo = _dw_case(shape, stride, torch.float32)
    mean, invstd = bn_saved_stats(lo["z"], EPS)
    gen = torch.Generator().manual_seed(6)
    e, merge_err = _randn(shape, gen, torch.float32), _randn(shape, gen, torch.float32)
    merge_dead = torch.rand(shape, generator=gen) < 0.5
    part = dwk.bn_partials_fwd(lo["g"], lo["z"], lo["dead"], mean, invstd)
    head = (lo["g"], lo["z"], lo["dead"], lo["gamma"], mean, invstd, part, lo["w"], stride, e)
    got, want = torch.full_like(e, float("nan")), torch.empty_like(e)
    dwk.dw_bn_relu_apply_fwd(*head, merge_err, 0.4, None, got, merge_dead)
    dwk.dw_bn_relu_apply_fwd(*head, merge_err.masked_fill(merge_dead, 0.0), 0.4, None, want)
    assert torch.equal(got, want)
    ref = torch.empty_like(e)
    passes.dw_bn_relu_apply_ref(*head, merge_err, 0.4, None, ref, merge_dead)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_add_relu_kernel_without_g_relaxes_the_same():
    gen = torch.Generator().manual_seed(2)
    e, e_a = _randn((2, 6, 5, 7), gen, torch.float32), _randn((2, 6, 5, 7), gen, torch.float32)
    dead = torch.rand(2, 6, 5, 7, generator=gen) < 0.4
    with_g, without_g = torch.empty_like(e), torch.full_like(e, float("nan"))
    vjp_relax.add_relu_vjp_relax_triton(e, dead, e_a, 0.5, None, with_g)
    none = vjp_relax.add_relu_vjp_relax_triton(e, dead, e_a, 0.5, None, without_g, False)
    assert torch.equal(with_g, without_g) and none.numel() == 0


def test_dw_bn_relu_pass_ops_opcheck():
    _, lo = _dw_case((2, 3, 6, 5), 2, torch.float32)
    mean, invstd = bn_saved_stats(lo["z"], EPS)
    pargs = (lo["g"], lo["z"], lo["dead"], mean, invstd)
    torch.library.opcheck(torch.ops.pcfast.bn_relu_partials.default, pargs)
    part = passes.bn_relu_partials(*pargs)
    e = torch.randn(2, 3, 6, 5)
    for e_, other, rate, clamp in [(None, None, 1.0, None), (e, None, 0.5, None),
                                   (e, torch.randn_like(e), 0.3, 0.1)]:
        torch.library.opcheck(torch.ops.pcfast.dw_bn_relu_apply.default,
                              (*pargs[:3], lo["gamma"], mean, invstd, part, lo["w"], 2, e_, other,
                               rate, clamp, torch.empty(2, 3, 6, 5)))


OPS_WITH_A_CUDA_KERNEL = ["pc_relax", "add_relu_vjp_relax", "concat_relu_vjp_relax",
                          "conv1x1_vjp_relax", "dw_bn_relu_vjp", "dw_bn_relu_vjp_relax",
                          "bn_relu_partials", "dw_bn_relu_apply", "pc_update", "bn_relu_vjp"]


@pytest.mark.parametrize("op", OPS_WITH_A_CUDA_KERNEL)
def test_fast_ops_have_a_cuda_kernel_registered(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pcfast::{op}", "CUDA")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("stride", [1, 2])
def test_registered_ops_on_cuda_match_the_references(dtype, stride):
    """The CUDA kernels behind each registered op (compiled Triton) against the op's reference
    run on the CPU in the same dtype."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    shape = (8, 16, 12, 10)
    _, lo = _dw_case(shape, stride, dtype, seed=7)
    gen = torch.Generator().manual_seed(8)
    e, other = _randn(shape, gen, dtype), _randn(shape, gen, dtype)
    mean, invstd = bn_saved_stats(lo["z"], EPS)
    cpu_args = (lo["g"], lo["z"], lo["dead"], lo["gamma"], mean, invstd, lo["w"], stride, e,
                other, 0.3, 0.5)
    want = torch.empty_like(e)
    dw_bn_relu_vjp_relax_ref(*cpu_args, want)
    cuda_args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in cpu_args)
    got = torch.empty_like(cuda_args[8])
    torch.ops.pcfast.dw_bn_relu_vjp_relax(*cuda_args, got)
    tol = 1e-11 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(got.cpu(), want, rtol=tol, atol=tol * want.abs().max().item())

    dead = lo["dead"]
    for n_backs in (1, 3):
        backs = [_randn(shape, gen, dtype) for _ in range(n_backs)]
        want = torch.empty_like(e)
        pc_relax_ref(e, backs, 0.7, 0.9, want)
        got = torch.empty_like(e).cuda()
        torch.ops.pcfast.pc_relax(e.cuda(), [b.cuda() for b in backs], 0.7, 0.9, got)
        torch.testing.assert_close(got.cpu(), want, rtol=tol, atol=tol)
    want_a = torch.empty_like(e)
    want_g = vjp_relax.add_relu_vjp_relax_ref(e, dead, other, 0.3, None, want_a)
    got_a = torch.empty_like(e).cuda()
    got_g = torch.ops.pcfast.add_relu_vjp_relax(e.cuda(), dead.cuda(), other.cuda(), 0.3, None,
                                                got_a)
    torch.testing.assert_close(got_g.cpu(), want_g, rtol=0, atol=0)
    torch.testing.assert_close(got_a.cpu(), want_a, rtol=tol, atol=tol)
    ea, eb = e[:, :5].contiguous(), e[:, 5:].contiguous()
    want_a, want_b = torch.empty_like(ea), torch.empty_like(eb)
    vjp_relax.concat_relu_vjp_relax_ref(other, dead, ea, eb, 0.6, 0.2, want_a, want_b)
    got_a, got_b = torch.empty_like(ea).cuda(), torch.empty_like(eb).cuda()
    torch.ops.pcfast.concat_relu_vjp_relax(other.cuda(), dead.cuda(), ea.cuda(), eb.cuda(), 0.6,
                                           0.2, got_a, got_b)
    torch.testing.assert_close(got_a.cpu(), want_a, rtol=tol, atol=tol)
    torch.testing.assert_close(got_b.cpu(), want_b, rtol=tol, atol=tol)
