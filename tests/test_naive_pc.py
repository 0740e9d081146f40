"""The benchmark's re-creation of the seed loop computes the reference engine's math: same
weight gradients and errors on one batch (tiny Res-DualNet, float64), and its data pipeline
yields normalised float batches."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

from pcfast.models.resdualnet import ResDualNet
from pcfast.pc import PCEngine

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.naive_pc import NaivePC, make_uint8_dataset, seed_loader  # noqa: E402


def test_naive_loop_equals_reference_engine():
    torch.manual_seed(0)
    net = ResDualNet(stages=((8, 1), (16, 2)), blocks_per_stage=1, stem_channels=4).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (4,), generator=g)
    ref_net, naive_net = copy.deepcopy(net), copy.deepcopy(net)
    ref_net.train()
    naive_net.train()
    r = PCEngine(ref_net.pc_graph(), T=4, rate=0.5, schedule="jacobi").compute_gradients(x, y)
    errors = NaivePC(naive_net, T=4, rate=0.5).compute_gradients(x, y)
    for (name, p), q in zip(ref_net.named_parameters(), naive_net.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12, msg=name)
    for name, e in r.errors.items():
        torch.testing.assert_close(errors[name], e, rtol=1e-10, atol=1e-12, msg=name)
    for (name, b), c in zip(ref_net.named_buffers(), naive_net.buffers()):
        torch.testing.assert_close(c, b, msg=name)  # BN running stats moved once, identically


def test_seed_loader_yields_normalised_batches():
    x, y = next(iter(seed_loader(make_uint8_dataset(16), batch_size=8)))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (8,) and y.dtype == torch.int64
    assert -2.5 < float(x.min()) < -1.5 and 1.5 < float(x.max()) < 2.5
