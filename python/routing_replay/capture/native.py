"""Loads the native backends: ``_capture_cpu`` (always built) and ``_capture_cuda`` (optional)."""

from __future__ import annotations

from types import ModuleType

import torch

from routing_replay.capture import _capture_cpu

try:
    from routing_replay.capture import _capture_cuda
except ImportError as exc:  # built without a CUDA toolkit
    _capture_cuda = None
    _cuda_import_error: ImportError | None = exc
else:
    _cuda_import_error = None

NUM_ERROR_KINDS: int = _capture_cpu.NUM_ERROR_KINDS


def cuda_backend_available() -> bool:
    """True when the CUDA module was built and torch sees a GPU."""
    return _capture_cuda is not None and torch.cuda.is_available()


def backend_for(device: torch.device) -> ModuleType:
    if device.type == "cpu":
        return _capture_cpu
    if device.type == "cuda":
        if _capture_cuda is None:
            raise RuntimeError(
                "routing_replay was built without its CUDA module (no CUDA toolkit at build time); "
                f"reinstall with nvcc on PATH to record on {device}. Import error: {_cuda_import_error}"
            )
        return _capture_cuda
    raise ValueError(f"unsupported device {device}: the recorder runs on cpu or cuda")


def stream_handle(device: torch.device) -> int:
    """The raw cudaStream_t of the current stream on ``device`` (0 on CPU)."""
    if device.type != "cuda":
        return 0
    return torch.cuda.current_stream(device).cuda_stream
