"""``pcfast doctor``: passes on a CPU-only install, lists every op, and names what breaks.

The doctor runs in-process through the CLI (``pcfast.cli.main``); its timing section uses a tiny
batch here so that the whole file stays well under a minute on two cores.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch

import pcfast.doctor.engine
import pcfast.ops
import pcfast.pc
from pcfast.cli import main
from pcfast.ops import _ext

OPS = ("dwconv forward", "dwconv input-VJP", "dwconv weight-VJP", "pc_update", "bn_relu_vjp")


@pytest.fixture(autouse=True)
def _quick_timing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pcfast.doctor.engine, "TIME_BATCH", (2, 8))
    monkeypatch.setattr(pcfast.doctor.engine, "TIME_T", 2)
    monkeypatch.setattr(pcfast.doctor.engine, "TIME_REPEATS", 1)


def _doctor(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str]]:
    code = main(["doctor", *args])
    return code, capsys.readouterr().out.splitlines()


def _status(line: str) -> str:
    words = line.split()
    if line.strip().startswith("not available"):
        return "not available"
    return words[0] if words else ""


def _fail_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("FAIL: ")]


def test_passes_on_cpu_and_lists_every_op(capsys: pytest.CaptureFixture[str],
                                          tmp_path: Path) -> None:
    code, lines = _doctor(capsys, "--json", str(tmp_path / "doctor.json"))
    text = "\n".join(lines)
    assert code == 0, text
    assert not _fail_lines(lines), text
    devices = ["cpu", "cuda"]  # cuda rows are "not available" without a GPU, never left out
    for op in OPS:
        for device in devices:
            rows = [line for line in lines if f" {op} on {device} (" in line]
            assert rows, f"{op} on {device} missing from:\n{text}"
            for row in rows:
                assert _status(row) in ("PASS", "not available"), row
        assert any(_status(r) == "PASS" for r in lines if f" {op} on cpu (reference backend)" in r)
    for what in ("relaxed errors", "weight gradients"):
        assert any(_status(r) == "PASS" and f"PC engine fast vs reference on cpu: {what}" in r
                   for r in lines), text
    assert any("ms per inference step on cpu" in r or "lost in timing noise" in r
               for r in lines if "PC engine fast on cpu" in r), text
    data = json.loads((tmp_path / "doctor.json").read_text())
    env = {row["name"] for row in data["rows"] if row["section"] == "env"}
    assert {"pcfast", "torch", "triton", "CUDA", "python", "pcfast._C", "TF32"} <= env, env
    assert data["exit_code"] == 0
    names = {row["name"] for row in data["rows"]}
    assert "pc_update on cpu (auto backend)" in names
    if not torch.cuda.is_available():
        assert all(r["status"] == "not available" for r in data["rows"] if r["device"] == "cuda")


def test_wrong_or_crashing_op_fails_and_is_named(capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    real = pcfast.ops.pc_update

    def wrong_pc_update(state: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        energy = real(state, *args, **kwargs)
        state.add_(1e-3)
        return energy

    def crashing_bn_relu_vjp(*args, **kwargs) -> torch.Tensor:
        raise RuntimeError("simulated kernel crash")

    monkeypatch.setattr(pcfast.ops, "pc_update", wrong_pc_update)
    monkeypatch.setattr(pcfast.ops, "bn_relu_vjp", crashing_bn_relu_vjp)
    code, lines = _doctor(capsys, "--device", "cpu")
    fails = _fail_lines(lines)
    assert code == 1
    assert any(f.startswith("FAIL: pc_update on cpu (auto backend): max err ") and " > tol " in f
               for f in fails), fails
    assert ("FAIL: bn_relu_vjp on cpu (torch backend): RuntimeError: simulated kernel crash"
            in fails), fails
    assert not any("reference backend" in f for f in fails), fails


def _use_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    """Have ``pcfast._C`` used; a stale build (sources edited since) is used as it is: this test
    checks how the doctor reports a wrong kernel, not the kernel."""
    if _ext.load() is not None:
        return
    try:
        module = importlib.import_module("pcfast._C")
    except (ImportError, OSError) as exc:
        pytest.skip(f"pcfast._C not importable: {exc}")
    if getattr(module, "torch_version", None) != torch.__version__:
        pytest.skip(f"pcfast._C not usable: {_ext.unavailable_reason()}")
    monkeypatch.setattr(_ext, "_module", module)
    monkeypatch.setattr(_ext, "_reason", None)


def test_wrong_compiled_dwconv_input_vjp_fails(capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    _use_extension(monkeypatch)
    real = torch.ops.pcfast.dwconv_bwd_input

    def wrong(grad_out: torch.Tensor, weight: torch.Tensor, stride: int, h: int,
              w: int) -> torch.Tensor:
        return real(grad_out, weight, stride, h, w) * 1.01

    monkeypatch.setattr(torch.ops.pcfast, "dwconv_bwd_input", wrong)
    code, lines = _doctor(capsys, "--device", "cpu")
    fails = _fail_lines(lines)
    assert code == 1
    assert any(f.startswith("FAIL: dwconv input-VJP on cpu (cpu backend): max err ") for f in fails)
    ok = ("dwconv forward", "dwconv weight-VJP", "(reference backend)", "pc_update", "bn_relu")
    # The fused dw op's unfused reference calls the compiled input-VJP: it fails with it.
    fails = [f for f in fails if not f.startswith("FAIL: dw_bn_relu_vjp_relax on cpu (reference")]
    assert not any(name in f for f in fails for name in ok), fails


def test_engine_mismatch_fails(capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    class SkewedFastEngine(pcfast.pc.PCEngine):
        """The fast engine writes slightly wrong weight gradients."""

        def compute_gradients(self, x: torch.Tensor, y: torch.Tensor) -> pcfast.pc.PCResult:
            result = super().compute_gradients(x, y)
            if self.backend == "fast":
                for p in self.graph.parameters():
                    if p.grad is not None:
                        p.grad.add_(1e-4)
            return result

    monkeypatch.setattr(pcfast.pc, "PCEngine", SkewedFastEngine)
    code, lines = _doctor(capsys, "--device", "cpu")
    fails = _fail_lines(lines)
    assert code == 1
    assert len(fails) == 1 and fails[0].startswith(
        "FAIL: PC engine fast vs reference on cpu: weight gradients: max err 1.00e-04 > tol"), fails


def test_wrong_fused_fast_path_op_fails(capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from pcfast.ops import vjp_relax

    real = vjp_relax.add_relu_vjp_relax

    def wrong(e, dead, e_a, rate, clamp, out_a):
        g = real(e, dead, e_a, rate, clamp, out_a)
        out_a.mul_(1.001)
        return g

    monkeypatch.setattr(vjp_relax, "add_relu_vjp_relax", wrong)
    code, lines = _doctor(capsys, "--device", "cpu")
    fails = _fail_lines(lines)
    assert code == 1
    assert [f for f in fails if "PC engine" not in f] == [
        f for f in fails if f.startswith("FAIL: add_relu_vjp_relax on cpu (auto backend): max err ")]
    assert any(f.startswith("FAIL: add_relu_vjp_relax on cpu (auto backend)") for f in fails)
