"""Routing replay in real megatron-core on CPU: exact use, gradients, HF equivalence, R2, refusals."""

from __future__ import annotations

import pytest
import torch

from routing_replay.megatron.hf_checkpoint import build_model
from routing_replay.megatron.logprobs import Batch, score
from routing_replay.megatron.replay import ModelReplay, ReplayVerificationError, rollout_to_router_indices

TOP_K, EXPERTS = 2, 8


@pytest.fixture(scope="module")
def megatron_ready():
    from routing_replay.megatron.parallel import ParallelConfig, initialize

    initialize(ParallelConfig())


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    from routing_replay.tiny_models import build

    return build("qwen3_moe", tmp_path_factory.mktemp("replay") / "qwen3", seed=21)


def random_routing(tokens: int, layers: int, gen: torch.Generator, experts: int = EXPERTS) -> list[torch.Tensor]:
    return [torch.rand(tokens, experts, generator=gen).argsort(1)[:, :TOP_K] for _ in range(layers)]


def routing_maps(model) -> list:
    seen = []
    for router in [m for name, m in model.named_modules() if name.endswith("mlp.router")]:
        router.register_forward_hook(lambda m, i, o: seen.append(o[1].detach()))
    return seen


def test_replayed_indices_are_used_exactly_and_gradients_reach_the_chosen_experts(qwen3, megatron_ready):
    model = build_model(qwen3)
    replay = ModelReplay(model)
    seen = routing_maps(model)
    batch = Batch.from_sequences([list(range(5, 21)), list(range(30, 46))])
    tokens = batch.tokens.numel()
    plan = random_routing(tokens, replay.num_layers, torch.Generator().manual_seed(0), experts=EXPERTS - 1)  # never expert 7
    with replay.replaying(plan):
        scores = score(model, batch)
        (-scores.logprobs[scores.valid].mean()).backward()
    for routing_map, ids in zip(seen, plan):
        assert torch.equal(routing_map, torch.zeros(tokens, EXPERTS, dtype=torch.bool).scatter(1, ids, True))
    for router in replay.routers:
        grad_norms = router.weight.grad.norm(dim=1)
        assert (grad_norms[: EXPERTS - 1] > 0).all() and grad_norms[EXPERTS - 1] == 0
    report = replay.report()
    assert report.coverage == 1.0 and len(report.agreement) == replay.num_layers


def test_replay_equals_hugging_face_forced_to_the_same_experts(qwen3, megatron_ready):
    from transformers import AutoModelForCausalLM

    model = build_model(qwen3).eval()
    replay = ModelReplay(model)
    tokens = list(range(7, 27))
    batch = Batch.from_sequences([tokens])
    plan = random_routing(len(tokens), replay.num_layers, torch.Generator().manual_seed(1))
    with torch.no_grad(), replay.replaying(plan):
        ours = score(model, batch).logprobs[0]
    hf = AutoModelForCausalLM.from_pretrained(qwen3, dtype=torch.float32).eval()
    for layer, block in enumerate(hf.model.layers):
        def forced(hidden, gate=block.mlp.gate, ids=plan[layer]):
            logits = torch.nn.functional.linear(hidden.reshape(-1, gate.hidden_dim), gate.weight)
            chosen = logits.gather(1, ids)  # renormalised top-k == softmax over the chosen logits
            return logits, torch.softmax(chosen.float(), -1).to(logits.dtype), ids
        block.mlp.gate.forward = forced
    with torch.no_grad():
        logits = hf(torch.tensor([tokens])).logits[0, :-1]
    want = torch.log_softmax(logits, -1).gather(1, torch.tensor(tokens[1:])[:, None]).squeeze(1)
    assert torch.allclose(ours, want, atol=1e-5)


def test_r2_record_then_replay_gives_the_identical_loss(qwen3, megatron_ready):
    model = build_model(qwen3)
    replay = ModelReplay(model)
    batch = Batch.from_sequences([list(range(3, 19)), list(range(40, 52))])
    with torch.no_grad(), replay.recording() as recorded:
        old = score(model, batch).logprobs
    with torch.no_grad(), replay.replaying(recorded):
        again = score(model, batch).logprobs
    assert torch.equal(old, again)
    assert replay.report().agreement == [1.0] * replay.num_layers and replay.report().tokens_differing == 0


