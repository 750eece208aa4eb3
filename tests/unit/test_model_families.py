"""The model-family registry: every family has every fact, its names are the checkpoint's, its layer
map matches real models' configs, and unknown model types are refused naming the supported ones."""

from __future__ import annotations

import importlib
import pkgutil
from types import SimpleNamespace

import pytest
import transformers
from safetensors import safe_open

from routing_replay import config, models, tiny_models
from routing_replay.capture import RoutingLayout
from routing_replay.models import FAMILIES, UnsupportedModel, family_of, moe_layer_ids
from routing_replay.models.base import ModelFamily

HELPER_MODULES = {"base", "deepseek_moe"}
"""Modules of ``routing_replay.models`` that are not families (every other one must be registered)."""
FAMILY_CONFIG_FIELDS = {"moe_router_score_function", "moe_router_pre_softmax", "moe_shared_expert_intermediate_size",
                        "moe_shared_expert_gate", "qk_layernorm", "add_qkv_bias", "moe_layer_freq"}
DENSE_LAYERS = {"qwen3_moe": (0, 2), "qwen2_moe": (1,), "mixtral": ()}
"""Dense layers each tiny family can place: Qwen anywhere, Mixtral none, the others (GLM4-MoE,
DeepSeek-V3: ``first_k_dense_replace``) a prefix."""


def dense_layers(kind: str) -> tuple[int, ...]:
    return DENSE_LAYERS.get(kind, (0,))


def test_every_family_module_is_registered_under_its_model_type():
    modules = [m.name for m in pkgutil.iter_modules(models.__path__) if m.name not in HELPER_MODULES]
    for name in modules:
        family = importlib.import_module(f"routing_replay.models.{name}").FAMILY
        assert FAMILIES.get(family.model_type) is family, f"models/{name}.py is not in FAMILIES"
    assert sorted(FAMILIES) == sorted(f.model_type for f in FAMILIES.values())
    assert len(FAMILIES) == len(modules)


@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_every_family_has_every_fact(kind):
    family = FAMILIES[kind]
    assert isinstance(family, ModelFamily) and family.model_type == kind
    assert family.experts_attrs and family.moe_prefix.endswith(".") and family.router_name
    assert len(family.expert_names) == 3 and all(family.expert_names)
    assert (family.shared_expert_gate is None) or (family.shared_expert is not None)
    assert tiny_models.family(kind) is family and kind in tiny_models.KINDS


def tiny_checkpoint(kind: str, tmp_path, *, dense: tuple[int, ...]) -> tuple[object, set[str]]:
    model = tiny_models.make_model(kind, 64, layers=3, hidden=32, experts=4, top_k=2, dense_layers=dense)
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        return model.config, set(f.keys())


@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_hf_names_and_layer_map_are_the_checkpoints(kind, tmp_path):
    """The layers with a router tensor are ``moe_layer_ids``; the experts, shared expert and gate
    have the family's names; expert counts and sizes are read from the family's attributes."""
    family = FAMILIES[kind]
    hf_config, names = tiny_checkpoint(kind, tmp_path, dense=dense_layers(kind))
    assert hf_config.model_type == kind and family.hf_model_class().config_class is type(hf_config)
    routed = [i for i in range(3) if f"model.layers.{i}.{family.router_module}.weight" in names]
    assert routed == moe_layer_ids(hf_config) == [i for i in range(3) if i not in dense_layers(kind)]
    assert family.num_experts(hf_config) == 4
    moe = f"model.layers.{routed[0]}.{family.moe_prefix}"
    for e in range(4):
        assert {f"{moe}experts.{e}.{p}.weight" for p in family.expert_names} <= names
    assert f"{moe}experts.4.{family.expert_names[0]}.weight" not in names
    assert f"{moe}experts.0.{family.expert_names[0]}.weight" in names
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        down = f.get_slice(f"{moe}experts.0.{family.expert_names[2]}.weight").get_shape()
        assert down[1] == family.expert_intermediate_size(hf_config)
        if family.shared_expert is not None:
            shared_down = f.get_slice(f"{moe}{family.shared_expert}.down_proj.weight").get_shape()
            assert shared_down[1] == family.shared_expert_intermediate_size(hf_config)
        else:
            assert family.shared_expert_intermediate_size(hf_config) is None
    assert (f"{moe}{family.shared_expert_gate}.weight" in names) == (family.shared_expert_gate is not None)


@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_megatron_weights_cover_the_checkpoint_exactly(kind, tmp_path):
    family = FAMILIES[kind]
    hf_config, names = tiny_checkpoint(kind, tmp_path, dense=dense_layers(kind))
    weights, fields = family.weights(hf_config), family.megatron_config(hf_config)
    mapped = [name for w in weights for name in w.hf]
    assert sorted(mapped) == sorted(names)  # every checkpoint tensor once, nothing else
    assert len({w.mcore for w in weights}) == len(weights)
    assert FAMILY_CONFIG_FIELDS <= fields.keys()
    assert fields["moe_layer_freq"] == [0 if i in dense_layers(kind) else 1 for i in range(3)]
    if not fields.get("multi_latent_attention"):  # MLA's latent norms take qk_layernorm too
        assert fields["qk_layernorm"] == any(".q_norm." in n for n in names)
    assert fields["add_qkv_bias"] == any(n.endswith("q_proj.bias") for n in names)
    assert fields["moe_shared_expert_intermediate_size"] == family.shared_expert_intermediate_size(hf_config)
    assert fields["moe_shared_expert_gate"] == (family.shared_expert_gate is not None)


def test_routing_semantics_of_each_softmax_family():
    """Qwen3 and Mixtral renormalise the top-k (softmax over the top-k logits); Qwen2 does not."""
    pre_softmax = {}
    for kind in ("qwen3_moe", "qwen2_moe", "mixtral"):
        hf_config = tiny_models.make_model(kind, 64, layers=1, hidden=16, experts=2).config
        assert FAMILIES[kind].megatron_config(hf_config)["moe_router_score_function"] == "softmax"
        pre_softmax[kind] = FAMILIES[kind].megatron_config(hf_config)["moe_router_pre_softmax"]
    assert pre_softmax == {"qwen3_moe": False, "qwen2_moe": True, "mixtral": False}


@pytest.mark.parametrize("kind", ["glm4_moe", "deepseek_v3"])
def test_sigmoid_router_families_keep_the_checkpoints_correction_bias_and_scaling(kind):
    """GLM4-MoE and DeepSeek-V3 route with sigmoid scores, the correction bias as megatron's
    ``expert_bias`` (never updated: the trainer routes as the rollout engine does), groups only
    where they restrict the choice, and the routed scaling factor."""
    family = FAMILIES[kind]
    hf_config = tiny_models.make_model(kind, 64, layers=2, hidden=32, experts=8, top_k=4, dense_layers=[0]).config
    hf_config.routed_scaling_factor = 2.5
    hf_config.n_group, hf_config.topk_group = 4, 2
    fields = family.megatron_config(hf_config)
    assert (fields["moe_router_score_function"], fields["moe_router_pre_softmax"]) == ("sigmoid", False)
    assert fields["moe_router_enable_expert_bias"] and fields["moe_router_bias_update_rate"] == 0.0
    assert (fields["moe_router_num_groups"], fields["moe_router_group_topk"]) == (4, 2)
    assert fields["moe_router_topk_scaling_factor"] == 2.5 and fields["moe_router_dtype"] == "fp32"
    hf_config.topk_group = 4  # every group may be chosen: no group restriction
    fields = family.megatron_config(hf_config)
    assert fields["moe_router_num_groups"] is None and fields["moe_router_group_topk"] is None
    bias = [w for w in family.weights(hf_config) if w.mcore.endswith("mlp.router.expert_bias")]
    assert [(w.mcore, w.hf) for w in bias] == [("decoder.layers.1.mlp.router.expert_bias",
                                                 ("model.layers.1.mlp.gate.e_score_correction_bias",))]


def test_glm4_moe_rotates_part_of_each_head_with_default_rope_only():
    family = FAMILIES["glm4_moe"]
    hf_config = tiny_models.make_model("glm4_moe", 64, layers=1, hidden=16, experts=2).config
    hf_config.rope_parameters = {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25}
    assert family.gpt_model_args(hf_config) == {"rotary_percent": 0.25}
    hf_config.rope_parameters = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}
    with pytest.raises(UnsupportedModel, match="glm4_moe: rope type 'yarn'; the Megatron side has default rope only"):
        family.megatron_config(hf_config)


