"""Shared pytest configuration: the GPU skip, and torch seeded like every other random source.

pytest-randomly shuffles the tests (the seed is in pytest's header: rerun a failure with
``-p randomly --randomly-seed=N``) and reseeds ``random`` and numpy before each test from that seed
and the test's id; torch is seeded here from the same state, so a failure reproduces alone too."""

import random

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(trylast=True)  # after pytest-randomly has reseeded ``random`` for this test
def pytest_runtest_setup(item):
    torch.manual_seed(random.getrandbits(63))


_seconds_per_file: dict[str, float] = {}


def pytest_runtest_logreport(report):
    path = report.nodeid.split("::", 1)[0]
    _seconds_per_file[path] = _seconds_per_file.get(path, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    """Seconds per test file (set-up, call and tear-down; session fixtures count where first used),
    so the CI log shows where the suite's time goes (tests/README.md keeps the table)."""
    if not _seconds_per_file:
        return
    terminalreporter.section("seconds per test file")
    for path, seconds in sorted(_seconds_per_file.items(), key=lambda item: -item[1]):
        terminalreporter.write_line(f"{seconds:8.1f}  {path}")
