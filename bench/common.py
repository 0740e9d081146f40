"""Shared benchmark harness: environment record, timing, JSON results.

Every benchmark in ``bench/`` times with :func:`time_fn` and saves with :func:`write_result`, so
all results carry the same environment record (device name, commit, torch/triton versions).

Timing: on CUDA, CUDA events around each call with an L2 flush before it (the method of
``triton.testing.do_bench``, by call count instead of a millisecond budget); on CPU
``time.perf_counter``. Timings on a CPU check that a benchmark runs; they are not the
product's speed (see bench/README.md).

Example::

    from bench.common import environment, time_fn, write_result
    t = time_fn(lambda: torch.mm(a, b), warmup=5, rep=20)
    write_result("mm", {"config": {"n": 512}, "timing": t, "environment": environment()})
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

# PCFAST_RESULTS_DIR redirects every result (bench/gpu_check.sh collects one run in one folder).
RESULTS_DIR = Path(os.environ.get("PCFAST_RESULTS_DIR") or Path(__file__).resolve().parent / "results")


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def environment(device: str | torch.device | None = None) -> dict[str, Any]:
    """Where a number was measured: device name, commit, versions, host.

    ``device`` defaults to CUDA when present. The ``device_kind`` field is ``"cpu"`` or
    ``"cuda"``, so a reader can tell CPU checks from GPU measurements at a glance.
    """
    dev = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
    else:
        cpu = platform.processor() or platform.machine()
        name = f"CPU: {cpu} ({torch.get_num_threads()} threads)"
    return {
        "device_kind": dev.type,
        "device_name": name,
        "commit": _commit(),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "host": platform.node(),
        "time_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _quantiles(samples_ms: Sequence[float]) -> dict[str, float]:
    s = sorted(samples_ms)

    def q(p: float) -> float:
        # Linear interpolation between closest ranks.
        pos = p * (len(s) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)

    return {"median_ms": statistics.median(s), "p20_ms": q(0.2), "p80_ms": q(0.8),
            "n": len(s)}


def time_fn(fn: Callable[[], Any], warmup: int = 3, rep: int = 10,
            device: str | torch.device | None = None) -> dict[str, float]:
    """Time ``fn()``: ``warmup`` untimed calls, then ``rep`` timed ones.

    Returns ``{"median_ms", "p20_ms", "p80_ms", "n"}``. ``device`` picks the clock: CUDA events
    (``triton.testing.do_bench`` when Triton is present) for a CUDA device, ``perf_counter``
    otherwise; by default CUDA when present.
    """
    if warmup < 0 or rep < 1:
        raise ValueError(f"need warmup >= 0 and rep >= 1, got warmup={warmup}, rep={rep}")
    dev = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        return _time_cuda(fn, warmup, rep)
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(rep):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(samples)


def sync(device: str | torch.device) -> None:
    """Wait for ``device``'s queued work (CUDA); a no-op on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _time_cuda(fn: Callable[[], Any], warmup: int, rep: int) -> dict[str, float]:
    # do_bench takes warm-up and repetition budgets in milliseconds; callers here ask for call
    # counts, so time each call with CUDA events after flushing L2 as do_bench does.
    cache = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(rep):
        cache.zero_()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end))
    return _quantiles(samples)


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as JSON to ``bench/results/<name>-<device_kind>.json``; return the path.

    ``payload`` gets an ``environment`` entry (from :func:`environment`) unless it has one.
    """
    if not name or any(c in name for c in "/\\ "):
        raise ValueError(f"result name must be a plain file stem, got {name!r}")
    payload = dict(payload)
    payload.setdefault("environment", environment())
    kind = payload["environment"].get("device_kind", "unknown")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}-{kind}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """Print ``rows`` as a fixed-width table of ``columns``."""
    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c)
              for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
