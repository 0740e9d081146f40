"""The destinations that ``pcfast.ops.write_only_args`` declares write-only are never read.

``bench/cost.py`` charges such an argument one write instead of a read and a write, so the
claim must hold on every backend of the op: the registered op (C++ on the CPU where built, else
the reference), the PyTorch reference, and the form CUDA runs (Triton kernels through the interpreter).
Each form runs twice on the same inputs, its destinations filled once with NaN and once with
zeros; the results must be identical and finite (a kernel that read a destination, even to
add zero times it, would carry the NaN through).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import pytest
import torch
from _dw_case import dw_case

from pcfast.ops import (
    bn_saved_stats,
    dw_bn_relu_passes,
    dw_bn_relu_vjp,
    vjp_relax,
    write_only_args,
)
from pcfast.ops.pc_relax import pc_relax_ref, pc_relax_triton

HAS_TRITON = importlib.util.find_spec("triton") is not None
EPS = 1e-5


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _dw_args(stride: int, with_other: bool) -> tuple:
    t = dw_case((2, 3, 6, 5), stride, seed=4)
    lo = {k: (v.float() if v is not None else None) for k, v in t.items()}
    dead = t["out"] <= 0
    mean, invstd = bn_saved_stats(lo["z"], EPS)
    e = _randn(*lo["x"].shape, seed=1)
    other = _randn(*lo["x"].shape, seed=2) if with_other else None
    return (lo["g"], lo["z"], dead, lo["gamma"], mean, invstd, lo["w"], stride, e, other, 0.4,
            0.5)


def _cases() -> dict[str, tuple[Callable[[], tuple], list[int], list[tuple[str, Callable]]]]:
    """Per op: a maker of its arguments without the destinations, the destinations' shapes (as
    indices of arguments they copy), and its backend forms ``(name, fn(*args, *dests))``."""
    e, dead, ea = _randn(2, 4, 3, 5), _randn(2, 4, 3, 5, seed=3) > 0, _randn(2, 4, 3, 5, seed=5)
    a, b = _randn(2, 1, 3, 5, seed=6), _randn(2, 3, 3, 5, seed=7)
    g, wt, e_in = _randn(2, 4, 3, 5, seed=8), _randn(6, 4, seed=9), _randn(2, 6, 3, 5, seed=10)
    backs = [_randn(2, 4, 3, 5, seed=11), _randn(2, 4, 3, 5, seed=12)]
    ops = torch.ops.pcfast
    cases = {
        "pcfast::pc_relax": (lambda: (e, backs, 0.3, 0.6), [0], [
            ("op", ops.pc_relax), ("ref", pc_relax_ref),
            ("cuda", pc_relax_triton)]),
        "pcfast::add_relu_vjp_relax": (lambda: (e, dead, ea, 0.5, None), [2], [
            ("op", ops.add_relu_vjp_relax), ("ref", vjp_relax.add_relu_vjp_relax_ref),
            ("cuda", vjp_relax.add_relu_vjp_relax_triton)]),
        "pcfast::concat_relu_vjp_relax": (lambda: (e, dead, a, b, 0.5, 0.3), [2, 3], [
            ("op", ops.concat_relu_vjp_relax), ("ref", vjp_relax.concat_relu_vjp_relax_ref),
            ("cuda", vjp_relax.concat_relu_vjp_relax_triton)]),
        "pcfast::conv1x1_vjp_relax": (lambda: (g, wt, e_in, e_in * 0.5, 0.5, None), [2], [
            ("op", ops.conv1x1_vjp_relax), ("ref", vjp_relax.conv1x1_vjp_relax_ref),
            ("cuda", vjp_relax.conv1x1_vjp_relax_cuda)]),
    }
    for stride in (1, 2):
        for with_other in (False, True):
            key = f"pcfast::dw_bn_relu_vjp_relax/s{stride}/{'other' if with_other else 'none'}"
            cases[key] = (lambda s=stride, o=with_other: _dw_args(s, o), [8], [
                ("op", ops.dw_bn_relu_vjp_relax), ("ref", dw_bn_relu_vjp.dw_bn_relu_vjp_relax_ref),
                ("cuda", dw_bn_relu_vjp.dw_bn_relu_vjp_relax_cuda)])
            cases[f"pcfast::dw_bn_relu_apply/s{stride}/{'other' if with_other else 'none'}"] = (
                lambda s=stride, o=with_other: _apply_args(s, o), [9], [
                    ("op", ops.dw_bn_relu_apply), ("ref", dw_bn_relu_passes.dw_bn_relu_apply_ref),
                    ("cuda", _apply_triton)])
    return cases


def _apply_args(stride: int, with_other: bool) -> tuple:
    g, z, dead, gamma, mean, invstd, w, s, e, other, rate, clamp = _dw_args(stride, with_other)
    part = dw_bn_relu_passes.bn_relu_partials(g, z, dead, mean, invstd)
    return (g, z, dead, gamma, mean, invstd, part, w, s, e, other, rate, clamp)


def _apply_triton(*args):
    from pcfast.kernels.dw_bn_relu_vjp import dw_bn_relu_apply_fwd

    dw_bn_relu_apply_fwd(*args)


CASES = _cases()


def test_every_declared_write_only_argument_is_a_mutated_argument_of_its_op():
    declared = write_only_args()
    assert set(declared) == {key.split("/")[0] for key in CASES}  # every declaration tested
    for name, arg_names in declared.items():
        namespace, op = name.split("::")
        schema = getattr(getattr(torch.ops, namespace), op).default._schema
        mutated = {a.name for a in schema.arguments
                   if a.alias_info is not None and a.alias_info.is_write}
        assert arg_names and set(arg_names) <= mutated, (name, arg_names, mutated)


def _run(fn, args, dest_like, fill):
    dests = [torch.full_like(args[i], fill) for i in dest_like]
    result = fn(*args, *dests)
    return dests, result


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("form", ["op", "ref", "cuda"])
def test_destinations_are_written_without_being_read(case, form):
    make, dest_like, forms = CASES[case]
    fn = dict(forms)[form]
    if form == "cuda" and not HAS_TRITON:
        pytest.skip("triton not installed")
    args = make()
    # the destination is positioned where the op takes it: after every other argument
    poisoned, r1 = _run(fn, args, dest_like, float("nan"))
    clean, r2 = _run(fn, args, dest_like, 0.0)
    for got, want in zip(poisoned, clean):
        assert torch.isfinite(want).all()
        assert torch.equal(got, want), f"{case} ({form}) read its destination"
    if isinstance(r1, torch.Tensor):
        assert torch.equal(r1, r2)