def test_masked_rows_fall_back_to_the_models_own_routing(qwen3, megatron_ready):
    model = build_model(qwen3)
    replay = ModelReplay(model)
    batch = Batch.from_sequences([list(range(3, 13))])
    with torch.no_grad(), replay.recording() as own:
        score(model, batch)
    plan = random_routing(10, replay.num_layers, torch.Generator().manual_seed(2))
    masks = [torch.arange(10) < 6 for _ in plan]
    seen = routing_maps(model)
    with torch.no_grad(), replay.replaying(plan, masks):
        score(model, batch)
    for routing_map, ids, mine in zip(seen, plan, own):
        expected = torch.where(masks[0][:, None], ids, mine)
        assert torch.equal(routing_map, torch.zeros(10, EXPERTS, dtype=torch.bool).scatter(1, expected, True))
    assert replay.report().coverage == 0.6


def test_rollout_rows_map_to_megatron_token_order():
    first, second = torch.arange(12).view(3, 2, 2), 100 + torch.arange(8).view(2, 2, 2)
    routing = rollout_to_router_indices([first, second], starts=[0, 1], seq_len=4)
    ids, masks = routing.indices, routing.masks
    # row s * B + b; sample 1's rows start at position 1
    assert ids[0][0 * 2 + 0].tolist() == first[0, 0].tolist()
    assert ids[1][2 * 2 + 0].tolist() == first[2, 1].tolist()
    assert ids[0][1 * 2 + 1].tolist() == second[0, 0].tolist()
    assert masks[0].view(4, 2).tolist() == [[True, False], [True, True], [True, True], [False, False]]


def test_refusals_and_bad_replay_data(qwen3, megatron_ready):
    with pytest.raises(ValueError, match="moe_router_fusion"):
        ModelReplay(_with(build_model(qwen3), moe_router_fusion=True))
    with pytest.raises(ValueError, match="capacity_factor"):
        ModelReplay(_with(build_model(qwen3), moe_expert_capacity_factor=1.0))
    model = build_model(qwen3)
    replay = ModelReplay(model)
    good = random_routing(4, replay.num_layers, torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="needs 2 layers"):
        with replay.replaying(good[:1]):
            pass
    with pytest.raises(ValueError, match=r"must be \[tokens, 2, 2\]"):
        with replay.replaying([g[:, :1] for g in good]):
            pass
    with pytest.raises(ValueError, match="must lie in 0..7"):
        with replay.replaying([g + 7 for g in good]):
            pass
    with pytest.raises(ValueError, match="4 replay rows for 6 routed tokens"):
        with replay.replaying(good):
            score(model, Batch.from_sequences([list(range(6))]))
    with pytest.raises(ReplayVerificationError, match="never consumed"):
        with replay.replaying(good):
            pass


def test_a_second_model_in_the_process_does_not_collide(qwen3, megatron_ready):
    trained, reference = build_model(qwen3), build_model(qwen3)
    replay = ModelReplay(trained)
    batch = Batch.from_sequences([list(range(3, 11))])
    with torch.no_grad():
        before = score(reference, batch).logprobs
        with replay.replaying(random_routing(8, replay.num_layers, torch.Generator().manual_seed(4))):
            score(trained, batch)
            assert torch.equal(score(reference, batch).logprobs, before)  # untouched by the other model's replay


def _with(model, **overrides):
    for name, value in overrides.items():
        setattr(model.config, name, value)
    return model


def test_r3_brings_float32_training_closer_to_a_bfloat16_rollout(megatron_ready, tmp_path):
    """Rollout in bfloat16 (Hugging Face transformers as the engine), training in float32: replaying
    the rollout's routing must shrink |log pi - log mu| compared with the trainer's own routing."""
    from transformers import AutoModelForCausalLM

    from routing_replay.tiny_models import build

    path = build("qwen3_moe", tmp_path / "mm", experts=16, top_k=2, seed=5)
    engine = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    used = []
    for block in engine.model.layers:
        block.mlp.gate.register_forward_hook(lambda m, i, o: used.append(o[2]))
    gen = torch.Generator().manual_seed(0)
    sequences = [torch.randint(5, 400, (64,), generator=gen).tolist() for _ in range(8)]
    rows, mu = [], []
    with torch.no_grad():
        for seq in sequences:
            used.clear()
            logits = engine(torch.tensor([seq])).logits[0, :-1].float()
            mu.append(torch.log_softmax(logits, -1).gather(1, torch.tensor(seq[1:])[:, None]).squeeze(1))
            rows.append(torch.stack(used, 1)[:-1].to(torch.uint8))  # the last token has no row; uint8 as on the wire
    model = build_model(path).eval()
    replay = ModelReplay(model)
    batch = Batch.from_sequences(sequences)
    with torch.no_grad():
        own = score(model, batch).logprobs
        with replay.replaying(rollout_to_router_indices(rows, [0] * len(rows), batch.tokens.shape[1])):
            replayed = score(model, batch).logprobs
    mu = torch.stack(mu)
    assert replay.report().tokens_differing > 0  # bf16 and fp32 routed some tokens differently
    assert (replayed - mu).abs().mean() < 0.95 * (own - mu).abs().mean()


