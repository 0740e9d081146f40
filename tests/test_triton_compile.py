"""Every Triton kernel compiles for the GPUs pcfast targets (sm_80, sm_90), without a GPU.

Triton compiles ahead of time for a named target (ptxas ships with it), so CI on a CPU-only machine
catches kernels that the interpreter runs but the compiler rejects, and checks that the fused
update's loads and stores are 16 bytes wide when its buffers are aligned.
"""

from __future__ import annotations

import re

import pytest
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pcfast.kernels.bn_relu_vjp import _bn_relu_vjp_kernel, _bn_relu_vjp_reduce_kernel
from pcfast.kernels.pc_update import _pc_update_kernel

TARGETS = [GPUTarget("cuda", 80, 32), GPUTarget("cuda", 90, 32)]
DTYPES = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}


def _compile(fn, signature: dict, constexprs: dict, target: GPUTarget, aligned=()):
    names = list(signature)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    for k in constexprs:
        signature[k] = "constexpr"
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs,
                                    attrs=attrs), target=target)


def _pc_update(dtype: str, target: GPUTarget, has_mu: bool, aligned=()):
    sig = {"state_ptr": f"*{dtype}", "back_ptr": f"*{dtype}", "mu_ptr": f"*{dtype}",
           "partial_ptr": "*fp32", "n_elements": "i64", "rate": "fp32", "clamp_val": "fp32"}
    consts = {"HAS_MU": has_mu, "HAS_CLAMP": True, "LERP_HIGH": True,
              "ACC_DTYPE": tl.float32, "BLOCK": 1024}
    return _compile(_pc_update_kernel, sig, consts, target, aligned)


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: f"sm_{t.arch}")
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("has_mu", [False, True], ids=["error-space", "value-space"])
def test_pc_update_compiles(target, dtype, has_mu):
    kernel = _pc_update(dtype, target, has_mu)
    assert len(kernel.asm["cubin"]) > 0
    assert f"sm_{target.arch}" in kernel.asm["ptx"]


def test_pc_update_moves_16_bytes_per_access_on_aligned_buffers():
    aligned = ("state_ptr", "back_ptr", "mu_ptr", "partial_ptr", "n_elements")
    ptx = _pc_update("fp32", TARGETS[1], False, aligned).asm["ptx"]
    loads = set(re.findall(r"ld\.global[.\w]*", ptx))
    stores = set(re.findall(r"st\.global[.\w]*", ptx))
    assert loads == {"ld.global.v4.b32"}, loads
    assert "st.global.v4.b32" in stores, stores


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: f"sm_{t.arch}")
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_bn_relu_vjp_kernels_compile(target, dtype):
    ints = {"M": "i32", "C": "i32", "HW": "i32", "stride_n": "i32", "stride_c": "i32",
            "stride_hw": "i32"}
    consts = {"ACC_DTYPE": tl.float32, "BLOCK_M": 64, "BLOCK_C": 16}
    reduce_sig = {"g_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "z_ptr": f"*{dtype}",
                  "mean_ptr": "*fp32", "invstd_ptr": "*fp32", "psum_dy_ptr": "*fp32",
                  "psum_dyx_ptr": "*fp32", **ints}
    apply_sig = {"g_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "z_ptr": f"*{dtype}",
                 "mean_ptr": "*fp32", "invstd_ptr": "*fp32", "scale_ptr": "*fp32",
                 "k1_ptr": "*fp32", "k2_ptr": "*fp32", "dz_ptr": f"*{dtype}", **ints,
                 "dz_stride_n": "i32", "dz_stride_c": "i32", "dz_stride_hw": "i32"}
    for fn, sig in ((_bn_relu_vjp_reduce_kernel, reduce_sig), (_bn_relu_vjp_kernel, apply_sig)):
        assert len(_compile(fn, dict(sig), dict(consts), target).asm["cubin"]) > 0
