"""FPA inference solved by path length (``fpa_solver="levels"``) against the stepped reference.

Oracles: the reference backend's ``T`` autograd steps (float64), the binomial tail for the
jacobi coefficients, ``r^k`` for one sequential sweep, and the number of VJPs the solver must
run on a chain (one per node, whatever ``T``).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from pcfast.models import build_model
from pcfast.models.cifar_resnet import CifarResNet
from pcfast.models.resdualnet import ResDualNet
from pcfast.models.simple import CNN, MLP, ResCNN
from pcfast.pc import PCEngine, vjp_rules
from pcfast.pc.backends.base import PCSettings
from pcfast.pc.backends.fast import FastBackend
from pcfast.pc.backends.fpa_levels import level_coefficients, path_lengths, solver_costs


@pytest.mark.parametrize("T, rate", [(1, 0.5), (5, 0.3), (12, 0.5), (4, 1.0)])
def test_jacobi_coefficients_are_the_binomial_tail(T, rate):
    got = level_coefficients(PCSettings(T=T, rate=rate, schedule="jacobi"), T + 3)
    for k, c in enumerate(got):
        tail = sum(math.comb(T, j) * rate ** j * (1 - rate) ** (T - j) for j in range(k, T + 1))
        assert c == pytest.approx(tail, rel=1e-12, abs=1e-15), k


def test_one_sequential_sweep_carries_r_to_the_k():
    got = level_coefficients(PCSettings(T=1, rate=0.3, schedule="sequential"), 6)
    assert got == pytest.approx([0.3 ** k for k in range(7)], rel=1e-12)


def _nets() -> dict[str, tuple[torch.nn.Module, int]]:
    torch.manual_seed(0)
    return {
        "resdualnet-2blocks": (ResDualNet(num_classes=10, stem_channels=3,
                                          stages=((3, 1), (6, 2)), blocks_per_stage=2), 8),
        "resnet20": (CifarResNet(20, widths=(3, 4, 6)), 8),
        "cnn-bn": (CNN([4, "p", 6, "p"], image_size=8), 8),
        "rescnn": (ResCNN((4, 8), blocks=1, block="small"), 8),
        "mlp-tanh": (MLP((12, 8), in_features=3 * 4 * 4, activation="tanh"), 4),
    }


SETTINGS = {
    "T1": dict(T=1, rate=0.5),
    "T3": dict(T=3, rate=0.5),
    "T40-deeper-than-the-net": dict(T=40, rate=0.3),
    "rate1": dict(T=6, rate=1.0),
    "heavy-ball": dict(T=6, rate=0.2, state_momentum=0.7),
    "nesterov": dict(T=6, rate=0.2, state_momentum=0.5, state_nesterov=True),
}


@pytest.mark.parametrize("key", list(_nets()))
@pytest.mark.parametrize("schedule", ["jacobi", "sequential"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_levels_equal_the_stepped_reference_in_float64(key, schedule, setting):
    """Errors, energy and weight gradients over two batches with an Adam step between."""
    net, size = _nets()[key]
    net = net.double().train()
    ref_net, fast_net = copy.deepcopy(net), copy.deepcopy(net)
    kw = dict(schedule=schedule, **SETTINGS[setting])
    ref = PCEngine(ref_net.pc_graph(), backend="reference", **kw)
    fast = PCEngine(fast_net.pc_graph(), backend="fast",
                    backend_options={"kernels": "torch", "fpa_solver": "levels"}, **kw)
    opt_r = torch.optim.Adam(ref_net.parameters(), lr=0.01)
    opt_f = torch.optim.Adam(fast_net.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(1)
    for i in range(2):
        x = torch.randn(5, 3, size, size, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 10, (5,), generator=gen)
        r_ref, r_fast = ref.step(x, y, opt_r), fast.step(x, y, opt_f)
        for k in r_ref.errors:
            torch.testing.assert_close(r_fast.errors[k], r_ref.errors[k], rtol=1e-10,
                                       atol=1e-13, msg=f"batch {i} error {k}")
        torch.testing.assert_close(r_fast.energy, r_ref.energy, rtol=1e-10, atol=1e-13)
        for (name, p), q in zip(ref_net.named_parameters(), fast_net.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-13,
                                       msg=f"batch {i} grad {name}")


def test_kernels_auto_levels_equal_the_reference_on_resdualnet():
    """The registered ops' rules (C++ where built) under the levels solver."""
    torch.manual_seed(0)
    net = ResDualNet(stem_channels=3, stages=((3, 1), (6, 2)), blocks_per_stage=2).double()
    x, y = torch.randn(5, 3, 8, 8, dtype=torch.float64), torch.randint(0, 10, (5,))
    ref_net, fast_net = copy.deepcopy(net), copy.deepcopy(net)
    r = PCEngine(ref_net.pc_graph(), T=30, rate=0.5).compute_gradients(x, y)
    f = PCEngine(fast_net.pc_graph(), T=30, rate=0.5, backend="fast",
                 backend_options={"kernels": "auto", "fpa_solver": "levels"}
                 ).compute_gradients(x, y)
    for k in r.errors:
        torch.testing.assert_close(f.errors[k], r.errors[k], rtol=1e-10, atol=1e-13, msg=k)
    for (name, p), q in zip(ref_net.named_parameters(), fast_net.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-13, msg=name)


