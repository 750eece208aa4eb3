"""Worker for the learner tests: one rank trains a tiny Qwen3-MoE on its share of a fixed global
batch with megatron-core's DDP and optimizer (gloo), and writes what the test compares."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

GLOBAL_BATCH = 8


@dataclass(frozen=True)
class Run:
    model: str
    out: str
    expert: int = 1
    dtype: str = "float32"
    distributed: bool = False
    learning_rate: float = 1e-4
    steps: int = 2
    save_after: int | None = None
    """Save a checkpoint to ``out/ckpt`` after this many steps (then keep training)."""
    load: str | None = None
    """Start from this checkpoint directory."""
    grads: bool = False
    """Write each rank's reduced gradients of the first step under global names."""
    extra: dict = field(default_factory=dict)


def sequences(step: int) -> list[list[int]]:
    """The global batch of ``step``: the same on every rank and in every run."""
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randint(3, 400, (int(n),), generator=gen).tolist()
            for n in torch.randint(6, 14, (GLOBAL_BATCH,), generator=gen)]


def loss_of(model, step: int) -> tuple[torch.Tensor, float]:
    """This data-parallel rank's share of the global token-mean NLL (summed over ranks it is the
    global mean), and the global mean's value."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from routing_replay.megatron.logprobs import Batch, score

    everything = sequences(step)
    size, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    share = everything[rank * len(everything) // size: (rank + 1) * len(everything) // size]
    scores = score(model, Batch.from_sequences(share))
    total_tokens = sum(len(s) - 1 for s in everything)
    loss = -(scores.logprobs * scores.valid).sum() / total_tokens
    value = loss.detach().clone()
    dist.all_reduce(value, group=ps.get_data_parallel_group())
    return loss, float(value)


def worker(rank: int, world: int, port: int, run: Run) -> None:
    from megatron.core import parallel_state as ps

    from transformers import AutoConfig

    from routing_replay.megatron.hf_checkpoint import build_model, export_hf
    from routing_replay.megatron.learner import Learner, OptimizerSettings, state_digest
    from routing_replay.megatron.parallel import ParallelConfig, initialize

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    initialize(ParallelConfig(expert=run.expert), rank=rank, world_size=world, master_port=port, seed=0)
    model = build_model(run.model, ParallelConfig(expert=run.expert), dtype=getattr(torch, run.dtype))
    learner = Learner(model, OptimizerSettings(learning_rate=run.learning_rate, warmup_steps=1, decay="cosine",
                                               total_steps=10, distributed=run.distributed))
    out = Path(run.out)
    first = 0
    if run.load is not None:
        learner.load(run.load)
        first = learner.steps_taken
    record = {"losses": [], "grad_norms": [], "learning_rates": []}
    for step in range(first, first + run.steps):
        if run.save_after is not None and step - first == run.save_after:
            learner.save(out / "ckpt")
            record["digest_at_save"] = state_digest(learner)
        learner.zero_grad()
        loss, value = loss_of(model, step)
        loss.backward()
        result = learner.step()
        if run.grads and step == first:
            _write_grads(model, out / f"grads-rank{rank}.pt", ps)
        record["losses"].append(value)
        record["grad_norms"].append(result.grad_norm)
        record["learning_rates"].append(result.learning_rate)
    record["digest"] = state_digest(learner)
    weights = export_hf(model, AutoConfig.from_pretrained(run.model))  # collective
    if rank == 0:
        torch.save({name: t.float() for name, t in weights.items()}, out / "weights.pt")
    (out / f"record-rank{rank}.json").write_text(json.dumps(record))
    torch.distributed.barrier()


def _write_grads(model, path: Path, ps) -> None:
    """This rank's reduced fp32 gradients (``main_grad``) under global expert numbers."""
    per_rank = model.config.num_moe_experts // ps.get_expert_model_parallel_world_size()
    first_expert = ps.get_expert_model_parallel_rank() * per_rank
    grads = {}
    for name, param in model.named_parameters():
        marker = ".local_experts."
        if marker in name:
            head, tail = name.split(marker)
            local, rest = tail.split(".", 1)
            name = f"{head}{marker}{first_expert + int(local)}.{rest}"
        grads[name] = param.main_grad.detach().float().clone()
    torch.save(grads, path)
