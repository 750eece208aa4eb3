"""Process groups for megatron-core from a ParallelConfig (gloo on CPU, NCCL on GPU), and each
rank's device: the GPU it was given (a Ray actor sees only its own; under torchrun, LOCAL_RANK's)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from routing_replay.megatron import cpu_workarounds
from routing_replay.ports import free_port


@dataclass(frozen=True)
class ParallelConfig:
    tensor: int = 1
    """Tensor-parallel size."""
    expert: int = 1
    """Expert-parallel size."""
    pipeline: int = 1
    """Pipeline-parallel size."""
    sequence_parallel: bool = False
    """Shard activations along the sequence across the tensor-parallel group (needs tensor > 1)."""
    context: int = 1
    """Context-parallel size. megatron-core needs TransformerEngine attention for it (not on CPU);
    replay rows for it come from ``replay.context_parallel_rows``."""


def initialize(parallel: ParallelConfig, *, rank: int = 0, world_size: int = 1, master_port: int | None = None,
               seed: int = 1234) -> None:
    """Initialises torch.distributed (if needed) and megatron-core's parallel state. Without
    ``master_port`` (single process) a free loopback port is used; multi-process callers pass one
    port to every rank, or set MASTER_ADDR/MASTER_PORT themselves."""
    from megatron.core import parallel_state

    cpu_workarounds.apply()
    if torch.cuda.is_available():  # before NCCL starts: its communicator binds to the current device
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if master_port is not None:
            os.environ["MASTER_PORT"] = str(master_port)
        elif world_size == 1 or "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(free_port())
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor, pipeline_model_parallel_size=parallel.pipeline,
            expert_model_parallel_size=parallel.expert, context_parallel_size=parallel.context,
        )
    cpu_workarounds.seed_rng(seed)



def on_local_device(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` moved to this rank's GPU (set by ``initialize``); unchanged without CUDA."""
    if torch.cuda.is_available():
        return model.cuda(torch.cuda.current_device())
    return model
