"""The fast PC engine against the reference engine (the oracle): same errors, same weight
gradients, same optimizer trajectory, for every FPA schedule and option.

CPU runs use ``kernels="torch"`` (PyTorch forms of the fused ops) and ``kernels="triton"`` (the
Triton kernels through the interpreter, tiny shapes); the CUDA-graph path is tested on a GPU.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from pcfast.models.resdualnet import ResDualNet
from pcfast.pc import PCEngine, sequential_graph
from pcfast.pc.backends import BackendUnavailable
from pcfast.pc.backends import fast as fast_backend
from pcfast.pc.backends.fast import FastBackend
from pcfast.pc.fast import FastPCEngine
from pcfast.pc.vjp_rules import has_rule, squash_vjp


def _resdualnet() -> nn.Module:
    torch.manual_seed(0)
    return ResDualNet(stages=((8, 1), (16, 2)), blocks_per_stage=1, stem_channels=4).double()


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.layers = nn.ModuleList([
            nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU()),
            nn.Sequential(nn.Linear(16, 16), nn.ReLU()),
            nn.Linear(16, 10),
        ])

    def pc_graph(self):
        return sequential_graph(list(self.layers))


class _GeluBlock(nn.Module):
    """A node type without an explicit rule: exercises the autograd fallback."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(self.lin(x)) * 0.5


def _mlp() -> nn.Module:
    return _MLP().double()


def _batch(model_name: str, n: int = 4):
    g = torch.Generator().manual_seed(2)
    shape = (n, 3, 8, 8) if model_name == "resdualnet" else (n, 3, 2, 2)
    return (torch.randn(shape, generator=g, dtype=torch.float64),
            torch.randint(0, 10, (n,), generator=g))


def _pair(model, **kw):
    ref_model, fast_model = copy.deepcopy(model), copy.deepcopy(model)
    options = {"kernels": kw.pop("kernels", "torch"), "fpa_solver": kw.pop("solver", "steps")}
    ref = PCEngine(ref_model.pc_graph(), **kw)
    fast = PCEngine(fast_model.pc_graph(), backend="fast", backend_options=options, **kw)
    return (ref_model, ref), (fast_model, fast)


def _assert_same(ref_model, fast_model, r_ref, r_fast, tol=1e-12):
    for (name, p), q in zip(ref_model.named_parameters(), fast_model.parameters()):
        assert p.grad is not None and q.grad is not None, name
        torch.testing.assert_close(q.grad, p.grad, rtol=tol, atol=tol, msg=name)
    assert r_ref.errors.keys() == r_fast.errors.keys()
    for k in r_ref.errors:
        torch.testing.assert_close(r_fast.errors[k], r_ref.errors[k], rtol=tol, atol=tol, msg=k)
    torch.testing.assert_close(r_fast.energy, r_ref.energy, rtol=tol, atol=tol)


MODELS = {"resdualnet": _resdualnet, "mlp": _mlp}


@pytest.mark.parametrize("model_name", ["resdualnet", "mlp"])
@pytest.mark.parametrize("schedule", ["jacobi", "sequential"])
@pytest.mark.parametrize("rate", [0.5, 1.0])
@pytest.mark.parametrize("clamp", [None, 0.05])
def test_matches_reference_torch_kernels(model_name, schedule, rate, clamp):
    model = MODELS[model_name]()
    x, y = _batch(model_name)
    (rm, ref), (fm, fast) = _pair(model, T=4, rate=rate, schedule=schedule, error_clamp=clamp)
    _assert_same(rm, fm, ref.compute_gradients(x, y), fast.compute_gradients(x, y))


@pytest.mark.parametrize("schedule", ["jacobi", "sequential"])
def test_matches_reference_triton_interpreter(schedule):
    model = _resdualnet()
    x, y = _batch("resdualnet", n=2)
    (rm, ref), (fm, fast) = _pair(model, T=2, rate=0.5, schedule=schedule, error_clamp=0.05,
                                  kernels="triton")
    _assert_same(rm, fm, ref.compute_gradients(x, y), fast.compute_gradients(x, y))


@pytest.mark.parametrize("mode", [dict(fpa=False), dict(fpa=False, epc=True)],
                         ids=["strict", "epc"])
