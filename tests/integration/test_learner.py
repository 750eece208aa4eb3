"""The trainer's optimisation on megatron-core's DDP, optimizer, schedule and dist_checkpointing
(real megatron-core, gloo ranks in spawned processes; a tiny Qwen3-MoE).

- bf16 at lr 1e-6 moves the fp32 main params (plain AdamW on bf16 weights would round most
  updates away) and follows the float32 loss curve;
- data x expert parallel ranks produce the gradients, grad norm and updated weights of one rank on
  the same global batch;
- a checkpoint resumes bit-exactly, and loads at another data-parallel size.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.integration.learner_ranks import Run, worker


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    from routing_replay.tiny_models import build

    return str(build("qwen3_moe", tmp_path_factory.mktemp("learner") / "qwen3", layers=2, seed=5))


def spawn(run: Run, world: int) -> list[dict]:
    import torch.multiprocessing as mp

    from routing_replay.ports import free_port

    Path(run.out).mkdir(parents=True, exist_ok=True)
    mp.spawn(worker, args=(world, free_port(), run), nprocs=world, join=True)
    return [json.loads((Path(run.out) / f"record-rank{r}.json").read_text()) for r in range(world)]


def weights(run: Run) -> dict[str, torch.Tensor]:
    return torch.load(Path(run.out) / "weights.pt", weights_only=True)


def test_bf16_moves_fp32_main_params_at_lr_1e6_and_follows_the_float32_curve(tiny, tmp_path):
    """In this process: one rank, the same 4 batches in bf16 and in float32."""
    from routing_replay.megatron.hf_checkpoint import build_model
    from routing_replay.megatron.learner import Learner, OptimizerSettings
    from routing_replay.megatron.parallel import ParallelConfig, initialize
    from tests.integration.learner_ranks import loss_of

    initialize(ParallelConfig())
    curves = {}
    for dtype in (torch.bfloat16, torch.float32):
        model = build_model(tiny, dtype=dtype)
        initial = {name: p.detach().float().clone() for name, p in model.named_parameters()}
        learner = Learner(model, OptimizerSettings(learning_rate=1e-6))
        touched = {name: torch.zeros_like(p, dtype=torch.bool) for name, p in model.named_parameters()}
        curves[dtype] = []
        for step in range(4):
            learner.zero_grad()
            loss, value = loss_of(model, step)
            loss.backward()
            assert learner.step().updated
            for name, param in model.named_parameters():
                touched[name] |= param.main_grad != 0
            curves[dtype].append(value)
        if dtype is torch.bfloat16:
            mains = learner.main_params()
            assert all(m.dtype == torch.float32 for m in mains.values())
            got_gradient = sum(int(t.sum()) for t in touched.values())
            moved_entries = 0
            for name, start in initial.items():
                moved = mains[name] != start
                assert touched[name].any(), f"{name} got no gradient"
                assert not (moved & ~touched[name]).any(), f"{name}: entries without a gradient moved"
                assert float(moved[touched[name]].float().mean()) > 0.9, name
                moved_entries += int(moved.sum())
            # Practically every entry that got a gradient moved in its fp32 main copy (Adam's
            # update can cancel over steps in rare entries).
            assert moved_entries / got_gradient > 0.999
            stored = sum(int((p.detach().float() != initial[n]).sum()) for n, p in model.named_parameters())
            assert stored / got_gradient < 0.5  # bf16 weights alone would have kept fewer than half the updates
    assert curves[torch.bfloat16] == pytest.approx(curves[torch.float32], rel=2e-2)


def test_data_and_expert_parallel_ranks_equal_one_rank_on_the_same_global_batch(tiny, tmp_path):
    single = Run(tiny, str(tmp_path / "world1"), grads=True)
    parallel = replace(single, out=str(tmp_path / "dp4-ep2"), expert=2)  # data 4, expert 2, expert-data 2
    [one] = spawn(single, 1)
    ranks = spawn(parallel, 4)
    reference = torch.load(Path(single.out) / "grads-rank0.pt", weights_only=True)
    for rank in range(4):
        grads = torch.load(Path(parallel.out) / f"grads-rank{rank}.pt", weights_only=True)
        for name, grad in grads.items():
            assert torch.allclose(grad, reference[name], rtol=1e-4, atol=1e-7), f"rank {rank}: {name}"
    # The grads were written after clipping to 1.0: the norm each rank reports is the global one
    # (dense once, every expert once) that scaled them down.
    by_hand = math.sqrt(sum(float(g.double().pow(2).sum()) for g in reference.values()))
    for record in ranks:
        norm = record["grad_norms"][0]
        assert norm > 1.0 and by_hand == pytest.approx(norm * 1.0 / (norm + 1e-6), rel=1e-5)
        assert record["losses"] == pytest.approx(one["losses"], rel=1e-5)
        assert record["grad_norms"] == pytest.approx(one["grad_norms"], rel=1e-4)
    after_one, after_parallel = weights(single), weights(parallel)
    for name, tensor in after_one.items():
        assert torch.allclose(after_parallel[name], tensor, atol=2e-6), name


def test_checkpoint_resumes_bit_exactly_and_loads_at_another_data_parallel_size(tiny, tmp_path):
    """Distributed optimizer, bf16, data 2 x expert 2: save after 2 steps and take a third; a new
    pair of processes loads and takes the third again (every rank's weights, fp32 main params,
    Adam moments and steps bit-equal); four ranks (data 4 x expert 2) load the same checkpoint
    and their third step matches too (float tolerance: a different reduction)."""
    first = Run(tiny, str(tmp_path / "first"), expert=2, dtype="bfloat16", distributed=True, learning_rate=1e-3,
                steps=3, save_after=2)
    saved = spawn(first, 2)
    resumed = spawn(replace(first, out=str(tmp_path / "resumed"), steps=1, save_after=None,
                            load=str(Path(first.out) / "ckpt")), 2)
    for rank, (a, b) in enumerate(zip(saved, resumed, strict=True)):
        assert a["digest"] == b["digest"], f"rank {rank}: resumed state differs"
        assert a["losses"][-1] == b["losses"][0] and a["learning_rates"][-1] == b["learning_rates"][0]
        assert a["digest_at_save"]["schedule_steps"] == "2"
    resharded = replace(first, out=str(tmp_path / "dp4"), steps=1, save_after=None, load=str(Path(first.out) / "ckpt"))
    wider = spawn(resharded, 4)
    assert wider[0]["losses"][0] == pytest.approx(saved[0]["losses"][-1], rel=1e-2)
    assert wider[0]["learning_rates"][0] == saved[0]["learning_rates"][-1]
    for name, tensor in weights(first).items():
        assert torch.allclose(weights(resharded)[name], tensor, atol=1e-2), name


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_activation_recompute_gives_the_same_update(tiny, mode):
    """``train.recompute`` reaches megatron-core's TransformerConfig and changes memory, not maths."""
    from routing_replay.megatron.hf_checkpoint import build_model
    from routing_replay.megatron.learner import Learner, OptimizerSettings, recompute_overrides
    from routing_replay.megatron.parallel import ParallelConfig, initialize
    from tests.integration.learner_ranks import loss_of

    initialize(ParallelConfig())
    norms, updated = {}, {}
    for overrides in ({}, recompute_overrides(mode, layers=2)):
        model = build_model(tiny, **overrides)
        assert model.config.recompute_granularity == overrides.get("recompute_granularity")
        learner = Learner(model, OptimizerSettings(learning_rate=1e-3))
        learner.zero_grad()
        loss, _ = loss_of(model, 0)
        loss.backward()
        norms[bool(overrides)] = learner.step().grad_norm
        updated[bool(overrides)] = {name: p.detach().clone() for name, p in model.named_parameters()}
    assert norms[True] == pytest.approx(norms[False], rel=1e-6)
    for name, tensor in updated[False].items():
        assert torch.allclose(updated[True][name], tensor, atol=1e-7), name


