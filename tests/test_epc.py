"""Error-based PC (ePC): the errors are the free variables, ``x_v = f_v(parents) + e_v``.

Oracles: a closed-form MLP running ePC step by step (errors, weight gradients); strict PC at
equilibrium (ePC only re-parametrises the same energy, so both equilibria, and the local weight
gradients there, coincide: MLP and a conv net with BatchNorm); and on a deep chain the output
error reaches the first node after ONE ePC step, where one strict jacobi step reaches only the
last hidden node.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _hand_mlp import HandMLP, strict_mlp_case
from _nets import randomize_batchnorm
from torch import nn

from pcfast.models import build_model
from pcfast.pc import PCEngine, sequential_graph

TOL = dict(rtol=1e-10, atol=1e-12)


def _grads(layers):
    return [p.grad for lin in layers for p in (lin.weight, lin.bias)]


@pytest.mark.parametrize("T, rate", [(1, 0.5), (6, 0.3), (4, 0.8)])
def test_epc_matches_a_hand_written_mlp(T, rate):
    layers, graph, x, y = strict_mlp_case()
    hand = HandMLP(layers)
    x1, x2 = hand.epc(x, y, T, rate)
    want = hand.weight_grads(x, x1, x2, y)
    result = PCEngine(graph, T=T, rate=rate, fpa=False, epc=True).compute_gradients(x, y)
    for i, (a, b) in enumerate(zip(_grads(layers), want)):
        assert b.abs().max() > 1e-6, i
        torch.testing.assert_close(a, b, **TOL, msg=f"parameter {i}")
    torch.testing.assert_close(result.errors["layer0"], x1 - hand.predict(0, x), **TOL)
    torch.testing.assert_close(result.errors["layer1"], x2 - hand.predict(1, x1), **TOL)


def _converged_grads(net_or_layers, graph, x, y, **kw):
    PCEngine(graph, fpa=False, backend="reference", **kw).compute_gradients(x, y)
    return [p.grad.clone() for p in graph.parameters() if p.grad is not None]


def test_epc_and_strict_pc_agree_at_equilibrium_on_an_mlp():
    layers, graph, x, y = strict_mlp_case()
    for lin in layers:  # a milder net, so that both converge in a few hundred steps
        lin.weight.data.mul_(0.5)
    epc = _converged_grads(layers, graph, x, y, T=400, rate=0.3, epc=True)
    for p in graph.parameters():
        p.grad = None
    strict = _converged_grads(layers, graph, x, y, T=1500, rate=0.3)
    for i, (a, b) in enumerate(zip(epc, strict)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-11, msg=f"parameter {i}")
    # ...and not because nothing moved: far from equilibrium they differ.
    for p in graph.parameters():
        p.grad = None
    early = _converged_grads(layers, graph, x, y, T=2, rate=0.3)
    assert max((a - b).abs().max().item() for a, b in zip(epc, early)) > 1e-4


@pytest.mark.parametrize("name", ["cnn", "resnet20", "resdualnet"])
def test_one_epc_step_moves_each_error_to_minus_rate_times_backprop(name):
    """From zero errors, one step at rate r gives ``e_v = -r dL/dx_v``: backprop's gradient of
    the output loss w.r.t. each node's output, taken here by plain autograd over a forward pass
    (BatchNorm on batch statistics, as in training)."""
    torch.manual_seed(0)
    kwargs = {"cnn": dict(spec=[4, "p", 6, "p"], image_size=8),
              "resnet20": dict(num_classes=10),
              "resdualnet": dict(num_classes=10, stem_channels=4, stages=((4, 1), (8, 2)),
                                 blocks_per_stage=2)}[name]
    net = randomize_batchnorm(build_model(name, **kwargs).double())
    size = 8 if name == "cnn" else 16
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, size, size, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (4,), generator=g)
    graph = net.pc_graph()
    bp_net = copy.deepcopy(net)
    bp_graph = bp_net.pc_graph()
    outs = {bp_graph.input_name: x}
    for node in bp_graph.nodes:
        outs[node.name] = node.fn(*(outs[p] for p in node.parents))
        outs[node.name].retain_grad()
    torch.nn.functional.cross_entropy(outs[bp_graph.output], y, reduction="sum").backward()
    rate = 0.37
    result = PCEngine(graph, T=1, rate=rate, fpa=False, epc=True).compute_gradients(x, y)
    for v in graph.hidden:
        torch.testing.assert_close(result.errors[v], -rate * outs[v].grad, **TOL, msg=v)
    assert result.errors[graph.hidden[0]].abs().max() > 1e-8


def test_one_epc_step_reaches_the_first_node_of_a_deep_chain():
    torch.manual_seed(1)
    mods = [nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(7)] + [nn.Linear(6, 3)]
    graph = sequential_graph([m.double() for m in mods])
    x = torch.randn(5, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    epc = PCEngine(graph, T=1, rate=0.5, fpa=False, epc=True).compute_gradients(x, y)
    strict = PCEngine(graph, T=1, rate=0.5, fpa=False, backend="reference").compute_gradients(x, y)
    first, last = graph.hidden[0], graph.hidden[-1]
    assert epc.errors[first].abs().max() > 1e-6
    assert strict.errors[first].abs().max() == 0  # strict jacobi: one node per step
    assert strict.errors[last].abs().max() > 1e-6


def test_epc_energy_decreases_and_starts_at_the_feedforward_loss():
    layers, graph, x, y = strict_mlp_case()
    result = PCEngine(graph, T=8, rate=0.2, fpa=False, epc=True,
                      record_energy=True).compute_gradients(x, y)
    trace = torch.stack(result.energy_trace)
    assert trace.shape[0] == 9
    torch.testing.assert_close(trace[0], result.loss, **TOL)  # errors start at zero
    assert (trace[1:] < trace[:-1]).all(), trace


@pytest.mark.parametrize("kwargs, match", [
    (dict(epc=True), "pass fpa=False"),
    (dict(epc=True, fpa=False, ipc=True), "not both"),
    (dict(epc=True, fpa=False, schedule="sequential"), "jacobi"),
    (dict(epc=True, fpa=False, error_clamp=1.0), "error_clamp"),
])
def test_epc_misuse_is_named(kwargs, match):
    _, graph, _, _ = strict_mlp_case()
    with pytest.raises(ValueError, match=match):
        PCEngine(graph, **kwargs)
