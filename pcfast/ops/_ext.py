"""Optional loader of the compiled extension ``pcfast._C``.

``pcfast._C`` registers C++/CUDA ops under ``torch.ops.pcfast``. It may be missing (pure-Python
install, ``PCFAST_SKIP_EXT=1``), fail to load (built against another torch), or be stale (built
from other sources than ``csrc/`` holds now, in a source checkout). Ops then fall back to their
reference path with one warning; asking for a compiled backend explicitly raises an error that
says how to rebuild.

Example::

    from pcfast.ops import _ext
    if _ext.has_kernel("dwconv_fwd", "cpu"):
        ...
"""

from __future__ import annotations

import hashlib
import importlib
import warnings
from pathlib import Path
from types import ModuleType

import torch

REBUILD_HINT = "rebuild it with `MAX_JOBS=1 pip install --no-build-isolation -e .` in the repo root"
SOURCE_SUFFIXES = (".cpp", ".cu", ".h", ".cuh")
_CSRC = Path(__file__).resolve().parents[2] / "csrc"
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}

_module: ModuleType | None = None
_reason: str | None = None
_loaded = False
_warned = False


def source_hash(csrc: Path = _CSRC) -> str:
    """SHA-256 prefix over the ``csrc/`` sources; identical to ``setup.py``'s ``source_hash``."""
    digest = hashlib.sha256()
    for path in sorted(p for p in csrc.iterdir() if p.suffix in SOURCE_SUFFIXES):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _stale_reason(module: ModuleType) -> str | None:
    built_torch = getattr(module, "torch_version", "unknown")
    if built_torch != torch.__version__:
        return f"pcfast._C was built against torch {built_torch}, running torch {torch.__version__}"
    if _CSRC.is_dir():
        built, current = getattr(module, "source_hash", "unknown"), source_hash()
        if built != current:
            return (f"pcfast._C is stale: built from csrc/ sources {built}, "
                    f"csrc/ now hashes to {current}")
    return None


def load() -> ModuleType | None:
    """Import ``pcfast._C`` once; return it, or None when it is missing, broken or stale."""
    global _module, _reason, _loaded
    if not _loaded:
        _loaded = True
        try:
            module = importlib.import_module("pcfast._C")
        except (ImportError, OSError) as exc:
            _reason = f"pcfast._C could not be imported ({exc})"
        else:
            _reason = _stale_reason(module)
            _module = module if _reason is None else None
    return _module


def unavailable_reason() -> str | None:
    """Why the extension is not used, or None when it is loaded and current."""
    load()
    return _reason


# (loaded module, op, dispatch key) -> has a kernel. The extension registers its kernels when it
# is imported, so the dispatcher is asked once per loaded module (~6 us a question, about a
# small fused kernel's own time; the ops ask on every call).
_kernel_known: dict[tuple[ModuleType, str, str], bool] = {}


def has_kernel(op: str, device_type: str) -> bool:
    """True when the loaded extension has a kernel of ``pcfast::<op>`` for ``device_type``."""
    key = _DISPATCH_KEYS.get(device_type)
    module = load()
    if key is None or module is None:
        return False
    known = _kernel_known.get((module, op, key))
    if known is None:
        known = torch._C._dispatch_has_kernel_for_dispatch_key(f"pcfast::{op}", key)
        _kernel_known[(module, op, key)] = known
    return known


def require(op: str, device_type: str) -> None:
    """Raise a RuntimeError naming the problem and the rebuild command unless the kernel exists."""
    if has_kernel(op, device_type):
        return
    if load() is None:
        raise RuntimeError(f"{unavailable_reason()}; {REBUILD_HINT}")
    if device_type == "cuda":
        raise RuntimeError(
            f"pcfast._C was built without CUDA kernels (no nvcc or CPU-only torch at build time, "
            f"or PCFAST_SKIP_CUDA=1), so pcfast::{op} has no CUDA backend; with nvcc and a "
            f"CUDA-enabled torch, {REBUILD_HINT}")
    raise RuntimeError(f"pcfast::{op} has no compiled kernel for device type {device_type!r}")


def compiled_cuda_archs() -> list[str] | None:
    """The CUDA architectures ``pcfast._C`` holds code for (``["7.5", ..., "9.0+PTX"]``), ``[]``
    when it was built without CUDA, None when it is not loaded or does not say."""
    module = load()
    text = getattr(module, "cuda_archs", None) if module is not None else None
    if text is None:
        return None
    return [a for a in text.split(",") if a]


def arch_covers(capability: tuple[int, int], archs: list[str]) -> bool:
    """Whether a GPU of compute capability ``(major, minor)`` can run code built for ``archs``.

    Machine code for ``X.Y`` runs on ``X.Z`` with ``Z >= Y`` (same major); PTX for ``X.Y``
    (``"X.Y+PTX"``) is compiled by the driver for any capability ``>= X.Y``.
    """
    for arch in archs:
        ptx = arch.endswith("+PTX")
        major, minor = (int(v) for v in arch.removesuffix("+PTX").split("."))
        if capability[0] == major and capability[1] >= minor:
            return True
        if ptx and capability >= (major, minor):
            return True
    return False


_checked_devices: set[int] = set()


def check_cuda_device(device: torch.device) -> None:
    """Raise a RuntimeError naming the GPU, its capability, the compiled architectures and the
    rebuild command when ``pcfast._C`` has no code this GPU can run (checked once per device)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index in _checked_devices:
        return
    archs = compiled_cuda_archs()
    capability = torch.cuda.get_device_capability(index)
    if archs and not arch_covers(capability, archs):
        name = torch.cuda.get_device_name(index)
        cc = f"{capability[0]}.{capability[1]}"
        raise RuntimeError(
            f"pcfast._C has no CUDA kernels for {name} (compute capability {cc}): it was compiled "
            f"for {';'.join(archs)}. Rebuild it for this GPU with "
            f"`PCFAST_CUDA_ARCHS=\"{cc}\" pip install --no-build-isolation -e .` in the pcfast "
            "checkout (or add it to the list to keep the others)")
    _checked_devices.add(index)


def warn_fallback(op: str, device_type: str) -> None:
    """Warn once per process that compiled ops fall back to the reference path."""
    global _warned
    if _warned:
        return
    _warned = True
    reason = unavailable_reason() or f"pcfast._C has no {device_type} kernel for pcfast::{op}"
    warnings.warn(
        f"{reason}; pcfast ops use the slower PyTorch reference path. To use the compiled ops, "
        f"{REBUILD_HINT}.",
        RuntimeWarning,
        stacklevel=3,
    )
