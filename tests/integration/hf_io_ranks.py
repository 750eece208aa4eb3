"""Worker for the sharded Hugging Face I/O tests: one spawned gloo rank per process."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

# Hugging Face tensors megatron-core cuts over the (expert-)tensor-parallel ranks; the rest is replicated.
TP_SHARDED = re.compile(r"(embed_tokens|lm_head|self_attn\.[qkvo]_proj|(gate|up|down)_proj)\.weight$")


def expected_bytes(headers: dict[str, tuple[tuple[int, ...], int]], *, tp_rank: int, tp: int, ep_rank: int, ep: int,
                   stage: int, stages: int, experts: int, layers: int) -> int:
    """Bytes of checkpoint tensors a rank needs: its stage's layers, its expert-parallel rank's
    experts, and of each tensor-parallel tensor its 1/tp of the rows or columns (vocabulary rows
    split by megatron's padded chunks)."""
    layers_per_stage = layers // stages
    total = 0
    for name, (shape, nbytes) in headers.items():
        layer = re.search(r"layers\.(\d+)\.", name)
        owner = int(layer[1]) // layers_per_stage if layer else 0 if "embed_tokens" in name else stages - 1
        expert = re.search(r"experts\.(\d+)\.", name)
        if owner != stage or (expert and int(expert[1]) // (experts // ep) != ep_rank):
            continue
        if not TP_SHARDED.search(name) or tp == 1:
            total += nbytes
        elif "embed_tokens" in name or "lm_head" in name:
            chunk = -(-shape[0] // tp)
            total += nbytes // shape[0] * (min(shape[0], (tp_rank + 1) * chunk) - min(shape[0], tp_rank * chunk))
        else:
            total += nbytes // tp
    return total


def megatron_shard(name: str, full: torch.Tensor, param, size: int, rank: int) -> torch.Tensor:
    """megatron-core's own cut of a full Megatron tensor over ``size`` (expert-)tensor-parallel
    ranks: GLU fc1 halves cut separately, q/k/v by contiguous query groups, the vocabulary padded."""
    if not getattr(param, "tensor_model_parallel", False) or size == 1:
        return full
    dim = param.partition_dim
    if name.endswith("linear_fc1.weight"):
        return torch.cat([half.chunk(size, dim=dim)[rank] for half in full.chunk(2, dim=0)])
    if dim == 0 and full.shape[0] < param.shape[0] * size:
        full = torch.cat([full, full.new_zeros(param.shape[0] * size - full.shape[0], *full.shape[1:])])
    return full.chunk(size, dim=dim)[rank]


def load_and_save(rank: int, world: int, tensor: int, expert: int, pipeline: int, port: int, checkpoint: str,
                  reference: str, out_dir: str, max_shard_bytes: int) -> None:
    """Loads this rank's part of a sharded checkpoint: every parameter must equal megatron's cut of
    the world-1 model, and the bytes read must be exactly what the rank holds (also reported as
    ``read-rank{rank}`` next to ``out_dir``). Then ``save_hf`` from the shards: rank 0 writes
    ``out_dir``; the others get a decoy directory they must not create."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from safetensors import safe_open
    from transformers import AutoConfig

    from routing_replay.megatron.hf_checkpoint import build_model, save_hf
    from routing_replay.megatron.parallel import ParallelConfig, initialize

    os.environ["MASTER_PORT"] = str(port)
    parallel = ParallelConfig(tensor=tensor, expert=expert, pipeline=pipeline)
    initialize(parallel, rank=rank, world_size=world)
    hf_config = AutoConfig.from_pretrained(checkpoint)
    model = build_model(checkpoint, parallel)

    full = torch.load(reference, weights_only=True)
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    etp_rank = ps.get_expert_tensor_parallel_rank()  # expert-TP size is the TP size here
    ep_rank, stage = ps.get_expert_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    experts_per_rank, first_layer = hf_config.num_experts // expert, stage * hf_config.num_hidden_layers // pipeline
    local = {n: p for n, p in model.state_dict(keep_vars=True).items() if not n.endswith("_extra_state")}
    for name, param in local.items():
        name_global = re.sub(r"^decoder\.layers\.(\d+)\.", lambda m: f"decoder.layers.{int(m[1]) + first_layer}.", name)
        name_global = re.sub(r"local_experts\.(\d+)\.",
                             lambda m: f"local_experts.{int(m[1]) + ep_rank * experts_per_rank}.", name_global)
        want = megatron_shard(name, full[name_global], param, tp, etp_rank if "local_experts" in name else tp_rank)
        assert torch.equal(param.detach(), want), f"rank {rank}: {name} ({name_global}) differs from megatron's cut"

    index = json.loads((Path(checkpoint) / "model.safetensors.index.json").read_text())
    headers = {}
    for name, file in index["weight_map"].items():
        part = safe_open(str(Path(checkpoint) / file), framework="pt").get_slice(name)
        shape = tuple(part.get_shape())
        headers[name] = (shape, torch.Size(shape).numel() * 4)  # float32 checkpoint
    want = expected_bytes(headers, tp_rank=tp_rank, tp=tp, ep_rank=ep_rank, ep=expert, stage=stage, stages=pipeline,
                          experts=hf_config.num_experts, layers=hf_config.num_hidden_layers)
    assert model.hf_bytes_read == want, f"rank {rank}: read {model.hf_bytes_read} bytes, holds {want}"
    assert want < index["metadata"]["total_size"]
    (Path(out_dir).parent / f"read-rank{rank}").write_text(str(model.hf_bytes_read))

    decoy = Path(out_dir).with_name(f"decoy-rank{rank}")
    written = save_hf(model, hf_config, out_dir if rank == 0 else decoy, write=rank == 0,
                      max_shard_bytes=max_shard_bytes)
    assert (written is not None) == (rank == 0) and not decoy.exists()
    ps.destroy_model_parallel()
    dist.destroy_process_group()
