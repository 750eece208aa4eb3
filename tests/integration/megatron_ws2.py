"""Worker for the world-size-2 replay tests (run in two spawned processes with gloo)."""

from __future__ import annotations

import os

import torch


def worker(rank: int, world: int, tensor: int, expert: int, dispatcher: str, port: int, path: str) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from routing_replay.megatron.hf_checkpoint import build_model
    from routing_replay.megatron.logprobs import Batch, score
    from routing_replay.megatron.parallel import ParallelConfig, initialize
    from routing_replay.megatron.replay import ModelReplay
    from tests.support.token_order import sequence_parallel_shard

    os.environ["MASTER_PORT"] = str(port)
    parallel = ParallelConfig(tensor=tensor, expert=expert, sequence_parallel=tensor > 1)
    initialize(parallel, rank=rank, world_size=world, seed=1234)
    model = build_model(path, parallel, load_weights=False, dispatcher=dispatcher)
    replay = ModelReplay(model)
    dp_rank = ps.get_data_parallel_rank()
    gen = torch.Generator().manual_seed(100 + dp_rank)  # TP ranks share a micro-batch; DP ranks do not
    batch = Batch.from_sequences(torch.randint(5, 300, (2, 16), generator=gen).tolist())

    with torch.no_grad(), replay.recording() as recorded:
        before = score(model, batch).logprobs
    with torch.no_grad(), replay.replaying(recorded):
        again = score(model, batch).logprobs
    assert torch.equal(before, again), f"rank {rank}: record -> replay changed the log-probs"

    routed = batch.tokens.numel()
    full = [torch.rand(routed, 8, generator=torch.Generator().manual_seed(7 + dp_rank)).argsort(1)[:, :2]
            for _ in range(replay.num_layers)]
    tp_rank = ps.get_tensor_model_parallel_rank()
    mine = [sequence_parallel_shard(f, tp_rank, tensor) for f in full]
    maps = []
    hooks = [r.register_forward_hook(lambda m, i, o: maps.append(o[1].detach())) for r in replay.routers]
    with replay.replaying(mine):  # verification inside raises if any rank routes differently
        (-score(model, batch).logprobs.mean()).backward()
    for h in hooks:
        h.remove()
    if tensor > 1:  # the TP ranks' maps together are the whole micro-batch's injected routing
        for routing_map, ids in zip(maps, full):
            parts = [torch.empty_like(routing_map) for _ in range(tensor)]
            dist.all_gather(parts, routing_map.contiguous(), group=ps.get_tensor_model_parallel_group())
            assert torch.equal(torch.cat(parts), torch.zeros(routed, 8, dtype=torch.bool).scatter(1, ids, True))
    assert all(r.weight.grad is not None and r.weight.grad.abs().sum() > 0 for r in replay.routers)
    ps.destroy_model_parallel()
    dist.destroy_process_group()


def parity_worker(rank: int, world: int, tensor: int, expert: int, port: int, path: str) -> None:
    """Each rank loads its shard of the checkpoint; full logits must equal transformers', and the
    export gathered from the shards must equal the checkpoint bit for bit."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from transformers import AutoModelForCausalLM

    from routing_replay.megatron.hf_checkpoint import build_model
    from routing_replay.megatron.logprobs import Batch
    from routing_replay.megatron.parallel import ParallelConfig, initialize

    os.environ["MASTER_PORT"] = str(port)
    parallel = ParallelConfig(tensor=tensor, expert=expert, sequence_parallel=tensor > 1)
    initialize(parallel, rank=rank, world_size=world)
    model = build_model(path, parallel, dispatcher="alltoall" if expert > 1 else "allgather").eval()
    tokens = torch.randint(5, 300, (2, 16), generator=torch.Generator().manual_seed(3 + ps.get_data_parallel_rank()))
    batch = Batch.from_sequences(tokens.tolist())
    with torch.no_grad():
        ours = model(batch.tokens, batch.positions(), attention_mask=batch.attention_mask())[..., : model.vocab_size]
        want = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(tokens).logits
    assert (ours - want).abs().max() < 1e-5, f"rank {rank}: max |dlogits| {(ours - want).abs().max()}"
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from routing_replay.megatron.hf_checkpoint import export_hf

    original = load_file(f"{path}/model.safetensors")
    exported = export_hf(model, AutoConfig.from_pretrained(path))  # gathered from both ranks
    assert set(exported) == set(original)
    assert all(torch.equal(exported[k], original[k]) for k in original), f"rank {rank}: export differs"
    ps.destroy_model_parallel()
    dist.destroy_process_group()


def pipeline_worker(rank: int, world: int, port: int, path: str) -> None:
    """Two pipeline stages: each loads its layers; the last stage's logits equal transformers', and
    replaying the routing recorded on each stage reproduces them exactly; export gathers the stages."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from transformers import AutoModelForCausalLM

    from routing_replay.megatron.hf_checkpoint import build_model
    from routing_replay.megatron.logprobs import Batch
    from routing_replay.megatron.parallel import ParallelConfig, initialize
    from routing_replay.megatron.replay import ModelReplay
    from tests.support.megatron_cpu import pipeline_schedules_on_cpu

    os.environ["MASTER_PORT"] = str(port)
    initialize(ParallelConfig(pipeline=2), rank=rank, world_size=world)
    model = build_model(path, ParallelConfig(pipeline=2)).eval()
    replay = ModelReplay(model)
    tokens = torch.randint(5, 300, (2, 16), generator=torch.Generator().manual_seed(4))
    batch = Batch.from_sequences(tokens.tolist())
    outputs = []

    def forward_step(data_iterator, stage_model):
        output = stage_model(batch.tokens, batch.positions(), attention_mask=batch.attention_mask())

        def keep(out):
            outputs.append(out.detach())
            return out.sum() * 0, {}

        return output, keep

    def run():
        outputs.clear()
        with pipeline_schedules_on_cpu():
            get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([None]), model=[model],
                                        num_microbatches=1, seq_length=16, micro_batch_size=2, forward_only=True)
        return outputs[0] if outputs else None

    with torch.no_grad(), replay.recording() as recorded:
        logits = run()
    with torch.no_grad(), replay.replaying(recorded):
        again = run()
    assert len(replay.routers) == 1  # each stage holds one of the two MoE layers
    if ps.is_pipeline_last_stage():
        want = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(tokens).logits
        assert (logits[..., : model.vocab_size] - want).abs().max() < 1e-5
        assert torch.equal(logits, again)
    # Export gathers both stages' layers (global layer numbers) on every stage: exactly the checkpoint.
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from routing_replay.megatron.hf_checkpoint import export_hf

    exported = export_hf(model, AutoConfig.from_pretrained(path))
    original = load_file(f"{path}/model.safetensors")
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[name], original[name]) for name in original)
    ps.destroy_model_parallel()
    dist.destroy_process_group()
