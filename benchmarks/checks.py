"""Validity checks shared by the benchmarks: a measurement whose check fails stops the run.

Each helper raises ``BenchmarkCheckFailed`` (a ``SystemExit``: the run exits 1 with the message on
stderr, and no report, no ratio, is printed) naming what differed. The checks run in full runs and
in the smoke runs CI makes alike, outside the timed regions.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping

import numpy as np


class BenchmarkCheckFailed(SystemExit):
    """A benchmark's measurement is not valid: what it compared or measured is wrong."""

    def __init__(self, message: str) -> None:
        super().__init__(f"benchmark check failed: {message}")


def require(condition: object, message: str) -> None:
    if not condition:
        raise BenchmarkCheckFailed(message)


def as_array(values) -> np.ndarray:
    """A numpy view of a torch tensor (on any device), a numpy array or a bytes-like buffer."""
    if hasattr(values, "detach"):  # torch.Tensor, without importing torch here
        return values.detach().cpu().numpy()
    if isinstance(values, (bytes, bytearray, memoryview)):
        return np.frombuffer(values, dtype=np.uint8)
    return np.asarray(values)


def require_equal(what: str, got, want) -> None:
    """``got`` holds exactly the values of ``want`` (same shape; dtypes may differ, values may not)."""
    got, want = as_array(got), as_array(want)
    require(got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}")
    if np.array_equal(got, want):
        return
    differing = np.argwhere(got != want)
    first = tuple(int(i) for i in differing[0])
    raise BenchmarkCheckFailed(f"{what}: {len(differing)} of {got.size} values differ; first at index {first}:"
                               f" {got[first].item()!r}, expected {want[first].item()!r}")


def require_keys(what: str, mapping: Mapping, keys: Iterable[str]) -> None:
    """Every one of ``keys`` is present in ``mapping``, with a finite number >= 0."""
    missing = [key for key in keys if key not in mapping]
    require(not missing, f"{what}: missing {', '.join(missing)} (present: {', '.join(sorted(mapping)) or 'nothing'})")
    for key in keys:
        require_non_negative(f"{what}: {key}", mapping[key])


def is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def require_non_negative(what: str, value) -> None:
    require(is_number(value) and value >= 0, f"{what} is {value!r}, expected a finite number >= 0")


def require_positive(what: str, value) -> None:
    require(is_number(value) and value > 0, f"{what} is {value!r}, expected a finite number > 0")
