"""Op microbenchmark: dual-path depthwise conv (pcfast._C) vs PyTorch's conv2d(groups=C).

For every Res-DualNet depthwise layer shape it times forward, input-VJP and weight-VJP of
``pcfast.ops.dual_path_dwconv`` (compiled backend of the device) against PyTorch's own grouped
conv of the two-path reference (``conv2d(C -> 2C, groups=C)`` + pairwise sum, and its
``aten.convolution_backward``) and reports ms, GB/s (compulsory traffic: each tensor read or
written once) and peak memory (CUDA only). On a CPU it compares the C++ op with PyTorch's CPU
conv; those rows say ``device_kind: cpu`` and are correctness-run timings, not product speed.

Run (writes bench/results/dwconv-<cpu|cuda>.json)::

    python -m bench.bench_dwconv                 # GPU: batch 256
    python -m bench.bench_dwconv --batch 8       # CPU check run
    pytest bench/bench_dwconv.py                 # pytest-benchmark, CPU, one small shape each
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import pytest
import torch

from bench.common import environment, print_table, time_fn, write_result
from pcfast.ops import dual_path_dwconv_ref

# (channels, input H = W, stride) of the Res-DualNet depthwise layers.
LAYERS = [(16, 32, 1), (32, 32, 1), (64, 32, 1), (64, 32, 2), (128, 16, 1), (128, 16, 2),
          (256, 8, 1)]
PASSES = ("fwd", "bwd_input", "bwd_weight")


def make_inputs(batch: int, c: int, hw: int, stride: int, dtype: torch.dtype,
                device: torch.device) -> dict[str, torch.Tensor]:
    """x (N, C, H, W), weight (2C, 1, 3, 3), grad (N, C, Ho, Wo) and the two-path grad."""
    ho = (hw - 1) // stride + 1
    g = torch.randn(batch, c, ho, ho, device=device, dtype=dtype)
    return {
        "x": torch.randn(batch, c, hw, hw, device=device, dtype=dtype),
        "w": torch.randn(2 * c, 1, 3, 3, device=device, dtype=dtype),
        "g": g,
        # d(sum over paths)/d(path output) = 1: both paths receive g.
        "g2": g.repeat_interleave(2, dim=1),
    }


def pcfast_fn(pass_name: str, t: dict[str, torch.Tensor], stride: int) -> Callable[[], object]:
    """The compiled op's entry point for one pass."""
    ops = torch.ops.pcfast
    x, w, g = t["x"], t["w"], t["g"]
    if pass_name == "fwd":
        return lambda: ops.dwconv_fwd(x, w, stride)
    if pass_name == "bwd_input":
        return lambda: ops.dwconv_bwd_input(g, w, stride, x.shape[2], x.shape[3])
    return lambda: ops.dwconv_bwd_weight(g, x, stride)


def torch_fn(pass_name: str, t: dict[str, torch.Tensor], stride: int) -> Callable[[], object]:
    """PyTorch's grouped conv (two-path reference) for one pass."""
    x, w, g2 = t["x"], t["w"], t["g2"]
    c = x.shape[1]
    if pass_name == "fwd":
        return lambda: dual_path_dwconv_ref(x, w, stride)
    mask = [pass_name == "bwd_input", pass_name == "bwd_weight", False]
    return lambda: torch.ops.aten.convolution_backward(
        g2, x, w, None, [stride, stride], [1, 1], [1, 1], False, [0, 0], c, mask)


def traffic_bytes(pass_name: str, t: dict[str, torch.Tensor]) -> int:
    """Compulsory bytes moved by the fused op (activations once, weights once)."""
    x, w, g = t["x"], t["w"], t["g"]
    return (x.numel() + g.numel() + w.numel()) * x.element_size()


def _peak_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def run(batch: int, dtype: torch.dtype, device: torch.device, warmup: int,
        rep: int) -> list[dict]:
    """Time every layer and pass for both implementations; return the result rows."""
    rows = []
    for c, hw, stride in LAYERS:
        t = make_inputs(batch, c, hw, stride, dtype, device)
        for pass_name in PASSES:
            nbytes = traffic_bytes(pass_name, t)
            for impl, make in (("pcfast", pcfast_fn), ("torch", torch_fn)):
                fn = make(pass_name, t, stride)
                timing = time_fn(fn, warmup=warmup, rep=rep, device=device)
                rows.append({
                    "layer": f"C{c}@{hw}x{hw}/s{stride}", "pass": pass_name, "impl": impl,
                    "ms": timing["median_ms"], "p20_ms": timing["p20_ms"],
                    "p80_ms": timing["p80_ms"],
                    "GB/s": nbytes / (timing["median_ms"] * 1e-3) / 1e9,
                    "peak_MiB": _peak_mb(fn, device),
                })
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rep", type=int, default=10)
    args = parser.parse_args(argv)
    import pcfast.ops  # noqa: F401  (loads pcfast._C, registers the ops)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    rows = run(args.batch, dtype, device, args.warmup, args.rep)
    print_table(rows, ["layer", "pass", "impl", "ms", "GB/s", "peak_MiB"])
    path = write_result("dwconv", {
        "config": {"batch": args.batch, "dtype": args.dtype, "warmup": args.warmup,
                   "rep": args.rep, "layers": LAYERS,
                   "baseline": "torch conv2d(C->2C, groups=C) + pair sum / "
                               "aten.convolution_backward"},
        "rows": rows,
        "environment": environment(device),
    })
    print(f"wrote {path}")


@pytest.mark.parametrize("pass_name", PASSES)
@pytest.mark.parametrize("impl", ["pcfast", "torch"])
def test_bench_dwconv_cpu(benchmark, impl: str, pass_name: str) -> None:
    """pytest-benchmark entry (CPU): one small Res-DualNet layer, batch 4."""
    import pcfast.ops  # noqa: F401

    t = make_inputs(4, 64, 32, 1, torch.float32, torch.device("cpu"))
    benchmark((pcfast_fn if impl == "pcfast" else torch_fn)(pass_name, t, 1))


if __name__ == "__main__":
    main()
