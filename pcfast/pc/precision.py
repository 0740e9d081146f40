"""Precision weighting of the PC energy: ``F = sum_v pi_v(t)/2 ||e_v||^2 + pi_out(t) L``.

A precision is given per node, as a constant or as a schedule over the inference steps ``t``
(the number of steps taken when the energy is formed: ``t = 0`` drives the first step, the
final weight gradients use ``t = steps taken``). :func:`as_precision` turns what a user passes
(``{node: value or schedule}`` or one callable ``(node, t) -> value``) into that callable; nodes
not named keep precision 1, the key ``"*"`` sets every node not named otherwise. A schedule is a
callable ``t -> value`` or, JSON-friendly (``pcfast train --precision``), ``{"decaying": [start,
factor]}`` or ``{"spiking": [value, steps]}``. Two schedule shapes are provided:

- :func:`decaying`: ``1 + (start - 1) * factor**t``, from ``start`` towards 1;
- :func:`spiking`: ``value`` for the first ``steps`` steps, then 1.

Example::

    PCEngine(graph, fpa=False, precision={"layer0": 4.0, "layer1": decaying(10.0, 0.5)})
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

Schedule = Callable[[int], float]
Precision = Callable[[str, int], float]


def decaying(start: float, factor: float) -> Schedule:
    """``t -> 1 + (start - 1) * factor**t`` (``0 < factor < 1``)."""
    if not 0.0 < factor < 1.0:
        raise ValueError(f"decaying: factor must be in (0, 1), got {factor}")
    _check_value("decaying start", start)
    return lambda t: 1.0 + (start - 1.0) * factor ** t


def spiking(value: float, steps: int) -> Schedule:
    """``t -> value`` for ``t < steps``, else 1."""
    if steps < 1 or int(steps) != steps:
        raise ValueError(f"spiking: steps must be a positive integer, got {steps}")
    _check_value("spiking value", value)
    return lambda t: value if t < steps else 1.0


def _check_value(what: str, v: float) -> None:
    if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
        raise ValueError(f"{what} must be a finite number >= 0, got {v!r}")


def as_precision(spec: Mapping[str, float | Schedule] | Precision | None,
                 nodes: Iterable[str]) -> Precision | None:
    """The ``(node, t) -> pi`` callable for ``spec``; unknown node names raise a ValueError
    naming the nodes that exist."""
    if spec is None or callable(spec):
        return spec
    if not isinstance(spec, Mapping):
        raise TypeError(f"precision must be a mapping node -> value/schedule or a callable "
                        f"(node, t) -> value, got {type(spec).__name__}")
    known = list(nodes)
    unknown = sorted(set(spec) - set(known) - {"*"})
    if unknown:
        raise ValueError(f"precision names unknown nodes {unknown}; the graph's hidden and "
                         f"output nodes are: {known}")
    table = {name: _schedule(name, v) for name, v in spec.items()}
    default = table.pop("*", None)

    def precision(name: str, t: int) -> float:
        fn = table.get(name, default)
        return 1.0 if fn is None else fn(t)

    return precision


SHAPES = {"decaying": decaying, "spiking": spiking}


def _schedule(name: str, v) -> Schedule:
    if callable(v):
        return v
    if isinstance(v, Mapping):
        if len(v) != 1 or next(iter(v)) not in SHAPES:
            raise ValueError(f"precision of {name!r}: a schedule is {{shape: [args]}} with shape "
                             f"one of {sorted(SHAPES)}, got {dict(v)!r}")
        shape, args = next(iter(v.items()))
        return SHAPES[shape](*args)
    _check_value(f"precision of {name!r}", v)
    return lambda t, v=float(v): v
