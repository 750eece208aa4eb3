"""R3 end to end: SGLang records routing, the wire delivers it to the trainer's collector, and
megatron-core replays it on the same checkpoint (float32), verified per layer and token."""

from __future__ import annotations

import torch

from routing_replay.megatron.hf_checkpoint import build_model
from routing_replay.megatron.logprobs import Batch, score
from routing_replay.megatron.replay import ModelReplay, rollout_indices_from_wire
from routing_replay.sglang.client import routing_descriptor, routing_params
from tests.integration.sglang_support import generate


def test_sglang_routing_replays_in_megatron(qwen3_server, routing_collector, tiny_models):
    from routing_replay.megatron.parallel import ParallelConfig, initialize

    initialize(ParallelConfig())
    prompts = [[11, 22, 33, 44, 55, 66, 77], [101, 102, 103, 104]]
    sequences, keys = [], []
    for i, prompt in enumerate(prompts):
        response = generate(qwen3_server, prompt, max_new_tokens=9, temperature=1.0,
                            routing=routing_params(key=f"r3-e2e-{i}"))
        assert routing_descriptor(response)["delivery"] == "queued"
        sequences.append(prompt + response["output_ids"])
        keys.append(f"r3-e2e-{i}")
    samples = routing_collector.take(keys, timeout=30, token_ids=dict(zip(keys, sequences)))
    batch = Batch.from_sequences(sequences)
    model = build_model(tiny_models["qwen3_moe"]).eval()
    replay = ModelReplay(model)
    routing = rollout_indices_from_wire([samples[k] for k in keys], batch.tokens.shape[1])
    assert routing.ids.dtype == samples[keys[0]].routing.dtype == torch.uint8  # compact as received
    with torch.no_grad():
        own = score(model, batch, temperature=1.0).logprobs
        with replay.replaying(routing):
            replayed = score(model, batch, temperature=1.0).logprobs
    report = replay.report()
    # every real position but each sequence's last token has a rollout row
    assert report.coverage == sum(len(s) - 1 for s in sequences) / batch.tokens.numel()
    assert min(report.agreement) >= 0.99  # same checkpoint, float32 on both sides
    valid = batch.valid[:, 1:]
    assert torch.allclose(own[valid], replayed[valid], atol=1e-4)