def test_strict_and_epc_match_reference_triton_interpreter(mode):
    """The fast strict/ePC steps with the Triton kernels in their rules (interpreter on CPU)."""
    model = _resdualnet()
    x, y = _batch("resdualnet", n=2)
    (rm, ref), (fm, fast) = _pair(model, T=2, rate=0.3, kernels="triton", **mode)
    _assert_same(rm, fm, ref.compute_gradients(x, y), fast.compute_gradients(x, y), tol=1e-10)


def test_resdualnet_nodes_all_have_explicit_rules():
    graph = _resdualnet().pc_graph()
    senders = [n for n in graph.nodes if any(p != graph.input_name for p in n.parents)]
    missing = [n.name for n in senders if not has_rule(n.fn)]
    assert not missing, f"these nodes would use the slow autograd fallback: {missing}"


def test_jacobi_error_front_moves_one_node_per_step():
    model = _mlp()
    x, y = _batch("mlp")
    fast = FastPCEngine(model.pc_graph(), T=1, rate=1.0, kernels="torch")
    errors = fast.compute_gradients(x, y).errors
    assert errors["layer1"].abs().sum() > 0  # the output's parent moved
    assert torch.count_nonzero(errors["layer0"]) == 0  # the front has not reached it yet


def test_several_optimizer_steps_equal_step_for_step():
    model = _resdualnet()
    (rm, ref), (fm, fast) = _pair(model, T=3, rate=0.5, schedule="jacobi")
    opt_r = torch.optim.Adam(rm.parameters(), lr=0.01)
    opt_f = torch.optim.Adam(fm.parameters(), lr=0.01)
    rm.train()
    fm.train()
    for i in range(3):
        x, y = _batch("resdualnet")
        x = x + i
        ref.step(x, y, opt_r)
        fast.step(x, y, opt_f)
        for (name, p), q in zip(rm.named_parameters(), fm.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-12, msg=f"step {i}: {name}")
        for (name, b), c in zip(rm.named_buffers(), fm.buffers()):
            torch.testing.assert_close(c, b, rtol=1e-10, atol=1e-12, msg=f"step {i}: {name}")


def test_autograd_fallback_for_unknown_nodes():
    torch.manual_seed(3)
    layers = [nn.Sequential(nn.Flatten(), nn.Linear(12, 16)), _GeluBlock(), nn.Linear(16, 10)]
    model = nn.ModuleList(layers).double()
    assert not has_rule(model[1])
    x, y = _batch("mlp")
    m_ref, m_fast = copy.deepcopy(model), copy.deepcopy(model)
    ref = PCEngine(sequential_graph(list(m_ref)), T=3, rate=0.5)
    fast = FastPCEngine(sequential_graph(list(m_fast)), T=3, rate=0.5, kernels="torch")
    _assert_same(m_ref, m_fast, ref.compute_gradients(x, y), fast.compute_gradients(x, y))


def test_energy_trace_and_mse_match():
    model = _mlp()
    x, y = _batch("mlp")
    (rm, ref), (fm, fast) = _pair(model, T=3, rate=0.5, output_loss="mse", record_energy=True)
    r_ref, r_fast = ref.compute_gradients(x, y), fast.compute_gradients(x, y)
    _assert_same(rm, fm, r_ref, r_fast)
    assert len(r_fast.energy_trace) == len(r_ref.energy_trace) == 4
    for a, b in zip(r_fast.energy_trace, r_ref.energy_trace):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_strict_pc_runs_on_the_fast_backend_and_auto_picks_it_on_cpu():
    """On the CPU ``auto`` runs strict PC, ePC and FPA solved by path length on the fast
    backend, stepped FPA (an error clamp) on the reference."""
    graph = _mlp().pc_graph()
    engine = FastPCEngine(graph, T=2, fpa=False)
    engine.compute_gradients(*_batch("mlp"))
    assert engine.last_backend == "fast"
    for kw, want in ((dict(), "fast"), (dict(error_clamp=1.0), "reference"),
                     (dict(fpa=False), "fast"), (dict(fpa=False, epc=True), "fast")):
        engine = PCEngine(graph, T=2, backend="auto", **kw)
        engine.compute_gradients(*_batch("mlp"))
        assert engine.last_backend == want, kw


