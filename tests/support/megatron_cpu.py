"""Running megatron-core's pipeline schedules on a machine without CUDA (only tests run them).

The schedules create tensors with ``device="cuda"``; ``pipeline_schedules_on_cpu()`` sends such
factory calls to the CPU while a schedule runs, and does nothing where there is a GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class _CudaFactoryCallsToCpu(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if (isinstance(device, torch.device) and device.type == "cuda") or (
                isinstance(device, str) and device.startswith("cuda")):
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


@contextlib.contextmanager
def pipeline_schedules_on_cpu() -> Iterator[None]:
    """Wrap megatron-core pipeline schedule calls with this."""
    if torch.cuda.is_available():
        yield
        return
    with _CudaFactoryCallsToCpu():
        yield
