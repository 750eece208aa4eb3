"""Exceptions raised by the capture package."""


class InvalidRoutingInput(ValueError):
    """An argument to a recorder call is malformed: wrong dtype, shape, device, layout, layer id,
    expert id or slot. Raised before anything is written."""


class RoutingCaptureError(RuntimeError):
    """The CUDA kernels skipped rows with bad input since the previous gather (they cannot raise
    inside the kernel or a CUDA graph, so they count). Raised when the gather that observes the
    counts is waited on; the counts are then cleared."""


class MissingRoutingError(LookupError):
    """Rows that should hold routing were never recorded (or were reset)."""
