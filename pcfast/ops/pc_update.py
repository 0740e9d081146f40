"""Fused PC state update: relax every hidden node's state in one pass and return the energy.

``pc_update(state, back, rate, clamp=None, mu=None)`` updates ``state`` in place:

- error space (``mu=None``, what the FPA engine runs): ``e <- e + rate * (clamp(back) - e)``;
- value space (``mu`` given): ``e = x - mu``, ``x <- x - rate * (e - clamp(back))``;

and returns ``0.5 * ||e_new||^2`` (``e_new = x_new - mu`` in value space), accumulated in
float32 (float64 for float64 states). ``state`` is typically one flat buffer holding every hidden
node's state, so one launch updates the whole network.

Backends: ``"triton"`` (``kernels/pc_update.py``; CUDA tensors compiled, CPU tensors through the
Triton interpreter), ``"ref"`` (:func:`pc_update_ref`, PyTorch), ``"auto"`` (the registered op
``pcfast::pc_update``: Triton on CUDA, the reference on CPU).
"""

from __future__ import annotations

import torch

BACKENDS = ("auto", "triton", "ref")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def pc_update_ref(state: torch.Tensor, back: torch.Tensor, rate: float,
                  clamp: float | None = None, mu: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch reference of :func:`pc_update` (same arguments, same in-place update).

    Example::

        e = torch.zeros(1000); back = torch.randn(1000)
        energy = pc_update_ref(e, back, rate=0.5)   # e == 0.5 * back
    """
    b = back.clamp(-clamp, clamp) if clamp is not None else back
    acc = _acc_dtype(state.dtype)
    with torch.no_grad():
        if mu is None:
            state.copy_(torch.lerp(state, b.to(state.dtype), rate))
            e_new = state.to(acc)
        else:
            state.sub_(rate * ((state - mu) - b))
            e_new = state.to(acc) - mu.to(acc)
        return 0.5 * e_new.pow(2).sum()


def _check(state: torch.Tensor, back: torch.Tensor, rate: float, clamp: float | None,
           mu: torch.Tensor | None) -> None:
    if not state.is_floating_point():
        raise TypeError(f"pc_update needs a floating-point state, got {state.dtype}")
    for name, t in (("back", back), ("mu", mu)):
        if t is None:
            continue
        if t.shape != state.shape:
            raise ValueError(f"pc_update: {name} has shape {tuple(t.shape)} but state has "
                             f"{tuple(state.shape)}; pass tensors of one shape")
        if t.device != state.device:
            raise ValueError(f"pc_update: {name} is on {t.device} but state is on "
                             f"{state.device}; move them to one device")
    if not rate > 0:
        raise ValueError(f"pc_update: rate must be positive, got {rate}")
    if clamp is not None and not clamp > 0:
        raise ValueError(f"pc_update: clamp must be positive or None, got {clamp}")


def _pc_update_triton(state: torch.Tensor, back: torch.Tensor, rate: float,
                      clamp: float | None, mu: torch.Tensor | None) -> torch.Tensor:
    try:
        from pcfast.kernels.pc_update import _pc_update_fwd
    except ImportError as exc:
        raise RuntimeError("pc_update backend='triton' needs Triton: pip install 'pcfast[kernels]'"
                           ", or pass backend='ref'") from exc
    flat = state if state.is_contiguous() else state.contiguous()
    energy = _pc_update_fwd(flat, back.contiguous(),
                            mu.contiguous() if mu is not None else None, rate, clamp)
    if flat is not state:
        state.copy_(flat)
    return energy


@torch.library.custom_op("pcfast::pc_update", mutates_args=("state",))
def _pc_update_op(state: torch.Tensor, back: torch.Tensor, mu: torch.Tensor | None,
                  rate: float, clamp: float | None) -> torch.Tensor:
    return pc_update_ref(state, back, rate, clamp, mu)


@_pc_update_op.register_kernel("cuda")
def _pc_update_op_cuda(state: torch.Tensor, back: torch.Tensor, mu: torch.Tensor | None,
                       rate: float, clamp: float | None) -> torch.Tensor:
    return _pc_update_triton(state, back, rate, clamp, mu)


@_pc_update_op.register_fake
def _pc_update_fake(state: torch.Tensor, back: torch.Tensor, mu: torch.Tensor | None,
                    rate: float, clamp: float | None) -> torch.Tensor:
    return state.new_empty((), dtype=_acc_dtype(state.dtype))


def pc_update(state: torch.Tensor, back: torch.Tensor, rate: float, clamp: float | None = None,
              mu: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """Fused PC state update of ``state`` (in place); returns the energy of the new state.

    Args:
        state: errors ``e`` (``mu=None``) or values ``x``; any shape, typically a flat buffer
            ``(n,)`` holding every hidden node; float32, bfloat16, float16 or float64.
        back: the propagated errors ``sum_v J_vu^T e_v``, same shape.
        rate: inference rate ``gamma > 0``.
        clamp: if set, ``back`` is clamped to ``[-clamp, clamp]`` first.
        mu: predictions (value space) or ``None`` (error space).
        backend: ``"auto"``, ``"triton"`` or ``"ref"``.

    Returns:
        0-d tensor ``0.5 * ||e_new||^2`` (float32; float64 for float64 states).

    Example::

        errors = torch.zeros(4096, device="cuda")
        energy = pc_update(errors, back, rate=0.5, clamp=1.0)
    """
    if backend not in BACKENDS:
        raise ValueError(f"pc_update backend must be one of {BACKENDS}, got {backend!r}")
    _check(state, back, rate, clamp, mu)
    if backend == "ref":
        return pc_update_ref(state, back, rate, clamp, mu)
    if backend == "triton":
        return _pc_update_triton(state, back, rate, clamp, mu)
    return _pc_update_op(state, back, mu, float(rate), None if clamp is None else float(clamp))
