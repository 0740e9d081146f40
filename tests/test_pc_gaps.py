"""Two gaps in the PC engine's tests, closed against independent oracles (float64, CPU).

1. The AddReLU merge: with ``blocks_per_stage=1`` every Res-DualNet merge is a concat, so a
   wrong add-merge VJP passed every test. Here a Res-DualNet with two blocks per stage (three
   AddReLU merges, one ConcatReLU): the reference engine equals BP at rate 1, and the fast
   backend equals the reference step for step (errors, ``.grad``, parameters) over several
   batches with optimizer steps between them, and equals BP itself at rate 1.
2. Strict PC's weight gradients (``fpa=False``): checked against strict PC run by hand -- an MLP
   with closed-form tanh/linear/cross-entropy derivatives, and a conv + BatchNorm net written
   with functional ops and its own energy (autograd over that hand-written energy) -- with the
   engine's value update ``x_u <- x_u - rate * (e_u - clamp(sum_v J_vu^T e_v))``, predictions
   recomputed every step, weight gradient ``dF/dtheta / N`` at the relaxed values, BatchNorm on
   the current batch statistics and its running statistics moved by the feedforward pass only.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _hand_mlp import HandMLP, strict_mlp_case, strict_update
from _nets import randomize_batchnorm
from torch import nn

from pcfast.models.layers import AddReLU
from pcfast.models.resdualnet import ResDualNet
from pcfast.pc import PCEngine, sequential_graph

TOL = dict(rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ 1. AddReLU merges
def _two_block_resdualnet() -> ResDualNet:
    torch.manual_seed(0)
    net = ResDualNet(num_classes=4, stem_channels=4, stages=((4, 1), (8, 2)),
                     blocks_per_stage=2).double()
    # Non-trivial BatchNorm affine parameters, so every path carries a distinct signal.
    return randomize_batchnorm(net)


def _image_batch(i: int, n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + i)
    return (torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64),
            torch.randint(0, 4, (n,), generator=g))


def test_the_net_has_add_merges_that_carry_errors():
    net = _two_block_resdualnet()
    merges = [type(b.merge) for b in net.blocks]
    assert merges.count(AddReLU) == 3
    # Each AddReLU's output is partly active: both branches' gradients are nonzero somewhere.
    x, _ = _image_batch(0)
    with torch.no_grad():
        h = net.stem(x)
        for block in net.blocks:
            out = block(h)
            if isinstance(block.merge, AddReLU):
                frac = (out > 0).double().mean().item()
                assert 0.1 < frac < 0.95, frac
            h = out


def _bp_grads(net: ResDualNet, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    net = copy.deepcopy(net).train()
    F.cross_entropy(net(x), y).backward()
    return [p.grad.clone() for p in net.parameters()]


def _pc_grads(net: ResDualNet, x: torch.Tensor, y: torch.Tensor,
              **kw) -> list[torch.Tensor]:
    net = copy.deepcopy(net).train()
    PCEngine(net.pc_graph(), **kw).compute_gradients(x, y)
    return [p.grad.clone() for p in net.parameters()]


@pytest.mark.parametrize("schedule", ["jacobi", "sequential"])
@pytest.mark.parametrize("backend, kernels", [("reference", None), ("fast", "torch"),
                                               ("fast", "auto")])
def test_add_merges_pc_at_rate_one_equals_bp(schedule, backend, kernels):
    net = _two_block_resdualnet()
    x, y = _image_batch(0)
    T = net.pc_graph().depth if schedule == "jacobi" else 1
    options = {"kernels": kernels} if kernels else None
    pc = _pc_grads(net, x, y, T=T, rate=1.0, schedule=schedule, backend=backend,
                   backend_options=options)
    bp = _bp_grads(net, x, y)
    names = [n for n, _ in net.named_parameters()]
    assert len(pc) == len(bp) == len(names)
    for name, a, b in zip(names, pc, bp):
        assert b.abs().max() > 0, name  # every parameter really receives a gradient
        torch.testing.assert_close(a, b, **TOL, msg=name)


@pytest.mark.parametrize("schedule, T", [("jacobi", 7), ("sequential", 2)])
@pytest.mark.parametrize("kernels", ["torch", "auto"])
def test_fast_equals_reference_step_for_step_with_add_merges(schedule, T, kernels):
    net = _two_block_resdualnet()
    ref_net, fast_net = copy.deepcopy(net), copy.deepcopy(net)
    ref = PCEngine(ref_net.pc_graph(), T=T, rate=0.5, schedule=schedule, backend="reference")
    fast = PCEngine(fast_net.pc_graph(), T=T, rate=0.5, schedule=schedule, backend="fast",
                    backend_options={"kernels": kernels})
    opt_r = torch.optim.Adam(ref_net.parameters(), lr=0.01)
    opt_f = torch.optim.Adam(fast_net.parameters(), lr=0.01)
    ref_net.train()
    fast_net.train()
    merge_names = [f"block{i}.merge" for i, b in enumerate(net.blocks)
                   if isinstance(b.merge, AddReLU)]
    for i in range(3):
        x, y = _image_batch(i)
        r_ref = ref.step(x, y, opt_r)
        r_fast = fast.step(x, y, opt_f)
        assert r_ref.errors.keys() == r_fast.errors.keys()
        for name in merge_names:  # the add merges' errors are live, not trivially equal
            assert r_ref.errors[name].abs().max() > 0, (i, name)
        for name, e in r_ref.errors.items():
            torch.testing.assert_close(r_fast.errors[name], e, **TOL, msg=f"batch {i}: {name}")
        for (name, p), q in zip(ref_net.named_parameters(), fast_net.parameters()):
            torch.testing.assert_close(q.grad, p.grad, **TOL, msg=f"batch {i}: grad {name}")
            torch.testing.assert_close(q, p, **TOL, msg=f"batch {i}: {name}")
        for (name, b), c in zip(ref_net.named_buffers(), fast_net.buffers()):
            torch.testing.assert_close(c, b, **TOL, msg=f"batch {i}: {name}")


# --------------------------------------------------------------- 2. strict PC, by hand
@pytest.mark.parametrize("schedule", ["jacobi", "sequential"])
@pytest.mark.parametrize("rate, T, clamp", [(0.3, 6, None), (0.7, 4, None), (0.5, 5, 0.05)])
def test_strict_pc_weight_grads_match_a_hand_written_mlp(schedule, rate, T, clamp):
    layers, graph, x, y = strict_mlp_case()
    hand = HandMLP(layers)
    x1, x2 = hand.relax(x, y, T, rate, schedule, clamp)
    want = hand.weight_grads(x, x1, x2, y)
    engine = PCEngine(graph, T=T, rate=rate, schedule=schedule, fpa=False, error_clamp=clamp,
                      backend="reference")
    result = engine.compute_gradients(x, y)
    got = [p.grad for lin in layers for p in (lin.weight, lin.bias)]
    assert len(got) == len(want) == 6
    for i, (a, b) in enumerate(zip(got, want)):
        assert b.abs().max() > 1e-6, i  # hidden layers moved: not the T=0 zeros
        torch.testing.assert_close(a, b, **TOL, msg=f"parameter {i}")
    # The reported errors are those at the relaxed values.
    torch.testing.assert_close(result.errors["layer0"], x1 - hand.predict(0, x), **TOL)
    torch.testing.assert_close(result.errors["layer1"], x2 - hand.predict(1, x1), **TOL)


@pytest.mark.parametrize("backend", ["reference", "fast"])
@pytest.mark.parametrize("fpa", [False, True])
@pytest.mark.parametrize("schedule", ["jacobi", "sequential"])
@pytest.mark.parametrize("momentum, nesterov, clamp", [(0.6, False, None), (0.8, True, None),
                                                       (0.5, True, 0.05)])
def test_state_momentum_matches_a_hand_written_mlp(fpa, schedule, momentum, nesterov, clamp,
                                                   backend):
    """Heavy-ball and Nesterov steps on the values, strict PC and FPA, both schedules, both
    backends."""
    layers, graph, x, y = strict_mlp_case()
    hand = HandMLP(layers)
    T, rate = 6, 0.3
    x1, x2 = hand.relax(x, y, T, rate, schedule, clamp, momentum, nesterov, fpa=fpa)
    weight_grads = hand.fpa_weight_grads if fpa else hand.weight_grads
    want = weight_grads(x, x1, x2, y)
    # The momentum matters: plain steps end elsewhere.
    plain = weight_grads(x, *hand.relax(x, y, T, rate, schedule, clamp, fpa=fpa), y)
    assert max(((a - b).norm() / b.norm()).item() for a, b in zip(want, plain)) > 1e-3
    engine = PCEngine(graph, T=T, rate=rate, schedule=schedule, fpa=fpa, error_clamp=clamp,
                      state_momentum=momentum, state_nesterov=nesterov, backend=backend)
    engine.compute_gradients(x, y)
    assert engine.last_backend == backend
    got = [p.grad for lin in layers for p in (lin.weight, lin.bias)]
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, **TOL, msg=f"parameter {i}")


def test_plain_fpa_hand_loop_matches_the_engine():
    """The FPA form of the hand-written oracle itself agrees with the engine's plain steps."""
    layers, graph, x, y = strict_mlp_case()
    hand = HandMLP(layers)
    want = hand.fpa_weight_grads(x, *hand.relax(x, y, 5, 0.4, "jacobi", None, fpa=True), y)
    PCEngine(graph, T=5, rate=0.4, backend="reference").compute_gradients(x, y)
    got = [p.grad for lin in layers for p in (lin.weight, lin.bias)]
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, **TOL, msg=f"parameter {i}")


