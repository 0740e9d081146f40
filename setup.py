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
- ``PCFAST_CUDA_ARCHS``: ``;``- or space-separated compute capabilities, default
  ``7.5;8.0;8.6;8.9;9.0+PTX`` (machine code for each; a ``+PTX`` suffix also embeds PTX, which
  newer GPUs compile at first use).
- ``MAX_JOBS``: parallel compile jobs, default and cap derived from cores and RAM (nvcc with the
  torch headers takes ~2 GiB per job).

Build: ``MAX_JOBS=1 pip install --no-build-isolation -e .``
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

import setuptools
from setuptools import find_packages, setup


def _check_build_tools() -> None:
    """``pip install --no-build-isolation`` builds with this environment's setuptools: one older
    than 70.1 has no ``bdist_wheel`` without the ``wheel`` package, and pip then fails with
    "invalid command 'bdist_wheel'". Say what to install instead."""
    major, minor = (int(v) for v in setuptools.__version__.split(".")[:2])
    if (major, minor) >= (70, 1):
        return
    try:
        import wheel  # noqa: F401
    except ImportError:
        raise SystemExit(
            f"pcfast: setuptools {setuptools.__version__} in this environment cannot build a "
            "wheel; run `pip install \"setuptools>=70.1\"` and install pcfast again") from None


_check_build_tools()

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
CUDA_SOURCES = ("dwconv_fwd.cu", "dwconv_bwd_input.cu", "dwconv_bwd_weight.cu", "dwconv_cuda.cpp")
SOURCE_SUFFIXES = (".cpp", ".cu", ".h", ".cuh")
# Machine code for Turing (T4) through Hopper, plus PTX of the newest so that later GPUs
# (Blackwell, 10.x/12.x) JIT-compile it at first use.
DEFAULT_CUDA_ARCHS = "7.5;8.0;8.6;8.9;9.0+PTX"
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


def cuda_arch_list() -> list[str]:
    """The compute capabilities to compile for: ``PCFAST_CUDA_ARCHS`` or the default."""
    text = os.environ.get("PCFAST_CUDA_ARCHS", "").strip() or DEFAULT_CUDA_ARCHS
    archs = [a for a in text.replace(",", ";").replace(" ", ";").split(";") if a]
    for arch in archs:
        number = arch.removesuffix("+PTX")
        major, _, minor = number.partition(".")
        if not (major.isdigit() and minor.isdigit()):
            raise ValueError(f"PCFAST_CUDA_ARCHS: {arch!r} is not a compute capability such as "
                             f"'8.0' or '9.0+PTX' (got {text!r})")
    return archs


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
    # No -std flag: torch's extension builder adds the standard its own headers need (C++17 up to
    # torch 2.13, C++20 from 2.14), for the host compiler and nvcc alike.
    cxx = ["-O3", *defines]
    # The CPU ops split their work with at::parallel_for, which runs serially unless the ops are
    # compiled with OpenMP (torch's Linux wheels bring the libgomp it then links against).
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx += openmp
    kwargs: dict = {
        "name": "pcfast._C",
        "include_dirs": [str(CSRC)],
        "py_limited_api": False,
        "extra_link_args": openmp,
    }
    if with_cuda:
        archs = cuda_arch_list()
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)
        # Commas, not semicolons: the define passes through a shell in ninja's command line.
        cuda_defines = ["-DPCFAST_WITH_CUDA", f'-DPCFAST_CUDA_ARCHS="{",".join(archs)}"']
        sources = [f"csrc/{s}" for s in (*cpu_sources, *CUDA_SOURCES)]
        nvcc = ["-O3", "-lineinfo", *defines, *cuda_defines]
        ext = cpp_extension.CUDAExtension(
            sources=sources,
            extra_compile_args={"cxx": [*cxx, *cuda_defines], "nvcc": nvcc},
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
