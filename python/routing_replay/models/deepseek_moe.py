"""DeepSeek-V3's MoE block, which GLM4-MoE shares (transformers' ``Glm4MoeTopkRouter`` is
``DeepseekV3TopkRouter``): ``DeepseekStyleMoE`` (the first ``first_k_dense_replace`` layers dense,
``n_shared_experts`` ungated shared experts) and the sigmoid router's Megatron facts (the
TransformerConfig fields and the weight of its score-correction bias). What megatron-core
reproduces exactly, and what is refused (``UnsupportedModel``) because it would not:

- the correction bias only chooses experts, the weights are the unbiased sigmoid scores: megatron's
  ``expert_bias`` buffer (float32), loaded from ``e_score_correction_bias`` and kept constant
  (``moe_router_bias_update_rate=0``: HF's bias is a constant of the checkpoint, and the trainer must
  route as the rollout engine does);
- top-k renormalisation: megatron's sigmoid router renormalises exactly when top-k > 1, HF when
  ``norm_topk_prob``: the two must agree;
- expert groups: HF ranks a group by the sum of its two best scores, megatron by its best
  ``top_k // topk_group``: groups are supported when ``top_k // topk_group == 2`` (DeepSeek-V3:
  8 // 4) or when they restrict nothing;
- ``routed_scaling_factor`` is megatron's ``moe_router_topk_scaling_factor``; the shared experts
  (``n_shared_experts`` of ``moe_intermediate_size`` each, one MLP in both) are ungated.
"""

from __future__ import annotations

from typing import Any

from routing_replay.models.base import ModelFamily, UnsupportedModel, Weight


class DeepseekStyleMoE(ModelFamily):
    """The layer map and shared experts of a DeepSeek-V3-style family (subclasses name the rest)."""

    moe_prefix = "mlp."
    shared_expert = "shared_experts"

    def moe_layer_ids(self, hf_config: Any) -> list[int]:
        first_moe = getattr(hf_config, "first_k_dense_replace", None) or 0
        return list(range(first_moe, int(hf_config.num_hidden_layers)))

    def shared_expert_intermediate_size(self, hf_config: Any) -> int | None:
        shared = getattr(hf_config, "n_shared_experts", None) or 0
        return int(hf_config.moe_intermediate_size) * shared or None


def sigmoid_router_config(family: ModelFamily, hf_config: Any) -> dict[str, Any]:
    """TransformerConfig fields of HF's ``DeepseekV3TopkRouter`` and ungated shared experts.
    Raises ``UnsupportedModel`` where megatron-core would route or weigh differently."""
    experts, top_k = family.num_experts(hf_config), int(hf_config.num_experts_per_tok)
    norm = bool(getattr(hf_config, "norm_topk_prob", True))
    if norm != (top_k > 1):
        raise UnsupportedModel(
            f"{family.model_type}: norm_topk_prob={norm} with {top_k} experts per token; megatron-core's sigmoid "
            "router renormalises the top-k weights exactly when top-k > 1")
    groups = int(getattr(hf_config, "n_group", None) or 1)
    topk_group = int(getattr(hf_config, "topk_group", None) or groups)
    limited = groups > 1 and topk_group < groups
    if limited and (experts % groups or top_k // topk_group != 2):
        raise UnsupportedModel(
            f"{family.model_type}: expert groups n_group={groups}, topk_group={topk_group} with {experts} experts and "
            f"top-{top_k}; HF ranks a group by its 2 best scores, megatron-core by its best top_k // topk_group = "
            f"{top_k // topk_group}: they agree only when that is 2 (and the groups divide the experts)")
    return dict(
        moe_router_score_function="sigmoid", moe_router_pre_softmax=False,
        moe_router_enable_expert_bias=True, moe_router_bias_update_rate=0.0,
        moe_router_num_groups=groups if limited else None, moe_router_group_topk=topk_group if limited else None,
        moe_router_topk_scaling_factor=float(getattr(hf_config, "routed_scaling_factor", None) or 1.0),
        moe_router_dtype="fp32",  # HF computes the router logits in float32
        moe_shared_expert_intermediate_size=family.shared_expert_intermediate_size(hf_config),
        moe_shared_expert_gate=False,
    )


def expert_bias_weight(family: ModelFamily, hf: str, mc: str) -> Weight:
    """The router's score-correction bias: megatron's ``expert_bias`` buffer (float32)."""
    return Weight(f"{mc}mlp.router.expert_bias", (f"{hf}{family.router_module}.e_score_correction_bias",))
