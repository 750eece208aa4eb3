"""The build produced what this machine can build."""

import shutil
from pathlib import Path

import pytest

from routing_replay.capture import native


def test_cpu_module_is_always_built():
    assert native._capture_cpu.NUM_ERROR_KINDS == 4


@pytest.mark.skipif(shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").exists(),
                    reason="no CUDA toolkit on this machine")
def test_cuda_module_is_built_where_a_toolkit_exists():
    # Building needs only nvcc; running needs a GPU (tests/gpu). Importing needs neither.
    assert native._capture_cuda is not None, "nvcc is installed but the CUDA module was not built"
    assert native._capture_cuda.NUM_ERROR_KINDS == native._capture_cpu.NUM_ERROR_KINDS
