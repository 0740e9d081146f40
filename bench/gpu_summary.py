"""Markdown summary of one ``bench/gpu_check.sh`` folder: parts, doctor, tests, benchmark JSON.

Usage::

    python bench/gpu_summary.py bench/results/gpu-NVIDIA-H100-20261125-1200 > SUMMARY.md

Reads ``parts.tsv`` (each part's status and time), ``doctor.json``, ``gpu-tests.xml`` (JUnit) and
every other ``*.json`` the benchmarks wrote, and prints what a reader needs first: what passed,
on which GPU with which versions, and the headline numbers of each result file.
"""

from __future__ import annotations

import csv
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any


def _parts(folder: Path) -> list[dict[str, str]]:
    path = folder / "parts.tsv"
    if not path.exists():
        return []
    with path.open() as f:
        return list(csv.DictReader(f, delimiter="\t"))


def _junit(folder: Path) -> str:
    path = folder / "gpu-tests.xml"
    if not path.exists():
        return "no JUnit file (the test part did not run to the end)"
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return "unreadable JUnit file"
    keys = ("tests", "failures", "errors", "skipped")
    counts = {k: int(suite.get(k, 0)) for k in keys}
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    text = ", ".join(f"{counts[k]} {k}" for k in keys)
    return text + ("".join(f"\n  - FAILED {name}" for name in failed) if failed else "")


def _environment(payloads: list[dict[str, Any]]) -> dict[str, Any]:
    for p in payloads:
        env = p.get("environment")
        if isinstance(env, dict):
            return env
    return {}


def _headline(payload: dict[str, Any]) -> list[str]:
    """A few lines per result file: its rows, if it has a list of flat dicts."""
    for key in ("rows", "results", "modes", "table"):
        rows = payload.get(key)
        if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
            cols = [c for c in rows[0] if not isinstance(rows[0][c], (dict, list))][:8]
            out = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
            for r in rows[:20]:
                cells = [f"{r.get(c):.4g}" if isinstance(r.get(c), float) else str(r.get(c, ""))
                         for c in cols]
                out.append("| " + " | ".join(cells) + " |")
            return out
    return ["(no table in this file; see the JSON)"]


def summary(folder: Path) -> str:
    results = []
    for path in sorted(folder.glob("*.json")):
        try:
            results.append((path.name, json.loads(path.read_text())))
        except (OSError, json.JSONDecodeError) as exc:
            results.append((path.name, {"unreadable": str(exc)}))
    env = _environment([p for _, p in results])
    lines = [f"# GPU check: {folder.name}", ""]
    if env:
        lines += ["| | |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in env.items() if not isinstance(v, (dict, list))]
        lines.append("")
    lines += ["## Parts", "", "| part | status | seconds | log |", "| --- | --- | --- | --- |"]
    lines += [f"| {p['part']} | {p['status']} | {p['seconds']} | {p['log']} |"
              for p in _parts(folder)]
    lines += ["", "## GPU tests", "", _junit(folder), ""]
    for name, payload in results:
        lines += [f"## {name}", ""]
        if "unreadable" in payload:
            lines += [f"unreadable: {payload['unreadable']}", ""]
            continue
        lines += _headline(payload) + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not Path(args[0]).is_dir():
        print("usage: python bench/gpu_summary.py RESULTS_FOLDER", file=sys.stderr)
        return 2
    print(summary(Path(args[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
