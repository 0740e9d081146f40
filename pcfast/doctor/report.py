"""Rows of the doctor's report: printed one by one as they complete, collected for ``--json``.

Example::

    report = Report()
    report.add(Row("op", "pc_update on cpu (auto backend)", PASS, err=1e-7, tol=1e-5))
    code = report.finish()   # prints the summary and the FAIL lines; 0 or 1
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

PASS = "PASS"
FAIL = "FAIL"
NOT_AVAILABLE = "not available"
WARN = "WARN"
INFO = "info"
TIME = "time"

_STATUS_WIDTH = 13
_NAME_WIDTH = 54


@dataclasses.dataclass
class Row:
    """One line of the report.

    ``section`` is ``"env"``, ``"op"``, ``"engine"`` or ``"time"``; ``status`` one of
    ``PASS``, ``FAIL``, ``not available``, ``WARN``, ``info``, ``time``; ``err``/``tol`` are set
    for comparisons, ``seconds`` for timings, ``device`` where the row belongs to one device.
    """

    section: str
    name: str
    status: str
    detail: str = ""
    err: float | None = None
    tol: float | None = None
    seconds: float | None = None
    device: str | None = None

    def text(self) -> str:
        """The row as one table line."""
        detail = self.detail
        if self.err is not None and self.tol is not None:
            rel = "<=" if self.status == PASS else ">"
            detail = f"max err {self.err:.2e} {rel} tol {self.tol:.2e}" + (
                f"  {detail}" if detail else "")
        return f"  {self.status:<{_STATUS_WIDTH}} {self.name:<{_NAME_WIDTH}} {detail}".rstrip()

    def failure(self) -> str:
        """The final ``FAIL: ...`` line naming this row."""
        if self.err is not None and self.tol is not None:
            return f"FAIL: {self.name}: max err {self.err:.2e} > tol {self.tol:.2e}"
        return f"FAIL: {self.name}: {self.detail}"


class Report:
    """Collects rows, printing each one (flushed) as it is added."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.rows: list[Row] = []
        self.stream = stream if stream is not None else sys.stdout
        self.start = time.perf_counter()

    def say(self, text: str) -> None:
        """Print a free line (section headings), flushed."""
        print(text, file=self.stream, flush=True)

    def add(self, row: Row) -> Row:
        """Record and print one row."""
        self.rows.append(row)
        self.say(row.text())
        return row

    def guarded(self, section: str, name: str, fn: Callable[[], Row | list[Row]],
                device: str | None = None) -> list[Row]:
        """Add the row(s) ``fn`` returns; an exception in ``fn`` becomes one FAIL row, ``name``."""
        try:
            result = fn()
        except Exception as exc:  # a crashing check is a failing check, reported, not raised
            text = str(exc).strip()
            first = text.splitlines()[0] if text else ""
            result = Row(section, name, FAIL, f"{type(exc).__name__}: {first}"[:400],
                         device=device)
        return [self.add(r) for r in (result if isinstance(result, list) else [result])]

    def counts(self) -> dict[str, int]:
        """Number of rows per status."""
        out: dict[str, int] = {}
        for row in self.rows:
            out[row.status] = out.get(row.status, 0) + 1
        return out

    def exit_code(self) -> int:
        """1 when any row failed, else 0."""
        return int(any(r.status == FAIL for r in self.rows))

    def finish(self) -> int:
        """Print the summary, then one ``FAIL: ...`` line per failing row; return the exit code."""
        c = self.counts()
        elapsed = time.perf_counter() - self.start
        self.say(f"\nsummary: {c.get(PASS, 0)} passed, {c.get(FAIL, 0)} failed, "
                 f"{c.get(NOT_AVAILABLE, 0)} not available, {c.get(WARN, 0)} warnings "
                 f"({elapsed:.1f} s)")
        for row in self.rows:
            if row.status == FAIL:
                self.say(row.failure())
        if not c.get(FAIL):
            self.say("OK: every available check passed" if c.get(PASS)
                     else "nothing could be checked here: see the \"not available\" rows")
        return self.exit_code()

    def write_json(self, path: str | Path) -> None:
        """Write every row, the counts and the exit code as JSON."""
        data: dict[str, Any] = {
            "exit_code": self.exit_code(),
            "counts": self.counts(),
            "rows": [dataclasses.asdict(r) for r in self.rows],
        }
        Path(path).write_text(json.dumps(data, indent=1) + "\n")
