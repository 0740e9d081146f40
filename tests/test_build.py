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
import json, runpy, setuptools
captured = {}
setuptools.setup = lambda **kw: captured.update(kw)
runpy.run_path("setup.py", run_name="__main__")
exts = captured.get("ext_modules") or []
print(json.dumps({
    "exts": [e.name for e in exts],
    "sources": sorted(s for e in exts for s in e.sources),
    "package_dir": captured.get("package_dir"),
}))
"""


def _probe(**env: str) -> dict:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PCFAST_")}
    full_env.update(env)
    out = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, env=full_env, check=True,
                         capture_output=True, text=True, timeout=120).stdout
    return json.loads(out.strip().splitlines()[-1])


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
    import shutil

    if torch.version.cuda is None or not (shutil.which("nvcc") or os.environ.get("CUDA_HOME")):
        pytest.skip("needs a CUDA-enabled torch and nvcc")
    sources = _probe()["sources"]
    for name in ("dwconv_fwd.cu", "dwconv_bwd_input.cu", "dwconv_bwd_weight.cu"):
        assert f"csrc/{name}" in sources
