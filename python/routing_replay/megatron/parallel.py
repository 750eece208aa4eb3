"""Process groups for megatron-core from a ParallelConfig (gloo on CPU, NCCL on GPU), and each
rank's device: the GPU it was given (a Ray actor sees only its own; under torchrun, LOCAL_RANK's).
``ParallelConfig`` lives in ``megatron.settings`` (torch-free: the job configuration imports it)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from routing_replay.megatron import cpu_workarounds, torch_adam_fixes
from routing_replay.megatron.settings import ParallelConfig
from routing_replay.ports import free_port


def initialize(parallel: ParallelConfig, *, rank: int = 0, world_size: int = 1, master_port: int | None = None,
               seed: int = 1234) -> None:
    """Initialises torch.distributed (if needed) and megatron-core's parallel state. Without
    ``master_port`` (single process) a free loopback port is used; multi-process callers pass one
    port to every rank, or set MASTER_ADDR/MASTER_PORT themselves.

    This is the process entry of megatron-core for every rank, test and benchmark, so it is the one
    place that applies our fixes to megatron-core (both idempotent, each only where it applies):
    ``cpu_workarounds`` without CUDA, ``torch_adam_fixes`` where torch's Adam stands in for FusedAdam.
    """
    from megatron.core import parallel_state

    cpu_workarounds.apply()
    torch_adam_fixes.apply()
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


def data_parallel_group() -> dist.ProcessGroup:
    """megatron-core's data-parallel group of this rank (``initialize`` made it)."""
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group()


def on_local_device(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` moved to this rank's GPU (set by ``initialize``); unchanged without CUDA."""
    if torch.cuda.is_available():
        return model.cuda(torch.cuda.current_device())
    return model
