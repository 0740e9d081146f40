"""The fast PC backend against the reference backend on one model, timed A/B in one process.

Both engines relax the same batch on identically initialised copies of the model; their
``compute_gradients`` calls alternate (reference, fast, reference, fast, ...) so that a noisy
machine slows both alike, and each backend's best and median times count. Run once at ``--T``
and once at ``T=0`` (feedforward pass and weight gradients only), which gives the time of one
inference step per backend as well.

``--mode`` picks the PC variant: ``fpa`` (default), ``strict`` or ``epc`` (``--schedule`` and
``--rate`` as the engine's).

Usage::

    python bench/backends_ab.py                          # Res-DualNet, batch 64, T=10, CPU
    python bench/backends_ab.py --model resnet20 --device cuda --batch-size 256 --T 100
    python bench/backends_ab.py --model resnet20 --mode strict --T 3 --batch-size 128
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import environment, print_table, sync, write_result  # noqa: E402
from pcfast.models import build_model  # noqa: E402
from pcfast.pc import PCEngine  # noqa: E402

# name -> (backend, backend_options); "fast-steps" (FPA only): the fast backend taking the T
# steps one by one instead of solving them by path length (fpa_solver, pcfast/pc/backends/fpa_levels.py)
VARIANTS = {"reference": ("reference", None), "fast": ("fast", None),
            "fast-steps": ("fast", {"fpa_solver": "steps"})}
MODES = {"fpa": dict(), "strict": dict(fpa=False), "epc": dict(fpa=False, epc=True)}


def variants(mode: str) -> list[str]:
    """The rows for ``mode``: reference and fast; under FPA also the stepped fast solver."""
    return list(VARIANTS) if mode == "fpa" else ["reference", "fast"]


def time_ab(model_name: str, T: int, x: torch.Tensor, y: torch.Tensor, repeats: int,
            mode: str = "fpa", schedule: str = "jacobi", rate: float = 0.5
            ) -> dict[str, list[float]]:
    """Seconds per ``compute_gradients`` call for each variant (:func:`variants`), calls
    alternating."""
    engines = {}
    for name in variants(mode):
        backend, options = VARIANTS[name]
        torch.manual_seed(0)
        net = build_model(model_name).to(x.device).train()
        engines[name] = PCEngine(net.pc_graph(), T=T, rate=rate, schedule=schedule,
                                 backend=backend, backend_options=options, **MODES[mode])
        engines[name].compute_gradients(x, y)  # warm-up (and capture on CUDA)
    times: dict[str, list[float]] = {b: [] for b in engines}
    for _ in range(repeats):
        for backend, engine in engines.items():
            sync(x.device)
            t0 = time.perf_counter()
            engine.compute_gradients(x, y)
            sync(x.device)
            times[backend].append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resdualnet")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--T", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5, help="timed calls per backend and T")
    p.add_argument("--mode", choices=list(MODES), default="fpa", help="PC variant (fpa)")
    p.add_argument("--schedule", choices=["jacobi", "sequential"], default="jacobi")
    p.add_argument("--rate", type=float, default=0.5)
    args = p.parse_args(argv)
    if args.mode == "epc" and args.schedule != "jacobi":
        p.error("--mode epc runs the jacobi schedule only")
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 10, (args.batch_size,), generator=gen).to(device)
    kw = dict(mode=args.mode, schedule=args.schedule, rate=args.rate)
    at_t = time_ab(args.model, args.T, x, y, args.repeats, **kw)
    at_0 = time_ab(args.model, 0, x, y, args.repeats, **kw)
    rows = []
    for backend in variants(args.mode):
        best, med = min(at_t[backend]), sorted(at_t[backend])[len(at_t[backend]) // 2]
        best0 = min(at_0[backend])
        rows.append({"backend": backend, "best_s": best, "median_s": med, "best_T0_s": best0,
                     "step_ms": 1e3 * max(best - best0, 0.0) / max(args.T, 1),
                     "calls_s": at_t[backend], "calls_T0_s": at_0[backend]})
    ref = rows[0]
    for r in rows:
        r["speedup_vs_reference"] = ref["best_s"] / r["best_s"]
        r["step_speedup_vs_reference"] = (ref["step_ms"] / r["step_ms"] if r["step_ms"] > 0
                                          else float("nan"))
    env = environment(device)
    unit = "CPU" if device.type == "cpu" else device.type.upper()
    print(f"\n{env['device_name']} | commit {env['commit'][:10]} | torch {env['torch']} | "
          f"{args.model}, {args.mode}, batch {args.batch_size}, T={args.T}, {args.schedule} | "
          f"{unit} times, "
          f"best of {args.repeats} alternating calls")
    print_table(rows, ["backend", "best_s", "median_s", "best_T0_s", "step_ms",
                       "speedup_vs_reference", "step_speedup_vs_reference"])
    payload = {"benchmark": "backends_ab", "config": vars(args), "rows": rows,
               "environment": env}
    suffix = ("" if args.mode == "fpa" else f"-{args.mode}") + (
        "" if args.schedule == "jacobi" else f"-{args.schedule}")
    path = write_result(f"backends_ab-{args.model}{suffix}", payload)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
