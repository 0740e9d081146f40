"""The PC backends: layout (no import circles), explicit VJP rules for every zoo node, fast =
reference on every zoo model (float64, several optimizer steps, both schedules), the CUDA-graph
capture cache, and the CUDA-graph path on a GPU.
"""

from __future__ import annotations

import ast
import copy
import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from pcfast.models import MODELS, build_model
from pcfast.models.cifar_resnet import CifarResNet
from pcfast.models.resdualnet import ResDualNet
from pcfast.models.simple import CNN, MLP, ResCNN
from pcfast.pc import PCEngine
from pcfast.pc.backends.capture import CaptureCache
from pcfast.pc.vjp_rules import has_rule

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------- layout
def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_backends_never_import_the_front_and_ops_never_import_models():
    front = {"pcfast.pc.engine", "pcfast.pc.fast", "pcfast.pc.PCEngine"}
    for path in sorted((ROOT / "pcfast" / "pc" / "backends").glob("*.py")):
        bad = _imports(path) & front
        assert not bad, f"{path.name} imports the front: {bad}"
    for path in sorted((ROOT / "pcfast" / "ops").glob("*.py")):
        bad = {m for m in _imports(path) if m.startswith(("pcfast.models", "pcfast.pc"))}
        assert not bad, f"ops/{path.name} depends on {bad}"
    assert "pcfast.pc.fast" not in _imports(ROOT / "pcfast" / "pc" / "engine.py")


def test_each_backend_module_imports_alone_in_a_fresh_interpreter():
    for module in ("pcfast.pc.backends.base", "pcfast.pc.backends.reference",
                   "pcfast.pc.backends.fast", "pcfast.ops.dwconv", "pcfast.pc.engine"):
        code = (f"import sys, {module}; "
                "assert 'pcfast.pc.fast' not in sys.modules, 'the front pulled in pcfast.pc.fast'")
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=120, cwd=ROOT)
        assert run.returncode == 0, f"{module}: {run.stderr[-2000:]}"


# ------------------------------------------------------------------------------ VJP rules
def _zoo():
    for name in sorted(MODELS):
        if name == "resnet1202":
            with torch.device("meta"):
                yield name, build_model(name)
        else:
            yield name, build_model(name)


def test_every_zoo_graph_node_has_an_explicit_vjp_rule():
    """No node of any zoo model's ``pc_graph()`` needs the autograd fallback (which the CUDA
    graph cannot capture)."""
    checked = 0
    for name, model in _zoo():
        if not hasattr(model, "pc_graph"):
            continue
        graph = model.pc_graph()
        senders = [n for n in graph.nodes if any(p != graph.input_name for p in n.parents)]
        missing = [n.name for n in senders if not has_rule(n.fn)]
        assert not missing, f"{name}: these nodes would use the autograd fallback: {missing}"
        checked += 1
    assert checked >= 17


# ------------------------------------------------------------------------------- equality
def _small_zoo() -> dict[str, tuple[nn.Module, int]]:
    """Every zoo architecture with a pc_graph, small (model kwargs), with its image size."""
    return {
        "resdualnet-2blocks": (ResDualNet(num_classes=10, stem_channels=3,
                                          stages=((3, 1), (6, 2)), blocks_per_stage=2), 8),
        "resnet-A": (CifarResNet(14, widths=(3, 4, 6)), 8),
        "resnet-B": (CifarResNet(8, shortcut="B", widths=(3, 4, 6)), 8),
        "plain": (CifarResNet(8, plain=True, widths=(3, 4, 6)), 8),
        "cnn-maxpool": (CNN([4, "p", 6, "p"], image_size=8), 8),
        "cnn-gelu-avg-gap": (CNN([4, "p", 6], image_size=8, pool="avg", activation="gelu",
                                 head="gap"), 8),
        "cnn-tanh-nobn": (CNN([4, "p", 5], image_size=8, activation="tanh", batchnorm=False), 8),
        "rescnn": (ResCNN((4, 8), blocks=1, block=("small", "big")), 8),
        "mlp-bn": (MLP((12, 8), in_features=3 * 4 * 4, batchnorm=True, activation="silu"), 4),
        "mlp-elu": (MLP((12,), in_features=3 * 4 * 4, activation="elu"), 4),
    }


