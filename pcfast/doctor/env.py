"""The environment part of ``pcfast doctor``: versions, the compiled extension, devices, TF32."""

from __future__ import annotations

import contextlib
import importlib
import platform
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

from pcfast.doctor.report import INFO, NOT_AVAILABLE, WARN, Row

UNKNOWN = "unknown"


def _row(name: str, detail: str, status: str = INFO, device: str | None = None) -> Row:
    return Row("env", name, status, detail, device=device)


def triton_version() -> str | None:
    """Triton's version, or None when it is not installed (or fails to import)."""
    try:
        import triton
    except Exception:  # ImportError, or a broken install raising anything at import
        return None
    return getattr(triton, "__version__", UNKNOWN)


def version_rows() -> list[Row]:
    """pcfast, Python, torch, Triton and CUDA versions."""
    import pcfast

    cuda_build = torch.version.cuda
    rows = [
        _row("pcfast", f"{pcfast.__version__} ({Path(pcfast.__file__).parent})"),
        _row("python", f"{platform.python_version()} ({sys.executable})"),
        _row("torch", f"{torch.__version__} ("
             + (f"built with CUDA {cuda_build})" if cuda_build else "CPU-only build)")),
    ]
    tv = triton_version()
    rows.append(_row("triton", tv) if tv else
                _row("triton", "not installed: Triton backends unavailable "
                     "(pip install 'pcfast[kernels]')", NOT_AVAILABLE))
    if torch.cuda.is_available():
        rows.append(_row("CUDA", f"available: {torch.cuda.device_count()} device(s), "
                         f"runtime {cuda_build}"))
    else:
        why = ("torch.cuda.is_available() is False (no GPU or driver)" if cuda_build
               else "this torch build has no CUDA")
        rows.append(_row("CUDA", why, NOT_AVAILABLE))
    return rows


def _import_extension() -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module("pcfast._C"), None
    except (ImportError, OSError) as exc:
        return None, str(exc)


def extension_rows() -> list[Row]:
    """Whether ``pcfast._C`` is built, for which CUDA architectures, and whether it is current."""
    from pcfast.ops import _ext

    module, error = _import_extension()
    if module is None:
        return [_row("pcfast._C", f"not built or not importable ({error}); ops use the PyTorch "
                     f"reference path. To build it, {_ext.REBUILD_HINT}", WARN)]
    with_cuda = bool(getattr(module, "with_cuda", False))
    archs = getattr(module, "cuda_archs", None)
    archs_text = UNKNOWN if archs is None else (archs or "none (built without CUDA)")
    rows = [
        _row("pcfast._C", f"built: {Path(module.__file__).name}"),
        _row("pcfast._C CUDA", ("with CUDA kernels" if with_cuda else "CPU kernels only")
             + f"; archs: {archs_text}"),
    ]
    reason = _ext.unavailable_reason()
    built = (f"sources {getattr(module, 'source_hash', UNKNOWN)}, "
             f"torch {getattr(module, 'torch_version', UNKNOWN)}")
    if reason is None:
        rows.append(_row("pcfast._C status", f"current ({built})"))
    else:
        rows.append(_row("pcfast._C status", f"NOT USED: {reason}; ops fall back to the PyTorch "
                         f"reference path. To fix, {_ext.REBUILD_HINT}", WARN))
    return rows


def _arch_note(capability: tuple[int, int]) -> str:
    """Whether the loaded extension has code for this compute capability, where it says."""
    from pcfast.ops import _ext

    module, _ = _import_extension()
    archs = getattr(module, "cuda_archs", None) if module is not None else None
    covers = getattr(_ext, "arch_covers", None)
    if not archs or covers is None:
        return ""
    names = [a for a in archs.replace(";", ",").split(",") if a]
    return "; pcfast._C has code for it" if covers(capability, names) else (
        f"; pcfast._C has NO code for it (built for {archs})")


def device_unavailable(device: torch.device) -> str | None:
    """Why ``device`` cannot be checked here (no GPU, no such GPU), or None when it can."""
    if device.type != "cuda":
        return None
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    if device.index is not None and device.index >= torch.cuda.device_count():
        return f"no such device: {torch.cuda.device_count()} CUDA device(s)"
    return None


def device_rows(devices: list[torch.device]) -> list[Row]:
    """One row per device to check: the CPU's threads, each GPU's name and capability."""
    rows = []
    for dev in devices:
        if dev.type == "cpu":
            rows.append(_row("device cpu", f"{platform.machine()} "
                             f"{platform.processor() or ''}".strip()
                             + f", torch uses {torch.get_num_threads()} threads", device="cpu"))
        elif (reason := device_unavailable(dev)) is not None:
            rows.append(_row(f"device {dev}", reason, NOT_AVAILABLE, device=str(dev)))
        else:
            index = dev.index if dev.index is not None else torch.cuda.current_device()
            props = torch.cuda.get_device_properties(index)
            cap = (props.major, props.minor)
            rows.append(_row(f"device cuda:{index}",
                             f"{props.name}, compute capability {cap[0]}.{cap[1]}, "
                             f"{props.total_memory / 2**30:.0f} GiB" + _arch_note(cap),
                             device=str(dev)))
    return rows


def tf32_row() -> Row:
    """The TF32 settings float32 matmuls and convolutions run under."""
    return _row("TF32", f"cuda.matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}, "
                f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, "
                f"float32_matmul_precision={torch.get_float32_matmul_precision()!r}")


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """TF32 off while checking (restored after): checks compare against float32 tolerances."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    precision = torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn
