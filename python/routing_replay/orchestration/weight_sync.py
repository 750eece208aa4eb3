"""Trainer -> engine weight broadcast through SGLang's ``update_weights_from_distributed``.

Trainer rank 0 and every engine's tensor-parallel ranks form one process group (gloo on CPU, NCCL
on GPU) outside the trainer's own; rank 0 broadcasts each Hugging Face-named tensor and SGLang
loads it as it arrives. SGLang builds its side with ``init_custom_process_group`` (a TCP
rendezvous, a store prefixed by the group name, torch's process-group helper); ``open_group`` builds
the trainer's side the same way, so both agree on every store key. No pickle: tensors go as raw
collectives, names/dtypes/shapes as the JSON of SGLang's HTTP request.
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class TensorMeta:
    names: tuple[str, ...]
    dtypes: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, named: dict[str, torch.Tensor]) -> TensorMeta:
        names = tuple(sorted(named))
        return cls(names, tuple(str(named[n].dtype).removeprefix("torch.") for n in names),
                   tuple(tuple(named[n].shape) for n in names))


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


def broadcast(named: dict[str, torch.Tensor], meta: TensorMeta, pg) -> None:
    """Sends every tensor of ``meta`` in its order (the order the engines receive in)."""
    import torch.distributed as dist

    if tuple(sorted(named)) != meta.names:
        raise ValueError("the model's exported tensors differ from the announced ones")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    handles = [dist.broadcast(named[name].to(device).contiguous(), src=0, group=pg, async_op=True)
               for name in meta.names]
    for handle in handles:
        handle.wait()
