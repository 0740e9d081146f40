"""The compiled extension pcfast._C: present, current, and what setup.py decides to build."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pcfast.ops import _ext

ROOT = Path(__file__).resolve().parents[1]

# Runs setup.py with setuptools.setup captured, for one environment, and prints what it would build.
_PROBE = r"""
import json, os, runpy, setuptools
captured = {}
setuptools.setup = lambda **kw: captured.update(kw)
runpy.run_path("setup.py", run_name="__main__")
exts = captured.get("ext_modules") or []
args = [a for e in exts for flags in (e.extra_compile_args or {}).values() for a in flags]
print(json.dumps({
    "exts": [e.name for e in exts],
    "sources": sorted(s for e in exts for s in e.sources),
    "package_dir": captured.get("package_dir"),
    "compile_args": args,
    "arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST"),
}))
"""


def _probe(**env: str) -> dict:
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith("PCFAST_") and k != "TORCH_CUDA_ARCH_LIST"}
    full_env.update(env)
    out = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, env=full_env, check=True,
                         capture_output=True, text=True, timeout=120).stdout
    return json.loads(out.strip().splitlines()[-1])


def _needs_cuda_build() -> None:
    import shutil

    if torch.version.cuda is None or not (shutil.which("nvcc") or os.environ.get("CUDA_HOME")
                                          or Path("/usr/local/cuda/bin/nvcc").exists()):
        pytest.skip("needs a CUDA-enabled torch and nvcc")


def test_extension_imports_and_is_current() -> None:
    import pcfast._C as ext

    assert ext.torch_version == torch.__version__
    assert ext.source_hash == _ext.source_hash(), (
        "pcfast._C is stale; rebuild with `MAX_JOBS=1 pip install --no-build-isolation -e .`")
    assert _ext.load() is ext and _ext.unavailable_reason() is None


def test_cpu_kernels_registered() -> None:
    for op in ("dwconv_fwd", "dwconv_bwd_input", "dwconv_bwd_weight"):
        assert _ext.has_kernel(op, "cpu"), op


def test_cuda_kernels_registered_when_built_with_cuda() -> None:
    import pcfast._C as ext

    if not ext.with_cuda:
        pytest.skip("pcfast._C was built without CUDA")
    for op in ("dwconv_fwd", "dwconv_bwd_input", "dwconv_bwd_weight"):
        assert _ext.has_kernel(op, "cuda"), op


def test_setup_skip_flags() -> None:
    assert _probe(PCFAST_SKIP_EXT="1")["exts"] == []
    cpu_only = _probe(PCFAST_SKIP_CUDA="1")
    assert cpu_only["exts"] == ["pcfast._C"]
    assert cpu_only["package_dir"] == {"pcfast.kernels": "kernels"}
    assert "csrc/dwconv_cpu.cpp" in cpu_only["sources"]
    assert not any(s.endswith(".cu") for s in cpu_only["sources"])


def test_setup_builds_cuda_sources_when_nvcc_and_cuda_torch() -> None:
    _needs_cuda_build()
    sources = _probe()["sources"]
    for name in ("dwconv_fwd.cu", "dwconv_bwd_input.cu", "dwconv_bwd_weight.cu"):
        assert f"csrc/{name}" in sources


def test_setup_leaves_the_language_standard_to_torch() -> None:
    # torch's extension builder adds the -std its headers need (C++20 from torch 2.14); a forced
    # -std=c++17 broke every build against torch 2.14.
    for env in ({}, {"PCFAST_SKIP_CUDA": "1"}):
        args = _probe(**env)["compile_args"]
        assert args, "no compile arguments captured"
        assert not [a for a in args if a.startswith("-std")], args


def test_default_cuda_archs_cover_turing_to_hopper_plus_ptx() -> None:
    _needs_cuda_build()
    info = _probe()
    assert info["arch_list"] == "7.5;8.0;8.6;8.9;9.0+PTX"
    assert '-DPCFAST_CUDA_ARCHS="7.5,8.0,8.6,8.9,9.0+PTX"' in info["compile_args"]
    assert _probe(PCFAST_CUDA_ARCHS="8.6 9.0")["arch_list"] == "8.6;9.0"


def test_bad_cuda_archs_value_is_named() -> None:
    _needs_cuda_build()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PCFAST_")}
    env["PCFAST_CUDA_ARCHS"] = "sm_90"
    proc = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "PCFAST_CUDA_ARCHS" in proc.stderr and "sm_90" in proc.stderr


def test_built_extension_records_its_cuda_archs() -> None:
    import pcfast._C as ext

    archs = _ext.compiled_cuda_archs()
    if not ext.with_cuda:
        assert archs == []
        return
    expected = os.environ.get("PCFAST_CUDA_ARCHS", "7.5;8.0;8.6;8.9;9.0+PTX")
    assert archs == expected.replace(" ", ";").split(";"), (archs, expected)


@pytest.mark.parametrize(("capability", "archs", "covered"), [
    ((7, 5), ["7.5", "8.0", "8.6", "8.9", "9.0+PTX"], True),    # T4: machine code
    ((8, 7), ["7.5", "8.0", "8.6", "8.9", "9.0+PTX"], True),    # Orin: 8.6 code runs on 8.7
    ((12, 0), ["7.5", "8.0", "8.6", "8.9", "9.0+PTX"], True),   # Blackwell: PTX of 9.0
    ((10, 0), ["8.0", "9.0"], False),                           # no PTX: nothing for 10.0
    ((7, 0), ["7.5", "8.0", "9.0+PTX"], False),                 # V100 predates every arch
    ((8, 0), ["8.6"], False),                                   # code for 8.6 needs >= 8.6
    ((9, 0), ["8.0"], False),                                   # machine code is per major
])
def test_arch_coverage(capability, archs, covered) -> None:
    assert _ext.arch_covers(capability, archs) is covered


def test_uncovered_gpu_is_named_with_the_rebuild_command(monkeypatch) -> None:
    monkeypatch.setattr(_ext, "compiled_cuda_archs", lambda: ["8.0", "9.0"])
    monkeypatch.setattr(_ext, "_checked_devices", set())
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (12, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA RTX 5090")
    with pytest.raises(RuntimeError) as info:
        _ext.check_cuda_device(torch.device("cuda", 0))
    text = str(info.value)
    for part in ("NVIDIA RTX 5090", "12.0", "8.0;9.0", 'PCFAST_CUDA_ARCHS="12.0"',
                 "pip install --no-build-isolation -e ."):
        assert part in text, (part, text)
    monkeypatch.setattr(_ext, "compiled_cuda_archs", lambda: ["8.0", "9.0+PTX"])
    _ext.check_cuda_device(torch.device("cuda", 0))  # PTX covers it: no error
