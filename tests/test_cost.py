"""The traffic model of ``bench/cost.py``: the op counter against hand-computed ops and bytes,
and the inference-step difference method against a hand analysis of the reference engine.

Oracles are counted by hand from the shapes (float32: 4 bytes an element) and from the code of
``pcfast/pc/engine.py``, never from the counter itself.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from pcfast.pc import sequential_graph

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.cost import (  # noqa: E402
    OpCounter,
    StepCost,
    bp_step_cost,
    check_rows,
    count_ops,
    fit_linear,
    main,
    pc_step_cost,
    relaxation_cost,
)

F32 = 4


def test_one_add_is_one_op_reading_two_tensors_and_writing_one():
    a, b = torch.randn(3, 5), torch.randn(3, 5)
    c = count_ops(lambda: torch.add(a, b))
    assert dict(c.ops) == {"aten.add.Tensor": 1}
    assert c.n_bytes == 3 * a.nbytes == 3 * 15 * F32


def test_in_place_add_reads_both_and_writes_self_once():
    a, b = torch.randn(4, 6), torch.randn(4, 6)
    c = count_ops(lambda: a.add_(b))
    assert dict(c.ops) == {"aten.add_.Tensor": 1}
    assert c.n_bytes == 3 * 24 * F32


def test_broadcast_operand_counts_its_distinct_elements():
    a, row = torch.randn(8, 6), torch.randn(6)
    c = count_ops(lambda: a + row.expand(8, 6))
    assert c.n_ops == 1  # the expand is a view: excluded
    assert c.n_bytes == (48 + 6 + 48) * F32


def test_linear_forward_counts_its_addmm():
    torch.manual_seed(0)
    lin = nn.Linear(3, 2)
    x = torch.randn(5, 3)
    with torch.no_grad():
        c = count_ops(lambda: lin(x))
    assert dict(c.ops) == {"aten.addmm.default": 1}  # weight.t() is a view: not counted
    # bias (2) + input (5x3) + weight (2x3) read, output (5x2) written
    assert c.n_bytes == (2 + 15 + 6 + 10) * F32
    assert c.excluded["view: aten.t.default"] == 1


def test_view_and_allocation_ops_are_excluded():
    x = torch.randn(4, 6)

    def metadata_only() -> None:
        x.view(24)
        x.t()
        x.reshape(2, 12)
        x[1]
        x[:, 2:4]
        x.unsqueeze(0).expand(3, 4, 6)
        x.detach()
        x.permute(1, 0)
        torch.empty(100)
        torch.empty_like(x)

    c = count_ops(metadata_only)
    assert c.n_ops == 0 and c.n_bytes == 0
    assert sum(c.excluded.values()) >= 10


def test_copies_count():
    x = torch.randn(4, 6)
    c = count_ops(lambda: (x.double(), x.t().contiguous()))
    assert c.ops["aten._to_copy.default"] == 1
    assert c.ops["aten.clone.default"] == 1
    assert c.n_bytes == (24 * F32 + 24 * 8) + 2 * 24 * F32


@torch.library.custom_op("pcfast_cost_test::three_ops", mutates_args=())
def _three_ops(x: torch.Tensor) -> torch.Tensor:
    return (x * 2 + 1).relu()


def test_custom_op_counts_once_not_its_body():
    x = torch.randn(10)
    with OpCounter() as counter:
        torch.ops.pcfast_cost_test.three_ops(x)
    assert dict(counter.count.ops) == {"pcfast_cost_test.three_ops.default": 1}
    assert counter.count.n_bytes == 2 * 10 * F32
    assert count_ops(lambda: (x * 2 + 1).relu()).n_ops == 3  # the same body, uncounted above


@torch.library.custom_op("pcfast_cost_test::scale_into", mutates_args=("out",))
def _scale_into(x: torch.Tensor, out: torch.Tensor) -> None:
    torch.mul(x, 2.0, out=out)


def test_a_declared_write_only_destination_is_charged_its_write_only():
    x, out = torch.randn(10), torch.empty(10)
    call = lambda: torch.ops.pcfast_cost_test.scale_into(x, out)  # noqa: E731
    with OpCounter(write_only={}) as plain:
        call()
    with OpCounter(write_only={"pcfast_cost_test::scale_into": ("out",)}) as declared:
        call()
    assert plain.count.n_bytes == 3 * 10 * F32  # x read, out read and written
    assert declared.count.n_bytes == 2 * 10 * F32  # x read, out written


def test_the_fast_ops_declare_their_destinations_write_only_by_default():
    e, b, out = torch.randn(6), torch.randn(6), torch.empty(6)
    c = count_ops(lambda: torch.ops.pcfast.pc_relax(e, [b], 0.5, None, out))
    assert c.n_bytes == 3 * 6 * F32  # e and b read, out written


def test_an_expanded_custom_op_counts_its_composite_op_by_op():
    # What a device without the op's fused kernel runs: the unfused ops, each with its traffic.
    x = torch.randn(10)
    body = lambda t: (t * 2 + 1).relu()  # noqa: E731
    c = count_ops(lambda: torch.ops.pcfast_cost_test.three_ops(x),
                  expand={"pcfast_cost_test::three_ops": body})
    assert dict(c.ops) == {"aten.mul.Tensor": 1, "aten.add.Tensor": 1, "aten.relu.default": 1}
    assert c.n_bytes == 3 * 2 * 10 * F32  # each unfused op reads and writes the whole tensor


def test_every_cuda_composite_names_a_registered_op_and_takes_its_arguments():
    import inspect

    from pcfast.ops import cuda_composites

    composites = cuda_composites()
    assert {"pcfast::dw_bn_relu_vjp_relax", "pcfast::dw_bn_relu_vjp"} <= set(composites)
    for name, fn in composites.items():
        namespace, op = name.split("::")
        overload = getattr(getattr(torch.ops, namespace), op).default
        op_args = [a.name for a in overload._schema.arguments]
        assert len(inspect.signature(fn).parameters) == len(op_args), (name, op_args)


def test_foreach_in_place_op_charges_the_mutated_list():
    xs, ys = [torch.randn(3), torch.randn(5)], [torch.randn(3), torch.randn(5)]
    c = count_ops(lambda: torch._foreach_add_(xs, ys))
    assert c.n_ops == 1
    assert c.n_bytes == 3 * 8 * F32  # read xs, ys; write xs


def _mlp_graph(widths: tuple[int, ...]):
    def make():
        torch.manual_seed(0)
        layers = [nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:])]
        return sequential_graph(layers)
    return make


def _mlp_batch(d_in: int):
    def make(n: int):
        g = torch.Generator().manual_seed(1)
        return torch.randn(n, d_in, generator=g), torch.randint(0, 3, (n,), generator=g)
    return make


@pytest.mark.parametrize("schedule", ["jacobi", "sequential"])
@pytest.mark.parametrize("k", [2, 3])
def test_reference_step_of_a_two_layer_linear_mlp(schedule, k):
    """Graph input -> layer0 = Linear(5, 7) -> layer1 = Linear(7, 3) (output). One step of the
    reference engine (both schedules: one hidden node, one child) is one
    ``autograd.grad(mu1, leaf0, e1)``, i.e. AddmmBackward's input gradient
    ``mm(e1 (N x 3), W1 (3 x 7))``, then ``_relax`` at rate 0.5: ``lerp(e0, back, 0.5)``."""
    n, d_in, h, c = 6, 5, 7, 3
    step = pc_step_cost(_mlp_graph((d_in, h, c)), _mlp_batch(d_in), n, schedule, "reference",
                        k=k, rate=0.5)
    assert step.ops == {"aten.mm.default": 1, "aten.lerp.Scalar": 1}
    mm = (n * c + c * h + n * h) * F32
    lerp = 3 * n * h * F32
    assert step.bytes == {"aten.mm.default": mm, "aten.lerp.Scalar": lerp}


def test_rate_one_drops_the_lerp_and_three_layers_double_the_work():
    """At rate 1 ``_relax`` returns the propagated error itself (no op). Three layers
    (5 -> 7 -> 4 -> 3): jacobi sends from layer1 and layer2, so one step is two ``mm``."""
    n = 4
    step = pc_step_cost(_mlp_graph((5, 7, 4, 3)), _mlp_batch(5), n, "jacobi", "reference",
                        k=2, rate=1.0)
    assert step.ops == {"aten.mm.default": 2}
    # layer1: mm(e1 (n x 4), W1 (4 x 7)) -> n x 7; layer2: mm(e2 (n x 3), W2 (3 x 4)) -> n x 4
    want = (n * 4 + 28 + n * 7) + (n * 3 + 12 + n * 4)
    assert step.n_bytes == want * F32


def test_linear_fit_over_batch_sizes_recovers_weights_and_per_sample_bytes():
    steps = [pc_step_cost(_mlp_graph((5, 7, 3)), _mlp_batch(5), n, "jacobi", "reference")
             for n in (2, 6, 4)]
    fit = fit_linear(steps)
    assert fit.ops == 2
    assert fit.a == 3 * 7 * F32  # the weight W1 is the batch-independent part
    assert fit.b == (3 + 7 + 3 * 7) * F32  # mm reads e1, writes back; lerp moves 3 x 7
    assert fit.bytes_at(256) == fit.a + 256 * fit.b


def test_fit_rejects_nonlinear_bytes_and_batch_dependent_ops():
    def cost(n: int, b: float, ops: float = 1.0) -> StepCost:
        return StepCost(n, {"aten.x": ops}, {"aten.x": b}, {})

    fit_linear([cost(2, 10.0), cost(4, 20.0), cost(3, 15.0)])
    with pytest.raises(AssertionError, match="not linear"):
        fit_linear([cost(2, 10.0), cost(4, 20.0), cost(3, 16.0)])
    with pytest.raises(AssertionError, match="op counts differ"):
        fit_linear([cost(2, 10.0), cost(4, 20.0, ops=2.0)])


def test_bp_step_counts_forward_backward_and_one_foreach_adam():
    """Linear(5, 3) + CE: the step has the addmm forward, the weight-gradient mm of the
    backward and Adam's multi-tensor ops (no per-parameter ops: a foreach step)."""
    def make():
        torch.manual_seed(0)
        return nn.Linear(5, 3)

    c = bp_step_cost(make, _mlp_batch(5), 4)
    assert c.ops["aten.addmm.default"] == 1
    assert c.ops["aten.mm.default"] == 1  # dW; no input gradient for the data
    assert any(name.startswith("aten._foreach_") for name in c.ops)
    assert c.ops.get("aten.add_.Tensor", 0) == 0  # no per-parameter Adam loop


