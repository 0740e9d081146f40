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
from pcfast.kernels.conv1x1_relax import BK, BM, BN, _conv1x1_relax_kernel
from pcfast.kernels.dw_bn_relu_vjp import _bn_partials_kernel, _dw_bn_relu_apply_kernel
from pcfast.kernels.pc_update import _pc_update_kernel
from pcfast.kernels.relax import _concat_relax_kernel, _relax_kernel

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


F32X3 = {f"{s}_{p}": "fp32" for s in ("rate", "clamp") for p in ("hi", "mid", "lo")}


def _relax(dtype: str, target: GPUTarget, aligned=(), **flags):
    sig = {**{f"{n}_ptr": f"*{dtype}" for n in ("e", "out", "b0", "b1", "b2", "b3")},
           "dead_ptr": "*i1", "g_ptr": f"*{dtype}", "n_elements": "i64", **F32X3}
    consts = {"NB": 2, "HAS_DEAD": True, "STORE_G": True, "HAS_CLAMP": True, "RATE_ONE": False,
              "LERP_HIGH": True, "ACC_DTYPE": tl.float32, "BLOCK": 1024, **flags}
    return _compile(_relax_kernel, sig, consts, target, aligned)


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: f"sm_{t.arch}")
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_relax_kernels_compile(target, dtype):
    for flags in ({}, {"NB": 4, "HAS_DEAD": False, "STORE_G": False, "RATE_ONE": True}):
        assert len(_relax(dtype, target, **flags).asm["cubin"]) > 0
    sig = {**{f"{n}_ptr": f"*{dtype}" for n in ("e", "ea", "eb", "outa", "outb")},
           "n_elements": "i64", "a_numel": "i64", "b_numel": "i64", **F32X3}
    sig = {"e_ptr": sig.pop("e_ptr"), "dead_ptr": "*i1", **sig}
    consts = {"HAS_CLAMP": False, "RATE_ONE": False, "LERP_HIGH": False,
              "ACC_DTYPE": tl.float32, "BLOCK": 1024}
    assert len(_compile(_concat_relax_kernel, sig, consts, target).asm["cubin"]) > 0


def test_relax_kernel_moves_16_bytes_per_access_on_aligned_buffers():
    aligned = ("e_ptr", "out_ptr", "b0_ptr", "b1_ptr", "b2_ptr", "b3_ptr", "g_ptr", "n_elements")
    ptx = _relax("fp32", TARGETS[1], aligned, HAS_DEAD=False, STORE_G=False).asm["ptx"]
    assert set(re.findall(r"ld\.global[.\w]*", ptx)) == {"ld.global.v4.b32"}
    assert set(re.findall(r"st\.global[.\w]*", ptx)) == {"st.global.v4.b32"}


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: f"sm_{t.arch}")
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("stride", [1, 2])
def test_dw_bn_relu_pass_kernels_compile(target, dtype, stride):
    stats = {"mean_ptr": "*fp32", "invstd_ptr": "*fp32"}
    reduce_sig = {"g_ptr": f"*{dtype}", "z_ptr": f"*{dtype}", "dead_ptr": "*i1", **stats,
                  "part_ptr": "*fp32", "C": "i32", "HWo": "i32", "M": "i32", "chunk": "i32"}
    reduce_consts = {"ACC_DTYPE": tl.float32, "SPLIT_": 16, "BLOCK": 1024}
    apply_sig = {"g_ptr": f"*{dtype}", "z_ptr": f"*{dtype}", "dead_ptr": "*i1",
                 "gamma_ptr": f"*{dtype}", **stats, "part_ptr": "*fp32", "w_ptr": f"*{dtype}",
                 "e_ptr": f"*{dtype}", "other_ptr": f"*{dtype}", "other_dead_ptr": "*i1",
                 "out_ptr": f"*{dtype}",
                 **{k: "i32" for k in ("C", "H", "W", "Ho", "Wo", "M")}, **F32X3}
    apply_consts = {"STRIDE": stride, "HAS_GAMMA": True, "RELAX": True, "HAS_OTHER": True,
                    "OTHER_DEAD": True, "HAS_CLAMP": True, "RATE_ONE": False, "LERP_HIGH": True,
                    "ACC_DTYPE": tl.float32, "SPLIT_": 16, "BLOCK": 256}
    for fn, sig, consts in ((_bn_partials_kernel, reduce_sig, reduce_consts),
                            (_dw_bn_relu_apply_kernel, apply_sig, apply_consts)):
        assert len(_compile(fn, dict(sig), dict(consts), target).asm["cubin"]) > 0


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: f"sm_{t.arch}")
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("has_other", [False, True])
def test_conv1x1_relax_kernel_compiles_without_tf32(target, dtype, has_other):
    sig = {**{f"{n}_ptr": f"*{dtype}" for n in ("wt", "g", "e", "other", "out")},
           "C_in": "i32", "C_out": "i32", "HW": "i32", **F32X3}
    consts = {"HAS_OTHER": has_other, "HAS_CLAMP": True, "RATE_ONE": False, "LERP_HIGH": True,
              "BLOCK_M": BM, "BLOCK_N": BN, "BLOCK_K": BK, "K_STEPS": 4}
    kernel = _compile(_conv1x1_relax_kernel, sig, consts, target)
    assert len(kernel.asm["cubin"]) > 0
    assert ".tf32" not in kernel.asm["ptx"]  # IEEE float32 products, as PyTorch's matmul
