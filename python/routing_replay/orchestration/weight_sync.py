"""Trainer -> engine weight broadcast through SGLang's ``update_weights_from_distributed``.

Trainer rank 0 and every engine's tensor-parallel ranks form one process group (gloo on CPU, NCCL
on GPU) outside the trainer's own; rank 0 broadcasts each Hugging Face-named tensor and SGLang
loads it as it arrives. SGLang builds its side with ``init_custom_process_group`` (a TCP
rendezvous, a store prefixed by the group name, torch's process-group helper); ``open_group`` builds
the trainer's side the same way, so both agree on every store key. No pickle: tensors go as raw
collectives, names/dtypes/shapes as the JSON of SGLang's HTTP request.

The weights go in buckets of at most ``BUCKET_BYTES``: the trainer ranks stream the model to rank 0
(``hf_checkpoint.iter_hf_buckets``), which broadcasts each tensor as it arrives, and each engine
receives and loads one bucket per ``update_weights_from_distributed`` call (``TensorMeta.buckets``
splits the same way on both sides), so neither side ever holds the whole model twice.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from datetime import timedelta

import torch


@dataclass(frozen=True)
class WeightGroup:
    """Where and how the trainer and the engines meet."""

    master_address: str
    master_port: int
    world_size: int
    """1 (trainer rank 0) + every engine's tensor-parallel ranks."""
    name: str
    backend: str


BUCKET_BYTES = 512 << 20
"""The bound on one weight-broadcast bucket (a larger tensor goes alone)."""


@dataclass(frozen=True)
class TensorMeta:
    """The Hugging Face tensors a broadcast sends, in the order it sends them."""

    names: tuple[str, ...]
    dtypes: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of_model(cls, model, hf_config) -> TensorMeta:
        """What ``broadcast_model`` sends for ``model``, without exporting it (no collective)."""
        from routing_replay.megatron.hf_checkpoint import hf_tensor_meta

        entries = hf_tensor_meta(model, hf_config)
        return cls(tuple(name for name, _, _ in entries),
                   tuple(str(dtype).removeprefix("torch.") for _, dtype, _ in entries),
                   tuple(shape for _, _, shape in entries))

    def _nbytes(self, i: int) -> int:
        return math.prod(self.shapes[i]) * getattr(torch, self.dtypes[i]).itemsize

    def buckets(self, bucket_bytes: int = BUCKET_BYTES) -> list[TensorMeta]:
        """Consecutive runs of tensors of at most ``bucket_bytes`` each (a larger tensor alone)."""
        if bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes must be positive, not {bucket_bytes}")
        spans: list[list[int]] = []
        size = 0
        for i in range(len(self.names)):
            if not spans or size + self._nbytes(i) > bucket_bytes:
                spans.append([])
                size = 0
            spans[-1].append(i)
            size += self._nbytes(i)
        return [TensorMeta(tuple(self.names[i] for i in span), tuple(self.dtypes[i] for i in span),
                           tuple(self.shapes[i] for i in span)) for span in spans]


def open_group(group: WeightGroup, timeout: float = 300.0):
    """The trainer's end (rank 0) of ``group``; blocks until every engine rank has joined."""
    from torch.distributed.distributed_c10d import (
        Backend,
        PrefixStore,
        _new_process_group_helper,
        _world,
        rendezvous,
    )

    store, rank, world = next(rendezvous(f"tcp://{group.master_address}:{group.master_port}", 0, group.world_size,
                                         timeout=timedelta(seconds=timeout)))
    store.set_timeout(timedelta(seconds=timeout))
    pg, _ = _new_process_group_helper(world, rank, [], Backend(group.backend), PrefixStore(group.name, store),
                                      group_name=group.name, backend_options=None, timeout=timedelta(seconds=timeout))
    _world.pg_group_ranks[pg] = {i: i for i in range(world)}  # as SGLang does: collectives look ranks up here
    return pg


def broadcast_model(model, hf_config, meta: TensorMeta, pg, bucket_bytes: int = BUCKET_BYTES) -> None:
    """Streams the model's Hugging Face tensors to trainer rank 0, which broadcasts them over ``pg``
    (its weight group; None on the other ranks) bucket by bucket, as the engines receive them.
    Collective over the trainer ranks. ``meta`` is checked on every rank before anything is sent, so
    a stale announcement fails everywhere instead of leaving ranks waiting."""
    import torch.distributed as dist

    from routing_replay.megatron.hf_checkpoint import iter_hf_buckets

    rank = dist.get_rank() if dist.is_initialized() else 0
    if (pg is not None) != (rank == 0):
        raise ValueError(f"trainer rank 0, and only it, broadcasts to the engines (rank {rank} "
                         f"{'has' if pg is not None else 'lacks'} a weight group)")
    if TensorMeta.of_model(model, hf_config) != meta:
        raise ValueError("the model's Hugging Face tensors differ from the announced ones")
    ends = itertools.accumulate(len(bucket.names) for bucket in meta.buckets(bucket_bytes))
    end, sent, pending = next(ends, 0), 0, []
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for streamed in iter_hf_buckets(model, hf_config, bucket_bytes, dst=0):
        for tensor in streamed.values():
            pending.append(dist.broadcast(tensor.to(device), src=0, group=pg, async_op=True))
            sent += 1
            if sent == end:  # the engines load this bucket before they take the next
                for handle in pending:
                    handle.wait()
                end, pending = next(ends, 0), []
