"""The build produced what this machine can build."""

import re
import shutil
from pathlib import Path

import pytest
import torch

from routing_replay.capture import native


def test_cpu_module_is_always_built():
    assert native._capture_cpu.NUM_ERROR_KINDS == 4


@pytest.mark.skipif(shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").exists(),
                    reason="no CUDA toolkit on this machine")
def test_cuda_module_is_built_where_a_toolkit_exists():
    # Building needs only nvcc; running needs a GPU (tests/gpu). Importing needs neither.
    assert native.built_cuda_module is not None, "nvcc is installed but the CUDA module was not built"
    assert native.built_cuda_module.NUM_ERROR_KINDS == native._capture_cpu.NUM_ERROR_KINDS


@pytest.mark.parametrize(("runtime", "driver", "refused"), [
    (13000, 13020, None),  # newer minor: fine
    (13020, 13000, None),  # older minor of the same major: CUDA's minor-version compatibility
    (13000, 12080, "links the CUDA 13.0 runtime but the driver supports CUDA 12.8"),
    (12080, 0, "no NVIDIA driver"),
])
def test_a_driver_older_than_the_modules_cuda_major_is_refused_with_the_reason(runtime, driver, refused):
    reason = native.driver_refusal(runtime, driver)
    assert reason is None if refused is None else refused in reason


def test_without_a_usable_cuda_module_the_cpu_module_still_records_and_cuda_names_the_reason():
    from routing_replay.capture import RoutingLayout, RoutingRecorder

    versions = native.cuda_versions()
    assert set(versions) == {"module_runtime", "driver", "torch"}
    if native.cuda_unavailable_reason is None:
        pytest.skip("this machine can run the CUDA module")
    RoutingRecorder(RoutingLayout(2, 2, 8), num_slots=4).record(0, torch.tensor([1]), torch.tensor([[0, 1]]))
    with pytest.raises(RuntimeError, match="cannot record on cuda:0: " + re.escape(native.cuda_unavailable_reason)):
        native.backend_for(torch.device("cuda", 0))
