"""GLM-4-MoE: the first ``first_k_dense_replace`` layers are dense MLPs, the rest routed by a
sigmoid router (expert groups, a score-correction bias, a routed scaling factor) with
``n_shared_experts`` ungated shared experts; grouped-query attention with optional q/k/v biases
(``attention_bias``) and q/k norms (``use_qk_norm``), rotating the first ``partial_rotary_factor``
of each head. Its router is DeepSeek-V3's: its Megatron facts, and what is refused, are
``deepseek_moe``'s. Only default rope is supported on the Megatron side (GLM-4.5's)."""

from __future__ import annotations

from typing import Any

from routing_replay.models.base import TinyShape, UnsupportedModel, Weight, rope_parameters
from routing_replay.models.deepseek_moe import DeepseekStyleMoE, expert_bias_weight, sigmoid_router_config


class Glm4Moe(DeepseekStyleMoE):
    model_type = "glm4_moe"
    experts_attrs = ("n_routed_experts",)

    def qk_norm(self, hf_config: Any) -> bool:
        return bool(getattr(hf_config, "use_qk_norm", False))

    def qkv_bias(self, hf_config: Any) -> bool:
        return bool(getattr(hf_config, "attention_bias", False))

    def megatron_config(self, hf_config: Any) -> dict[str, Any]:
        _default_rope(hf_config)
        return dict(**sigmoid_router_config(self, hf_config), qk_layernorm=self.qk_norm(hf_config),
                    add_qkv_bias=self.qkv_bias(hf_config), moe_layer_freq=self.moe_layer_freq(hf_config))

    def gpt_model_args(self, hf_config: Any) -> dict[str, Any]:
        # HF rotates the first partial_rotary_factor of each head by halves (gpt_neox's rotate_half,
        # not interleaved pairs), which is megatron-core's rotary_percent: no weight permutation.
        return dict(rotary_percent=_default_rope(hf_config).get("partial_rotary_factor", 1.0))

    def weights(self, hf_config: Any) -> list[Weight]:
        return self.decoder_weights(hf_config)

    def moe_weights(self, hf_config: Any, hf: str, mc: str) -> list[Weight]:
        return super().moe_weights(hf_config, hf, mc) + [expert_bias_weight(self, hf, mc)]

    def tiny_config(self, shape: TinyShape) -> Any:
        import transformers

        if list(shape.dense_layers) != list(range(len(shape.dense_layers))):
            raise ValueError("glm4_moe makes its first k layers dense: dense_layers must be 0..k-1")
        # One expert group and no score bias: its sigmoid router then picks the top-k logits.
        return transformers.Glm4MoeConfig(
            **shape.common_hf_fields(), head_dim=shape.head_dim, intermediate_size=2 * shape.hidden,
            moe_intermediate_size=shape.moe_intermediate_size, n_routed_experts=shape.experts, n_shared_experts=1,
            n_group=1, topk_group=1, norm_topk_prob=True, first_k_dense_replace=len(shape.dense_layers))

    def hf_model_class(self) -> type:
        import transformers

        return transformers.Glm4MoeForCausalLM


FAMILY = Glm4Moe()


def _default_rope(hf_config: Any) -> dict[str, Any]:
    """The rope parameters; refuses scaled rope, which GPTModel's rotary embedding does not compute as HF does."""
    rope = rope_parameters(hf_config)
    if rope["rope_type"] != "default":
        raise UnsupportedModel(f"glm4_moe: rope type {rope['rope_type']!r}; the Megatron side has default rope only")
    return rope
