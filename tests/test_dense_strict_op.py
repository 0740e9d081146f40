"""PC on a dense chain (an MLP): strict PC as one op (``pcfast::dense_strict_relax``) and FPA in
closed form, as the fast backend runs them on the CPU.

Oracles: the op's PyTorch reference (straight steps, float64) for the C++ kernel; the reference
backend (autograd over the whole energy, stepped) for the engine; the op's Gram-matrix form must
equal the straight steps up to rounding.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pcfast.models import build_model
from pcfast.ops import _ext
from pcfast.ops.dense_strict import (
    ACTIVATIONS,
    dense_strict_relax,
    dense_strict_relax_ref,
    gram_pays,
)
from pcfast.pc import PCEngine, sequential_graph
from pcfast.pc.backends import dense_chain
from pcfast.pc.backends.dense_chain import DenseChain, find_dense_chain

needs_kernel = pytest.mark.skipif(not _ext.has_kernel("dense_strict_relax_cpu", "cpu"),
                                  reason="pcfast._C is not built")
A = ACTIVATIONS
CHAINS = {  # widths d_1 .. d_L, C and the activation of every node after the first
    "tanh-identity": ((6, 4, 3), (A["tanh"], A["identity"])),
    "relu-sigmoid-tanh": ((6, 5, 4, 3), (A["relu"], A["sigmoid"], A["tanh"])),
    "one-hidden": ((4, 3), (A["tanh"],)),
    "wide-first": ((9, 3, 5, 3), (A["sigmoid"], A["relu"], A["identity"])),
}


def _case(widths, dtype=torch.float64, bias=True, start_at_mu1=False, seed=0, n=5):
    g = torch.Generator().manual_seed(seed)
    L = len(widths) - 1
    weights = [torch.randn(widths[k + 1], widths[k], generator=g, dtype=dtype) * 0.5
               for k in range(L)]
    biases = [torch.randn(widths[k + 1], generator=g, dtype=dtype) if bias else None
              for k in range(L)]
    values = [torch.randn(n, widths[k], generator=g, dtype=dtype) for k in range(L)]
    mu1 = values[0].clone() if start_at_mu1 else \
        values[0] + 0.3 * torch.randn(values[0].shape, generator=g, dtype=dtype)
    target = F.one_hot(torch.randint(widths[-1], (n,), generator=g), widths[-1]).to(dtype)
    return mu1, weights, biases, values, target


def _run(fn, case, acts, T, rate, sequential, ce, **kw):
    mu1, weights, biases, values, target = case
    out = [v.clone() for v in values]
    fn(mu1, weights, biases, out, target, list(acts), T, rate, sequential, ce, **kw)
    return out


@needs_kernel
@pytest.mark.parametrize("chain", list(CHAINS))
@pytest.mark.parametrize("sequential, ce, gram, bias, start_at_mu1",
                         list(itertools.product([False, True], [False, True], [False, True],
                                                [True, False], [False, True])))
def test_cpu_kernel_equals_reference_in_float64(chain, sequential, ce, gram, bias, start_at_mu1):
    """Both schedules, both output losses, with and without the Gram form and biases, from the
    feedforward start (``v_1 = mu_1``, the engine's) and from any other."""
    widths, acts = CHAINS[chain]
    case = _case(widths, bias=bias, start_at_mu1=start_at_mu1)
    want = _run(dense_strict_relax_ref, case, acts, 7, 0.3, sequential, ce)
    got = _run(dense_strict_relax, case, acts, 7, 0.3, sequential, ce, gram=gram)
    moved = max((w - v).abs().max().item() for w, v in zip(want, case[3]))
    assert moved > 1e-2, "the values did not move: the comparison would see nothing"
    for k, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12, msg=f"value {k}")


@needs_kernel
@pytest.mark.parametrize("gram", [False, True])
def test_cpu_kernel_float32_tracks_float64(gram):
    widths, acts = CHAINS["relu-sigmoid-tanh"]
    case64 = _case(widths, start_at_mu1=True, n=33)
    case32 = tuple(t.float() if isinstance(t, torch.Tensor) else [None if x is None else x.float()
                                                                   for x in t] for t in case64)
    want = _run(dense_strict_relax_ref, case64, acts, 20, 0.1, False, True)
    got = _run(dense_strict_relax, case32, acts, 20, 0.1, False, True, gram=gram)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