@pytest.mark.parametrize("key", list(_small_zoo()))
@pytest.mark.parametrize("schedule", ["jacobi", "sequential"])
def test_fast_equals_reference_on_the_zoo_in_float64(key, schedule):
    """Errors, energies, weight gradients, parameters and BatchNorm statistics of the fast
    backend equal the reference's over three batches with Adam steps between."""
    torch.manual_seed(0)
    net, size = _small_zoo()[key]
    net = net.double().train()
    ref_net, fast_net = copy.deepcopy(net), copy.deepcopy(net)
    kw = dict(T=4, rate=0.5, schedule=schedule, error_clamp=0.5 if schedule == "jacobi" else None)
    ref = PCEngine(ref_net.pc_graph(), backend="reference", **kw)
    # The stepped FPA solver (the path-length one: tests/test_fpa_levels.py).
    fast = PCEngine(fast_net.pc_graph(), backend="fast",
                    backend_options={"kernels": "torch", "fpa_solver": "steps"}, **kw)
    opt_r = torch.optim.Adam(ref_net.parameters(), lr=0.01)
    opt_f = torch.optim.Adam(fast_net.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(1)
    for i in range(3):
        x = torch.randn(5, 3, size, size, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 10, (5,), generator=gen)
        r_ref, r_fast = ref.step(x, y, opt_r), fast.step(x, y, opt_f)
        assert fast.last_backend == "fast"
        for k in r_ref.errors:
            torch.testing.assert_close(r_fast.errors[k], r_ref.errors[k], rtol=1e-10,
                                       atol=1e-12, msg=f"batch {i} error {k}")
        torch.testing.assert_close(r_fast.energy, r_ref.energy, rtol=1e-10, atol=1e-12)
        for (name, p), q in zip(ref_net.named_parameters(), fast_net.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-12,
                                       msg=f"batch {i} grad {name}")
            torch.testing.assert_close(q, p, rtol=1e-9, atol=1e-12, msg=f"batch {i} {name}")
        for (name, b), c in zip(ref_net.named_buffers(), fast_net.buffers()):
            torch.testing.assert_close(c, b, msg=f"batch {i} buffer {name}")


@pytest.mark.parametrize("schedule", ["jacobi", "sequential"])
@pytest.mark.parametrize("rate, clamp", [(0.5, None), (1.0, 0.2)])
def test_fused_kernels_equal_reference_on_resdualnet(schedule, rate, clamp):
    """``kernels="auto"``: the fused dw+BN+ReLU VJP with the PC update as epilogue, the C++
    ``pc_relax`` (where pcfast._C is built), on a Res-DualNet with add and concat merges."""
    torch.manual_seed(0)
    net = ResDualNet(stem_channels=3, stages=((3, 1), (6, 2)), blocks_per_stage=2).double()
    x, y = torch.randn(5, 3, 8, 8, dtype=torch.float64), torch.randint(0, 10, (5,))
    ref_net, fast_net = copy.deepcopy(net), copy.deepcopy(net)
    kw = dict(T=5, rate=rate, error_clamp=clamp, schedule=schedule)
    r = PCEngine(ref_net.pc_graph(), backend="reference", **kw).compute_gradients(x, y)
    f = PCEngine(fast_net.pc_graph(), backend="fast", backend_options={"kernels": "auto"},
                 **kw).compute_gradients(x, y)
    for k in r.errors:
        torch.testing.assert_close(f.errors[k], r.errors[k], rtol=1e-10, atol=1e-12, msg=k)
    for (name, p), q in zip(ref_net.named_parameters(), fast_net.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-12, msg=name)


class _FusedCalls(TorchDispatchMode):
    """Records the add merges' ``store_g`` and the dw ops' ``other_dead`` of each call."""

    def __init__(self) -> None:
        super().__init__()
        self.store_g, self.other_dead = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name == "pcfast.add_relu_vjp_relax.default":
            self.store_g.append(args[6] if len(args) > 6 else True)
        elif name == "pcfast.dw_bn_relu_vjp_relax.default":
            self.other_dead.append(args[13] if len(args) > 13 else None)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("schedule", ["jacobi", "sequential"])
def test_add_merges_hand_their_masked_error_to_the_block_input_s_last_writer(schedule):
    """The stride-1 blocks' add merge stores no masked error: the dw sub-layer that finishes the
    block input reads the merge's error and mask in its own op, with results equal to the
    reference path's (the equality tests above check the values; here, that the path ran)."""
    torch.manual_seed(0)
    net = ResDualNet(stem_channels=3, stages=((3, 1), (6, 2)), blocks_per_stage=2).double()
    x, y = torch.randn(5, 3, 8, 8, dtype=torch.float64), torch.randint(0, 10, (5,))
    ref_net, fast_net = copy.deepcopy(net), copy.deepcopy(net)
    kw = dict(T=4, rate=0.5, schedule=schedule)
    r = PCEngine(ref_net.pc_graph(), backend="reference", **kw).compute_gradients(x, y)
    engine = PCEngine(fast_net.pc_graph(), backend="fast",
                      backend_options={"kernels": "auto", "fpa_solver": "steps"}, **kw)
    with _FusedCalls() as calls:
        f = engine.compute_gradients(x, y)
    adds = len(calls.store_g)
    assert adds > 0 and not any(calls.store_g)
    masked = [d for d in calls.other_dead if d is not None]
    assert len(masked) == adds and all(d.dtype == torch.bool for d in masked)
    for k in r.errors:
        torch.testing.assert_close(f.errors[k], r.errors[k], rtol=1e-10, atol=1e-12, msg=k)


def test_masked_error_is_stored_for_a_last_writer_that_cannot_read_it():
    from pcfast.pc.vjp_rules import ChainRule, MaskedError, _Step, stored

    err, dead = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4) > 0
    m = MaskedError(err, dead)
    (t,) = stored([m])
    assert torch.equal(t, err.masked_fill(dead, 0.0)) and m.shape == err.shape
    seen = []
    step = _Step(("test",), {}, lambda g, s: g, relax=lambda *a: seen.append(a[3]))
    rule = ChainRule([step])
    assert not rule.takes_masked_other()
    rule.fused(err, {0: (err, [m], torch.empty_like(err))}, 0.5, None)
    assert isinstance(seen[0], torch.Tensor) and torch.equal(seen[0], t)


