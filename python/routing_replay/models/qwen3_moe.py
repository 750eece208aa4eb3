"""Qwen3-MoE: renormalised top-k softmax (``norm_topk_prob=True``), q/k norms, no q/k/v biases and
no shared expert; Qwen2-MoE's dense-layer rule (``mlp_only_layers``, ``decoder_sparse_step``)."""

from __future__ import annotations

from typing import Any

from routing_replay.models.base import ModelFamily, TinyShape, Weight
from routing_replay.models.qwen2_moe import qwen_moe_layer_ids


class Qwen3Moe(ModelFamily):
    model_type = "qwen3_moe"
    experts_attrs = ("num_experts", "num_local_experts")
    moe_prefix = "mlp."

    def moe_layer_ids(self, hf_config: Any) -> list[int]:
        return qwen_moe_layer_ids(hf_config)

    def qk_norm(self, hf_config: Any) -> bool:
        return True

    def megatron_config(self, hf_config: Any) -> dict[str, Any]:
        return dict(
            moe_router_score_function="softmax",
            # Renormalised top-k == softmax over the top-k logits (pre_softmax=False).
            moe_router_pre_softmax=not getattr(hf_config, "norm_topk_prob", True),
            moe_shared_expert_intermediate_size=None, moe_shared_expert_gate=False,
            qk_layernorm=self.qk_norm(hf_config), add_qkv_bias=self.qkv_bias(hf_config),
            moe_layer_freq=self.moe_layer_freq(hf_config),
        )

    def weights(self, hf_config: Any) -> list[Weight]:
        return self.decoder_weights(hf_config)

    def tiny_config(self, shape: TinyShape) -> Any:
        import transformers

        return transformers.Qwen3MoeConfig(
            **shape.common_hf_fields(), head_dim=shape.head_dim, intermediate_size=2 * shape.hidden,
            moe_intermediate_size=shape.moe_intermediate_size, num_experts=shape.experts, norm_topk_prob=True,
            mlp_only_layers=list(shape.dense_layers))

    def hf_model_class(self) -> type:
        import transformers

        return transformers.Qwen3MoeForCausalLM


FAMILY = Qwen3Moe()