def test_check_gate_flags_rows_over_the_thresholds():
    rows = [{"model": "m", "schedule": "jacobi", "path": "fast", "x_bp_bytes": 0.5,
             "ops_per_step": 30},
            {"model": "m", "schedule": "jacobi", "path": "reference", "x_bp_bytes": 0.9,
             "ops_per_step": 300}]
    assert check_rows(rows, max_ratio=0.6, max_ops=40) == []
    assert len(check_rows(rows, max_ratio=0.35, max_ops=None)) == 1
    assert len(check_rows(rows, max_ratio=None, max_ops=20)) == 1
    assert len(check_rows(rows, max_ratio=0.35, max_ops=20, paths=("fast", "reference"))) == 4


def test_check_needs_a_threshold():
    with pytest.raises(SystemExit):
        main(["--check", "--no-write"])


def test_epc_step_is_one_forward_and_one_backward_without_the_input_layer():
    """ePC on input -> layer0 = Linear(5, 7) -> layer1 = Linear(7, 3) (output, CE): a step
    recomputes only what the errors change -- layer1's ``addmm`` (layer0 reads the fixed input,
    its prediction is kept) -- and its backward to the error is one ``mm(dL/dlogits, W1)``; no
    weight gradient is formed during inference."""
    step = pc_step_cost(_mlp_graph((5, 7, 3)), _mlp_batch(5), 6, "jacobi", "reference", k=2,
                        mode="epc")
    assert step.ops["aten.addmm.default"] == 1
    assert step.ops["aten.mm.default"] == 1
    strict = pc_step_cost(_mlp_graph((5, 7, 3)), _mlp_batch(5), 6, "jacobi", "reference", k=2,
                          mode="strict")
    assert strict.ops["aten.addmm.default"] >= 1