def _count_vjps(monkeypatch) -> list[int]:
    """Count every rule's ``vjp`` call."""
    calls = [0]
    for cls in (vjp_rules.ChainRule, vjp_rules.MergeRule, vjp_rules.HeadRule,
                vjp_rules.AutogradRule):
        def counted(self, e, original=cls.vjp):
            calls[0] += 1
            return original(self, e)

        monkeypatch.setattr(cls, "vjp", counted)
    return calls


@pytest.mark.parametrize("T", [3, 20])
def test_a_chain_costs_one_vjp_per_sender_whatever_T(monkeypatch, T):
    torch.manual_seed(0)
    net = MLP((12, 8, 8), in_features=3 * 4 * 4, activation="tanh")
    graph = net.pc_graph()
    senders = [n for n in graph.nodes if any(p != graph.input_name for p in n.parents)]
    x, y = torch.randn(4, 3, 4, 4), torch.randint(0, 10, (4,))
    calls = _count_vjps(monkeypatch)
    PCEngine(graph, T=T, rate=0.5, backend="fast",
             backend_options={"kernels": "torch"}).compute_gradients(x, y)
    assert calls[0] == min(T, len(senders))  # jacobi: lengths beyond T carry nothing


def test_auto_steps_where_levels_would_cost_more():
    """Sequential, few steps, a deep residual net: every node sees many path lengths at once."""
    g = build_model("resnet56").pc_graph()
    backend = FastBackend(g, kernels="torch")
    x = torch.randn(2, 3, 32, 32)
    _, rules = backend._feedforward(x)
    plan = backend._plan(rules)
    seq = PCSettings(T=3, schedule="sequential")
    levels, stepped = solver_costs(plan, path_lengths(plan, g.output, seq), g.output, seq)
    assert levels > stepped and not backend.by_levels(plan, seq)
    jac = PCSettings(T=100, schedule="jacobi")
    levels, stepped = solver_costs(plan, path_lengths(plan, g.output, jac), g.output, jac)
    assert levels < stepped / 2 and backend.by_levels(plan, jac)


@pytest.mark.parametrize("kw", [dict(error_clamp=0.1), dict(tol=1e-3), dict(record_energy=True)])
def test_settings_the_levels_do_not_solve_step_under_auto_and_raise_when_forced(kw):
    torch.manual_seed(0)
    net = MLP((12,), in_features=3 * 4 * 4).double()
    x, y = torch.randn(4, 3, 4, 4, dtype=torch.float64), torch.randint(0, 10, (4,))
    ref = copy.deepcopy(net)
    r = PCEngine(ref.pc_graph(), T=5, **kw).compute_gradients(x, y)
    f = PCEngine(net.pc_graph(), T=5, backend="fast", backend_options={"kernels": "torch"},
                 **kw).compute_gradients(x, y)
    for k in r.errors:
        torch.testing.assert_close(f.errors[k], r.errors[k], rtol=1e-10, atol=1e-13)
    forced = PCEngine(net.pc_graph(), T=5, backend="fast",
                      backend_options={"kernels": "torch", "fpa_solver": "levels"}, **kw)
    with pytest.raises(ValueError, match="fpa_solver='levels' solves plain FPA"):
        forced.compute_gradients(x, y)


def test_bad_solver_name_is_rejected():
    net = MLP((12,), in_features=3 * 4 * 4)
    with pytest.raises(ValueError, match="fpa_solver must be one of"):
        PCEngine(net.pc_graph(), backend="fast", backend_options={"fpa_solver": "closed"})
