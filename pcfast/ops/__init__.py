"""pcfast ops: one public function per op, its autograd glue and its PyTorch reference (``*_ref``).

Each op has backends (``ref``, ``cpu``, ``cuda``, ``triton`` where available) chosen with
``backend="auto"`` and overridable per call.
"""

# Fused BatchNorm(train) + ReLU input-VJP (Triton).
from pcfast.ops.bn_relu_vjp import bn_relu_vjp, bn_relu_vjp_ref, bn_saved_stats

# Dual-path depthwise conv (C++/CUDA, pcfast._C).
from pcfast.ops.dwconv import dual_path_dwconv, dual_path_dwconv_ref, summed_kernel

# Fused PC state update over a flat buffer (Triton).
from pcfast.ops.pc_update import pc_update, pc_update_ref

__all__ = [
    "bn_relu_vjp",
    "bn_relu_vjp_ref",
    "bn_saved_stats",
    "pc_update",
    "pc_update_ref",
    "dual_path_dwconv",
    "dual_path_dwconv_ref",
    "summed_kernel",
]
