"""Strict PC, iPC and ePC on the fast backend (explicit VJP rules, no autograd in the steps).

Oracle: the reference backend (autograd over the whole energy), itself tested against
closed-form MLPs elsewhere. Float64 on CPU, several batches with optimizer steps between, on an
MLP, a conv net with BatchNorm, Res-DualNet (add and concat merges) and resnet20; values,
errors, energies, weight gradients, parameters and BatchNorm buffers must agree.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _hand_mlp import HandMLP, strict_mlp_case
from _nets import randomize_batchnorm
from torch import nn

from pcfast.models import build_model
from pcfast.pc import PCEngine, decaying, sequential_graph, spiking
from pcfast.pc.vjp_rules import has_rule

TOL = dict(rtol=1e-9, atol=1e-11)
# Errors far from the output are tiny differences of O(1) values and predictions: their
# rounding is ~1e-16 of the values, not of the errors themselves.
ERROR_TOL = dict(rtol=1e-9, atol=1e-10)


def _net(name: str):
    torch.manual_seed(0)
    kwargs = {"mlp": dict(hidden=(12, 8), in_features=3 * 4 * 4, activation="tanh"),
              "cnn": dict(spec=[4, "p", 6, "p"], image_size=8),
              "resnet20": dict(num_classes=10),
              "resdualnet": dict(num_classes=10, stem_channels=4, stages=((4, 1), (8, 2)),
                                 blocks_per_stage=2)}[name]
    net = build_model(name, **kwargs).double().train()
    size = {"mlp": 4, "cnn": 8, "resnet20": 16, "resdualnet": 16}[name]
    return randomize_batchnorm(net), size


def _batches(size: int, n: int = 3, count: int = 2):
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(n, 3, size, size, generator=g, dtype=torch.float64),
             torch.randint(0, 10, (n,), generator=g)) for _ in range(count)]


def _assert_same(ref_net, fast_net, r_ref, r_fast, where: str) -> None:
    assert r_fast.steps == r_ref.steps, where
    for k, e in r_ref.errors.items():
        torch.testing.assert_close(r_fast.errors[k], e, **ERROR_TOL, msg=f"{where} error {k}")
    torch.testing.assert_close(r_fast.energy, r_ref.energy, **TOL, msg=f"{where} energy")
    assert len(r_fast.energy_trace) == len(r_ref.energy_trace), where
    for i, (a, b) in enumerate(zip(r_fast.energy_trace, r_ref.energy_trace)):
        torch.testing.assert_close(a, b, **TOL, msg=f"{where} trace {i}")
    for (name, p), q in zip(ref_net.named_parameters(), fast_net.parameters()):
        if p.grad is None:
            assert q.grad is None, f"{where} grad {name}"
        else:
            torch.testing.assert_close(q.grad, p.grad, **TOL, msg=f"{where} grad {name}")
        torch.testing.assert_close(q, p, **TOL, msg=f"{where} {name}")
    for (name, b), c in zip(ref_net.named_buffers(), fast_net.buffers()):
        torch.testing.assert_close(c, b, msg=f"{where} buffer {name}")


def _compare(name: str, kernels: str = "auto", lr: float = 0.1, **kw) -> None:
    net, size = _net(name)
    ref_net, fast_net = copy.deepcopy(net), copy.deepcopy(net)
    ref = PCEngine(ref_net.pc_graph(), backend="reference", **kw)
    fast = PCEngine(fast_net.pc_graph(), backend="fast", backend_options={"kernels": kernels},
                    **kw)
    # SGD, not Adam: Adam divides by the gradients' own scale, which turns rounding-level
    # differences of the tiny gradients far from the output into visible weight differences.
    opt_r = torch.optim.SGD(ref_net.parameters(), lr=lr, momentum=0.5)
    opt_f = torch.optim.SGD(fast_net.parameters(), lr=lr, momentum=0.5)
    moved = 0.0
    for i, (x, y) in enumerate(_batches(size)):
        r_ref, r_fast = ref.step(x, y, opt_r), fast.step(x, y, opt_f)
        assert fast.last_backend == "fast"
        _assert_same(ref_net, fast_net, r_ref, r_fast, f"{name} batch {i}")
        moved = max(moved, max(e.abs().max().item() for k, e in r_ref.errors.items()
                               if k != ref_net.pc_graph().output))
    assert moved > 1e-4, "the hidden errors stayed at zero: the test would not see a bug"


MODES = {
    "strict-jacobi": dict(fpa=False, T=3, rate=0.4, error_clamp=0.5),
    "strict-sequential": dict(fpa=False, T=2, rate=0.4, schedule="sequential"),
    "epc": dict(fpa=False, epc=True, T=3, rate=0.3),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", ["mlp", "cnn", "resdualnet", "resnet20"])
def test_fast_equals_reference_in_float64(name, mode):
    _compare(name, **MODES[mode])


@pytest.mark.parametrize("kw", [
    dict(fpa=False, T=3, rate=0.3, state_momentum=0.6, state_nesterov=True,
         precision={"*": decaying(2.0, 0.5)}, record_energy=True),
    dict(fpa=False, T=2, rate=0.3, schedule="sequential", state_momentum=0.5,
         precision={"*": spiking(3.0, 1)}, output_loss="mse"),
    dict(fpa=False, epc=True, T=3, rate=0.2, state_momentum=0.5,
         precision={"*": decaying(2.0, 0.5)}, record_energy=True),
    dict(fpa=False, T=3, rate=0.2, precision={"*": decaying(2.0, 0.5)}, error_clamp=0.5),
    dict(fpa=False, T=2, rate=0.2, schedule="sequential", precision={"*": spiking(3.0, 1)}),
    dict(fpa=False, epc=True, T=3, rate=0.2, precision={"*": decaying(2.0, 0.5)}),
    dict(fpa=False, T=12, rate=0.2, tol=1e-2, check_every=2),
    dict(fpa=False, epc=True, T=12, rate=0.2, tol=1e-2, check_every=2),
], ids=["strict-momentum-precision-trace", "sequential-momentum-spiking-mse",
        "epc-momentum-precision-trace", "strict-precision-clamp", "sequential-precision", "epc-precision",
        "strict-tol", "epc-tol"])
def test_fast_options_equal_reference(kw):
    _compare("resdualnet", **kw)


def test_the_pytorch_kernels_equal_reference():
    _compare("resdualnet", kernels="torch", **MODES["strict-jacobi"])


def test_adaptive_inference_stops_early_on_the_fast_backend():
    net, size = _net("cnn")
    (x, y), _ = _batches(size)
    engine = PCEngine(net.pc_graph(), backend="fast", fpa=False, T=40, rate=0.2, tol=1e-2,
                      check_every=2)
    assert engine.compute_gradients(x, y).steps < 40


@pytest.mark.parametrize("schedule", ["jacobi", "sequential"])
@pytest.mark.parametrize("name", ["mlp", "cnn", "resdualnet", "resnet20"])
def test_fast_ipc_equals_reference(name, schedule):
    """iPC: weights after every batch of T optimizer steps, errors, BatchNorm buffers."""
    # lr 0.005: T weight steps per batch; larger ones make the deep nets' energy grow fast,
    # which amplifies rounding (the comparison would then test conditioning, not the code).
    _compare(name, fpa=False, ipc=True, T=3, rate=0.4, schedule=schedule, lr=0.005)


def test_fast_ipc_matches_the_hand_written_mlp():
    """An oracle independent of the reference: closed-form iPC with plain SGD."""
    layers, graph, x, y = strict_mlp_case()
    hand = HandMLP(layers)
    params = [p for lin in layers for p in (lin.weight, lin.bias)]
    T, rate, lr = 4, 0.3, 0.2
    result = PCEngine(graph, T=T, rate=rate, fpa=False, ipc=True, backend="fast").step(
        x, y, torch.optim.SGD(params, lr=lr))
    hand.ipc(x, y, T, rate, "jacobi", lr)
    want = [hand.W[0], hand.b[0], hand.W[1], hand.b[1], hand.W[2], hand.b[2]]
    for p, w in zip(params, want):
        torch.testing.assert_close(p.detach(), w, rtol=1e-10, atol=1e-12)
    assert result.steps == T


def test_auto_runs_ipc_on_the_reference_backend():
    layers, graph, x, y = strict_mlp_case()
    params = [p for lin in layers for p in (lin.weight, lin.bias)]
    engine = PCEngine(graph, T=2, rate=0.3, fpa=False, ipc=True, backend="auto")
    engine.step(x, y, torch.optim.SGD(params, lr=0.1))
    assert engine.last_backend == "reference"


@pytest.mark.parametrize("name", ["mlp", "cnn", "resdualnet", "resnet20"])
def test_strict_energy_decreases_for_a_small_rate(name):
    """Gradient steps on F with a small rate: F falls at every step (rate 0.05, well inside
    the range where it does: the errors' curvature is ~1 plus the children's)."""
    net, size = _net(name)
    (x, y), _ = _batches(size, n=4)
    result = PCEngine(net.pc_graph(), backend="fast", fpa=False, T=8, rate=0.05,
                      record_energy=True).compute_gradients(x, y)
    trace = torch.stack(result.energy_trace)
    assert (trace[1:] < trace[:-1]).all(), trace
    assert trace[-1] < trace[0] * (1 - 1e-4), trace


@pytest.mark.parametrize("kw", [
    dict(T=4, rate=0.4, state_momentum=0.7, error_clamp=0.3),
    dict(T=3, rate=0.3, state_momentum=0.5, state_nesterov=True, schedule="sequential",
         record_energy=True),
    dict(T=20, rate=0.3, state_momentum=0.5, tol=1e-3, check_every=2),
], ids=["heavy-ball-clamp", "nesterov-sequential-trace", "momentum-tol"])
@pytest.mark.parametrize("name", ["cnn", "resdualnet"])
def test_fpa_state_momentum_and_tol_on_the_fast_backend_equal_reference(name, kw):
    """Under FPA the fast backend takes momentum steps (unfused, per-node velocities) and
    stops early under tol exactly as the reference does."""
    _compare(name, **kw)


class _Swish(nn.Module):
    """A module without an explicit VJP rule: its node runs on the autograd fallback."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.tanh(x)


