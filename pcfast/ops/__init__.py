"""pcfast ops: one public function per op, its autograd glue and its PyTorch reference (``*_ref``).

Each op has backends (``ref``, ``cpu``, ``cuda``, ``triton`` where available) chosen with
``backend="auto"`` and overridable per call.
"""

# Fused BatchNorm(train) + ReLU input-VJP (Triton).
from pcfast.ops.bn_relu_vjp import bn_relu_vjp, bn_relu_vjp_ref, bn_saved_stats

# Strict PC on a dense chain (an MLP), all T steps in one op (C++).
from pcfast.ops.dense_strict import dense_strict_relax, dense_strict_relax_ref

# Dual-path depthwise conv (C++/CUDA, pcfast._C).
from pcfast.ops.dwconv import dual_path_dwconv, dual_path_dwconv_ref, summed_kernel

# Fused PC relaxation of one node (the fast engine's per-node update).
from pcfast.ops.pc_relax import pc_relax, pc_relax_ref

# Fused PC state update over a flat buffer (Triton).
from pcfast.ops.pc_update import pc_update, pc_update_ref


def cuda_composites() -> dict:
    """``{"pcfast::op": callable}`` for the registered ops that CUDA runs as several launches
    (each callable takes the op's arguments and dispatches what CUDA launches for it)."""
    import importlib

    out: dict = {}
    for name in ("pc_relax", "dw_bn_relu_vjp", "vjp_relax"):
        out.update(importlib.import_module(f"pcfast.ops.{name}").CUDA_COMPOSITES)
    return out


def write_only_args() -> dict[str, tuple[str, ...]]:
    """``{"pcfast::op": (argument, ...)}``: the mutated arguments of the registered ops that
    every backend only writes (destinations such as ``out``; never read, so ``bench/cost.py``
    charges them one write, as it does aten's ``out=`` arguments, not a read and a write)."""
    import importlib

    out: dict = {}
    for name in ("pc_relax", "dw_bn_relu_vjp", "dw_bn_relu_passes", "vjp_relax"):
        out.update(importlib.import_module(f"pcfast.ops.{name}").WRITE_ONLY)
    return out


__all__ = [
    "cuda_composites",
    "write_only_args",
    "bn_relu_vjp",
    "bn_relu_vjp_ref",
    "bn_saved_stats",
    "pc_relax",
    "pc_relax_ref",
    "pc_update",
    "pc_update_ref",
    "dense_strict_relax",
    "dense_strict_relax_ref",
    "dual_path_dwconv",
    "dual_path_dwconv_ref",
    "summed_kernel",
]
