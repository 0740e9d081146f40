"""Incremental PC (iPC): strict PC whose weights take an optimizer step at every inference step.

Oracles: a hand-written closed-form MLP running iPC with plain SGD (weights after T steps, errors
at the end, several batches in a row), and on BatchNorm nets the strict-PC engine itself: with a
zero learning rate iPC must be strict PC exactly, and its first step's weight update must be
strict PC's gradient at the feedforward point.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _hand_mlp import HandMLP, strict_mlp_case
from _nets import randomize_batchnorm
from torch import nn

from pcfast.models import build_model
from pcfast.pc import PCEngine

TOL = dict(rtol=1e-10, atol=1e-12)


def _params(layers):
    return [p for lin in layers for p in (lin.weight, lin.bias)]


@pytest.mark.parametrize("schedule", ["jacobi", "sequential"])
@pytest.mark.parametrize("T, rate, lr", [(5, 0.3, 0.4), (3, 0.7, 0.1)])
def test_ipc_matches_a_hand_written_mlp_over_several_batches(schedule, T, rate, lr):
    layers, graph, x, y = strict_mlp_case()
    hand = HandMLP(layers)
    w0 = [p.detach().clone() for p in _params(layers)]
    opt = torch.optim.SGD(_params(layers), lr=lr)
    engine = PCEngine(graph, T=T, rate=rate, schedule=schedule, fpa=False, ipc=True)
    g = torch.Generator().manual_seed(11)
    for batch in range(3):
        if batch:
            x = torch.randn(x.shape, generator=g, dtype=torch.float64)
            y = torch.randint(0, 4, y.shape, generator=g)
        x1, x2 = hand.ipc(x, y, T, rate, schedule, lr)
        result = engine.step(x, y, opt)
        assert engine.last_backend == "reference"
        want = [t for i in range(3) for t in (hand.W[i], hand.b[i])]
        for i, (p, w) in enumerate(zip(_params(layers), want)):
            torch.testing.assert_close(p.detach(), w, **TOL, msg=f"batch {batch}, param {i}")
        # The reported errors are those at the final values and the final weights.
        torch.testing.assert_close(result.errors["layer0"], x1 - hand.predict(0, x), **TOL)
        torch.testing.assert_close(result.errors["layer1"], x2 - hand.predict(1, x1), **TOL)
    # The weights moved, every layer.
    assert all((p - w).abs().max() > 1e-4 for p, w in zip(_params(layers), w0))


def test_ipc_differs_from_strict_pc_with_one_weight_step():
    """The per-step weight updates change the values' trajectory: not strict PC + one step."""
    layers, graph, x, y = strict_mlp_case()
    lr, T = 0.4, 5
    a = HandMLP(layers)
    a.ipc(x, y, T, 0.3, "jacobi", lr)
    b = HandMLP(layers)
    x1, x2 = b.relax(x, y, T, 0.3, "jacobi", None)
    strict = b.weight_grads(x, x1, x2, y)
    one_step = [w - T * lr * gr for w, gr in zip((b.W[0], b.b[0], b.W[1], b.b[1], b.W[2], b.b[2]),
                                                  strict)]
    ipc = [a.W[0], a.b[0], a.W[1], a.b[1], a.W[2], a.b[2]]
    assert max((p - q).abs().max().item() for p, q in zip(ipc, one_step)) > 1e-3


def _bn_net(name: str) -> nn.Module:
    torch.manual_seed(0)
    kwargs = {"cnn": dict(spec=[4, "p", 6, "p"], image_size=8),
              "resnet20": dict(num_classes=10),
              "resdualnet": dict(num_classes=10, stem_channels=4, stages=((4, 1), (8, 2)),
                                 blocks_per_stage=2)}[name]
    net = build_model(name, **kwargs).double()
    return randomize_batchnorm(net)


@pytest.mark.parametrize("name", ["cnn", "resnet20", "resdualnet"])
@pytest.mark.parametrize("schedule", ["jacobi", "sequential"])
def test_ipc_on_batchnorm_nets_against_strict_pc(name, schedule):
    net = _bn_net(name)
    size = 8 if name == "cnn" else 16
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 3, size, size, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (4,), generator=g)
    T, rate = 3, 0.4
    # lr = 0: iPC is strict PC exactly (values, errors; BatchNorm running stats moved once).
    ipc_net, strict_net = copy.deepcopy(net), copy.deepcopy(net)
    opt = torch.optim.SGD(ipc_net.parameters(), lr=0.0)
    got = PCEngine(ipc_net.pc_graph(), T=T, rate=rate, schedule=schedule, fpa=False,
                   ipc=True).step(x, y, opt)
    want = PCEngine(strict_net.pc_graph(), T=T, rate=rate, schedule=schedule, fpa=False,
                    backend="reference").compute_gradients(x, y)
    for node, e in want.errors.items():
        torch.testing.assert_close(got.errors[node], e, **TOL, msg=node)
    assert any(e.abs().max() > 1e-6 for n, e in want.errors.items() if n != "head")
    for (bname, b), c in zip(strict_net.named_buffers(), ipc_net.buffers()):
        torch.testing.assert_close(c, b, **TOL, msg=bname)
    # T = 1: the single weight step is strict PC's gradient at the feedforward point (T = 0).
    one, ref = copy.deepcopy(net), copy.deepcopy(net)
    lr = 0.05
    PCEngine(one.pc_graph(), T=1, rate=rate, schedule=schedule, fpa=False, ipc=True).step(
        x, y, torch.optim.SGD(one.parameters(), lr=lr))
    PCEngine(ref.pc_graph(), T=0, fpa=False, backend="reference").compute_gradients(x, y)
    for (pname, p), q in zip(ref.named_parameters(), one.parameters()):
        expect = p.detach() - lr * (p.grad if p.grad is not None else torch.zeros_like(p))
        torch.testing.assert_close(q.detach(), expect, **TOL, msg=pname)


def test_ipc_steps_the_optimizer_once_per_inference_step():
    layers, graph, x, y = strict_mlp_case()
    opt = torch.optim.Adam(_params(layers), lr=1e-3)
    calls = []
    engine = PCEngine(graph, T=4, rate=0.3, fpa=False, ipc=True)
    engine.step(x, y, opt, before_step=lambda: calls.append(1))
    engine.step(x, y, opt, before_step=lambda: calls.append(1))
    assert len(calls) == 8
    assert all(int(opt.state[p]["step"]) == 8 for p in _params(layers))


def test_ipc_energy_decreases_for_a_small_rate():
    layers, graph, x, y = strict_mlp_case()
    opt = torch.optim.SGD(_params(layers), lr=0.05)
    result = PCEngine(graph, T=10, rate=0.1, fpa=False, ipc=True,
                      record_energy=True).step(x, y, opt)
    trace = torch.stack(result.energy_trace)
    assert trace.shape[0] == 11
    assert (trace[1:] < trace[:-1]).all(), trace


@pytest.mark.parametrize("kwargs, call, match", [
    (dict(ipc=True), None, "pass fpa=False"),
    (dict(ipc=True, fpa=False, T=0), None, "T >= 1"),
    (dict(ipc=True, fpa=False), "compute_gradients", "engine.step"),
    (dict(ipc=True, fpa=False), "step", "pass the optimizer"),
])
def test_ipc_misuse_is_named(kwargs, call, match):
    layers, graph, x, y = strict_mlp_case()
    with pytest.raises(ValueError, match=match):
        engine = PCEngine(graph, **kwargs)
        getattr(engine, call)(x, y)