@pytest.mark.parametrize("mode", [dict(fpa=False), dict(fpa=False, schedule="sequential"),
                                  dict(fpa=False, epc=True),
                                  dict(fpa=False, ipc=True)],
                         ids=["strict", "sequential", "epc", "ipc"])
def test_nodes_without_a_rule_run_on_the_autograd_fallback(mode):
    torch.manual_seed(0)
    layers = [nn.Sequential(nn.Linear(5, 8), nn.Tanh()), nn.Sequential(nn.Linear(8, 6), _Swish()),
              nn.Linear(6, 4)]
    net = nn.ModuleList(layers).double()
    assert not has_rule(layers[1])
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (7,), generator=g)
    kw = dict(T=3, rate=0.3, **mode)
    nets = {b: copy.deepcopy(net) for b in ("reference", "fast")}
    results = {}
    for backend, n in nets.items():
        engine = PCEngine(sequential_graph(list(n)), backend=backend, **kw)
        opt = torch.optim.SGD(n.parameters(), lr=0.05)
        results[backend] = engine.step(x, y, opt)
        assert engine.last_backend == backend
    for k, e in results["reference"].errors.items():
        torch.testing.assert_close(results["fast"].errors[k], e, **ERROR_TOL, msg=k)
    for p, q in zip(nets["reference"].parameters(), nets["fast"].parameters()):
        torch.testing.assert_close(q, p, **TOL)