def test_eval_mode_batchnorm_rule_equals_reference():
    torch.manual_seed(0)
    net = CifarResNet(8, shortcut="B", widths=(3, 4, 6)).double().eval()
    x, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randint(0, 10, (4,))
    ref_net, fast_net = copy.deepcopy(net), copy.deepcopy(net)
    r = PCEngine(ref_net.pc_graph(), T=3, backend="reference").compute_gradients(x, y)
    f = PCEngine(fast_net.pc_graph(), T=3, backend="fast",
                 backend_options={"kernels": "torch"}).compute_gradients(x, y)
    for k in r.errors:
        torch.testing.assert_close(f.errors[k], r.errors[k], rtol=1e-10, atol=1e-12, msg=k)


def test_batchnorm_rules_take_the_statistics_training_bn_saved(monkeypatch):
    """On the CPU the rules of training BatchNorm reuse the batch mean and invstd that the
    BN's autograd node saved (no second statistics pass), in the FPA feedforward pass and in
    strict PC's and ePC's no-grad steps alike; values equal a fresh computation."""
    import pcfast.pc.vjp_rules as vr
    from pcfast.ops.bn_relu_vjp import bn_saved_stats

    torch.manual_seed(0)
    bn = nn.BatchNorm2d(5).double().train()
    z = torch.randn(4, 5, 6, 6, dtype=torch.float64, requires_grad=True)
    y = bn(z)
    mean, invstd = vr.batch_stats(y, z.detach(), bn.eps)
    want = bn_saved_stats(z.detach(), bn.eps)
    torch.testing.assert_close(mean, want[0], rtol=0, atol=1e-15)
    torch.testing.assert_close(invstd, want[1], rtol=1e-14, atol=0)
    with torch.no_grad():  # no autograd node: computed again
        fallback = vr.batch_stats(bn(z), z.detach(), bn.eps)
    torch.testing.assert_close(fallback[0], want[0], rtol=0, atol=1e-15)

    def second_pass(*args, **kwargs):
        raise AssertionError("a second statistics pass in the feedforward")

    monkeypatch.setattr(vr, "bn_saved_stats", second_pass)
    net = ResDualNet(stem_channels=3, stages=((6, 2),), blocks_per_stage=1).double()
    mlp = MLP(in_features=12, hidden=(8, 8), batchnorm=True, activation="tanh").double()  # BN alone
    modes = ({}, {"fpa": False}, {"fpa": False, "epc": True})  # strict steps run without grad
    for model, shape in ((net, (2, 3, 8, 8)), (mlp, (3, 12))):
        for kernels, mode in itertools.product(("auto", "torch"), modes):
            engine = PCEngine(model.pc_graph(), T=2, backend="fast",
                              backend_options={"kernels": kernels}, **mode)
            engine.compute_gradients(torch.randn(*shape, dtype=torch.float64),
                                     torch.randint(0, 10, (shape[0],)))


