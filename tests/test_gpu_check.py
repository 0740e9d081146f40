"""bench/gpu_check.sh and its Markdown summary, checked without a GPU."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _summary_module():
    spec = importlib.util.spec_from_file_location("gpu_summary", ROOT / "bench" / "gpu_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_refuses_a_machine_without_gpu(tmp_path) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "no CUDA GPU" in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing built, nothing written


def test_summary_reports_parts_tests_and_results(tmp_path) -> None:
    (tmp_path / "parts.tsv").write_text(
        "part\tstatus\tseconds\tlog\nbuild\tpass\t41\tbuild.log\n"
        "epoch\ttimeout after 240s\t240\tepoch.log\n")
    (tmp_path / "gpu-tests.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="0">'
        '<testcase classname="tests.test_fast_engine" name="test_graph"><failure/></testcase>'
        '<testcase classname="tests.test_a" name="test_ok"/><testcase classname="t" name="u"/>'
        "</testsuite></testsuites>")
    (tmp_path / "epoch-cuda.json").write_text(json.dumps({
        "environment": {"device": "NVIDIA H100", "torch": "2.11.0"},
        "rows": [{"mode": "fast", "s_per_epoch": 12.5}, {"mode": "bp", "s_per_epoch": 4.25}]}))
    (tmp_path / "broken.json").write_text("{not json")
    text = _summary_module().summary(tmp_path)
    assert "| build | pass | 41 | build.log |" in text
    assert "timeout after 240s" in text
    assert "3 tests, 1 failures, 0 errors, 0 skipped" in text
    assert "FAILED tests.test_fast_engine::test_graph" in text
    assert "| device | NVIDIA H100 |" in text
    assert "| fast | 12.5 |" in text and "| bp | 4.25 |" in text
    assert "## broken.json" in text and "unreadable" in text


def test_summary_cli_rejects_a_missing_folder(tmp_path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_summary.py"),
                           str(tmp_path / "missing")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "usage" in proc.stderr


@pytest.mark.parametrize("name", ["bench_pc_update.py", "bench_dwconv.py", "epoch.py", "cost.py"])
def test_every_benchmark_the_script_runs_exists(name) -> None:
    script = (ROOT / "bench" / "gpu_check.sh").read_text()
    assert name.removesuffix(".py") in script
    assert (ROOT / "bench" / name).exists()
