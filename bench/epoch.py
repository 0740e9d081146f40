"""Epoch-level benchmark: the seed PC preset on Res-DualNet, naive vs reference vs fast vs BP.

One run, one device, one network (Res-DualNet, 141,354 parameters), one input pipeline. Each mode
trains ``--batches`` timed batches (after one untimed warm-up batch) and reports the median batch
time, s/epoch (50,000 CIFAR-10 training images; "extrapolated from N batches" unless N batches
make a whole epoch), the ratio to BP, and for the PC modes the time of one inference step
(``(t(T) - t(T=0)) / T``, both timed) against one whole BP training step.

Usage::

    python bench/epoch.py --device cuda                       # seed preset: batch 256, T=100
    python bench/epoch.py --device cpu --batches 1 --T 2 --batch-size 8   # CPU smoke run

Pipelines: ``device`` (uint8 images resident on the device; flip + normalise there; default) or
``dataloader`` (the seed's torchvision transforms on the CPU through a DataLoader). Images are
synthetic uint8 of CIFAR-10 shape: timing does not depend on their content.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import environment, print_table, sync, write_result  # noqa: E402
from bench.naive_pc import (  # noqa: E402
    NaivePC,
    make_uint8_dataset,
    seed_loader,
)
from pcfast.data import DeviceLoader, build_preprocessor  # noqa: E402
from pcfast.models.resdualnet import ResDualNet  # noqa: E402
from pcfast.pc import PCEngine  # noqa: E402

MODES = ("naive", "reference", "fast", "bp")
EPOCH_IMAGES = 50_000


def device_batches(data, batch_size: int, device: torch.device, seed: int = 0):
    """Endless shuffled batches from pcfast's own device-resident loader (flip + normalise), the
    pipeline ``pcfast train`` uses."""
    images = torch.from_numpy(data[0]).permute(0, 3, 1, 2).contiguous()
    labels = torch.from_numpy(data[1])
    loader = DeviceLoader(images, labels, batch_size, shuffle=True, flip=True, drop_last=True,
                          preprocess=build_preprocessor("cifar10").fit(images.to(device)),
                          seed=seed, device=device)
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def loader_batches(data, batch_size: int, device: torch.device):
    """Endless batches from the seed's CPU DataLoader, copied to ``device``."""
    while True:
        for x, y in seed_loader(data, batch_size):
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def make_trainer(mode: str, T: int, device: torch.device, fast_options: dict):
    """``(train_step(x, y), model)`` for one mode, on a freshly seeded Res-DualNet."""
    torch.manual_seed(0)
    net = ResDualNet().to(device).train()
    if mode == "naive":
        naive = NaivePC(net, T=T, rate=0.5, lr=0.01)
        return naive.step, net
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    if mode == "bp":
        def bp_step(x, y):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()
            opt.step()
        return bp_step, net
    backend = "fast" if mode == "fast" else "reference"
    engine = PCEngine(net.pc_graph(), T=T, rate=0.5, schedule="jacobi", backend=backend,
                      backend_options=fast_options if mode == "fast" else None)
    return (lambda x, y: engine.step(x, y, opt)), net



def time_batches(step, batches, n: int, device: torch.device) -> list[float]:
    """Seconds per batch for ``n`` batches after one warm-up batch (data loading included)."""
    step(*next(batches))
    sync(device)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step(*next(batches))
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batches", type=int, default=10, help="timed batches per mode")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--T", type=int, default=100, help="inference steps")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of {MODES}")
    p.add_argument("--pipeline", choices=("device", "dataloader"), default="device")
    p.add_argument("--kernels", choices=("auto", "triton", "torch"), default="auto",
                   help="fast mode: fused-op backend")
    p.add_argument("--no-cuda-graph", action="store_true", help="fast mode: eager steps")
    p.add_argument("--autocast", action="store_true", help="fast mode: bf16 feedforward")
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        p.error(f"unknown modes {unknown}; choose from {MODES}")
    device = torch.device(args.device)
    fast_options = {"kernels": args.kernels, "cuda_graph": not args.no_cuda_graph,
                    "autocast": args.autocast}
    n_images = max(args.batch_size * (args.batches + 2), 512)
    data = make_uint8_dataset(n_images)
    batches_per_epoch = math.ceil(EPOCH_IMAGES / args.batch_size)
    rows = []
    for mode in modes:
        feed = (device_batches(data, args.batch_size, device) if args.pipeline == "device"
                else loader_batches(data, args.batch_size, device))
        step, _ = make_trainer(mode, args.T, device, fast_options)
        times = time_batches(step, feed, args.batches, device)
        med = sorted(times)[len(times) // 2]
        row = {"mode": mode, "batch_s": med, "s_per_epoch": med * batches_per_epoch,
               "timed_batches": len(times)}
        if mode != "bp" and args.T > 0:
            step0, _ = make_trainer(mode, 0, device, fast_options)
            t0 = sorted(time_batches(step0, feed, args.batches, device))[len(times) // 2]
            row["step_ms"] = 1e3 * max(med - t0, 0.0) / args.T
        rows.append(row)
        print(f"{mode}: {med:.4g} s/batch", flush=True)
    bp = next((r for r in rows if r["mode"] == "bp"), None)
    for r in rows:
        if bp is not None:
            r["x_bp_epoch"] = r["s_per_epoch"] / bp["s_per_epoch"]
            if "step_ms" in r:
                r["step_vs_bp_step"] = r["step_ms"] / (1e3 * bp["batch_s"])
    env = environment(device)
    extrapolated = args.batches < batches_per_epoch
    label = (f"s/epoch extrapolated from {args.batches} batches" if extrapolated
             else "s/epoch measured")
    print(f"\n{env['device_name']} | commit {env['commit'][:10]} | torch {env['torch']} | "
          f"triton {env['triton']} | {label}")
    if device.type == "cpu":
        print("CPU run: checks that the benchmark works; not the product's speed.")
    print_table(rows, ["mode", "batch_s", "s_per_epoch", "x_bp_epoch", "step_ms",
                       "step_vs_bp_step"])
    payload = {"benchmark": "epoch", "label": label, "config": {
        **vars(args), "modes": modes, "rate": 0.5, "schedule": "jacobi", "optimizer": "Adam 0.01",
        "model": "ResDualNet (141,354 parameters)", "epoch_images": EPOCH_IMAGES,
        "batches_per_epoch": batches_per_epoch, "data": "synthetic uint8 images 32x32x3"},
        "rows": rows, "environment": env}
    path = write_result("epoch", payload)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
