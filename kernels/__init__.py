"""Triton kernels of pcfast (importable as ``pcfast.kernels``).

Each module holds ``_op_kernel`` (``@triton.jit``) and its launchers ``_op_fwd``/``_op_bwd``;
the public ops and their PyTorch references live in ``pcfast.ops``.

Kernels launch on CUDA tensors as compiled code and on CPU tensors through Triton's
interpreter (:func:`for_device`), which is how the CPU tests run them on tiny shapes without
depending on ``TRITON_INTERPRET`` being set before the first import.
"""

from __future__ import annotations

from typing import Any

import torch

# Kernels reduce with ``tl.reduce(x, axis, sum_combine)`` instead of ``tl.sum``: ``tl.sum`` (like
# any helper jit function) is callable from an interpreted kernel only when TRITON_INTERPRET was
# set before triton was imported, while ``tl.reduce`` is a builtin that compiles to the same
# reduction and runs on the interpreter's numpy path with this combiner.
from triton.language.standard import _sum_combine as sum_combine

__all__ = ["for_device", "scalar_parts", "sum_combine"]

_INTERPRETED: dict[int, Any] = {}


def for_device(kernel: Any, device: torch.device) -> Any:
    """``kernel`` itself for a CUDA device, else an interpreted copy of it (built once).

    Example::

        _pc_update_kernel_for = for_device(_pc_update_kernel, x.device)
        _pc_update_kernel_for[grid](...)
    """
    from triton.runtime.interpreter import InterpretedFunction

    if device.type == "cuda" or isinstance(kernel, InterpretedFunction):
        return kernel
    key = id(kernel)
    if key not in _INTERPRETED:
        _INTERPRETED[key] = InterpretedFunction(kernel.fn)
    return _INTERPRETED[key]


def scalar_parts(x: float | None) -> tuple[float, float, float]:
    """``x`` as three float32 values ``hi + mid + lo`` that sum to it exactly: Triton passes a
    Python float to a compiled kernel as float32, and 3 x 24 bits cover a float64's 53 (a kernel
    adds the parts in its accumulation dtype). ``None`` gives zeros.

    Example::

        kernel[grid](..., *scalar_parts(rate))   # kernel: rate_hi, rate_mid, rate_lo
    """
    if x is None:
        return 0.0, 0.0, 0.0
    parts = []
    for _ in range(3):
        parts.append(float(torch.tensor(x, dtype=torch.float32)))
        x -= parts[-1]
    return parts[0], parts[1], parts[2]
