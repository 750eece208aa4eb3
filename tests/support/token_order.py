"""Megatron token-order references the tests check replay against: which sequence-major rows a
sequence-parallel or context-parallel rank's routers see (the trainer itself never slices rows:
megatron-core does, inside the model)."""

from __future__ import annotations

import torch


def sequence_parallel_shard(rows: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """The rows a tensor-parallel rank's routers see under sequence parallelism: Megatron splits
    the sequence dimension, and rows are sequence-major, so rank r takes the r-th contiguous chunk."""
    if rows.shape[0] % size:
        raise ValueError(f"{rows.shape[0]} rows do not split evenly over {size} sequence-parallel ranks")
    chunk = rows.shape[0] // size
    return rows[rank * chunk : (rank + 1) * chunk]


def context_parallel_positions(seq_len: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Sequence positions a context-parallel rank holds: Megatron splits the sequence into
    ``2 * cp_size`` chunks and gives rank r chunks r and ``2 * cp_size - 1 - r`` (causal load balance)."""
    if seq_len % (2 * cp_size):
        raise ValueError(f"sequence length {seq_len} is not divisible by 2 x context-parallel size {cp_size}")
    chunk = seq_len // (2 * cp_size)
    first, second = cp_rank * chunk, (2 * cp_size - 1 - cp_rank) * chunk
    return torch.cat([torch.arange(first, first + chunk), torch.arange(second, second + chunk)])


def context_parallel_rows(rows: torch.Tensor, batch: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """The sequence-major rows (``[S * B, ...]``) a context-parallel rank's routers see, in its order."""
    seq_len = rows.shape[0] // batch
    local = rows.view(seq_len, batch, *rows.shape[1:])[context_parallel_positions(seq_len, cp_size, cp_rank)]
    return local.reshape(-1, *rows.shape[1:])