@needs_kernel
def test_zero_steps_leave_the_values_alone():
    widths, acts = CHAINS["tanh-identity"]
    case = _case(widths)
    got = _run(dense_strict_relax, case, acts, 0, 0.3, False, False, gram=True)
    for a, b in zip(got, case[3]):
        assert torch.equal(a, b)


def test_opcheck():
    widths, acts = CHAINS["relu-sigmoid-tanh"]
    for dtype, gram in ((torch.float64, True), (torch.float32, False)):
        mu1, weights, biases, values, target = _case(widths, dtype=dtype)
        torch.library.opcheck(torch.ops.pcfast.dense_strict_relax.default,
                              (mu1, weights, biases, [v.clone() for v in values], target,
                               list(acts), 3, 0.2, False, True, gram))


def test_bad_arguments_name_the_problem():
    widths, acts = CHAINS["tanh-identity"]
    mu1, weights, biases, values, target = _case(widths)
    with pytest.raises(ValueError, match="weight 1"):
        dense_strict_relax(mu1, [weights[0], weights[1].t()], biases, values, target, acts, 2, 0.1)
    with pytest.raises(ValueError, match="activation codes"):
        dense_strict_relax(mu1, weights, biases, values, target, [1, 9], 2, 0.1)
    with pytest.raises(ValueError, match="T >= 0"):
        dense_strict_relax(mu1, weights, biases, values, target, acts, -1, 0.1)
    with pytest.raises(ValueError, match="one weight, bias and activation"):
        dense_strict_relax(mu1, weights[:1], biases, values, target, acts, 2, 0.1)
    with pytest.raises(ValueError, match="mu1"):
        dense_strict_relax(mu1[:, :2], weights, biases, values, target, acts, 2, 0.1)


def test_gram_pays_counts_multiply_adds():
    # the benchmark MLP's first hidden node (256 -> 256), T = 20, batch 128: fewer with Gram
    assert gram_pays(128, [256, 256], 20)
    # a narrow hidden node feeding a much wider one: the Gram matrix is the larger product
    assert not gram_pays(128, [64, 1024], 20)
    # one step: the start and the final value cost more than the one pair of matmuls saved
    assert not gram_pays(128, [256, 256], 1)


# --------------------------------------------------------------------------------- the engine
def test_dense_chain_detection():
    torch.manual_seed(0)
    mlp = build_model("mlp", hidden=(12, 8), in_features=48, activation="tanh")
    chain = find_dense_chain(mlp.pc_graph())
    assert [(lin.out_features, code) for lin, code in chain] == [(8, A["tanh"]), (10, 0)]
    bn = build_model("mlp", hidden=(12, 8), in_features=48, batchnorm=True)
    gelu = build_model("mlp", hidden=(12, 8), in_features=48, activation="gelu")
    cnn = build_model("cnn", spec=[4, "p"], image_size=8)
    inplace = [nn.Linear(5, 6), nn.Sequential(nn.Linear(6, 4), nn.ReLU(inplace=True)),
               nn.Linear(4, 3)]
    for net in (bn, gelu, cnn):
        assert find_dense_chain(net.pc_graph()) is None
    assert find_dense_chain(sequential_graph(inplace)) is None


