"""Loads the native backends: ``_capture_cpu`` (always built) and ``_capture_cuda`` (optional).

The CUDA module links its CUDA runtime statically, so it runs only where the installed driver
supports that runtime's major version. That is checked here, at import: a module the driver cannot
run is refused with the reason (``cuda_unavailable_reason``), a warning is issued where torch sees
a GPU, and the CPU module stays usable. Without the check every launch would fail later, inside a
forward or a CUDA-graph capture.
"""

from __future__ import annotations

import warnings
from types import ModuleType

import torch

from routing_replay.capture import _capture_cpu

NUM_ERROR_KINDS: int = _capture_cpu.NUM_ERROR_KINDS


def _version_text(version: int) -> str:
    return f"{version // 1000}.{version % 1000 // 10}"


def driver_refusal(runtime_version: int, driver_version: int) -> str | None:
    """Why a module linking CUDA runtime ``runtime_version`` cannot run on a driver supporting
    ``driver_version`` (both 1000 * major + 10 * minor; a driver of 0 means none), else None.
    CUDA's minor-version compatibility lets any driver of the runtime's major (or newer) run it."""
    if driver_version == 0:
        return "no NVIDIA driver was found"
    if driver_version // 1000 < runtime_version // 1000:
        return (
            f"routing_replay's CUDA module links the CUDA {_version_text(runtime_version)} runtime but the "
            f"driver supports CUDA {_version_text(driver_version)}: upgrade the driver, or rebuild the module "
            f"with a CUDA {driver_version // 1000} toolkit (scripts/setup.sh builds it for the CUDA of the "
            "installed torch)"
        )
    return None


def _import_cuda_module() -> tuple[ModuleType | None, str | None]:
    try:
        from routing_replay.capture import _capture_cuda
    except ImportError as exc:  # built without a CUDA toolkit
        return None, (
            "routing_replay was built without its CUDA module (no CUDA toolkit at build time, or one newer "
            f"than torch's CUDA); reinstall with a matching nvcc on PATH. Import error: {exc}"
        )
    return _capture_cuda, None


built_cuda_module, _not_built = _import_cuda_module()
"""The CUDA module as built, whether or not this machine's driver can run it."""
cuda_unavailable_reason: str | None = _not_built or driver_refusal(
    built_cuda_module.runtime_version(), built_cuda_module.driver_version()
)
"""Why recording on CUDA is refused here, or None."""
_capture_cuda = built_cuda_module if cuda_unavailable_reason is None else None
if built_cuda_module is not None and _capture_cuda is None and torch.cuda.is_available():
    warnings.warn(f"routing_replay: CUDA recording disabled: {cuda_unavailable_reason}", RuntimeWarning, stacklevel=2)


def cuda_versions() -> dict[str, str | None]:
    """The CUDA versions that matter to the CUDA module, as "major.minor": the runtime it links,
    the driver's, and torch's (None: no module, no driver, or a CPU torch)."""
    module = built_cuda_module
    driver = module.driver_version() if module is not None else 0
    return {
        "module_runtime": _version_text(module.runtime_version()) if module is not None else None,
        "driver": _version_text(driver) if driver else None,
        "torch": torch.version.cuda,
    }


def cuda_backend_available() -> bool:
    """True when the CUDA module was built, the driver can run it, and torch sees a GPU."""
    return _capture_cuda is not None and torch.cuda.is_available()


def backend_for(device: torch.device) -> ModuleType:
    if device.type == "cpu":
        return _capture_cpu
    if device.type == "cuda":
        if _capture_cuda is None:
            raise RuntimeError(f"cannot record on {device}: {cuda_unavailable_reason}")
        return _capture_cuda
    raise ValueError(f"unsupported device {device}: the recorder runs on cpu or cuda")


def stream_handle(device: torch.device) -> int:
    """The raw cudaStream_t of the current stream on ``device`` (0 on CPU)."""
    if device.type != "cuda":
        return 0
    return torch.cuda.current_stream(device).cuda_stream
