"""How closely PC's weight gradients follow BP's, per weight tensor, on one batch.

For each PC setting (``--pc SCHEDULE:T[:RATE]``, FPA) the weight gradient of every weight tensor
is compared with BP's gradient of the mean cross-entropy on the same weights and batch: the norm
ratio ``||g_pc|| / ||g_bp||`` and the cosine. Under FPA the errors after ``T`` steps are BP's
backward vectors scaled by a coefficient per path length, ``C_k(T)``
(``pcfast/pc/backends/fpa_levels.py``): where every ``C_k`` is 1 (enough jacobi steps) both
columns read 1.000 for every tensor; with few steps the layers far from the output get a small
gradient (the ratio) made mostly of their short paths (the cosine). Inputs are random images of
CIFAR-10 shape (the comparison is of the two rules on the same batch, not of the data).

Usage::

    python bench/grad_alignment.py                                  # Res-DualNet at its init
    python bench/grad_alignment.py --checkpoint runs/seed-gap/pc/checkpoint.pt
    python bench/grad_alignment.py --model resnet20 --pc sequential:2 --pc jacobi:60
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import environment, print_table, write_result  # noqa: E402
from pcfast.models import build_model  # noqa: E402
from pcfast.pc import PCEngine  # noqa: E402
from pcfast.train.checkpoint import load_checkpoint  # noqa: E402


def parse_setting(text: str) -> dict:
    """``"sequential:2"`` or ``"jacobi:100:0.5"`` -> engine options (rate 0.5 by default)."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or parts[0] not in ("jacobi", "sequential"):
        raise argparse.ArgumentTypeError(
            f"--pc takes SCHEDULE:T[:RATE] with SCHEDULE jacobi or sequential, got {text!r}")
    try:
        T, rate = int(parts[1]), float(parts[2]) if len(parts) == 3 else 0.5
    except ValueError:
        raise argparse.ArgumentTypeError(f"--pc {text!r}: T must be an int, RATE a float") \
            from None
    return {"schedule": parts[0], "T": T, "rate": rate}


def weight_tensor_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The gradients of the multi-dimensional weights (convs, linears), by parameter name."""
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()
            if p.grad is not None and p.dim() > 1}


def alignment(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
              settings: list[dict]) -> list[dict]:
    """One row per weight tensor: BP's gradient norm and, per setting, the norm ratio and cosine
    of PC's gradient to BP's (every gradient from the same weights and BatchNorm statistics)."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    bp = weight_tensor_grads(model)
    rows = [{"tensor": n, "bp_norm": g.norm().item()} for n, g in bp.items()]
    for s in settings:
        model.load_state_dict(state)
        model.zero_grad()
        PCEngine(model.pc_graph(), fpa=True, **s).compute_gradients(x, y)
        pc = weight_tensor_grads(model)
        label = f"{s['schedule']}:{s['T']}"
        for row in rows:
            a, b = pc[row["tensor"]].flatten(), bp[row["tensor"]].flatten()
            row[f"{label} ratio"] = (a.norm() / b.norm()).item()
            row[f"{label} cos"] = F.cosine_similarity(a, b, dim=0).item()
    model.load_state_dict(state)
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resdualnet")
    p.add_argument("--model-kwargs", default="{}", help="JSON object of constructor arguments")
    p.add_argument("--checkpoint", default=None,
                   help="a pcfast training checkpoint to load the weights from")
    p.add_argument("--pc", action="append", type=parse_setting, default=None,
                   metavar="SCHEDULE:T[:RATE]",
                   help="a PC setting (FPA), repeatable (default: sequential:2 and jacobi:100)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    settings = args.pc or [parse_setting("sequential:2"), parse_setting("jacobi:100")]
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = build_model(args.model, **json.loads(args.model_kwargs)).to(device)
    if args.checkpoint:
        model.load_state_dict(load_checkpoint(Path(args.checkpoint), map_location=device)["model"])
    model.train()
    x = torch.randn(args.batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    rows = alignment(model, x, y, settings)
    env = environment(device)
    print(f"\n{env['device_name']} | commit {env['commit'][:10]} | {args.model}"
          f"{' from ' + args.checkpoint if args.checkpoint else ' at init'}, batch "
          f"{args.batch_size} | PC (FPA) weight gradients against BP's, per weight tensor")
    print_table(rows, list(rows[0]))
    payload = {"benchmark": "grad_alignment", "config": vars(args), "rows": rows,
               "environment": env}
    path = write_result(f"grad_alignment-{args.model}", payload)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