@pytest.mark.parametrize(("tensor", "expert", "dispatcher"),
                         [(2, 1, "allgather"), (1, 2, "alltoall"), (1, 2, "allgather")],
                         ids=["tp2-sp-allgather", "ep2-alltoall", "ep2-allgather"])
def test_world_size_two_replays_exactly_on_every_rank(tensor, expert, dispatcher, qwen3):
    import torch.multiprocessing as mp

    from routing_replay.ports import free_port
    from tests.integration.megatron_ws2 import worker

    mp.spawn(worker, args=(2, tensor, expert, dispatcher, free_port(), str(qwen3)), nprocs=2, join=True)


def test_r2_replays_through_a_multi_mini_batch_update_loop(qwen3, megatron_ready):
    from routing_replay.megatron.replay import RecordedRouting

    model = build_model(qwen3)
    replay = ModelReplay(model)
    gen = torch.Generator().manual_seed(9)
    samples = {f"s{i}": torch.randint(5, 300, (int(n),), generator=gen).tolist() for i, n in enumerate([12, 7, 15, 9])}
    keys = list(samples)
    old_batch = Batch.from_sequences([samples[k] for k in keys])
    store = RecordedRouting(replay.num_experts)
    with torch.no_grad(), replay.recording() as recorded:  # old-policy forward over the whole batch
        old = score(model, old_batch).logprobs
    store.add(keys, recorded, old_batch.lengths.tolist())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for step, mini in enumerate((["s2", "s0"], ["s3", "s1"])):  # other order, size and padding
        batch = Batch.from_sequences([samples[k] for k in mini])
        held = store.indices_for(mini, batch.tokens.shape[1])
        assert held.ids.dtype == torch.uint8  # stored and placed compact; widened in the router
        optimizer.zero_grad()
        with replay.replaying(held):  # verification inside: the old routing is used exactly
            scores = score(model, batch)
            (-scores.logprobs[scores.valid].mean()).backward()
        if step == 0:  # weights unchanged so far: replayed log-probs equal the old policy's
            for row, key in enumerate(mini):
                n = len(samples[key]) - 1
                assert torch.allclose(scores.logprobs[row, :n].detach(), old[keys.index(key), :n], atol=1e-6)
        optimizer.step()
    assert replay.report().coverage == held.mask[:, 0].sum().item() / held.tokens
    with pytest.raises(KeyError, match="no recorded routing for \\['unknown'\\]"):
        store.indices_for(["unknown"], 4)


def test_replay_under_activation_recompute(qwen3, megatron_ready):
    recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    batch = Batch.from_sequences([list(range(5, 21)), list(range(30, 42))])
    plan = random_routing(batch.tokens.numel(), 2, torch.Generator().manual_seed(5))
    grads = []
    for overrides in ({}, recompute):
        model = build_model(qwen3, **overrides)
        with ModelReplay(model).replaying(plan):
            (-score(model, batch).logprobs.mean()).backward()  # recomputed forwards replay too
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    model = build_model(qwen3, **recompute)
    replay = ModelReplay(model)
    with replay.replaying(plan):
        loss = -score(model, batch).logprobs.mean()
    with pytest.raises(ReplayVerificationError, match="call backward\\(\\) inside the replaying\\(\\) block"):
        loss.backward()


def test_packed_batches_score_and_replay_like_padded_ones(qwen3, megatron_ready):
    model = build_model(qwen3).eval()
    replay = ModelReplay(model)
    gen = torch.Generator().manual_seed(12)
    sequences = [torch.randint(5, 300, (n,), generator=gen).tolist() for n in (9, 5, 12, 6)]
    padded, packed = Batch.from_sequences(sequences), Batch.packed(sequences, row_len=16)
    assert packed.tokens.shape[0] < padded.tokens.shape[0]  # sequences share rows
    rows = [torch.rand(len(s) - 1, 2, 8, generator=gen).argsort(-1)[..., :TOP_K].to(torch.uint8) for s in sequences]
    scored = {}
    with torch.no_grad():
        for name, batch in (("padded", padded), ("packed", packed)):
            routing = rollout_to_router_indices(rows, [0] * len(rows), batch.tokens.shape[1],
                                                placements=batch.placements)
            with replay.replaying(routing):
                scores = score(model, batch)
            scored[name] = [scores.logprobs[row, offset : offset + len(seq) - 1]
                            for seq, (row, offset) in zip(sequences, batch.placements)]
            assert int(scores.valid.sum()) == sum(len(s) - 1 for s in sequences)
    for a, b in zip(scored["padded"], scored["packed"]):
        assert torch.allclose(a, b, atol=1e-5)