class _Counter:
    def __init__(self, monkeypatch):
        self.calls = 0
        original = dense_chain.dense_strict_relax

        def counting(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(dense_chain, "dense_strict_relax", counting)


@needs_kernel
@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("schedule", ["jacobi", "sequential"])
@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("chain_mode", ["auto", "straight"])
def test_engine_runs_the_op_and_equals_reference(monkeypatch, activation, schedule, loss,
                                                 chain_mode):
    """Three batches with SGD steps between: errors, energies, weight gradients and weights of
    the fast backend (one op per batch) against the reference backend, float64."""
    counter = _Counter(monkeypatch)
    torch.manual_seed(0)
    net = build_model("mlp", hidden=(12, 8, 9), in_features=48, activation=activation).double()
    nets = {b: copy.deepcopy(net) for b in ("reference", "fast")}
    kw = dict(fpa=False, T=6, rate=0.3, schedule=schedule, output_loss=loss)
    engines = {"reference": PCEngine(nets["reference"].pc_graph(), backend="reference", **kw),
               "fast": PCEngine(nets["fast"].pc_graph(), backend="fast",
                                backend_options={"dense_chain": chain_mode}, **kw)}
    opts = {b: torch.optim.SGD(n.parameters(), lr=0.1, momentum=0.5) for b, n in nets.items()}
    g = torch.Generator().manual_seed(3)
    moved = 0.0
    for i in range(3):
        x = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
        y = torch.randint(0, 10, (6,), generator=g)
        r = {b: engines[b].step(x, y, opts[b]) for b in engines}
        for name, e in r["reference"].errors.items():
            torch.testing.assert_close(r["fast"].errors[name], e, rtol=1e-9, atol=1e-10,
                                       msg=f"batch {i} error {name}")
        torch.testing.assert_close(r["fast"].energy, r["reference"].energy, rtol=1e-9, atol=0)
        torch.testing.assert_close(r["fast"].loss, r["reference"].loss, rtol=1e-12, atol=0)
        for (name, p), q in zip(nets["reference"].named_parameters(), nets["fast"].parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-11,
                                       msg=f"batch {i} grad {name}")
            torch.testing.assert_close(q, p, rtol=1e-9, atol=1e-11)
        moved = max(moved, r["reference"].errors["fc1"].abs().max().item())
    assert counter.calls == 3
    assert moved > 1e-3


@needs_kernel
@pytest.mark.parametrize("kw", [dict(error_clamp=0.5), dict(record_energy=True),
                                dict(state_momentum=0.5), dict(tol=1e-3, check_every=2)],
                         ids=["clamp", "trace", "momentum", "tol"])
def test_settings_the_op_does_not_take_run_the_per_node_steps(monkeypatch, kw):
    counter = _Counter(monkeypatch)
    torch.manual_seed(0)
    net = build_model("mlp", hidden=(12, 8), in_features=48, activation="tanh").double()
    x = torch.randn(5, 48, dtype=torch.float64)
    y = torch.randint(0, 10, (5,))
    results = {}
    for backend in ("reference", "fast"):
        n = copy.deepcopy(net)
        results[backend] = PCEngine(n.pc_graph(), backend=backend, fpa=False, T=4, rate=0.2,
                                    **kw).compute_gradients(x, y)
    assert counter.calls == 0
    torch.testing.assert_close(results["fast"].energy, results["reference"].energy,
                               rtol=1e-9, atol=0)


@needs_kernel
def test_dense_chain_option_is_checked():
    with pytest.raises(ValueError, match="dense_chain must be one of"):
        PCEngine(build_model("mlp", hidden=(8,), in_features=12).pc_graph(), backend="fast",
                 backend_options={"dense_chain": True})


@needs_kernel
@pytest.mark.parametrize("schedule", ["jacobi", "sequential"])
@pytest.mark.parametrize("chain_mode", ["auto", "straight"])
def test_energy_decreases_along_the_op_s_steps(monkeypatch, schedule, chain_mode):
    """Strict PC descends the energy: for a small rate the relaxed energy after T steps of the op
    falls with every T (each T a fresh run from the feedforward state, same weights)."""
    counter = _Counter(monkeypatch)
    torch.manual_seed(0)
    net = build_model("mlp", hidden=(32, 16), in_features=48, activation="tanh").double()
    x = torch.randn(16, 48, dtype=torch.float64)
    y = torch.randint(0, 10, (16,))
    energies = []
    for T in range(1, 12):
        engine = PCEngine(net.pc_graph(), backend="fast", fpa=False, T=T, rate=0.05,
                          schedule=schedule, backend_options={"dense_chain": chain_mode})
        energies.append(engine.compute_gradients(x, y).energy.item())
    assert counter.calls == len(energies)
    drops = [a - b for a, b in zip(energies, energies[1:])]
    assert min(drops) > 0, energies
    assert energies[0] - energies[-1] > 1e-3 * energies[0]


@needs_kernel
def test_frozen_layers_get_no_gradient_on_the_op_path(monkeypatch):
    counter = _Counter(monkeypatch)
    torch.manual_seed(0)
    net = build_model("mlp", hidden=(12, 8), in_features=48, activation="tanh").double()
    frozen = net.pc_graph().nodes[1].fn[0]
    frozen.weight.requires_grad_(False)
    nets = {b: copy.deepcopy(net) for b in ("reference", "fast")}
    x = torch.randn(5, 48, dtype=torch.float64)
    y = torch.randint(0, 10, (5,))
    for backend, n in nets.items():
        PCEngine(n.pc_graph(), backend=backend, fpa=False, T=4, rate=0.2).compute_gradients(x, y)
    assert counter.calls == 1
    for (name, p), q in zip(nets["reference"].named_parameters(), nets["fast"].parameters()):
        if p.grad is None:
            assert q.grad is None, name
        else:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-12, msg=name)
    assert nets["fast"].pc_graph().nodes[1].fn[0].weight.grad is None