def _count_predictions(monkeypatch) -> list[str]:
    """The node names :meth:`StrictRunner.predict_node` is called with, in order."""
    from pcfast.pc.backends.fast_strict import StrictRunner

    calls: list[str] = []
    original = StrictRunner.predict_node

    def counting(self, node, *args, **kwargs):
        calls.append(node.name)
        return original(self, node, *args, **kwargs)

    monkeypatch.setattr(StrictRunner, "predict_node", counting)
    return calls


def _chain_graph():
    layers = [nn.Sequential(nn.Linear(5, 8), nn.Tanh()), nn.Sequential(nn.Linear(8, 6), nn.Tanh()),
              nn.Sequential(nn.Linear(6, 6), nn.Tanh()), nn.Linear(6, 4)]
    return sequential_graph(layers, ["a", "b", "c", "out"])


def test_sequential_sweep_predicts_each_node_once_on_a_chain(monkeypatch):
    """A prediction depends on the parents only: on a chain, the one a node makes on its own
    turn is still current on its parent's turn, so a sweep predicts every node once (the first
    hidden node reads the clamped input and keeps its feedforward prediction). The first sweep
    starts at the feedforward values, whose predictions and rules the feedforward pass made."""
    calls = _count_predictions(monkeypatch)
    torch.manual_seed(0)
    x, y = torch.randn(7, 5), torch.randint(0, 4, (7,))
    engine = PCEngine(_chain_graph(), T=3, rate=0.3, fpa=False, schedule="sequential",
                      backend="fast", backend_options={"dense_chain": "off"})
    engine.compute_gradients(x, y)
    assert engine.last_backend == "fast"
    # the feedforward derives the senders' rules (a reads the input: no rule); sweep 1
    # predicts nothing; later sweeps: c and out on c's turn, b on b's, a (kept) on a's
    assert calls == ["b", "c", "out"] + ["out", "c", "b", "a"] * 2


@pytest.mark.parametrize("mode", [dict(fpa=False, schedule="jacobi"), dict(fpa=False, epc=True)],
                         ids=["strict-jacobi", "epc"])
def test_first_step_reuses_the_feedforward_predictions(monkeypatch, mode):
    """Strict jacobi and ePC: the first step's values are the feedforward's (ePC: zero
    errors), so it reuses that pass's predictions and rules: T steps predict the graph T - 1
    times after the feedforward, not T times."""
    calls = _count_predictions(monkeypatch)
    torch.manual_seed(0)
    x, y = torch.randn(7, 5), torch.randint(0, 4, (7,))
    engine = PCEngine(_chain_graph(), T=3, rate=0.3, backend="fast",
                      backend_options={"dense_chain": "off"}, **mode)
    engine.compute_gradients(x, y)
    assert engine.last_backend == "fast"
    assert calls[:3] == ["b", "c", "out"]  # the feedforward's senders
    # then every node once per later step (a keeps its feedforward prediction); ePC forms
    # its final values with one more pass
    passes = 2 + (1 if mode.get("epc") else 0)
    assert calls[3:] == ["a", "b", "c", "out"] * passes
