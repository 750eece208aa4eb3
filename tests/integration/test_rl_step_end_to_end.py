"""One RL step with every real piece, in one process (the Ray job will distribute the same steps):

SGLang (float32, --record-routing) samples a GRPO group with its log-probs mu_old, the routing
travels over the wire to the trainer's collector, megatron-core computes pi_old under R3 replay,
updates with the token-level objective and a truncated-IS correction, and syncs its weights back
through /update_weights_from_disk. After the sync, SGLang's log-probs of a probe sequence must
equal the trainer's.
"""

from __future__ import annotations

import concurrent.futures

import requests
import torch

from routing_replay.megatron.hf_checkpoint import build_model, save_hf
from routing_replay.megatron.logprobs import Batch, score
from routing_replay.megatron.replay import ModelReplay, rollout_indices_from_wire
from routing_replay.rl import advantages, corrections, metrics, objective
from routing_replay.sglang.client import routing_params
from routing_replay.tasks import addition
from tests.integration.sglang_support import start_server


def sglang_logprobs(server, tokens: list[int]) -> torch.Tensor:
    """SGLang's log-probs of every token of ``tokens`` after the first (prompt scoring)."""
    body = {"input_ids": tokens, "return_logprob": True, "logprob_start_len": 0,
            "sampling_params": {"max_new_tokens": 1, "temperature": 1.0}}
    meta = requests.post(f"{server.url}/generate", json=body, timeout=60).json()["meta_info"]
    return torch.tensor([entry[0] for entry in meta["input_token_logprobs"][1:]])


def test_one_rl_step_with_r3_and_a_verified_weight_sync(tiny_models, routing_collector, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    from routing_replay.megatron.parallel import ParallelConfig, initialize

    initialize(ParallelConfig())
    source = tiny_models["qwen3_moe"]
    tokenizer, hf_config = AutoTokenizer.from_pretrained(source), AutoConfig.from_pretrained(source)
    weights = save_hf(build_model(source), hf_config, tmp_path / "weights")
    tokenizer.save_pretrained(weights)
    server = start_server(weights, tmp_path / "rl.log", "--record-routing", "--routing-sink", routing_collector.address)
    try:
        model = build_model(weights)
        replay = ModelReplay(model)
        records = addition.prompts(2, seed=1)
        jobs = [(f"rl-{i}-{g}", record) for i, record in enumerate(records) for g in range(4)]

        def rollout(job):
            key, record = job
            prompt = tokenizer(record["prompt"]).input_ids
            body = {"input_ids": prompt, "return_logprob": True,
                    "sampling_params": {"max_new_tokens": 4, "temperature": 1.0, "custom_params": routing_params(key=key)}}
            return key, record, prompt, requests.post(f"{server.url}/generate", json=body, timeout=60).json()

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            rollouts = list(pool.map(rollout, jobs))
        keys = [key for key, *_ in rollouts]
        sequences = [prompt + out["output_ids"] for _, _, prompt, out in rollouts]
        # An untrained model never answers right, so the addition reward would be 0 for all: a reward
        # that varies with the sampled tokens gives this step non-zero advantages to learn from.
        rewards = torch.tensor([sum(out["output_ids"]) % 7 / 6 for *_, out in rollouts])
        routing = routing_collector.take(keys, timeout=30, token_ids=dict(zip(keys, sequences)))

        batch = Batch.from_sequences(sequences, pad_id=tokenizer.eos_token_id)
        width = batch.tokens.shape[1] - 1
        response, mu = torch.zeros(len(sequences), width, dtype=torch.bool), torch.zeros(len(sequences), width)
        for row, (_, _, prompt, out) in enumerate(rollouts):
            span = slice(len(prompt) - 1, len(prompt) - 1 + len(out["output_ids"]))
            response[row, span] = True
            mu[row, span] = torch.tensor([entry[0] for entry in out["meta_info"]["output_token_logprobs"]])
        held = rollout_indices_from_wire([routing[k] for k in keys], batch.tokens.shape[1])
        with torch.no_grad(), replay.replaying(held):
            old = score(model, batch).logprobs
        mismatch = metrics.RatioStats.from_log_ratio(old - mu, response).summary()
        assert mismatch["mean_abs"] < 1e-4  # same weights, float32 on both sides, same routing

        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        weight = corrections.weights(old - mu, response, corrections.Correction("truncate", "token"))
        with replay.replaying(held):
            new = score(model, batch).logprobs
            terms = objective.token_loss(new, old, weight, advantages.group_normalized(rewards, 4), response,
                                         objective.Clip())
            terms.loss.backward()
        optimizer.step()
        assert torch.isfinite(terms.loss) and min(replay.report().agreement) >= 0.99

        save_hf(model, hf_config, weights)
        synced = requests.post(f"{server.url}/update_weights_from_disk", timeout=120,
                               json={"model_path": str(weights), "weight_version": "1", "flush_cache": True}).json()
        assert synced["success"], synced
        probe = sequences[0]
        with torch.no_grad():
            trainer = score(model, Batch.from_sequences([probe])).logprobs[0]
        engine = sglang_logprobs(server, probe)
        assert not torch.allclose(trainer, old[0, : len(probe) - 1], atol=1e-3)  # the update changed the policy
        assert torch.allclose(engine, trainer, atol=1e-4)  # and SGLang now serves exactly the new weights
    finally:
        server.stop()
