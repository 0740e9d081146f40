"""Precision-weighted energies ``F = sum_v pi_v(t)/2 ||e_v||^2 + pi_out(t) L``.

Oracles: closed-form strict PC and ePC on the hand-written MLP with per-node, step-dependent
precisions (values, errors, weight gradients); all precisions 1 are bit-identical to the
unweighted engine (strict, iPC, ePC); and the schedules' shapes by their definitions.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from _hand_mlp import HandMLP, strict_mlp_case
from torch import nn

from pcfast.pc import PCEngine, decaying, sequential_graph, spiking

TOL = dict(rtol=1e-10, atol=1e-12)
PI = {"layer0": decaying(3.0, 0.6), "layer1": 0.5, "layer2": spiking(2.0, 2)}


def _pi(name, t):
    v = PI[name]
    return v(t) if callable(v) else v


def _grads_from(hand, x0, x1, x2, y, t):
    n = x0.shape[0]
    mu1, mu2, mu3 = hand.predict(0, x0), hand.predict(1, x1), hand.predict(2, x2)
    d3 = _pi("layer2", t) * (torch.softmax(mu3, 1) - F.one_hot(y, mu3.shape[1]).double())
    d2 = -_pi("layer1", t) * (x2 - mu2) * (1 - mu2 ** 2)
    d1 = -_pi("layer0", t) * (x1 - mu1) * (1 - mu1 ** 2)
    grads = []
    for d, inp in ((d1, x0), (d2, x1), (d3, x2)):
        grads += [d.T @ inp / n, d.sum(0) / n]
    return grads


def _hand_strict(hand, x0, y, T, rate):
    x1 = hand.predict(0, x0)
    x2 = hand.predict(1, x1)
    for t in range(T):
        p1, p2, po = _pi("layer0", t), _pi("layer1", t), _pi("layer2", t)
        mu1, mu2, mu3 = hand.predict(0, x0), hand.predict(1, x1), hand.predict(2, x2)
        d_out = torch.softmax(mu3, 1) - F.one_hot(y, mu3.shape[1]).double()
        g1 = p1 * (x1 - mu1) - (p2 * (x2 - mu2) * (1 - mu2 ** 2)) @ hand.W[1]
        g2 = p2 * (x2 - mu2) + po * d_out @ hand.W[2]
        x1, x2 = x1 - rate * g1, x2 - rate * g2
    return x1, x2


def _hand_epc(hand, x0, y, T, rate):
    W2, b2, W3 = hand.W[1], hand.b[1], hand.W[2]
    mu1 = hand.predict(0, x0)
    e1 = torch.zeros_like(mu1)
    e2 = torch.zeros(x0.shape[0], W2.shape[0], dtype=x0.dtype)
    for t in range(T):
        p1, p2, po = _pi("layer0", t), _pi("layer1", t), _pi("layer2", t)
        t2 = torch.tanh((mu1 + e1) @ W2.T + b2)
        out = hand.predict(2, t2 + e2)
        dL_dx2 = po * (torch.softmax(out, 1) - F.one_hot(y, out.shape[1]).double()) @ W3
        dL_dx1 = (dL_dx2 * (1 - t2 ** 2)) @ W2
        e1, e2 = e1 - rate * (p1 * e1 + dL_dx1), e2 - rate * (p2 * e2 + dL_dx2)
    x1 = mu1 + e1
    return x1, hand.predict(1, x1) + e2


@pytest.mark.parametrize("mode", ["strict", "epc"])
@pytest.mark.parametrize("T, rate", [(1, 0.3), (5, 0.2)])
def test_weighted_energy_matches_a_hand_written_mlp(mode, T, rate):
    layers, graph, x, y = strict_mlp_case()
    hand = HandMLP(layers)
    x1, x2 = (_hand_strict if mode == "strict" else _hand_epc)(hand, x, y, T, rate)
    want = _grads_from(hand, x, x1, x2, y, T)
    engine = PCEngine(graph, T=T, rate=rate, fpa=False, epc=mode == "epc", precision=PI)
    result = engine.compute_gradients(x, y)
    got = [p.grad for lin in layers for p in (lin.weight, lin.bias)]
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, **TOL, msg=f"parameter {i}")
    torch.testing.assert_close(result.errors["layer0"], x1 - hand.predict(0, x), **TOL)
    # The weighting matters: the unweighted engine ends elsewhere.
    for p in graph.parameters():
        p.grad = None
    PCEngine(graph, T=T, rate=rate, fpa=False, epc=mode == "epc").compute_gradients(x, y)
    plain = [p.grad for lin in layers for p in (lin.weight, lin.bias)]
    assert max((a - b).abs().max().item() for a, b in zip(plain, want)) > 1e-3


@pytest.mark.parametrize("backend", ["reference", "fast"])
@pytest.mark.parametrize("kwargs", [dict(), dict(schedule="sequential"), dict(epc=True),
                                    dict(ipc=True)])
def test_unit_precisions_are_bit_identical(kwargs, backend):
    layers, graph, x, y = strict_mlp_case()
    runs = []
    for precision in (None, {}, {"layer0": 1.0, "layer2": spiking(1.0, 3)}):
        ls = copy.deepcopy(layers)
        gr = sequential_graph([nn.Sequential(ls[0], nn.Tanh()), nn.Sequential(ls[1], nn.Tanh()),
                               ls[2]])
        engine = PCEngine(gr, T=4, rate=0.3, fpa=False, precision=precision, backend=backend,
                          **kwargs)
        if kwargs.get("ipc"):
            result = engine.step(x, y, torch.optim.SGD(gr.parameters(), lr=0.1))
            runs.append([p.detach().clone() for p in gr.parameters()])
        else:
            result = engine.compute_gradients(x, y)
            runs.append([p.grad.clone() for p in gr.parameters()])
        runs[-1].append(result.energy)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_schedules_and_validation():
    d = decaying(5.0, 0.5)
    assert [d(t) for t in range(3)] == [5.0, 3.0, 2.0]
    s = spiking(4.0, 2)
    assert [s(t) for t in range(4)] == [4.0, 4.0, 1.0, 1.0]
    _, graph, _, _ = strict_mlp_case()
    with pytest.raises(ValueError, match="unknown nodes"):
        PCEngine(graph, fpa=False, precision={"nope": 2.0})
    with pytest.raises(ValueError, match="fpa=False"):
        PCEngine(graph, precision={"layer0": 2.0})
    with pytest.raises(ValueError, match=">= 0"):
        PCEngine(graph, fpa=False, precision={"layer0": -1.0})
    with pytest.raises(ValueError, match="factor"):
        decaying(2.0, 1.5)
    with pytest.raises(ValueError, match="shape"):
        PCEngine(graph, fpa=False, precision={"layer0": {"ramp": [1, 2]}})


def test_json_schedules_and_the_default_key():
    from pcfast.pc.precision import as_precision

    pi = as_precision({"*": {"decaying": [5.0, 0.5]}, "layer1": {"spiking": [3.0, 1]},
                       "layer2": 0.25}, ["layer0", "layer1", "layer2"])
    assert [pi("layer0", t) for t in range(3)] == [5.0, 3.0, 2.0]
    assert [pi("layer1", t) for t in range(2)] == [3.0, 1.0]
    assert pi("layer2", 7) == 0.25


def test_a_first_step_that_must_overshoot_is_warned_about():
    """rate x pi(0) >= 2 on a hidden node: its own energy term alone makes the step unstable;
    the warning's advice (a rate below 2 / pi) gives a decreasing energy again."""
    _, graph, x, y = strict_mlp_case()
    pi = {"*": decaying(8.0, 0.5)}
    with pytest.warns(RuntimeWarning, match=r"rate 0.5 x precision 8 .* below 0.25"):
        bad = PCEngine(graph, T=3, rate=0.5, fpa=False, precision=pi, record_energy=True)
    trace = torch.stack(bad.compute_gradients(x, y).energy_trace)
    assert trace[1] > trace[0]  # the overshoot the warning names
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        good = PCEngine(graph, T=3, rate=0.1, fpa=False, precision=pi, record_energy=True)
    trace = torch.stack(good.compute_gradients(x, y).energy_trace)
    assert (trace[1:] < trace[:-1]).all(), trace
    with pytest.warns(RuntimeWarning, match="its own error term"):
        PCEngine(graph, rate=2.0)
