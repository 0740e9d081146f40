"""Generate the parameter table of docs/MODELS.md from the code.

usage: python tools/param_table.py            # rewrite the table in docs/MODELS.md
       python tools/param_table.py --check    # exit 1 if docs/MODELS.md is out of date
       python tools/param_table.py --print    # print the table only

The table sits between the markers ``<!-- param-table:begin -->`` and
``<!-- param-table:end -->``; everything else in the file is left as written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from pcfast.experiments.model_zoo import ZOO
from pcfast.experiments.report import markdown_table
from pcfast.models import build_model, count_parameters

DOC = Path(__file__).resolve().parent.parent / "docs" / "MODELS.md"
BEGIN, END = "<!-- param-table:begin -->", "<!-- param-table:end -->"

# (name in the table, registered model, kwargs, PC graph?)
ENTRIES: list[tuple[str, str, dict, str]] = [
    *[(f"resnet{d}", f"resnet{d}", {}, "yes") for d in (20, 32, 44, 56, 110, 1202)],
    *[(f"resnet{d} (shortcut B)", f"resnet{d}", {"shortcut": "B"}, "yes") for d in (20, 56)],
    *[(f"plain{d}", f"plain{d}", {}, "yes") for d in (20, 32, 44, 56, 110)],
    ("resnet18", "resnet18", {}, "yes"),
    ("resnet34", "resnet34", {}, "yes"),
    ("mlp (defaults)", "mlp", {}, "yes"),
    ("cnn (defaults)", "cnn", {}, "yes"),
    ("rescnn (defaults)", "rescnn", {}, "yes"),
    ("rescnn block=big", "rescnn", {"block": "big"}, "yes"),
    ("mixer (defaults)", "mixer", {}, "no"),
    ("vgg5 (PCX)", "vgg5", {}, "yes"),
    ("vgg7 (PCX)", "vgg7", {}, "yes"),
    *[(f"model-zoo: {name}", model, kw, "no" if model == "mixer" else "yes")
      for name, (model, kw) in ZOO.items()],
]


def table() -> str:
    rows = []
    for label, model, kwargs, pc in ENTRIES:
        with torch.device("meta"):  # counts only: no memory, no init cost
            n = count_parameters(build_model(model, **kwargs))
        opts = ", ".join(f"{k}={v}" for k, v in kwargs.items()) or "—"
        rows.append([label, f"`{model}`", opts, f"{n:,}", pc])
    return markdown_table(["model", "registry name", "options", "parameters", "pc_graph"], rows)


def render(text: str) -> str:
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{DOC} has no {BEGIN} ... {END} markers; add them where the table goes")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table()}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the doc is out of date")
    parser.add_argument("--print", action="store_true", help="print the table only")
    ns = parser.parse_args(argv)
    if ns.print:
        print(table())
        return 0
    old = DOC.read_text()
    new = render(old)
    if ns.check:
        if new != old:
            print(f"{DOC} is out of date: run python tools/param_table.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(new)
    print(f"wrote the parameter table of {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