def test_bf16_autocast_runs_close_to_float32():
    model = _MLP().float()
    x, y = _batch("mlp")
    x = x.float()
    m32, m16 = copy.deepcopy(model), copy.deepcopy(model)
    r32 = FastPCEngine(m32.pc_graph(), T=3, kernels="torch").compute_gradients(x, y)
    r16 = FastPCEngine(m16.pc_graph(), T=3, kernels="torch",
                       autocast=True).compute_gradients(x, y)
    for k, e in r32.errors.items():
        assert r16.errors[k].dtype == torch.float32
        scale = e.abs().max().clamp_min(1e-3)
        assert (r16.errors[k] - e).abs().max() <= 0.1 * scale, k


@pytest.mark.parametrize("act", [torch.tanh, torch.sigmoid])
def test_tanh_and_sigmoid_rules_match_autograd_and_keep_the_errors_dtype(act):
    z = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, 7, dtype=torch.float64)
    y = act(z)
    (want,) = torch.autograd.grad(y, z, g)
    got = squash_vjp(g, y.detach(), act is torch.tanh)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # bfloat16 predictions (autocast), float32 errors: the derivative in float32
    y16 = y.detach().bfloat16()
    got = squash_vjp(g.float(), y16, act is torch.tanh)
    o = y16.float()
    deriv = 1 - o * o if act is torch.tanh else (1 - o) * o
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, g.float() * deriv, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("schedule", ["jacobi", "sequential"])
@pytest.mark.parametrize("kernels", ["auto", "torch"])
def test_cuda_graph_path_matches_reference(schedule, kernels):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = _resdualnet().float().cuda()
    x, y = _batch("resdualnet", n=16)
    x, y = x.float().cuda(), y.cuda()
    ref_model, fast_model = copy.deepcopy(model), copy.deepcopy(model)
    ref = PCEngine(ref_model.pc_graph(), T=6, rate=0.5, schedule=schedule, error_clamp=1.0)
    fast = FastPCEngine(fast_model.pc_graph(), T=6, rate=0.5, schedule=schedule,
                        error_clamp=1.0, kernels=kernels, cuda_graph=True)
    for i in range(2):  # the second batch replays the first batch's capture
        for p, q in zip(ref_model.parameters(), fast_model.parameters()):
            p.grad = q.grad = None
        _assert_same(ref_model, fast_model, ref.compute_gradients(x + i, y),
                     fast.compute_gradients(x + i, y), tol=1e-4)
    assert fast._fast.captures.builds == 1


def test_bf16_autocast_on_resdualnet_stays_close_to_the_float32_reference():
    """Autocast runs the dual-path dwconv in bf16 too; gradients stay within bf16 accuracy."""
    torch.manual_seed(0)
    net = ResDualNet(num_classes=4, stem_channels=8, stages=((16, 1), (32, 2)))
    x, y = torch.randn(32, 3, 16, 16), torch.randint(0, 4, (32,))
    state = copy.deepcopy(net.state_dict())
    grads = []
    for backend, options in (("reference", None), ("fast", {"autocast": True})):
        net.load_state_dict(state)
        for p in net.parameters():
            p.grad = None
        PCEngine(net.pc_graph(), T=12, rate=0.5, backend=backend,
                 backend_options=options).compute_gradients(x, y)
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    rel = ((grads[1] - grads[0]).norm() / grads[0].norm()).item()
    assert 0 < rel < 0.03  # measured 0.0056: bf16 rounding, not a different computation


def _failing_relax(exc: Exception):
    """A pc_relax that fails the way a broken kernel does, after the feedforward pass (which
    moved the BatchNorm running stats) and after the first VJPs ran."""

    def relax(*args, **kwargs):
        raise exc

    return relax


def _small_bn_net() -> nn.Module:
    torch.manual_seed(0)
    return ResDualNet(num_classes=4, stem_channels=3, stages=((6, 1), (12, 2))).double()


