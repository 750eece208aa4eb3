"""Qwen2-MoE: softmax over all experts then top-k (``norm_topk_prob=False``), a shared expert with a
sigmoid gate, q/k/v biases; ``mlp_only_layers`` and ``decoder_sparse_step`` make layers dense."""

from __future__ import annotations

from typing import Any

from routing_replay.models.base import ModelFamily, TinyShape, Weight


def qwen_moe_layer_ids(hf_config: Any) -> list[int]:
    """Qwen2/3-MoE route a layer unless it is in ``mlp_only_layers`` or ``(i + 1) % decoder_sparse_step != 0``."""
    dense = set(getattr(hf_config, "mlp_only_layers", None) or ())
    step = getattr(hf_config, "decoder_sparse_step", None) or 1
    return [i for i in range(int(hf_config.num_hidden_layers)) if i not in dense and (i + 1) % step == 0]


class Qwen2Moe(ModelFamily):
    model_type = "qwen2_moe"
    experts_attrs = ("num_experts",)
    moe_prefix = "mlp."
    shared_expert = "shared_expert"
    shared_expert_gate = "shared_expert_gate"
    sized_shared_expert = True

    def moe_layer_ids(self, hf_config: Any) -> list[int]:
        return qwen_moe_layer_ids(hf_config)

    def shared_expert_intermediate_size(self, hf_config: Any) -> int | None:
        return int(hf_config.shared_expert_intermediate_size)

    def qkv_bias(self, hf_config: Any) -> bool:
        return True

    def megatron_config(self, hf_config: Any) -> dict[str, Any]:
        return dict(
            moe_router_score_function="softmax",
            # norm_topk_prob=False: softmax over all experts, then top-k; True renormalises the top-k,
            # which is a softmax over the top-k logits (pre_softmax=False).
            moe_router_pre_softmax=not getattr(hf_config, "norm_topk_prob", True),
            moe_shared_expert_intermediate_size=self.shared_expert_intermediate_size(hf_config),
            moe_shared_expert_gate=True,
            qk_layernorm=self.qk_norm(hf_config), add_qkv_bias=self.qkv_bias(hf_config),
            moe_layer_freq=self.moe_layer_freq(hf_config),
        )

    def weights(self, hf_config: Any) -> list[Weight]:
        return self.decoder_weights(hf_config)

    def tiny_config(self, shape: TinyShape) -> Any:
        import transformers

        return transformers.Qwen2MoeConfig(
            **shape.common_hf_fields(), intermediate_size=2 * shape.hidden,
            moe_intermediate_size=shape.moe_intermediate_size,
            shared_expert_intermediate_size=shape.shared_expert_size or shape.hidden, num_experts=shape.experts,
            norm_topk_prob=False, mlp_only_layers=list(shape.dense_layers))

    def hf_model_class(self) -> type:
        import transformers

        return transformers.Qwen2MoeForCausalLM


FAMILY = Qwen2Moe()