@pytest.mark.parametrize("distributed", [False, True])
def test_reset_starts_a_fresh_optimizer_from_the_current_weights(tiny, distributed):
    """The supervised warm start and the RL run get their own optimizer: a reset keeps what the
    first one trained (its main params are not copied back over the weights) and starts at step 0."""
    from routing_replay.megatron.hf_checkpoint import build_model
    from routing_replay.megatron.learner import Learner, OptimizerSettings
    from routing_replay.megatron.parallel import ParallelConfig, initialize
    from tests.integration.learner_ranks import loss_of

    initialize(ParallelConfig())
    model = build_model(tiny, dtype=torch.bfloat16)
    learner = Learner(model, OptimizerSettings(learning_rate=1e-2, distributed=distributed))

    def train_once() -> None:
        learner.zero_grad()
        loss_of(model, 0)[0].backward()
        assert learner.step().updated

    train_once()
    trained = {name: p.detach().clone() for name, p in model.named_parameters()}
    learner.reset(OptimizerSettings(learning_rate=1e-9, distributed=distributed))
    assert learner.steps_taken == 0 and learner.learning_rate == 1e-9
    train_once()
    for name, param in model.named_parameters():  # a 1e-9 step from the trained weights, not a revert
        assert torch.allclose(param.float(), trained[name].float(), atol=1e-6), name
