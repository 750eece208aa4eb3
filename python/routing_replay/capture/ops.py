"""The recorder's record call as a torch.library custom op, so ``torch.compile`` keeps it opaque.

Eager callers go straight to the native module (the op dispatcher costs more than the kernel at
small batches); ``RoutingRecorder.record`` switches to this op only while torch.compile traces.
The op mutates the recorder's tensors in place and returns nothing; on CUDA it launches on the
current stream without allocating or syncing, so it is also safe inside CUDA-graph capture.
"""

from __future__ import annotations

import torch

from routing_replay.capture import native
from routing_replay.capture.recorder import launch_record, make_view


@torch.library.custom_op("routing_replay::record", mutates_args=("ids", "valid_bits", "error_counts"))
def record(
    ids: torch.Tensor,
    valid_bits: torch.Tensor,
    error_counts: torch.Tensor,
    slots: torch.Tensor,
    topk_ids: torch.Tensor,
    valid_rows: torch.Tensor | None,
    layer_id: int,
    n_rows: int,
    num_experts: int,
) -> None:
    backend = native.backend_for(ids.device)
    view = make_view(backend, ids, valid_bits, error_counts, num_experts)
    launch_record(backend, view, ids.device, layer_id, slots, topk_ids, n_rows, valid_rows)


@record.register_fake
def _(ids, valid_bits, error_counts, slots, topk_ids, valid_rows, layer_id, n_rows, num_experts) -> None:
    return None
