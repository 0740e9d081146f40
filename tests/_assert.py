"""Mismatch-reporting comparison for kernel tests.

Example::

    assert_close_verbose(out, ref, atol=1e-5, rtol=0.0, name="forward")
"""

from __future__ import annotations

import torch

MAX_REPORTED = 5


def assert_close_verbose(actual: torch.Tensor, expected: torch.Tensor, atol: float,
                         rtol: float = 0.0, name: str = "tensor") -> None:
    """Assert ``|actual - expected| <= atol + rtol * |expected|`` elementwise (compared in float64).

    On failure the message names the shapes, the number of mismatching elements, the largest
    error and the first few mismatching indices with both values.
    """
    if actual.shape != expected.shape:
        raise AssertionError(
            f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    err = (a - e).abs()
    bad = ~(err <= atol + rtol * e.abs())  # also flags NaN
    count = int(bad.sum())
    if count == 0:
        return
    idx = bad.nonzero()[:MAX_REPORTED].tolist()
    lines = [f"  at {tuple(i)}: got {a[tuple(i)].item():.6g}, expected {e[tuple(i)].item():.6g}"
             for i in idx]
    raise AssertionError(
        f"{name}: {count} of {a.numel()} elements differ beyond atol={atol:.3g}, rtol={rtol:.3g} "
        f"(max abs error {err.nan_to_num(float('inf')).max().item():.3g}); first mismatches:\n"
        + "\n".join(lines))


def assert_within(actual: torch.Tensor, expected: torch.Tensor, tol: torch.Tensor | float,
                  name: str = "tensor") -> None:
    """Assert ``|actual - expected| <= tol`` elementwise, ``tol`` a tensor (per element) or a
    number; compared in float64, mismatches reported as :func:`assert_close_verbose` does."""
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    t = tol.detach().to("cpu", torch.float64) if isinstance(tol, torch.Tensor) else tol
    bad = ~((a - e).abs() <= t)  # also flags NaN
    count = int(bad.sum())
    if count:
        idx = bad.nonzero()[:MAX_REPORTED].tolist()
        raise AssertionError(f"{name}: {count} of {a.numel()} elements out of tolerance; first at "
                             + ", ".join(f"{tuple(i)} (got {a[tuple(i)].item():.6g}, expected "
                                         f"{e[tuple(i)].item():.6g})" for i in idx))