def test_a_result_s_errors_survive_later_batches_and_its_memory_is_reused_once_dropped():
    """The fast backend hands each result its final error buffer; the next batch takes that
    memory back only when nothing refers to it any more (no result, no view)."""
    torch.manual_seed(0)
    net = MLP(in_features=12, hidden=(16, 16), num_classes=3)
    engine = PCEngine(net.pc_graph(), T=3, backend="fast", backend_options={"kernels": "torch"})
    gen = torch.Generator().manual_seed(1)

    def batch():
        return torch.randn(4, 12, generator=gen), torch.randint(0, 3, (4,), generator=gen)

    def memory(result):
        return {e.untyped_storage().data_ptr() for k, e in result.errors.items()
                if k != net.pc_graph().output}

    kept = engine.compute_gradients(*batch())
    before = {k: e.clone() for k, e in kept.errors.items()}
    hidden = memory(kept)
    assert len(hidden) == 1  # one flat buffer behind every hidden node
    second = engine.compute_gradients(*batch())  # the kept result still refers to its buffer
    assert memory(second).isdisjoint(hidden)
    for k, e in kept.errors.items():
        torch.testing.assert_close(e, before[k], rtol=0, atol=0, msg=k)

    view = kept.errors[net.pc_graph().hidden[0]][0]  # a view outlives its result
    snapshot = view.clone()
    del kept
    third = engine.compute_gradients(*batch())
    torch.testing.assert_close(view, snapshot, rtol=0, atol=0)
    assert memory(third).isdisjoint(memory(second))

    reused = memory(third)
    del third
    assert memory(engine.compute_gradients(*batch())) == reused  # nothing refers to it: reused


# ------------------------------------------------------------------------------ capture cache
class _FakeCapture:
    def __init__(self, key):
        self.key = key


def test_capture_cache_reuses_for_one_key_and_replaces_on_a_new_key():
    cache = CaptureCache()
    built = []

    def build(key):
        def make():
            built.append(key)
            return _FakeCapture(key)
        return make

    a1, fresh1 = cache.get(("shape", 1), build(("shape", 1)))
    a2, fresh2 = cache.get(("shape", 1), build(("shape", 1)))
    assert fresh1 and not fresh2 and a1 is a2
    b, fresh3 = cache.get(("shape", 2), build(("shape", 2)))
    assert fresh3 and b.key == ("shape", 2) and cache.entry is b
    a3, fresh4 = cache.get(("shape", 1), build(("shape", 1)))  # one entry: rebuilt
    assert fresh4 and a3 is not a1
    assert built == [("shape", 1), ("shape", 2), ("shape", 1)] and cache.builds == 3