@pytest.mark.parametrize("kwargs, match", [
    ({"state_momentum": 1.0}, r"state_momentum must be in \[0, 1\)"),
    ({"state_momentum": -0.1}, r"state_momentum must be in \[0, 1\)"),
    ({"state_nesterov": True}, "state_nesterov=True needs state_momentum > 0"),
])
def test_state_momentum_options_are_checked(kwargs, match):
    _, graph, _, _ = strict_mlp_case()
    with pytest.raises(ValueError, match=match):
        PCEngine(graph, **kwargs)


def test_strict_pc_is_not_fpa():
    """Recomputing predictions matters: the FPA engine's gradients differ from strict ones."""
    layers, graph, x, y = strict_mlp_case()
    PCEngine(graph, T=6, rate=0.5, fpa=False, backend="reference").compute_gradients(x, y)
    strict = [p.grad.clone() for p in graph.parameters()]
    for p in graph.parameters():
        p.grad = None
    PCEngine(graph, T=6, rate=0.5, fpa=True, backend="reference").compute_gradients(x, y)
    fpa = [p.grad.clone() for p in graph.parameters()]
    rel = max(((a - b).norm() / b.norm()).item() for a, b in zip(strict, fpa))
    assert rel > 1e-3


class _HandConvBN:
    """conv3x3 + BN + tanh -> conv3x3/2 + BN + ReLU -> flatten + linear, written with
    functional ops; BatchNorm normalises with the current batch statistics (biased variance)."""

    def __init__(self, seqs: list[nn.Sequential]) -> None:
        (c1, bn1, _), (c2, bn2, _), (_, lin) = seqs
        take = lambda t: t.detach().clone().requires_grad_(True)  # noqa: E731
        self.params = [take(t) for t in (c1.weight, c1.bias, bn1.weight, bn1.bias,
                                         c2.weight, c2.bias, bn2.weight, bn2.bias,
                                         lin.weight, lin.bias)]
        self.eps = (bn1.eps, bn2.eps)

    @staticmethod
    def _bn(z: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float) -> torch.Tensor:
        mean = z.mean(dim=(0, 2, 3), keepdim=True)
        var = (z - mean).pow(2).mean(dim=(0, 2, 3), keepdim=True)
        return (z - mean) / torch.sqrt(var + eps) * gamma[None, :, None, None] \
            + beta[None, :, None, None]

    def predict(self, u: int, parent: torch.Tensor) -> torch.Tensor:
        w1, b1, g1, be1, w2, b2, g2, be2, wl, bl = self.params
        if u == 0:
            return torch.tanh(self._bn(F.conv2d(parent, w1, b1, padding=1), g1, be1,
                                       self.eps[0]))
        if u == 1:
            return torch.relu(self._bn(F.conv2d(parent, w2, b2, stride=2, padding=1), g2, be2,
                                       self.eps[1]))
        return parent.flatten(1) @ wl.T + bl

    def energy(self, x0, x1, x2, y) -> torch.Tensor:
        mu1, mu2, mu3 = self.predict(0, x0), self.predict(1, x1), self.predict(2, x2)
        return (0.5 * (x1 - mu1).pow(2).sum() + 0.5 * (x2 - mu2).pow(2).sum()
                + F.cross_entropy(mu3, y, reduction="sum"))

    def dF_dx(self, x0, x1, x2, y, u: int) -> torch.Tensor:
        x1, x2 = x1.detach().requires_grad_(True), x2.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(self.energy(x0, x1, x2, y), (x1, x2)[u - 1])
        return g

    def relax(self, x0, y, T: int, rate: float, schedule: str):
        with torch.no_grad():
            x1 = self.predict(0, x0)
            x2 = self.predict(1, x1)
        for _ in range(T):
            if schedule == "jacobi":
                g1, g2 = self.dF_dx(x0, x1, x2, y, 1), self.dF_dx(x0, x1, x2, y, 2)
                with torch.no_grad():
                    e1, e2 = x1 - self.predict(0, x0), x2 - self.predict(1, x1)
                    x1, x2 = (strict_update(x1, e1, g1, rate, None),
                              strict_update(x2, e2, g2, rate, None))
            else:
                g2 = self.dF_dx(x0, x1, x2, y, 2)
                with torch.no_grad():
                    x2 = strict_update(x2, x2 - self.predict(1, x1), g2, rate, None)
                g1 = self.dF_dx(x0, x1, x2, y, 1)
                with torch.no_grad():
                    x1 = strict_update(x1, x1 - self.predict(0, x0), g1, rate, None)
        return x1, x2

    def weight_grads(self, x0, x1, x2, y) -> list[torch.Tensor]:
        grads = torch.autograd.grad(self.energy(x0, x1, x2, y), self.params)
        return [g / x0.shape[0] for g in grads]

    def feedforward_batch_stats(self, x0: torch.Tensor):
        """Per BN: (mean, unbiased variance) of its input in the feedforward pass."""
        w1, b1, *_ = self.params
        w2, b2 = self.params[4], self.params[5]
        with torch.no_grad():
            z1 = F.conv2d(x0, w1, b1, padding=1)
            z2 = F.conv2d(self.predict(0, x0), w2, b2, stride=2, padding=1)
        return [(z.mean(dim=(0, 2, 3)), z.var(dim=(0, 2, 3), unbiased=True)) for z in (z1, z2)]


