"""Fused PC relaxation of one node: sum the propagated errors, clamp, lerp, write elsewhere.

``pc_relax(e, backs, rate, clamp, out)`` writes ``out = e + rate * (clamp(sum(backs)) - e)``
(``out = clamp(sum(backs))`` for ``rate == 1``), where ``backs`` are the input-VJPs ``J_vu^T e_v``
that the node's children send it (broadcastable to ``e``; any dtype, summed in ``e``'s dtype).
The fast PC backend calls it once per hidden node and step, as the last writer of the node:
no zero-filled accumulation buffer, no separate ``add_`` per contribution, no flat re-read, and
with ``out`` the other half of a double buffer the jacobi schedule needs no copy.

Registered as ``pcfast::pc_relax`` (one dispatched op; mutates ``out``). On CPU it runs the C++
kernel ``pcfast::pc_relax_cpu`` (``pcfast._C``) for contiguous tensors of one dtype, else the
PyTorch reference; on CUDA the Triton kernel ``kernels/relax.py`` (one pass) for up to four
``backs`` of ``e``'s shape, else the PyTorch reference (broadcast ``backs``).
"""

from __future__ import annotations

import importlib

import torch

from pcfast.ops import _ext

__all__ = ["pc_relax", "pc_relax_ref"]


def pc_relax_ref(e: torch.Tensor, backs: list[torch.Tensor], rate: float,
                 clamp: float | None, out: torch.Tensor) -> None:
    """PyTorch reference of :func:`pc_relax` (same arguments; writes ``out``).

    Example::

        e, out = torch.zeros(4, 8), torch.empty(4, 8)
        pc_relax_ref(e, [torch.randn(4, 8)], 0.5, None, out)   # out == 0.5 * back
    """
    b = backs[0].to(e.dtype)
    for other in backs[1:]:
        b = b + other.to(e.dtype)
    if clamp is not None:
        b = b.clamp(-clamp, clamp)
    with torch.no_grad():
        if rate == 1.0:
            out.copy_(b.expand_as(e))
        else:
            torch.lerp(e, b.expand_as(e), rate, out=out)


def _cpu_kernel_fits(e: torch.Tensor, backs: list[torch.Tensor], out: torch.Tensor) -> bool:
    """Whether the C++ kernel ``pcfast::pc_relax_cpu`` takes these tensors (CPU, contiguous,
    one shape and dtype, at most four ``backs``) and is built."""
    if e.device.type != "cpu" or len(backs) > 4 or not (e.is_contiguous() and out.is_contiguous()):
        return False
    shape, dtype = e.shape, e.dtype
    for b in backs:
        if b.shape != shape or b.dtype != dtype or not b.is_contiguous():
            return False
    return _ext.has_kernel("pc_relax_cpu", "cpu")


@torch.library.custom_op("pcfast::pc_relax", mutates_args=("out",))
def _pc_relax_op(e: torch.Tensor, backs: list[torch.Tensor], rate: float,
                 clamp: float | None, out: torch.Tensor) -> None:
    if _cpu_kernel_fits(e, backs, out):
        torch.ops.pcfast.pc_relax_cpu(e, backs, rate, clamp, out)  # C++: one pass
        return
    pc_relax_ref(e, backs, rate, clamp, out)


def _plain_eager(tensors: list[torch.Tensor]) -> bool:
    """No tracing, counting or autograd around plain tensors: the call may go straight to the
    C++ kernel that ``pcfast::pc_relax``'s CPU implementation would run."""
    return (torch._C._len_torch_dispatch_stack() == 0 and not torch.compiler.is_compiling()
            and all(type(t) is torch.Tensor and not t.requires_grad for t in tensors))


def triton_kernels(module: str):
    """The Triton kernel module ``pcfast.kernels.<module>``, or None without Triton."""
    try:
        return importlib.import_module(f"pcfast.kernels.{module}")
    except ImportError:
        return None


def triton_relax():
    """The Triton relax kernels (``pcfast.kernels.relax``), or None without Triton."""
    return triton_kernels("relax")


def pc_relax_triton(e, backs, rate, clamp, out) -> None:
    """What CUDA runs for ``pcfast::pc_relax``: the Triton kernel where it applies (contiguous
    tensors of one shape, at most four ``backs``), else the reference. On CPU tensors the
    kernel runs through Triton's interpreter (how the tests check it)."""
    relax = triton_relax()
    if relax is not None and len(backs) <= 4 and relax.fits(e, out, *backs):
        relax.relax_fwd(e, list(backs), rate, clamp, out)
        return
    pc_relax_ref(e, backs, rate, clamp, out)


@_pc_relax_op.register_kernel("cuda")
def _pc_relax_cuda(e: torch.Tensor, backs: list[torch.Tensor], rate: float,
                   clamp: float | None, out: torch.Tensor) -> None:
    pc_relax_triton(e, backs, rate, clamp, out)


@_pc_relax_op.register_fake
def _pc_relax_fake(e, backs, rate, clamp, out) -> None:
    return None


# What CUDA runs for each op as several unfused kernels (bench/cost.py counts these, not one op,
# for a GPU's step): none for pc_relax, which is one Triton kernel there.
CUDA_COMPOSITES: dict = {}

# Destinations every backend only writes (see pcfast.ops.write_only_args).
WRITE_ONLY = {"pcfast::pc_relax": ("out",)}


def pc_relax(e: torch.Tensor, backs: list[torch.Tensor], rate: float, clamp: float | None,
             out: torch.Tensor) -> None:
    """Relax one node: ``out = lerp(e, clamp(sum(backs)), rate)``.

    Args:
        e: ``(...)`` the node's current error.
        backs: one or more propagated errors, each broadcastable to ``e``'s shape.
        rate: inference rate ``gamma > 0``.
        clamp: if set, the summed ``backs`` are clamped to ``[-clamp, clamp]`` first.
        out: tensor of ``e``'s shape and dtype that receives the new error (may not alias
            any of ``backs``).

    Example::

        pc_relax(err[t % 2][name], [vjp_a, vjp_b], 0.5, None, err[(t + 1) % 2][name])
    """
    if not backs:
        raise ValueError("pc_relax needs at least one propagated error")
    if out.shape != e.shape or out.dtype != e.dtype:
        raise ValueError(f"pc_relax: out is {tuple(out.shape)} {out.dtype}, e is "
                         f"{tuple(e.shape)} {e.dtype}; pass a tensor like e")
    if not rate > 0:
        raise ValueError(f"pc_relax: rate must be positive, got {rate}")
    backs = list(backs)
    rate, clamp = float(rate), None if clamp is None else float(clamp)
    if _plain_eager([e, out, *backs]) and _cpu_kernel_fits(e, backs, out):
        # The same C++ kernel as the op's CPU implementation, without the Python custom-op
        # dispatch around it (~25 us per call on the CPU, more than the kernel's 7 us on a
        # (128, 256) float tensor). Under a dispatch mode (bench/cost.py's count), torch.compile
        # or autograd the public op runs.
        torch.ops.pcfast.pc_relax_cpu(e, backs, rate, clamp, out)
        return
    _pc_relax_op(e, backs, rate, clamp, out)
