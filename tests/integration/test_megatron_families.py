"""The sigmoid-router families on megatron-core: GLM4-MoE and DeepSeek-V3 (multi-head latent
attention, dense prefix, shared experts, expert groups, score-correction bias, routed scaling).

Each variant is a tiny checkpoint whose every norm weight, bias and correction bias is random (at
init they are ones and zeros, which would hide a wrong mapping), built through the real
``build_model`` path: logits and log-probs equal transformers', R3 (megatron-core replaying given
expert ids) equals transformers forced to the same experts, export gives the checkpoint back bit for
bit (also from two tensor-parallel ranks), training keeps the correction bias (the trainer routes as
the engine does), and what megatron-core would compute differently is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from routing_replay.megatron.hf_checkpoint import build_model
from routing_replay.megatron.logprobs import Batch, score
from routing_replay.megatron.replay import ModelReplay
from routing_replay.models import FAMILIES, UnsupportedModel
from tests.integration.test_megatron_checkpoint import (
    assert_export_round_trip_is_exact,
    assert_scores_match_transformers,
)

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 64,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.9, "mscale_all_dim": 0.7}
VARIANTS = {
    # (family, tiny_models.build arguments, HF config changes)
    "glm4_moe": ("glm4_moe", dict(top_k=2), {}),
    "glm4_moe-qkv-bias-qk-norm-groups": ("glm4_moe", dict(top_k=4), dict(
        attention_bias=True, use_qk_norm=True, n_group=4, topk_group=2, routed_scaling_factor=1.5)),
    "deepseek_v3": ("deepseek_v3", dict(top_k=4), {}),  # 4 groups of 2 experts, 2 chosen; q latent
    "deepseek_v3-yarn-no-q-latent": ("deepseek_v3", dict(top_k=2), dict(q_lora_rank=None, rope_parameters=YARN)),
}


@pytest.fixture(scope="module")
def megatron_ready():
    from routing_replay.megatron.parallel import ParallelConfig, initialize

    initialize(ParallelConfig())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sigmoid-router-families")
    return {name: tiny_checkpoint(root / name, *spec, seed=31 + i) for i, (name, spec) in enumerate(VARIANTS.items())}


def tiny_checkpoint(path: Path, kind: str, shape: dict, changes: dict, seed: int) -> Path:
    """A tiny ``kind`` checkpoint (3 layers, the first dense, 8 experts) with ``changes`` to its HF
    config and every norm weight, bias and correction bias drawn at random."""
    from transformers import AutoConfig

    from routing_replay.tiny_models import build

    build(kind, path, layers=3, dense_layers=[0], experts=8, seed=seed, **shape)
    config = AutoConfig.from_pretrained(path)
    for name, value in changes.items():
        setattr(config, name, value)
    torch.manual_seed(seed)
    model = FAMILIES[kind].hf_model_class()(config).float()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if "norm" in name or name.endswith(("bias", "e_score_correction_bias")):
                tensor.add_(0.3 * torch.randn_like(tensor))
    model.save_pretrained(path)
    return path


def hf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_and_logprobs_match_transformers(variant, checkpoints, megatron_ready):
    assert_scores_match_transformers(build_model(checkpoints[variant]).eval(), hf_model(checkpoints[variant]),
                                     torch.Generator().manual_seed(5))


def force_experts(hf, plan: list[torch.Tensor]) -> None:
    """Every HF router (``DeepseekV3TopkRouter``; GLM4-MoE's is a subclass) returns ``plan[l]`` at MoE
    layer ``l``, weighted as it weighs its own choice: its sigmoid scores there (without the
    correction bias), renormalised when ``norm_topk_prob``, times ``routed_scaling_factor``."""
    gates = [layer.mlp.gate for layer in hf.model.layers if hasattr(layer.mlp, "gate")]
    assert len(gates) == len(plan)
    for gate, ids in zip(gates, plan):
        def forced(hidden, gate=gate, ids=ids):
            logits = torch.nn.functional.linear(hidden.reshape(-1, gate.hidden_dim).float(), gate.weight.float())
            weights = logits.sigmoid().gather(1, ids)
            if gate.norm_topk_prob:
                weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
            return logits, weights * gate.routed_scaling_factor, ids
        gate.forward = forced


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_replay_equals_hugging_face_forced_to_the_same_experts(variant, checkpoints, megatron_ready):
    """R3: any expert ids (outside the chosen groups too) replayed in megatron-core give the log-probs
    of transformers routed to the same experts; the model's own routing would differ."""
    model = build_model(checkpoints[variant]).eval()
    replay = ModelReplay(model)
    tokens = torch.randint(5, 200, (24,), generator=torch.Generator().manual_seed(6)).tolist()
    gen = torch.Generator().manual_seed(7)
    top_k, experts = model.config.moe_router_topk, model.config.num_moe_experts
    plan = [torch.rand(len(tokens), experts, generator=gen).argsort(1)[:, :top_k] for _ in range(replay.num_layers)]
    with torch.no_grad(), replay.replaying(plan):
        ours = score(model, Batch.from_sequences([tokens])).logprobs[0]
    assert replay.report().tokens_differing > 0  # the plan is not the model's own routing
    hf = hf_model(checkpoints[variant])
    force_experts(hf, plan)
    with torch.no_grad():
        logits = hf(torch.tensor([tokens])).logits[0, :-1]
    want = torch.log_softmax(logits, -1).gather(1, torch.tensor(tokens[1:])[:, None]).squeeze(1)
    assert torch.allclose(ours, want, atol=1e-5)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_export_round_trip_is_exact(variant, checkpoints, megatron_ready, tmp_path):
    assert_export_round_trip_is_exact(checkpoints[variant], tmp_path / "export")


@pytest.mark.parametrize("variant", ["glm4_moe", "deepseek_v3"])
def test_the_dense_prefix_has_no_router_and_training_keeps_the_correction_bias(variant, checkpoints,
                                                                                megatron_ready):
    """Routers sit on layers 1 and 2 only; a learner step trains the router but leaves the correction
    bias as the checkpoint has it (megatron-core would otherwise move it towards balanced loads)."""
    from safetensors.torch import load_file

    from routing_replay.megatron.learner import Learner, OptimizerSettings

    model = build_model(checkpoints[variant])
    routers = {name: module for name, module in model.named_modules() if name.endswith("mlp.router")}
    assert list(routers) == ["decoder.layers.1.mlp.router", "decoder.layers.2.mlp.router"]
    original = load_file(checkpoints[variant] / "model.safetensors")
    biases = [original[f"model.layers.{i}.mlp.gate.e_score_correction_bias"] for i in (1, 2)]
    weights = [router.weight.detach().clone() for router in routers.values()]
    learner = Learner(model, OptimizerSettings(learning_rate=1e-2))
    learner.zero_grad()
    scores = score(model, Batch.from_sequences([list(range(5, 29)), list(range(40, 58))]))
    (-scores.logprobs[scores.valid].mean()).backward()
    assert learner.step().updated
    for router, bias, weight in zip(routers.values(), biases, weights):
        assert router.expert_bias.dtype == torch.float32 and torch.equal(router.expert_bias, bias)
        assert not torch.equal(router.weight.detach(), weight)


def test_two_tensor_parallel_ranks_load_their_latent_attention_shards_and_match_transformers(checkpoints):
    """Multi-latent attention's tensor-parallel path (sharded down projections gathered, up
    projections split by heads, sequence parallel): each rank loads its slice; logits equal
    transformers' and the export gathered from both ranks is the checkpoint."""
    import torch.multiprocessing as mp

    from routing_replay.ports import free_port
    from tests.integration.megatron_ws2 import parity_worker

    mp.spawn(parity_worker, args=(2, 2, 1, free_port(), str(checkpoints["deepseek_v3"])), nprocs=2, join=True)


def tiny_hf_config(kind: str, **changes):
    """The HF config of a tiny ``kind`` model with ``changes``."""
    from routing_replay.models import TinyShape

    shape = TinyShape(vocab_size=64, hidden=32, layers=2, experts=8, top_k=changes.pop("top_k", 2),
                      moe_intermediate_size=16, shared_expert_size=None, dense_layers=(), attention_heads=4,
                      key_value_heads=2, eos_id=0)
    config = FAMILIES[kind].tiny_config(shape)
    for name, value in changes.items():
        setattr(config, name, value)
    return config


@pytest.mark.parametrize(("kind", "changes", "message"), [
    ("deepseek_v3", dict(top_k=1, norm_topk_prob=True), "renormalises the top-k weights exactly when top-k > 1"),
    ("glm4_moe", dict(top_k=2, norm_topk_prob=False), "renormalises the top-k weights exactly when top-k > 1"),
    ("deepseek_v3", dict(top_k=2, n_group=4, topk_group=2), "by its best top_k // topk_group = 1"),
    ("glm4_moe", dict(top_k=6, n_group=4, topk_group=2), "by its best top_k // topk_group = 3"),
    ("deepseek_v3", dict(rope_interleave=False), "rope_interleave=False"),
    ("deepseek_v3", dict(attention_bias=True), "MLA projections have no biases"),
    ("deepseek_v3", dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}),
     "rope type 'linear'"),
    ("deepseek_v3", dict(rope_parameters={**YARN, "mscale": None}), "mscale_all_dim without mscale"),
])
def test_what_megatron_core_would_compute_differently_is_refused(kind, changes, message):
    config = tiny_hf_config(kind, **changes)
    with pytest.raises(UnsupportedModel, match=message):
        FAMILIES[kind].megatron_config(config)


def test_tiny_deepseek_v3_routes_within_expert_groups():
    """The tiny builder gives DeepSeek-V3 groups that restrict the choice (2 of 4 groups for top-4,
    1 of 2 for top-2) and no groups where none fit megatron-core's group rule (top-1, top-3)."""
    from routing_replay.models.deepseek_v3 import tiny_expert_groups

    assert tiny_expert_groups(8, 4) == (4, 2) and tiny_expert_groups(8, 2) == (2, 1)
    assert tiny_expert_groups(8, 1) == (1, 1) and tiny_expert_groups(8, 3) == (1, 1)
    config = FAMILIES["deepseek_v3"].megatron_config(tiny_hf_config("deepseek_v3", top_k=4))
    assert (config["moe_router_num_groups"], config["moe_router_group_topk"]) == (4, 2)
