"""Capture: record the top-k expert ids an inference engine used, compactly, keyed by KV slot.

A ``RoutingRecorder`` owns one preallocated ``[num_slots, num_layers, top_k]`` buffer of the
smallest dtype that holds every expert id (``RoutingLayout``: uint8 up to 256 experts, else int16),
plus a validity bitmask beside it. The engine calls ``record`` once per MoE layer per forward and
``gather`` once per finished request; rows of a cached prefix stay valid because they are keyed by
the KV slot, not by the request. ``reset`` marks freed slots unwritten.

The kernels are native (``_capture_cpu`` always, ``_capture_cuda`` when built with a CUDA
toolkit). They link no libtorch: this facade validates tensors and passes raw pointers, so one
build serves any torch version. This package imports torch only: never sglang, megatron or ray.
"""

from routing_replay.capture.errors import InvalidRoutingInput, MissingRoutingError, RoutingCaptureError
from routing_replay.capture.layout import RoutingLayout
from routing_replay.capture.native import cuda_backend_available
from routing_replay.capture.recorder import GatherHandle, RoutingRecorder, RoutingRows
from routing_replay.capture import ops as _ops  # noqa: F401  (registers torch.ops.routing_replay.record)

__all__ = [
    "GatherHandle",
    "InvalidRoutingInput",
    "MissingRoutingError",
    "RoutingCaptureError",
    "RoutingLayout",
    "RoutingRecorder",
    "RoutingRows",
    "cuda_backend_available",
]
