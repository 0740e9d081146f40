"""PC = BP under FPA at rate 1 (jacobi with T >= depth, or one sequential sweep), in float64.

The oracle is autograd backprop of the same mean cross-entropy. The other settings must give
different updates: the engine is not a BP shortcut.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pcfast.models.resdualnet import ResDualNet
from pcfast.pc import PCEngine, sequential_graph


def mlp():
    return sequential_graph([
        nn.Sequential(nn.Linear(6, 9), nn.Tanh()),
        nn.Sequential(nn.Linear(9, 7), nn.ReLU()),
        nn.Linear(7, 4),
    ])


def conv_bn():
    return sequential_graph([
        nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()),
        nn.Sequential(nn.Conv2d(4, 5, 3, stride=2, padding=1), nn.BatchNorm2d(5), nn.ReLU()),
        nn.Sequential(nn.Flatten(), nn.Linear(5 * 4 * 4, 4)),
    ])


class SmallResDual(ResDualNet):
    """Two stages of two blocks: concat merges (stride 1 and 2) and add merges."""

    def __init__(self):
        super().__init__(num_classes=4, stem_channels=3, stages=((6, 1), (12, 2)))


CASES = {
    "mlp": (mlp, lambda n: torch.randn(n, 6)),
    "conv_bn": (conv_bn, lambda n: torch.randn(n, 3, 8, 8)),
    "resdualnet": (lambda: SmallResDual().pc_graph(), lambda n: torch.randn(n, 3, 8, 8)),
}


def _pc_grads(graph, x, y, **kw):
    for p in graph.parameters():
        p.grad = None
    result = PCEngine(graph, **kw).compute_gradients(x, y)
    return [p.grad.clone() for p in graph.parameters()], result


def _bp_grads(graph, x, y):
    for p in graph.parameters():
        p.grad = None
    F.cross_entropy(graph.forward(x), y).backward()
    return [p.grad.clone() for p in graph.parameters()]


def _setup(case):
    torch.manual_seed(0)
    build, data = CASES[case]
    graph = build().to(torch.float64)
    x = data(10).double()
    y = torch.randint(0, 4, (10,))
    return graph, x, y


def _snapshot_bn(graph):
    return [b.clone() for m in graph.modules for b in m.buffers()]


def _restore_bn(graph, saved):
    with torch.no_grad():
        for b, s in zip((b for m in graph.modules for b in m.buffers()), saved):
            b.copy_(s)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("schedule", ["jacobi", "sequential"])
def test_pc_equals_bp_at_rate_one(case, schedule):
    graph, x, y = _setup(case)
    bn = _snapshot_bn(graph)
    T = graph.depth if schedule == "jacobi" else 1
    pc, result = _pc_grads(graph, x, y, T=T, rate=1.0, schedule=schedule)
    _restore_bn(graph, bn)
    bp = _bp_grads(graph, x, y)
    assert len(pc) == len(bp) > 0
    for a, b in zip(pc, bp):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert torch.isfinite(result.energy)


@pytest.mark.parametrize("case", ["mlp", "conv_bn"])  # chains: one path from output to input
def test_jacobi_with_too_few_steps_is_not_bp(case):
    """The error front moves one node per step: the output error reaches the first hidden node
    after depth - 1 steps, so with depth - 2 steps the first layer sees no error at all."""
    graph, x, y = _setup(case)
    pc, _ = _pc_grads(graph, x, y, T=graph.depth - 2, rate=1.0)
    assert pc[0].abs().max() == 0  # the first layer's error has not arrived yet
    assert pc[-1].abs().max() > 0


@pytest.mark.parametrize("case", list(CASES))
def test_small_rate_and_few_steps_are_not_bp(case):
    graph, x, y = _setup(case)
    bn = _snapshot_bn(graph)
    pc, _ = _pc_grads(graph, x, y, T=graph.depth + 2, rate=0.3)
    _restore_bn(graph, bn)
    bp = _bp_grads(graph, x, y)
    rel = max(((a - b).norm() / b.norm()).item() for a, b in zip(pc, bp))
    assert rel > 0.1


def test_many_small_steps_converge_to_bp():
    """Rate < 1 is a real relaxation: with enough steps it reaches the same fixed point."""
    graph, x, y = _setup("conv_bn")
    bn = _snapshot_bn(graph)
    pc, _ = _pc_grads(graph, x, y, T=300, rate=0.3)
    _restore_bn(graph, bn)
    bp = _bp_grads(graph, x, y)
    for a, b in zip(pc, bp):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("schedule", ["jacobi", "sequential"])
def test_strict_pc_lowers_the_energy_step_by_step(case, schedule):
    graph, x, y = _setup(case)
    engine = PCEngine(graph, T=15, rate=0.01, fpa=False, schedule=schedule, record_energy=True)
    trace = torch.stack(engine.compute_gradients(x, y).energy_trace)
    steps = trace.diff()
    assert (steps <= 1e-12).all(), steps
    assert trace[-1] < trace[0] - 1e-6


def test_strict_pc_keeps_batchnorm_running_stats_from_the_feedforward_pass():
    graph, x, y = _setup("conv_bn")
    reference, _, _ = _setup("conv_bn")
    with torch.no_grad():
        reference.forward(x)  # one training-mode pass moves the running stats once
    PCEngine(graph, T=5, rate=0.1, fpa=False).compute_gradients(x, y)
    for a, b in zip(_snapshot_bn(graph), _snapshot_bn(reference)):
        torch.testing.assert_close(a, b)


def test_energy_is_lowered_by_fpa_relaxation_and_errors_are_reported():
    graph, x, y = _setup("mlp")
    engine = PCEngine(graph, T=20, rate=0.2, record_energy=True)
    result = engine.compute_gradients(x, y)
    norms = result.error_norms()
    assert set(norms) == {n.name for n in graph.nodes}
    assert all(v > 0 for v in norms.values())
    assert len(result.energy_trace) == 21


def test_error_clamp_bounds_the_propagated_errors():
    graph, x, y = _setup("mlp")
    result = PCEngine(graph, T=10, rate=1.0, error_clamp=1e-3).compute_gradients(x * 100, y)
    for name in graph.hidden:
        assert result.errors[name].abs().max() <= 1e-3 + 1e-15


def test_mse_output_matches_bp_of_mse():
    graph, x, y = _setup("mlp")
    for p in graph.parameters():
        p.grad = None
    PCEngine(graph, T=graph.depth, rate=1.0, output_loss="mse").compute_gradients(x, y)
    pc = [p.grad.clone() for p in graph.parameters()]
    for p in graph.parameters():
        p.grad = None
    out = graph.forward(x)
    (0.5 * (out - F.one_hot(y, 4).double()).pow(2).sum() / x.shape[0]).backward()
    for a, p in zip(pc, graph.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kw, match", [
    (dict(schedule="gauss"), "schedule"), (dict(output_loss="l1"), "output_loss"),
    (dict(rate=0.0), "rate"), (dict(T=-1), "T"), (dict(error_clamp=0.0), "error_clamp"),
    (dict(backend="nope"), "backend"),
])
def test_bad_options_are_rejected(kw, match):
    with pytest.raises(ValueError, match=match):
        PCEngine(mlp(), **kw)
