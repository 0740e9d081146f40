"""``pcfast doctor``: check an install end to end and print what works, as a table.

Lists the versions (pcfast, torch, Triton, CUDA, Python), the compiled extension ``pcfast._C``
(built? CUDA architectures? stale?), the devices and TF32 settings; checks every op on every
device and backend against its reference (:mod:`pcfast.doctor.ops`), then the fast PC engine
against the reference engine and times both (:mod:`pcfast.doctor.engine`). What cannot run here
is listed as "not available" with the reason. Exit code 0 when every check passes, 1 otherwise;
the last lines name each failing check.

Example::

    $ pcfast doctor                 # or: python -m pcfast doctor
    $ pcfast doctor --device cuda --json doctor.json
"""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import torch

from pcfast.doctor import engine, env
from pcfast.doctor.fused import FUSED_CHECKS
from pcfast.doctor.ops import CHECKS, DTYPE, OpCheck, measure, unavailable
from pcfast.doctor.report import FAIL, INFO, NOT_AVAILABLE, PASS, Report, Row

__all__ = ["resolve_devices", "run"]


def resolve_devices(device: str | None) -> list[torch.device]:
    """The devices to check: ``--device`` alone, else the CPU and the current CUDA device."""
    if device in (None, "all"):
        return [torch.device("cpu"), torch.device("cuda")]
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"pcfast doctor checks cpu and cuda devices, got {device!r}")
    return [dev]


def _op_row(check: OpCheck, device: torch.device, backend: str, name: str) -> Row:
    reason = unavailable(check, device, backend)
    if reason is not None:
        return Row("op", name, NOT_AVAILABLE, reason, device=str(device))
    err, tol = measure(check.run(device, backend))
    return Row("op", name, PASS if err <= tol else FAIL, err=err, tol=tol, device=str(device))


def _check_ops(report: Report, devices: list[torch.device]) -> None:
    for check in CHECKS + FUSED_CHECKS:
        for dev in devices:
            for backend in check.backends.get(dev.type, ()):
                name = f"{check.name} on {dev} ({backend} backend)"
                report.guarded("op", name, functools.partial(_op_row, check, dev, backend, name),
                               str(dev))


def _device_guarded(report: Report, section: str, name: str, device: torch.device,
                    fn: Callable[[], Row | list[Row]]) -> None:
    """Run ``fn`` as :meth:`Report.guarded`, or add a "not available" row if the device is not."""
    reason = env.device_unavailable(device)
    if reason is not None:
        report.add(Row(section, name, NOT_AVAILABLE, reason, device=str(device)))
    else:
        report.guarded(section, name, fn, str(device))


def _check_engines(report: Report, devices: list[torch.device]) -> None:
    for dev in devices:
        _device_guarded(report, "engine", f"PC engine fast vs reference on {dev}", dev,
                        functools.partial(engine.compare, dev))


def _time_engines(report: Report, devices: list[torch.device]) -> None:
    for dev in devices:
        for backend in ("reference", "fast"):
            _device_guarded(report, "time", f"PC engine {backend} on {dev}", dev,
                            functools.partial(engine.timing, dev, backend))


def _warning_rows(report: Report, caught: list[warnings.WarningMessage]) -> None:
    seen: set[str] = set()
    for w in caught:
        text = str(w.message).splitlines()[0][:300]
        if text not in seen:
            seen.add(text)
            report.add(Row("warning", f"{w.category.__name__} during the checks", INFO, text))


def run(device: str | None = None, json_path: str | Path | None = None,
        stream: TextIO | None = None) -> int:
    """Run every check, printing each row as it completes; return the exit code: 0 when every
    available check passed, 1 on any failure, 2 for a malformed ``device``."""
    report = Report(stream)
    try:
        devices = resolve_devices(device)
    except (RuntimeError, ValueError) as exc:  # a malformed --device: one line, no trace
        print(f"pcfast doctor: {exc}", file=sys.stderr)
        return 2
    report.say("pcfast doctor" + (f" (--device {device})" if device else ""))
    report.say("\n== environment")
    for row in (env.version_rows() + env.extension_rows() + env.device_rows(devices)
                + [env.tf32_row()]):
        report.add(row)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with env.exact_float32():
            report.say(f"\n== ops ({str(DTYPE).removeprefix('torch.')} random inputs vs the "
                       "float64 reference on cpu; TF32 off while checking)")
            _check_ops(report, devices)
            report.say("\n== PC engines (fast vs reference, same model and batch)")
            _check_engines(report, devices)
        report.say("\n== timing (wall clock; TF32 as configured)")
        _time_engines(report, devices)
    _warning_rows(report, caught)
    code = report.finish()
    if json_path is not None:
        report.write_json(json_path)
        report.say(f"rows written to {json_path}")
    return code
