"""Build script for pcfast.

Maps the top-level ``kernels/`` folder to the package ``pcfast.kernels`` and builds the compiled
extension ``pcfast._C`` (ninja) from ``csrc/``:

- the C++ CPU ops always;
- the CUDA ops when torch is CUDA-enabled (``torch.version.cuda``) and nvcc is found
  (``CUDA_HOME``/``CUDA_PATH``, ``/usr/local/cuda`` or ``nvcc`` on ``PATH``). Never decided by
  ``torch.cuda.is_available()``: build machines often have no GPU.

Environment:

- ``PCFAST_SKIP_EXT=1``: build no extension (pure-Python install; ops use the reference path).
- ``PCFAST_SKIP_CUDA=1``: CPU-only extension.
- ``PCFAST_CUDA_ARCHS``: ``;``- or space-separated compute capabilities, default ``8.0;9.0``
  (a ``+PTX`` suffix, e.g. ``9.0+PTX``, also embeds PTX).
- ``MAX_JOBS``: parallel compile jobs, default and cap derived from cores and RAM (nvcc with the
  torch headers takes ~2 GiB per job).

Build: ``MAX_JOBS=1 pip install --no-build-isolation -e .``
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
CUDA_SOURCES = ("dwconv_fwd.cu", "dwconv_bwd_input.cu", "dwconv_bwd_weight.cu", "dwconv_cuda.cpp")
SOURCE_SUFFIXES = (".cpp", ".cu", ".h", ".cuh")
DEFAULT_CUDA_ARCHS = "8.0;9.0"
GIB_PER_JOB = 2


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def source_hash(csrc: Path = CSRC) -> str:
    """SHA-256 over csrc/ sources (names and bytes); pcfast.ops._ext recomputes it to spot a stale
    build. Keep the two implementations identical."""
    digest = hashlib.sha256()
    for path in sorted(p for p in csrc.iterdir() if p.suffix in SOURCE_SUFFIXES):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _find_cuda_home() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").exists():
            return home
    if Path("/usr/local/cuda/bin/nvcc").exists():
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    return str(Path(nvcc).resolve().parent.parent) if nvcc else None


def _max_jobs() -> int:
    cores = os.cpu_count() or 1
    try:
        ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        ram_gib = 8.0
    cap = max(1, min(cores, int(ram_gib // GIB_PER_JOB)))
    asked = os.environ.get("MAX_JOBS")
    return max(1, min(int(asked), cap)) if asked and asked.isdigit() else cap


def _nvidia_wheel_includes() -> list[str]:
    """Headers (cuBLAS, cuSPARSE, ...) that torch's CUDA headers include, shipped by the pip
    ``nvidia-*`` wheels when the system toolkit is a minimal one."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    if spec is None or spec.submodule_search_locations is None:
        return []
    return sorted(
        str(inc) for base in spec.submodule_search_locations
        for inc in Path(base).glob("*/include") if inc.is_dir()
    )


def _extensions() -> tuple[list, dict]:
    if _flag("PCFAST_SKIP_EXT"):
        return [], {}
    import torch

    cuda_home = None
    if not _flag("PCFAST_SKIP_CUDA") and torch.version.cuda is not None:
        cuda_home = _find_cuda_home()
        if cuda_home is not None:
            # torch.utils.cpp_extension reads CUDA_HOME when it is first imported.
            os.environ.setdefault("CUDA_HOME", cuda_home)
    from torch.utils import cpp_extension

    os.environ["MAX_JOBS"] = str(_max_jobs())
    with_cuda = cuda_home is not None
    cpu_sources = sorted(
        p.name for p in CSRC.glob("*.cpp") if p.name not in CUDA_SOURCES
    )
    defines = [
        "-DPCFAST_PYTHON_MODULE",
        f'-DPCFAST_SOURCE_HASH="{source_hash()}"',
        f'-DPCFAST_TORCH_VERSION="{torch.__version__}"',
    ]
    cxx = ["-O3", "-std=c++17", *defines]
    kwargs: dict = {
        "name": "pcfast._C",
        "include_dirs": [str(CSRC)],
        "py_limited_api": False,
    }
    if with_cuda:
        archs = os.environ.get("PCFAST_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        sources = [f"csrc/{s}" for s in (*cpu_sources, *CUDA_SOURCES)]
        nvcc = ["-O3", "-std=c++17", "-lineinfo", *defines,
                "-DPCFAST_WITH_CUDA"]
        ext = cpp_extension.CUDAExtension(
            sources=sources,
            extra_compile_args={"cxx": [*cxx, "-DPCFAST_WITH_CUDA"], "nvcc": nvcc},
            **{**kwargs, "include_dirs": [str(CSRC), *_nvidia_wheel_includes()]},
        )
    else:
        ext = cpp_extension.CppExtension(
            sources=[f"csrc/{s}" for s in cpu_sources],
            extra_compile_args={"cxx": cxx},
            **kwargs,
        )
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build_ext}


packages = find_packages(include=["pcfast", "pcfast.*"]) + ["pcfast.kernels"]
ext_modules, cmdclass = _extensions()

setup(
    packages=packages,
    package_dir={"pcfast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
