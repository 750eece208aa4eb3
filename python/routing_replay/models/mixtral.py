"""Mixtral: every layer routed, renormalised top-k softmax, experts named ``w1``/``w3``/``w2`` under
``block_sparse_moe``; each expert is a full-size MLP (``intermediate_size``)."""

from __future__ import annotations

from typing import Any

from routing_replay.models.base import ModelFamily, TinyShape, Weight


class Mixtral(ModelFamily):
    model_type = "mixtral"
    experts_attrs = ("num_local_experts",)
    moe_prefix = "block_sparse_moe."
    expert_names = ("w1", "w3", "w2")

    def moe_layer_ids(self, hf_config: Any) -> list[int]:
        return list(range(int(hf_config.num_hidden_layers)))

    def expert_intermediate_size(self, hf_config: Any) -> int:
        return int(hf_config.intermediate_size)

    def megatron_config(self, hf_config: Any) -> dict[str, Any]:
        return dict(
            # Mixtral always renormalises its top-k: a softmax over the top-k logits.
            moe_router_score_function="softmax", moe_router_pre_softmax=False,
            moe_shared_expert_intermediate_size=None, moe_shared_expert_gate=False,
            qk_layernorm=self.qk_norm(hf_config), add_qkv_bias=self.qkv_bias(hf_config),
            moe_layer_freq=self.moe_layer_freq(hf_config),
        )

    def weights(self, hf_config: Any) -> list[Weight]:
        return self.decoder_weights(hf_config)

    def default_moe_intermediate_size(self, hidden: int) -> int:
        return hidden  # Mixtral's experts are its MLPs

    def tiny_config(self, shape: TinyShape) -> Any:
        import transformers

        if shape.dense_layers:
            raise ValueError("mixtral routes every layer: dense_layers is not supported")
        return transformers.MixtralConfig(**shape.common_hf_fields(), intermediate_size=shape.moe_intermediate_size,
                                          num_local_experts=shape.experts)

    def hf_model_class(self) -> type:
        import transformers

        return transformers.MixtralForCausalLM


FAMILY = Mixtral()
