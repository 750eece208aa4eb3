"""One trainer step on CUDA: the model on the rank's GPU, NCCL, megatron-core DDP and optimizer
(bf16 with fp32 main params), R2 and R3 replay verified inside the step, and a dist checkpoint;
compact (uint8) routing placed on the GPU exactly as on the CPU.

Skipped without a GPU (tests/conftest.py); run on a lent GPU machine.
"""

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    from routing_replay.tiny_models import build

    return str(build("qwen3_moe", tmp_path_factory.mktemp("cuda-trainer") / "qwen3", layers=2, seed=3))


def test_one_replayed_bf16_step_on_the_gpu(tiny, tmp_path):
    import torch.distributed as dist

    from routing_replay.megatron.hf_checkpoint import build_model
    from routing_replay.megatron.learner import Learner, OptimizerSettings, state_digest
    from routing_replay.megatron.logprobs import Batch, score
    from routing_replay.megatron.parallel import ParallelConfig, initialize, on_local_device
    from routing_replay.megatron.replay import ModelReplay, RecordedRouting

    initialize(ParallelConfig())
    assert dist.get_backend() == "nccl"
    model = on_local_device(build_model(tiny, dtype=torch.bfloat16))
    assert next(model.parameters()).is_cuda
    learner = Learner(model, OptimizerSettings(learning_rate=1e-6, warmup_steps=0))
    replay = ModelReplay(model)
    gen = torch.Generator().manual_seed(0)
    batch = Batch.from_sequences(torch.randint(5, 300, (3, 24), generator=gen).tolist())
    with torch.no_grad(), replay.recording() as old_routing:  # R2: the old policy's own routing
        old = score(model, batch)
    keys = ["a", "b", "c"]
    store = RecordedRouting(model.config.num_moe_experts)  # as the trainer keeps it: compact, on the host
    store.add(keys, old_routing, batch.lengths.tolist())
    held = store.indices_for(keys, batch.tokens.shape[1], "cuda")
    assert held.ids.is_cuda and held.ids.dtype == torch.uint8
    learner.zero_grad()
    with replay.replaying(held):
        scores = score(model, batch)
        assert torch.equal(scores.logprobs, old.logprobs)  # replay of its own routing: the same forward
        loss = -(scores.logprobs * scores.valid).sum() / scores.valid.sum()
        loss.backward()
    assert replay.report().coverage == 1.0
    before = {name: main.clone() for name, main in learner.main_params().items()}
    result = learner.step()
    assert result.updated and result.grad_norm > 0
    moved = [name for name, main in learner.main_params().items() if not torch.equal(main, before[name])]
    assert moved, "no fp32 main param moved at lr 1e-6"
    # R3: another routing (a permutation of each token's experts would not differ: shift them).
    shifted = [(indices + 1) % model.config.num_moe_experts for indices in old_routing]
    with replay.replaying(shifted):
        learner.zero_grad()
        loss = -score(model, batch).logprobs.mean()
        loss.backward()
    assert learner.step().updated
    learner.save(tmp_path / "ckpt")
    saved = state_digest(learner)
    fresh = Learner(on_local_device(build_model(tiny, dtype=torch.bfloat16)), learner.settings)
    fresh.load(tmp_path / "ckpt")
    assert state_digest(fresh) == saved


def test_compact_routing_is_placed_on_the_gpu_as_on_the_cpu():
    """Pinned staging, one asynchronous copy and the strided placement on the device give what the
    CPU placement gives, in the received dtype."""
    from routing_replay.megatron.replay import rollout_to_router_indices

    gen = torch.Generator().manual_seed(1)
    for dtype, experts in ((torch.uint8, 64), (torch.int16, 1000)):
        rows = [torch.randint(0, experts, (n, 3, 4), generator=gen).to(dtype) for n in (7, 4, 9)]
        valid = [None, torch.rand(4, 3, generator=gen) < 0.5, None]
        args = (rows, [0, 2, 1], 16, valid, [(0, 0), (0, 8), (1, 0)])
        on_cpu = rollout_to_router_indices(*args)
        on_gpu = rollout_to_router_indices(*args, device="cuda")
        assert on_gpu.ids.is_cuda and on_gpu.ids.dtype == dtype and on_gpu.mask.is_cuda
        assert torch.equal(on_gpu.ids.cpu(), on_cpu.ids) and torch.equal(on_gpu.mask.cpu(), on_cpu.mask)