def test_rules_reload_the_next_batch_into_captured_tensors():
    """What a replay relies on: rules of one key have one signature, and copying the next
    batch's saved tensors into the first batch's rules gives the next batch's VJPs."""
    from pcfast.pc.vjp_rules import node_forward

    torch.manual_seed(0)
    block = ResDualNet(stem_channels=3, stages=((6, 2),), blocks_per_stage=1).double().blocks[0]
    vjps = []
    rules = []
    for seed in (1, 2):
        x = torch.randn(2, 3, 8, 8, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(seed)).requires_grad_(True)
        mu, rule = node_forward(block.dw1, [x], [True], "torch")
        e = torch.randn(mu.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
        rules.append(rule)
        vjps.append((e, rule.vjp(e)[0]))
    assert rules[0].signature == rules[1].signature
    rules[0].load_from(rules[1])
    torch.testing.assert_close(rules[0].vjp(vjps[1][0])[0], vjps[1][1], rtol=0, atol=0)


def test_graphs_with_autograd_fallback_nodes_are_not_captured():
    """The CUDA-graph decision (taken on CPU tensors here, for a CUDA device): zoo graphs are
    captured; a graph with a fallback node, a recorded trace or cuda_graph=False is not."""
    from pcfast.pc.backends import PCSettings
    from pcfast.pc.backends.fast import FastBackend
    from pcfast.pc.graph import sequential_graph

    cuda, s = torch.device("cuda"), PCSettings(T=3)
    torch.manual_seed(0)
    net = CifarResNet(8, widths=(3, 4, 6)).double()
    backend = FastBackend(net.pc_graph(), kernels="torch")
    _, rules = backend._feedforward(torch.randn(2, 3, 8, 8, dtype=torch.float64))
    assert backend.graphable(cuda, s, rules)
    assert not backend.graphable(torch.device("cpu"), s, rules)
    assert not backend.graphable(cuda, PCSettings(T=3, record_energy=True), rules)
    assert not FastBackend(net.pc_graph(), cuda_graph=False).graphable(cuda, s, rules)

    class Odd(nn.Module):  # no explicit rule: autograd fallback
        def forward(self, x):
            return torch.sin(x)

    graph = sequential_graph([nn.Linear(4, 4), Odd(), nn.Linear(4, 3)])
    odd = FastBackend(graph.to(torch.float64), kernels="torch")
    _, rules = odd._feedforward(torch.randn(2, 4, dtype=torch.float64))
    assert not odd.graphable(cuda, s, rules)


# ----------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("model", ["resnet20", "resdualnet"])
@pytest.mark.parametrize("schedule", ["jacobi", "sequential"])
def test_cuda_graph_path_equals_reference_across_batches(cuda_device, model, schedule):
    """The CUDA-graph path (one capture, replayed for the second batch) equals the reference
    on resnet20 and Res-DualNet in float32."""
    torch.manual_seed(0)
    net = (build_model("resnet20") if model == "resnet20" else
           ResDualNet(stem_channels=8, stages=((16, 1), (32, 2)))).to(cuda_device).train()
    ref_net, fast_net = copy.deepcopy(net), copy.deepcopy(net)
    kw = dict(T=6, rate=0.5, schedule=schedule)
    ref = PCEngine(ref_net.pc_graph(), backend="reference", **kw)
    fast = PCEngine(fast_net.pc_graph(), backend="fast", backend_options={"cuda_graph": True},
                    **kw)
    opt_r = torch.optim.SGD(ref_net.parameters(), lr=0.01)
    opt_f = torch.optim.SGD(fast_net.parameters(), lr=0.01)
    for i in range(2):
        x = torch.randn(16, 3, 32, 32, device=cuda_device)
        y = torch.randint(0, 10, (16,), device=cuda_device)
        r_ref, r_fast = ref.step(x, y, opt_r), fast.step(x, y, opt_f)
        for k in r_ref.errors:
            scale = r_ref.errors[k].abs().max().item() + 1e-6
            torch.testing.assert_close(r_fast.errors[k], r_ref.errors[k], rtol=1e-3,
                                       atol=1e-4 * scale, msg=f"batch {i} {k}")
        for (name, p), q in zip(ref_net.named_parameters(), fast_net.parameters()):
            scale = p.grad.abs().max().item() + 1e-6
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-4 * scale,
                                       msg=f"batch {i} {name}")
    assert fast._fast.captures.builds == 1  # the second batch replayed the first capture
