"""Op benchmark: the fused PC state update vs unfused PyTorch updates, at the seed's sizes.

The state is the seed preset's hidden errors: every hidden node of Res-DualNet at batch
``--batch-size`` (256 by default), one flat buffer. Three ways to do one inference step's update
``e <- lerp(e, clamp(back), rate)`` plus the energy ``0.5 * sum(e^2)``:

- ``fused``: :func:`pcfast.ops.pc_update` (one Triton launch + a tiny partial-sum reduction on
  CUDA; the PyTorch reference on CPU, where ``--backend triton`` runs the interpreter);
- ``unfused-flat``: PyTorch ops on the same flat buffer (clamp, lerp, square-sum: 3 passes);
- ``unfused-per-node``: the reference engine's way, the same ops per node tensor (many launches).

Reports ms (median, p20, p80), effective GB/s (the 3 ideal passes: read e, read back, write e)
and peak extra memory (CUDA only). Usage::

    python bench/bench_pc_update.py --device cuda
    python bench/bench_pc_update.py --device cpu --batch-size 4     # CPU smoke run
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import environment, print_table, time_fn, write_result  # noqa: E402
from pcfast.models.resdualnet import ResDualNet  # noqa: E402
from pcfast.ops.pc_update import pc_update  # noqa: E402


def hidden_sizes(batch_size: int) -> list[int]:
    """Element counts of Res-DualNet's hidden nodes (CIFAR-10 input) at ``batch_size``."""
    net = ResDualNet().eval()
    graph = net.pc_graph()
    values = {graph.input_name: torch.zeros(1, 3, 32, 32)}
    with torch.no_grad():
        for node in graph.nodes:
            values[node.name] = node.fn(*(values[p] for p in node.parents))
    return [values[name].numel() * batch_size for name in graph.hidden]


def _peak_extra_mb(fn, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--dtypes", default="float32,bfloat16,float16")
    p.add_argument("--rate", type=float, default=0.5)
    p.add_argument("--clamp", type=float, default=1.0)
    p.add_argument("--backend", choices=("auto", "triton", "ref"), default="auto")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rep", type=int, default=50)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    rate, c = args.rate, args.clamp
    sizes = hidden_sizes(args.batch_size)
    total = sum(sizes)
    rows = []
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name.strip())
        err = torch.randn(total, device=device).to(dtype)
        back = torch.randn(total, device=device).to(dtype)
        err_nodes, back_nodes = list(err.split(sizes)), list(back.split(sizes))

        def fused(err=err, back=back):
            return pc_update(err, back, rate, c, backend=args.backend)

        def flat(err=err, back=back):
            err.lerp_(back.clamp(-c, c), rate)
            return 0.5 * err.float().pow(2).sum()

        def per_node(err_nodes=err_nodes, back_nodes=back_nodes):
            energy = 0.0
            for e, b in zip(err_nodes, back_nodes):
                e.lerp_(b.clamp(-c, c), rate)
                energy = energy + 0.5 * e.float().pow(2).sum()
            return energy

        moved = 3 * total * err.element_size()
        for label, fn in (("fused", fused), ("unfused-flat", flat),
                          ("unfused-per-node", per_node)):
            t = time_fn(fn, warmup=args.warmup, rep=args.rep, device=device)
            rows.append({"dtype": name, "impl": label, "elements": total, **t,
                         "GB/s": moved / (t["median_ms"] * 1e-3) / 1e9,
                         "peak_extra_MB": _peak_extra_mb(fn, device)})
    env = environment(device)
    print(f"{env['device_name']} | commit {env['commit'][:10]} | torch {env['torch']} | "
          f"triton {env['triton']} | {len(sizes)} hidden nodes, {total:,} elements "
          f"(batch {args.batch_size})")
    if device.type == "cpu":
        print("CPU run (perf_counter): checks that the benchmark works; not the product's speed.")
    print_table(rows, ["dtype", "impl", "median_ms", "p20_ms", "p80_ms", "GB/s",
                       "peak_extra_MB"])
    payload = {"benchmark": "pc_update", "config": {**vars(args), "nodes": len(sizes),
                                                    "elements": total},
               "rows": rows, "environment": env}
    print(f"wrote {write_result('pc_update', payload)}")
    return payload


if __name__ == "__main__":
    main()
