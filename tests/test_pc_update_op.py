"""``pcfast.ops.pc_update``: the Triton kernel (interpreted on CPU) and the op vs the reference.

The oracle is :func:`pc_update_ref` run in float64; a low-precision result may be off by at most
twice the error of the reference run in that same precision (plus a few ulps of slack).
"""

from __future__ import annotations

import pytest
import torch
from _assert import assert_within

from pcfast.ops.pc_update import pc_update, pc_update_ref

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _oracle(state, back, rate, clamp, mu):
    s = state.double().clone()
    energy = pc_update_ref(s, back.double(), rate, clamp, None if mu is None else mu.double())
    return s, energy


def _lowp_ref(state, back, rate, clamp, mu):
    s = state.clone()
    energy = pc_update_ref(s, back, rate, clamp, mu)
    return s, energy


def _slack(dtype, want, on_cpu):
    """A few fp32 ulps, plus one bf16 ulp on CPU: Triton's interpreter converts float32 to
    bfloat16 by truncation (round-toward-zero) where the GPU rounds to nearest even."""
    eps = torch.finfo(torch.float32).eps * (1 + want.abs())
    if on_cpu and dtype == torch.bfloat16:
        eps = eps + torch.finfo(torch.bfloat16).eps * want.abs()
    return eps


def _assert_close(got, want, lowp, what):
    """``|got - want| <= 2 |lowp - want| + slack``, reporting count and first mismatches."""
    slack = _slack(got.dtype, want.double(), got.device.type == "cpu")
    got, want, lowp = got.double(), want.double(), lowp.double()
    tol = 2 * (lowp - want).abs() + slack
    assert_within(got, want, tol, what)


def _inputs(n, dtype, value_space, seed=0):
    g = torch.Generator().manual_seed(seed)
    state = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    back = (2 * torch.randn(n, generator=g, dtype=torch.float64)).to(dtype)
    mu = torch.randn(n, generator=g, dtype=torch.float64).to(dtype) if value_space else None
    return state, back, mu


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value_space", [False, True])
@pytest.mark.parametrize("rate,clamp", [(0.5, None), (1.0, 0.7), (0.3, 1.5)])
@pytest.mark.parametrize("n", [1, 65, 2051])
def test_triton_matches_reference(dtype, value_space, rate, clamp, n):
    state, back, mu = _inputs(n, dtype, value_space)
    want, want_energy = _oracle(state, back, rate, clamp, mu)
    lowp, lowp_energy = _lowp_ref(state, back, rate, clamp, mu)
    got = state.clone()
    energy = pc_update(got, back, rate, clamp, mu, backend="triton")
    assert energy.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    _assert_close(got, want, lowp, "state")
    # The kernel accumulates in fp32 while a low-precision reference squares in fp32 too; the
    # energy tolerance follows from the state tolerance: |d(0.5 e^2)| <= |e| |de| summed.
    de = 2 * (lowp.double() - want).abs() + _slack(dtype, want, True)
    tol = float((want.abs() * de).sum()) + 1e-5 * float(want_energy) + 1e-12
    assert abs(float(energy) - float(want_energy)) <= tol, (float(energy), float(want_energy))
    del lowp_energy


def test_float64_is_bit_exact():
    state, back, mu = _inputs(3001, torch.float64, False, seed=3)
    for rate in (0.25, 0.5, 1.0):
        ref, got = state.clone(), state.clone()
        pc_update_ref(ref, back, rate, 1.0)
        pc_update(got, back, rate, 1.0, backend="triton")
        assert torch.equal(got, ref), rate


@pytest.mark.parametrize("backend", ["triton", "auto", "ref"])
def test_strided_view_updates_in_place(backend):
    buf = torch.randn(2, 130, dtype=torch.float32)
    untouched = buf[:, 1::2].clone()
    view = buf[:, ::2]  # non-contiguous
    back = torch.randn(2, 65)
    want = view.clone()
    pc_update_ref(want, back, 0.5)
    pc_update(view, back, 0.5, backend=backend)
    torch.testing.assert_close(buf[:, ::2], want)
    assert torch.equal(buf[:, 1::2], untouched)


def test_flat_buffer_with_node_views_in_one_call():
    # The engine's layout: one flat buffer, one view per node, one call for all of them.
    shapes = [(2, 3, 5, 5), (2, 7), (2, 4, 3, 3)]
    sizes = [torch.Size(s).numel() for s in shapes]
    flat = torch.randn(sum(sizes), dtype=torch.float64)
    back = torch.randn(sum(sizes), dtype=torch.float64)
    views = [v.view(s) for v, s in zip(flat.split(sizes), shapes)]
    want = [torch.lerp(v, b.view(s), 0.5) for v, b, s in zip(views, back.split(sizes), shapes)]
    energy = pc_update(flat, back, 0.5, backend="triton")
    for v, w in zip(views, want):
        assert torch.equal(v, w)
    torch.testing.assert_close(energy, sum(0.5 * w.pow(2).sum() for w in want))


def test_opcheck_cpu():
    state, back, mu = _inputs(37, torch.float32, True)
    torch.library.opcheck(torch.ops.pcfast.pc_update.default, (state.clone(), back, mu, 0.5, 1.0))
    torch.library.opcheck(torch.ops.pcfast.pc_update.default,
                          (state.clone(), back, None, 1.0, None))


def test_clear_errors():
    with pytest.raises(ValueError, match="back has shape"):
        pc_update(torch.zeros(3), torch.zeros(4), 0.5)
    with pytest.raises(ValueError, match="backend must be one of"):
        pc_update(torch.zeros(3), torch.zeros(3), 0.5, backend="cuda")
    with pytest.raises(ValueError, match="rate must be positive"):
        pc_update(torch.zeros(3), torch.zeros(3), 0.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_op_matches_reference(dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    state, back, mu = _inputs(1 << 20 | 3, dtype, False)
    want, _ = _oracle(state, back, 0.5, 1.0, mu)
    lowp, _ = _lowp_ref(state, back, 0.5, 1.0, mu)
    got = state.cuda()
    energy = pc_update(got, back.cuda(), 0.5, 1.0)
    _assert_close(got.cpu(), want, lowp, "state")
    torch.testing.assert_close(energy.cpu().double(), 0.5 * want.pow(2).sum(), rtol=1e-4, atol=0)
    torch.library.opcheck(torch.ops.pcfast.pc_update.default,
                          (state.cuda(), back.cuda(), None, 0.5, 1.0))