def test_cost_rows_exist_only_where_the_mode_runs():
    from bench.cost import run_combinations

    rows = run_combinations(("fpa", "strict", "epc"), ("jacobi", "sequential"),
                            ("reference", "fast"))
    assert ("fpa", "sequential", "fast") in rows and ("strict", "sequential", "reference") in rows
    assert ("epc", "jacobi", "reference") in rows and ("strict", "jacobi", "fast") in rows
    assert ("epc", "jacobi", "fast") in rows
    assert not [r for r in rows if r[0] == "epc" and r[1] == "sequential"]
    assert len(rows) == 4 + 4 + 2


@pytest.mark.parametrize("mode", ["strict", "epc"])
def test_fast_strict_and_epc_steps_are_one_matmul_each_way(mode):
    """On the fast path a strict-PC or ePC step of input -> Linear(5, 7) -> Linear(7, 3) is the
    output's prediction (one ``addmm``; the first layer reads the fixed input and keeps its
    prediction) and its input-VJP (one ``mm``), with no autograd graph: no op of the reference's
    backward pass appears."""
    fast = pc_step_cost(_mlp_graph((5, 7, 3)), _mlp_batch(5), 6, "jacobi", "fast", k=2,
                        mode=mode)
    assert fast.ops["aten.addmm.default"] == 1
    assert fast.ops["aten.mm.default"] == 1
    ref = pc_step_cost(_mlp_graph((5, 7, 3)), _mlp_batch(5), 6, "jacobi", "reference", k=2,
                       mode=mode)
    assert sum(fast.ops.values()) < sum(ref.ops.values())


