"""The MLP-task benchmark is honest: its hand-written PC loops compute exactly the engine's math.

In float64 the closed-form loops' weight gradients after T steps equal
``PCEngine(sequential_graph(...), output_loss="mse", backend="reference")``'s on the same weights,
for strict PC and for FPA; each loop differs from the other math (so the comparison can fail),
and FPA at rate 1 with T >= depth equals backprop of the summed squared error (an oracle that
does not go through pcfast at all).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from pcfast.pc import PCEngine, sequential_graph

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench.common as common  # noqa: E402
from bench.mlp_task import (  # noqa: E402
    HAND,
    EngineLoop,
    flat_params,
    floor_strict_grads,
    gram_strict_grads,
    hand_fpa_grads,
    hand_ipc_step,
    hand_strict_grads,
    main,
    make_layers,
    run,
)

SMALL = (20, 16, 12, 5)  # same structure as 784-256-256-10, small enough for many cases


def _batch(sizes, n=6, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, sizes[0], generator=g, dtype=torch.float64)
    y = torch.randint(0, sizes[-1], (n,), generator=g)
    return x, y


def _engine_grads(layers, x, y, T, rate, fpa, epc=False):
    graph = sequential_graph(layers)
    PCEngine(graph, T=T, rate=rate, schedule="jacobi", fpa=fpa, epc=epc, output_loss="mse",
             backend="reference").compute_gradients(x, y)
    return [p.grad.clone() for p in flat_params(layers)]


@pytest.mark.parametrize("math_", ["strict", "fpa", "epc"])
@pytest.mark.parametrize(("sizes", "T", "rate"), [
    ((784, 256, 256, 10), 20, 0.1),   # the benchmark's own configuration
    (SMALL, 7, 0.35),
    (SMALL, 3, 1.0),
    ((20, 16, 16, 16, 5), 4, 0.6),    # a deeper chain: three hidden nodes
])
def test_hand_written_loop_equals_reference_engine(math_, sizes, T, rate):
    layers = make_layers(sizes, seed=1, dtype=torch.float64)
    x, y = _batch(sizes)
    with torch.no_grad():
        hand = HAND[math_](flat_params(layers), x, y, T, rate)
    engine = _engine_grads(layers, x, y, T, rate, fpa=math_ == "fpa", epc=math_ == "epc")
    for h, e in zip(hand, engine):
        torch.testing.assert_close(h, e, rtol=1e-10, atol=1e-13)
    assert all(g.abs().sum() > 0 for g in hand)  # every layer received an error


@pytest.mark.parametrize(("sizes", "T", "rate"), [
    ((784, 256, 256, 10), 20, 0.1), (SMALL, 7, 0.35), ((20, 16, 16, 16, 5), 4, 0.6),
    ((20, 16, 5), 3, 0.5),  # one hidden node: its child is the output
])
def test_gram_restructured_strict_loop_equals_the_straight_one(sizes, T, rate):
    layers = make_layers(sizes, seed=2, dtype=torch.float64)
    x, y = _batch(sizes)
    with torch.no_grad():
        params = flat_params(layers)
        gram, straight = gram_strict_grads(params, x, y, T, rate), hand_strict_grads(
            params, x, y, T, rate)
    for a, b in zip(gram, straight):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_strict_and_fpa_differ_so_the_check_can_fail():
    layers = make_layers(SMALL, seed=1, dtype=torch.float64)
    x, y = _batch(SMALL)
    params = flat_params(layers)
    with torch.no_grad():
        strict = hand_strict_grads(params, x, y, 7, 0.35)
        fpa = hand_fpa_grads(params, x, y, 7, 0.35)
    engine_fpa = _engine_grads(layers, x, y, 7, 0.35, fpa=True)
    # the first layer's weight gradient differs by far more than the tolerance used above
    assert (strict[0] - engine_fpa[0]).abs().max() > 1e-4 * engine_fpa[0].abs().max()
    torch.testing.assert_close(fpa[0], engine_fpa[0], rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize(("sizes", "T", "rate"), [(SMALL, 5, 0.3), ((20, 16, 16, 16, 5), 3, 0.6)])
def test_hand_written_ipc_equals_the_engine_over_batches(sizes, T, rate):
    """iPC: the weights after several batches of T Adam steps each, hand loop vs engine."""
    import copy

    layers = make_layers(sizes, seed=1, dtype=torch.float64)
    start = [p.detach().clone() for p in flat_params(layers)]
    hand_params = flat_params(copy.deepcopy(layers))
    hand_opt = torch.optim.Adam(hand_params, lr=1e-2)
    engine = EngineLoop(layers, "ipc", "reference", T, rate, 1e-2)
    for i in range(3):
        x, y = _batch(sizes, seed=10 + i)
        hand_ipc_step(hand_params, hand_opt, x, y, T, rate)
        engine(x, y)
    for h, e, s0 in zip(hand_params, flat_params(layers), start):
        torch.testing.assert_close(h.detach(), e.detach(), rtol=1e-10, atol=1e-13)
        assert (e - s0).abs().max() > 1e-3  # every tensor moved (3 x T Adam steps)
    assert int(engine.optimizer.state[flat_params(layers)[0]]["step"]) == 3 * T


def test_fpa_rate_one_is_backprop_of_the_squared_error():
    layers = make_layers(SMALL, seed=2, dtype=torch.float64)
    x, y = _batch(SMALL)
    params = flat_params(layers)
    out = x
    for m in layers:
        out = m(out)
    loss = 0.5 * (out - F.one_hot(y, SMALL[-1]).double()).pow(2).sum() / x.shape[0]
    bp = torch.autograd.grad(loss, params)
    with torch.no_grad():
        pc = hand_fpa_grads(params, x, y, T=len(layers), rate=1.0)
    for a, b in zip(pc, bp):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


class _Ops(TorchDispatchMode):
    """Records ``(op name, input shapes)`` of every dispatched op."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
        self.ops.append((str(func).split(".")[1], shapes))
        return func(*args, **(kwargs or {}))