class _FpaCounter:
    def __init__(self, monkeypatch):
        self.calls = 0
        original = DenseChain.fpa

        def counting(chain, *args, **kwargs):
            self.calls += 1
            return original(chain, *args, **kwargs)

        monkeypatch.setattr(DenseChain, "fpa", counting)


@pytest.mark.parametrize("activation", ["tanh", "relu", "sigmoid"])
@pytest.mark.parametrize("kw", [dict(T=8, rate=0.3), dict(T=8, rate=0.3, schedule="sequential"),
                                dict(T=2, rate=0.5), dict(T=6, rate=0.2, state_momentum=0.5,
                                                          state_nesterov=True),
                                dict(T=5, rate=0.3, output_loss="mse")],
                         ids=["jacobi", "sequential", "T-below-depth", "nesterov", "mse"])
def test_fpa_in_closed_form_equals_the_stepped_reference(monkeypatch, activation, kw):
    """Three batches with SGD steps between, float64: the closed form (one VJP per node, weight
    gradients without autograd) against the reference backend's T steps. ``T=2`` on three hidden
    nodes leaves the first one's error at zero (jacobi: no path of three edges in two steps)."""
    counter = _FpaCounter(monkeypatch)
    torch.manual_seed(0)
    if activation == "sigmoid":
        net = nn.Sequential(nn.Sequential(nn.Flatten(), nn.Linear(48, 12), nn.Sigmoid()),
                            nn.Sequential(nn.Linear(12, 8), nn.Sigmoid()),
                            nn.Sequential(nn.Linear(8, 9), nn.Sigmoid()), nn.Linear(9, 10))
        graph_of = lambda n: sequential_graph(list(n))  # noqa: E731
    else:
        net = build_model("mlp", hidden=(12, 8, 9), in_features=48, activation=activation)
        graph_of = lambda n: n.pc_graph()  # noqa: E731
    net = net.double()
    nets = {b: copy.deepcopy(net) for b in ("reference", "fast")}
    # T=2 on four nodes: stepping costs less than the closed form, which "levels" forces
    options = {"fpa_solver": "levels"} if kw["T"] == 2 else None
    engines = {"reference": PCEngine(graph_of(nets["reference"]), backend="reference", fpa=True,
                                     **kw),
               "fast": PCEngine(graph_of(nets["fast"]), backend="fast", fpa=True,
                                backend_options=options, **kw)}
    opts = {b: torch.optim.SGD(n.parameters(), lr=0.1, momentum=0.5) for b, n in nets.items()}
    g = torch.Generator().manual_seed(5)
    for i in range(3):
        x = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
        y = torch.randint(0, 10, (6,), generator=g)
        r = {b: engines[b].step(x, y, opts[b]) for b in engines}
        assert engines["fast"].last_backend == "fast"
        for name, e in r["reference"].errors.items():
            torch.testing.assert_close(r["fast"].errors[name], e, rtol=1e-9, atol=1e-12,
                                       msg=f"batch {i} error {name}")
        torch.testing.assert_close(r["fast"].energy, r["reference"].energy, rtol=1e-10, atol=0)
        for (name, p), q in zip(nets["reference"].named_parameters(), nets["fast"].parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-12,
                                       msg=f"batch {i} grad {name}")
    assert counter.calls == 3
    first = r["reference"].errors[graph_of(nets["reference"]).hidden[0]]
    if kw["T"] == 2:
        assert torch.count_nonzero(first) == 0
    else:
        assert first.abs().max() > 1e-6


def test_fpa_steps_and_off_take_the_generic_path(monkeypatch):
    counter = _FpaCounter(monkeypatch)
    torch.manual_seed(0)
    net = build_model("mlp", hidden=(12, 8), in_features=48, activation="tanh")
    x, y = torch.randn(5, 48), torch.randint(0, 10, (5,))
    for options in ({"fpa_solver": "steps"}, {"dense_chain": "off"}):
        PCEngine(net.pc_graph(), backend="fast", T=5, backend_options=options
                 ).compute_gradients(x, y)
    PCEngine(net.pc_graph(), backend="fast", T=5, error_clamp=0.5).compute_gradients(x, y)
    assert counter.calls == 0
    PCEngine(net.pc_graph(), backend="fast", T=5).compute_gradients(x, y)
    assert counter.calls == 1