def test_the_cuda_count_of_a_row_runs_that_row_s_mode():
    """The CUDA-launch recount of a fast row runs the row's own PC variant: a strict step
    recounts to at least its own ops (composites only add launches), not to the FPA step's."""
    from bench.cost import measure_model

    rows = {r["mode"]: r for r in measure_model("mlp", ["jacobi"], ["fast"], [2, 3], k=2,
                                                rate=0.5, kernels="auto",
                                                modes=("fpa", "strict"))["rows"]}
    strict, fpa = rows["strict"], rows["fpa"]
    assert strict["ops_per_step"] > fpa["ops_per_step"]
    assert strict["cuda_ops_per_step"] >= strict["ops_per_step"]


def test_a_strict_step_runs_batchnorm_once_per_layer_on_the_cpu_and_twice_counted_for_cuda():
    """A strict step on input -> Linear -> BN -> ReLU -> Linear -> BN -> ReLU -> Linear: each
    hidden BN (the one fed by the input keeps its prediction) runs once per step; the CPU takes
    its statistics from that pass, the CUDA count computes them again."""
    from bench.cost import statistics_as_on_cuda

    def graph():
        torch.manual_seed(0)
        return sequential_graph([nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU()),
                                 nn.Sequential(nn.Linear(7, 6), nn.BatchNorm1d(6), nn.ReLU()),
                                 nn.Linear(6, 3)])

    cpu = pc_step_cost(graph, _mlp_batch(5), 6, "jacobi", "fast", k=2, mode="strict")
    with statistics_as_on_cuda():
        cuda = pc_step_cost(graph, _mlp_batch(5), 6, "jacobi", "fast", k=2, mode="strict")
    assert cpu.ops["aten.native_batch_norm.default"] == 1
    assert cuda.ops["aten.native_batch_norm.default"] == 2


def test_a_levels_relaxation_of_a_linear_chain_is_one_mm_per_sender_and_a_scale_each():
    """Graph input -> Linear(5, 7) -> Linear(7, 4) -> Linear(4, 3) (output). By path length
    each hidden node has one path to the output, so a jacobi relaxation of T >= 2 steps is one
    ``mm`` per sender (output: e2 W2, layer1: u1 W1) and one ``mul`` by C_k(T) per hidden node,
    whatever T; stepped it grows by two ``mm`` a step."""
    n = 4
    make_graph, make_batch = _mlp_graph((5, 7, 4, 3)), _mlp_batch(5)
    short, long = (relaxation_cost(make_graph, make_batch, n, "jacobi", T, "levels")
                   for T in (3, 30))
    assert short.ops == long.ops == {"aten.mm.default": 2, "aten.mul.out": 2}
    # mm(e (n x 3), W2 (3 x 4)) -> n x 4; mm(u (n x 4), W1 (4 x 7)) -> n x 7; two scalings
    mm = (n * 3 + 12 + n * 4) + (n * 4 + 28 + n * 7)
    assert long.bytes["aten.mm.default"] == mm * F32
    assert long.bytes["aten.mul.out"] == 2 * (n * 4 + n * 7) * F32
    stepped = [relaxation_cost(make_graph, make_batch, n, "jacobi", T, "steps") for T in (3, 30)]
    assert stepped[1].ops["aten.mm.default"] - stepped[0].ops["aten.mm.default"] == 2 * 27