@pytest.mark.parametrize("schedule", ["jacobi", "sequential"])
def test_strict_pc_weight_grads_match_a_hand_written_conv_bn_net(schedule):
    torch.manual_seed(5)
    seqs = [nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh()),
            nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU()),
            nn.Sequential(nn.Flatten(), nn.Linear(4 * 3 * 3, 5))]
    with torch.no_grad():
        for s in seqs[:2]:
            s[1].weight.uniform_(0.5, 1.5)
            s[1].bias.uniform_(-0.3, 0.3)
    seqs = [s.double().train() for s in seqs]
    graph = sequential_graph(seqs)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(5, 2, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (5,), generator=g)
    hand = _HandConvBN(seqs)
    T, rate = 5, 0.2
    x1, x2 = hand.relax(x, y, T, rate, schedule)
    want = hand.weight_grads(x, x1, x2, y)
    stats = hand.feedforward_batch_stats(x)

    PCEngine(graph, T=T, rate=rate, schedule=schedule, fpa=False,
             backend="reference").compute_gradients(x, y)
    got = [p.grad for p in graph.parameters()]
    assert len(got) == len(want) == 10
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, **TOL, msg=f"parameter {i}")
    assert want[0].abs().max() > 1e-6  # the first conv's error is live
    # Running stats moved once, by the feedforward pass (momentum 0.1 from mean 0, var 1).
    for s, (mean, var) in zip(seqs[:2], stats):
        bn = s[1]
        torch.testing.assert_close(bn.running_mean, 0.1 * mean, **TOL)
        torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * var, **TOL)
        assert int(bn.num_batches_tracked) == 1
