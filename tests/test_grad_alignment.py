"""bench/grad_alignment.py: PC's weight gradients against BP's, per weight tensor."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.grad_alignment import alignment, main, parse_setting  # noqa: E402
from pcfast.models import build_model  # noqa: E402
from pcfast.pc.backends.base import PCSettings  # noqa: E402
from pcfast.pc.backends.fpa_levels import level_coefficients  # noqa: E402


def _chain_net():
    torch.manual_seed(0)
    model = build_model("cnn", spec=[8, "p", 16, "p"]).double().train()
    x = torch.randn(16, 3, 32, 32, dtype=torch.float64)
    return model, x, torch.randint(0, 10, (16,))


def test_on_a_chain_each_layer_gets_bps_gradient_times_its_path_coefficient():
    """A chain has one path per node, so FPA's weight gradient of a node k edges below the
    output is C_k(T) times BP's: ratio C_k, cosine 1 (the coefficients of the unit chain)."""
    model, x, y = _chain_net()
    graph = model.pc_graph()
    names = {id(p): n for n, p in model.named_parameters()}
    below = {}  # weight tensor -> edges from its node to the output
    for i, node in enumerate(graph.nodes):
        for p in graph.node_parameters(node):
            if p.dim() > 1:
                below[names[id(p)]] = len(graph.nodes) - 1 - i
    assert len(set(below.values())) >= 3  # layers at three distances at least
    rows = {r["tensor"]: r for r in alignment(model, x, y, [parse_setting("sequential:1"),
                                                            parse_setting("jacobi:30")])}
    deepest = max(below.values())
    seq = level_coefficients(PCSettings(T=1, rate=0.5, schedule="sequential"), deepest)
    jac = level_coefficients(PCSettings(T=30, rate=0.5, schedule="jacobi"), deepest)
    for tensor, k in below.items():
        assert rows[tensor]["sequential:1 ratio"] == pytest.approx(seq[k], rel=1e-6)
        assert rows[tensor]["sequential:1 cos"] == pytest.approx(1.0, abs=1e-9)
        # jacobi T=30, far more steps than the depth: C_k within 1e-5 of 1, BP's gradient
        assert rows[tensor]["jacobi:30 ratio"] == pytest.approx(jac[k], rel=1e-6)
        assert rows[tensor]["jacobi:30 ratio"] == pytest.approx(1.0, abs=1e-5)
        assert rows[tensor]["jacobi:30 cos"] == pytest.approx(1.0, abs=1e-9)
    assert min(r["sequential:1 ratio"] for r in rows.values()) < 0.2  # the bottom layer's


def test_the_weights_are_left_as_they_were_and_the_setting_parser_checks():
    model, x, y = _chain_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    alignment(model, x, y, [parse_setting("jacobi:3:0.25")])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert parse_setting("jacobi:3:0.25") == {"schedule": "jacobi", "T": 3, "rate": 0.25}
    for bad in ("jacobi", "newton:3", "jacobi:x", "sequential:2:fast"):
        with pytest.raises(Exception, match="--pc"):
            parse_setting(bad)


def test_main_writes_a_row_per_weight_tensor(tmp_path, monkeypatch):
    import bench.common as common

    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    out = main(["--model", "cnn", "--model-kwargs", '{"spec": [8, "p"]}', "--batch-size", "4",
                "--pc", "sequential:2"])
    assert [r["tensor"] for r in out["rows"]] == [
        n for n, p in build_model("cnn", spec=[8, "p"]).named_parameters() if p.dim() > 1]
    assert (tmp_path / "grad_alignment-cnn-cpu.json").exists()