# Published configs' routing fields (config.json of each model on the hub).
REAL_CONFIGS = {
    "Qwen3-30B-A3B": (transformers.Qwen3MoeConfig(num_hidden_layers=48, num_experts=128, num_experts_per_tok=8,
                                                  moe_intermediate_size=768, mlp_only_layers=[],
                                                  decoder_sparse_step=1), RoutingLayout(48, 8, 128)),
    "Qwen1.5-MoE-A2.7B": (transformers.Qwen2MoeConfig(num_hidden_layers=24, num_experts=60, num_experts_per_tok=4,
                                                      moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
                                                      decoder_sparse_step=1), RoutingLayout(24, 4, 60)),
    "Mixtral-8x7B": (transformers.MixtralConfig(num_hidden_layers=32, num_local_experts=8, num_experts_per_tok=2,
                                                intermediate_size=14336), RoutingLayout(32, 2, 8)),
    "GLM-4.5-Air": (transformers.Glm4MoeConfig(num_hidden_layers=46, n_routed_experts=128, num_experts_per_tok=8,
                                               first_k_dense_replace=1, n_shared_experts=1,
                                               moe_intermediate_size=1408), RoutingLayout(45, 8, 128)),
    "DeepSeek-V3": (transformers.DeepseekV3Config(num_hidden_layers=61, n_routed_experts=256, num_experts_per_tok=8,
                                                  first_k_dense_replace=3, n_shared_experts=1,
                                                  moe_intermediate_size=2048), RoutingLayout(58, 8, 256)),
}


@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_layer_maps_of_real_configs(name):
    """Capture's layout and the dry run's architecture (from config.json) agree with the published model."""
    hf_config, layout = REAL_CONFIGS[name]
    assert RoutingLayout.from_hf_config(hf_config) == layout
    architecture = config._architecture_of_hf(hf_config.to_dict())
    assert (architecture.moe_layers, architecture.top_k, architecture.num_experts) == (
        layout.num_layers, layout.top_k, layout.num_experts)
    assert architecture.moe_intermediate_size == family_of(hf_config).expert_intermediate_size(hf_config)


def test_qwen_sparse_step_and_mlp_only_layers_combine():
    qwen = transformers.Qwen2MoeConfig(num_hidden_layers=8, decoder_sparse_step=2, mlp_only_layers=[3])
    assert moe_layer_ids(qwen) == [1, 5, 7]
    assert FAMILIES["qwen2_moe"].moe_layer_freq(qwen) == [0, 1, 0, 0, 0, 1, 0, 1]


@pytest.mark.parametrize("model_type", ["llama", None])
def test_unknown_model_types_are_refused_naming_the_supported_ones(model_type):
    with pytest.raises(UnsupportedModel, match=f"unsupported model type {model_type!r}; supported: ") as raised:
        family_of(SimpleNamespace(model_type=model_type, num_hidden_layers=2))
    assert all(kind in str(raised.value) for kind in FAMILIES)
    with pytest.raises(UnsupportedModel, match="unsupported model type"):
        moe_layer_ids(SimpleNamespace(model_type=model_type, num_hidden_layers=2))


def test_the_dry_run_names_an_unsupported_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 2}')
    cfg = config.JobConfig.model_validate({"model": {"path": str(tmp_path)}})
    with pytest.raises(config.ConfigError, match="unsupported model type 'llama'"):
        config.architecture_of(cfg)


def test_tiny_builders_refuse_shapes_their_family_cannot_have():
    with pytest.raises(ValueError, match="mixtral routes every layer"):
        tiny_models.make_model("mixtral", 64, dense_layers=[0])
    with pytest.raises(ValueError, match="dense_layers must be 0..k-1"):
        tiny_models.make_model("glm4_moe", 64, layers=3, dense_layers=[1])
    with pytest.raises(ValueError, match="only qwen2_moe has a sized shared expert, not glm4_moe"):
        tiny_models.make_model("glm4_moe", 64, shared_expert_size=8)
    with pytest.raises(ValueError, match="unknown tiny model kind 'llama'"):
        tiny_models.make_model("llama", 64)
