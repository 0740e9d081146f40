"""bench/backends_ab.py times both backends on one batch and reports consistent ratios."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench.common as common  # noqa: E402
from bench.backends_ab import main  # noqa: E402


def test_backends_ab_writes_both_rows_with_consistent_ratios(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    payload = main(["--model", "cnn", "--batch-size", "4", "--T", "2", "--repeats", "2"])
    rows = {r["backend"]: r for r in payload["rows"]}
    assert set(rows) == {"reference", "fast", "fast-steps"}  # FPA: both fast solvers
    ref, fast = rows["reference"], rows["fast"]
    for r in rows.values():
        assert len(r["calls_s"]) == len(r["calls_T0_s"]) == 2
        assert r["best_s"] == min(r["calls_s"]) > 0
    assert ref["speedup_vs_reference"] == 1.0
    assert abs(fast["speedup_vs_reference"] - ref["best_s"] / fast["best_s"]) < 1e-12
    written = json.loads((tmp_path / "backends_ab-cnn-cpu.json").read_text())
    assert written["config"]["model"] == "cnn" and len(written["rows"]) == 3


def test_backends_ab_times_strict_pc_into_its_own_file(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    payload = main(["--model", "cnn", "--batch-size", "4", "--T", "2", "--repeats", "1",
                    "--mode", "strict", "--schedule", "sequential", "--rate", "0.2"])
    assert payload["config"]["mode"] == "strict" and len(payload["rows"]) == 2
    written = json.loads((tmp_path / "backends_ab-cnn-strict-sequential-cpu.json").read_text())
    assert written["config"]["schedule"] == "sequential"
    assert not (tmp_path / "backends_ab-cnn-cpu.json").exists()
