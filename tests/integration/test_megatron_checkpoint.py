"""megatron-core models from Hugging Face checkpoints of every model family: logits, log-probs,
export round trip; a checkpoint's multi-token-prediction layers are refused by name."""

from __future__ import annotations

import pytest
import torch

from routing_replay.megatron.hf_checkpoint import build_model, export_hf, load_hf, rules, save_hf
from routing_replay.megatron.logprobs import Batch, score
from routing_replay.models import FAMILIES, UnsupportedModel

TINY_SHAPES = {"qwen3_moe": dict(layers=3, dense_layers=[1]), "glm4_moe": dict(layers=3, dense_layers=[0]),
               "deepseek_v3": dict(layers=3, dense_layers=[0])}
"""Tiny shapes with dense layers where the family has them (default: two routed layers)."""


@pytest.fixture(scope="module")
def megatron_ready():
    from routing_replay.megatron.parallel import ParallelConfig, initialize

    initialize(ParallelConfig())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from routing_replay.tiny_models import build

    root = tmp_path_factory.mktemp("mcore-models")
    return {kind: build(kind, root / kind, seed=11 + i, **TINY_SHAPES.get(kind, {}))
            for i, kind in enumerate(FAMILIES)}


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_logits_and_logprobs_match_transformers(kind, checkpoints, megatron_ready):
    assert_scores_match_transformers(build_model(checkpoints[kind]).eval(), hf_model(checkpoints[kind]))


def assert_scores_match_transformers(model, reference, generator: torch.Generator | None = None) -> None:
    """On a padded batch of three random sequences, our log-probs (temperature 0.7) equal those of
    the Hugging Face ``reference`` run on each sequence alone, and so do our logits per sequence."""
    batch = Batch.from_sequences([torch.randint(5, 200, (n,), generator=generator).tolist() for n in (17, 11, 14)])
    with torch.no_grad():
        ours = score(model, batch, temperature=0.7)
        for row, n in enumerate(batch.lengths.tolist()):  # each sequence alone, unpadded, through HF
            tokens = batch.tokens[row : row + 1, :n]
            logits = reference(tokens).logits
            alone = Batch.from_sequences([tokens[0].tolist()])
            mine = model(tokens, alone.positions(), attention_mask=alone.attention_mask())
            assert (mine - logits).abs().max() < 1e-5
            want = torch.log_softmax(logits[0, :-1] / 0.7, -1).gather(-1, tokens[0, 1:, None]).squeeze(-1)
            assert torch.allclose(ours.logprobs[row, : n - 1], want, atol=1e-5)
            assert ours.valid[row].sum() == n - 1


def test_dense_layers_have_no_router(checkpoints, megatron_ready):
    model = build_model(checkpoints["qwen3_moe"])
    routers = [name for name, _ in model.named_modules() if name.endswith("mlp.router")]
    assert routers == ["decoder.layers.0.mlp.router", "decoder.layers.2.mlp.router"]


def assert_export_round_trip_is_exact(checkpoint, out_dir) -> None:
    """Exporting the loaded model gives the checkpoint's tensors exactly, and a saved export loads
    back to the same model."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(checkpoint)
    original = load_file(checkpoint / "model.safetensors")
    exported = export_hf(build_model(checkpoint), config)
    assert set(exported) == set(original)
    assert all(torch.equal(exported[name], original[name]) for name in original)
    reloaded = build_model(save_hf(build_model(checkpoint), config, out_dir))
    assert all(torch.equal(a, b) for a, b in zip(export_hf(reloaded, config).values(), exported.values()))


@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_export_round_trip_is_exact(kind, checkpoints, megatron_ready, tmp_path):
    assert_export_round_trip_is_exact(checkpoints[kind], tmp_path / "export")


def test_multi_token_prediction_layers_are_refused_by_name(checkpoints, megatron_ready):
    """Real DeepSeek-V3 / GLM-4.5 checkpoints carry MTP layers past ``num_hidden_layers``, which
    transformers ignores and the Megatron side does not build: refused before any data is read."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(checkpoints["deepseek_v3"])
    tensors = load_file(checkpoints["deepseek_v3"] / "model.safetensors")
    tensors["model.layers.3.eh_proj.weight"] = torch.zeros(2, 2)
    model = build_model(checkpoints["deepseek_v3"], load_weights=False)
    assert config.num_nextn_predict_layers == 1
    with pytest.raises(UnsupportedModel, match=r"multi-token-prediction layers \[3\] \(num_nextn_predict_layers=1, "
                                               r"past num_hidden_layers=3\)"):
        load_hf(model, config, tensors)


def test_unsupported_models_are_refused(megatron_ready):
    from types import SimpleNamespace

    with pytest.raises(UnsupportedModel, match="unsupported model type 'llama'; supported: "):
        rules(SimpleNamespace(model_type="llama"))


@pytest.mark.parametrize(("tensor", "expert"), [(2, 1), (1, 2)], ids=["tp2-sp", "ep2"])
def test_sharded_ranks_load_their_shard_and_match_transformers(tensor, expert, checkpoints):
    import torch.multiprocessing as mp

    from routing_replay.ports import free_port
    from tests.integration.megatron_ws2 import parity_worker

    mp.spawn(parity_worker, args=(2, tensor, expert, free_port(), str(checkpoints["qwen2_moe"])), nprocs=2, join=True)


def test_two_pipeline_stages_load_their_layers_replay_and_export(checkpoints):
    import torch.multiprocessing as mp

    from routing_replay.ports import free_port
    from tests.integration.megatron_ws2 import pipeline_worker

    mp.spawn(pipeline_worker, args=(2, free_port(), str(checkpoints["mixtral"])), nprocs=2, join=True)