@pytest.mark.parametrize("failure", [
    BackendUnavailable("simulated kernel failure"),
    pytest.param("triton", id="triton-out-of-resources"),
])
def test_auto_falls_back_on_a_kernel_failure_and_keeps_the_users_grads(monkeypatch, failure):
    """``auto`` keeps a run going on the reference path with one warning naming the cause; the
    gradients the user had accumulated before the batch stay and receive the reference's
    gradients; BatchNorm statistics are as if the failed attempt never ran."""
    if failure == "triton":
        from triton.runtime.errors import OutOfResources

        failure, cause = OutOfResources(1 << 20, 1 << 16, "shared memory"), "OutOfResources"
    else:
        cause = "simulated kernel failure"
    net = _small_bn_net()
    x, y = torch.randn(6, 3, 8, 8, dtype=torch.float64), torch.randint(0, 4, (6,))
    state = copy.deepcopy(net.state_dict())
    before = [torch.full_like(p, 0.25) for p in net.parameters()]

    for p, b in zip(net.parameters(), before):
        p.grad = b.clone()
    PCEngine(net.pc_graph(), T=4, backend="reference").compute_gradients(x, y)
    want_grads = [p.grad.clone() for p in net.parameters()]
    want_state = copy.deepcopy(net.state_dict())

    net.load_state_dict(state)
    for p, b in zip(net.parameters(), before):
        p.grad = b.clone()
    monkeypatch.setattr(FastBackend, "prefers", lambda self, x, settings: True)  # auto picks fast on CPU
    monkeypatch.setattr(fast_backend, "pc_relax", _failing_relax(failure))
    engine = PCEngine(net.pc_graph(), T=4, backend="auto",
                      backend_options={"kernels": "torch", "fpa_solver": "steps"})
    with pytest.warns(RuntimeWarning, match=cause):
        engine.compute_gradients(x, y)
    assert engine.last_backend == "reference"
    for p, g in zip(net.parameters(), want_grads):
        torch.testing.assert_close(p.grad, g)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, want_state[k])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine.compute_gradients(x, y)  # no second warning: the reference path from now on
    assert engine.last_backend == "reference"


def test_auto_lets_programming_errors_propagate(monkeypatch):
    monkeypatch.setattr(FastBackend, "prefers", lambda self, x, settings: True)
    monkeypatch.setattr(fast_backend, "pc_relax", _failing_relax(TypeError("a bug")))
    engine = PCEngine(_MLP().double().pc_graph(), T=2, backend="auto",
                      backend_options={"fpa_solver": "steps"})
    with pytest.raises(TypeError, match="a bug"):
        engine.compute_gradients(*_batch("mlp"))


def test_auto_runs_the_fast_backend_where_preferred(monkeypatch):
    monkeypatch.setattr(FastBackend, "prefers", lambda self, x, settings: True)
    model = _mlp()
    x, y = _batch("mlp")
    (rm, ref), (fm, _) = _pair(model, T=3)
    engine = PCEngine(fm.pc_graph(), T=3, backend="auto", backend_options={"kernels": "torch"})
    r_fast = engine.compute_gradients(x, y)
    assert engine.last_backend == "fast"
    _assert_same(rm, fm, ref.compute_gradients(x, y), r_fast)


@pytest.mark.parametrize("backend", ["auto", "fast"])
@pytest.mark.parametrize("options, match", [
    ({"kernel": "torch"}, r"unknown backend_options \['kernel'\]"),
    ({"kernels": "cuda"}, "kernels must be one of"),
    ({"cuda_graph": "yes"}, "booleans"),
])
def test_bad_backend_options_raise_at_construction(backend, options, match):
    with pytest.raises(ValueError, match=match):
        PCEngine(_mlp().pc_graph(), backend=backend, backend_options=options)


def test_reference_backend_takes_no_options():
    with pytest.raises(ValueError, match="takes none"):
        PCEngine(_mlp().pc_graph(), backend="reference", backend_options={"kernels": "torch"})


def test_explicit_fast_backend_raises_its_errors(monkeypatch):
    monkeypatch.setattr(fast_backend, "pc_relax",
                        _failing_relax(BackendUnavailable("simulated kernel failure")))
    engine = PCEngine(_MLP().double().pc_graph(), T=2, backend="fast",
                      backend_options={"fpa_solver": "steps"})
    with pytest.raises(RuntimeError, match="simulated"):
        engine.compute_gradients(*_batch("mlp"))
