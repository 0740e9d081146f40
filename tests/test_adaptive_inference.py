"""Adaptive inference (``tol``): ``T`` is a maximum; the energy is read every ``check_every``
steps and inference stops once it changed by at most ``tol`` (relative) between two readings.

Oracles: the recorded energy trace (the stopping rule must hold at the stop and must not have
held at the reading before), and the same engine run with a fixed ``T`` equal to the steps taken
(identical gradients: stopping early is truncation, nothing else).
"""

from __future__ import annotations

import json

import pytest
import torch
from _hand_mlp import strict_mlp_case

from pcfast.cli import main
from pcfast.pc import PCEngine
from pcfast.train.checkpoint import read_metrics

MODES = {"fpa": dict(), "strict": dict(fpa=False), "epc": dict(fpa=False, epc=True)}


def _grads(graph):
    out = [p.grad.clone() for p in graph.parameters()]
    for p in graph.parameters():
        p.grad = None
    return out


@pytest.mark.parametrize("mode, schedule", [(m, s) for m in MODES for s in ("jacobi", "sequential")
                                            if (m, s) != ("epc", "sequential")])
@pytest.mark.parametrize("tol, every", [(1e-3, 1), (1e-4, 3)])
@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_inference_stops_where_the_energy_settles(mode, schedule, tol, every, backend):
    _, graph, x, y = strict_mlp_case()
    T = 300
    engine = PCEngine(graph, T=T, rate=0.1, schedule=schedule, tol=tol, check_every=every,
                      record_energy=True, backend=backend, **MODES[mode])
    result = engine.compute_gradients(x, y)
    steps = result.steps
    assert 0 < steps < T and steps % every == 0
    trace = [float(e) for e in result.energy_trace]
    assert len(trace) == steps + 1  # after initialisation and after every step taken

    def change(t):
        return abs(trace[t - every] - trace[t]) / abs(trace[t - every])

    assert change(steps) <= tol
    if steps >= 2 * every:
        assert change(steps - every) > tol
    stopped = _grads(graph)
    # The same solver (a fixed T would otherwise take the FPA path-length solver, and strict
    # PC on this MLP the dense-chain op: equal up to rounding, tests/test_fpa_levels.py and
    # tests/test_dense_strict_op.py).
    options = {"fpa_solver": "steps", "dense_chain": "off"} if backend == "fast" else None
    PCEngine(graph, T=steps, rate=0.1, schedule=schedule, backend=backend,
             backend_options=options, **MODES[mode]).compute_gradients(x, y)
    for a, b in zip(stopped, _grads(graph)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    if backend == "fast":  # and the reference stops at the same step with the same gradients
        ref = PCEngine(graph, T=T, rate=0.1, schedule=schedule, tol=tol, check_every=every,
                       backend="reference", **MODES[mode]).compute_gradients(x, y)
        assert ref.steps == steps
        for a, b in zip(stopped, _grads(graph)):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_a_tight_tolerance_runs_every_step():
    _, graph, x, y = strict_mlp_case()
    result = PCEngine(graph, T=12, rate=0.2, tol=1e-15).compute_gradients(x, y)
    assert result.steps == 12
    assert PCEngine(graph, T=7, rate=0.2).compute_gradients(x, y).steps == 7


@pytest.mark.parametrize("kwargs, match", [
    (dict(tol=0.0), "tol must be positive"),
    (dict(tol=1e-3, check_every=0), "check_every"),
    (dict(tol=1e-3, fpa=False, ipc=True), "not defined for ipc"),
])
def test_adaptive_inference_misuse_is_named(kwargs, match):
    _, graph, _, _ = strict_mlp_case()
    with pytest.raises(ValueError, match=match):
        PCEngine(graph, **kwargs)


def test_auto_backend_runs_adaptive_inference_on_the_reference_path():
    _, graph, x, y = strict_mlp_case()
    engine = PCEngine(graph, T=300, rate=0.2, tol=1e-3, backend="auto")
    assert engine.compute_gradients(x, y).steps < 300
    assert engine.last_backend == "reference"


def test_training_reports_the_mean_steps_taken(tmp_path):
    out = tmp_path / "tol"
    assert main(["train", "--model", "mlp", "--model-kwargs", '{"hidden": [32]}', "--synthetic",
                 "--train-subset", "256", "--test-subset", "128", "--batch-size", "64",
                 "--rule", "pc", "--T", "60", "--rate", "0.3", "--tol", "1e-3",
                 "--check-every", "2", "--epochs", "1", "--no-progress",
                 "--out-dir", str(out)]) == 0
    row = read_metrics(out / "metrics.jsonl")[-1]
    assert 0 < row["inference_steps"] < 60
    assert json.loads((out / "config.json").read_text())["tol"] == 1e-3