def _matmul_macs(ops) -> int:
    """Multiply-adds of the recorded ``mm`` / ``addmm`` calls."""
    total = 0
    for name, shapes in ops:
        if name in ("mm", "addmm"):
            (m, k), (_, n) = shapes[-2:]
            total += m * k * n
    return total


def test_gram_row_does_a_third_less_matmul_work_at_the_benchmark_shapes():
    """What the gram row is for: at 784-256-256-10, batch 128, T=20 it drops one of the two big
    matmuls per step: 40 batch matmuls through the 256 x 256 layer become 20, for the Gram
    matrix (worth 2) and ``c`` and the final ``e_1`` (1 each) once per batch."""
    params = flat_params(make_layers(seed=0))
    x, y = torch.randn(128, 784), torch.randint(0, 10, (128,))
    macs = {}
    for name, fn in (("hand", hand_strict_grads), ("gram", gram_strict_grads)):
        with torch.no_grad(), _Ops() as mode:
            fn(params, x, y, 20, 0.1)
        macs[name] = _matmul_macs(mode.ops)
    big = 128 * 256 * 256  # one batch matmul through the 256 x 256 layer
    assert macs["hand"] - macs["gram"] == 16 * big
    assert macs["gram"] < 0.75 * macs["hand"]


def test_floor_row_dispatches_the_strict_loops_matmuls_and_tanh_and_little_else():
    """The floor row is a lower bound only if it runs every matmul and tanh of the hand-written
    strict loop, on the same shapes, and none of its error arithmetic."""
    heavy = {"mm", "addmm", "tanh"}
    params = flat_params(make_layers((12, 9, 7, 5), seed=0))
    x, y = torch.randn(6, 12), torch.randint(0, 5, (6,))
    counted = {}
    for name, fn in (("hand", hand_strict_grads), ("floor", floor_strict_grads)):
        with torch.no_grad(), _Ops() as mode:
            grads = fn(params, x, y, 3, 0.1)
        counted[name] = mode.ops
        assert [g.shape for g in grads] == [p.shape for p in params]
    hand = sorted(op for op in counted["hand"] if op[0] in heavy)
    floor = sorted(op for op in counted["floor"] if op[0] in heavy)
    assert floor == hand and len(hand) > 20
    assert len(counted["floor"]) < 0.6 * len(counted["hand"])


def test_benchmark_rows_run_and_report(monkeypatch, tmp_path):
    rows = ["pcfast-strict-reference", "pcfast-strict-fast", "pcfast-fpa-reference",
            "pcfast-fpa-fast", "pcfast-ipc-reference", "pcfast-epc-reference",
            "hand-strict-eager", "hand-fpa-eager", "hand-ipc-eager", "hand-epc-eager",
            "hand-strict-gram-eager"]
    results = run(rows, torch.device("cpu"), T=2, batch_size=4, rate=0.1, lr=1e-3, warmup=1, n=1,
                  repeats=2)
    by = {r["row"]: r for r in results}
    assert list(by) == rows
    for row in rows:
        r = by[row]
        if row == "pcfast-strict-fast" and r["status"] != "ok":
            assert r["status"].startswith("not available: ")  # pcfast's own ValueError message
            continue
        assert r["status"] == "ok" and len(r["repeats_ms"]) == 2
        assert r["ms_per_batch"] == min(r["repeats_ms"]) > 0
    assert by["hand-fpa-eager"]["x_hand_eager"] == 1.0
    assert by["hand-strict-eager"]["x_hand_eager"] == 1.0  # the baseline, not the gram row
    assert by["hand-strict-gram-eager"]["x_hand_eager"] == pytest.approx(
        by["hand-strict-gram-eager"]["ms_per_batch"] / by["hand-strict-eager"]["ms_per_batch"])
    assert by["hand-ipc-eager"]["x_hand_eager"] == 1.0 and by["pcfast-ipc-reference"]["math"] == "ipc"
    assert by["pcfast-fpa-reference"]["backend_ran"] == "reference"

    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    assert main(["--rows", "hand-fpa-eager", "pcfast-fpa-reference", "--device", "cpu",
                 "--batches", "1", "--repeats", "1", "--warmup", "1", "--T", "2",
                 "--batch-size", "4"]) == 0
    payload = json.loads((tmp_path / "mlp_task-cpu.json").read_text())
    assert payload["config"]["T"] == 2 and len(payload["rows"]) == 2
    assert max(payload["hand_vs_engine_max_rel_diff_float64"].values()) < 1e-9
