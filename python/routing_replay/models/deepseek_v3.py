"""DeepSeek-V3: multi-head latent attention (MLA), the first ``first_k_dense_replace`` layers dense
MLPs, the rest routed by a sigmoid router (expert groups, a score-correction bias, a routed scaling
factor) with ``n_shared_experts`` ungated shared experts.

The sigmoid router, shared with GLM4-MoE (transformers' GLM4-MoE router is DeepSeek-V3's), and
what of it megatron-core reproduces or refuses are in ``deepseek_moe``. This module adds the
attention, where the same rule holds (refused, ``UnsupportedModel``, what megatron-core would
compute differently):

- MLA's rotary embedding: megatron rotates the interleaved pairs of the rope dims, which is HF's
  ``rope_interleave=True`` (DeepSeek-V3's); default and YaRN rope; no attention biases (megatron's
  MLA projections have none).
"""

from __future__ import annotations

from typing import Any

from routing_replay.models.base import TinyShape, UnsupportedModel, Weight, rope_parameters
from routing_replay.models.deepseek_moe import DeepseekStyleMoE, expert_bias_weight, sigmoid_router_config


class DeepseekV3(DeepseekStyleMoE):
    model_type = "deepseek_v3"
    experts_attrs = ("n_routed_experts", "num_local_experts")

    # ---- Megatron ----------------------------------------------------------------------------------

    def megatron_config(self, hf_config: Any) -> dict[str, Any]:
        return dict(**sigmoid_router_config(self, hf_config), **mla_config(hf_config),
                    moe_layer_freq=self.moe_layer_freq(hf_config))

    def weights(self, hf_config: Any) -> list[Weight]:
        mla_config(hf_config)  # refuses what the weights could load but the model could not compute
        return self.decoder_weights(hf_config)

    def attention_weights(self, hf_config: Any, hf: str, mc: str) -> list[Weight]:
        """MLA: every HF tensor is one Megatron parameter, unchanged (the same per-head layouts:
        ``q_b_proj`` rows [nope; rope], ``kv_a_proj_with_mqa`` [kv latent; rope], ``kv_b_proj`` [nope; v])."""
        a, sa = f"{hf}self_attn.", f"{mc}self_attention."
        if getattr(hf_config, "q_lora_rank", None) is None:
            out = [Weight(f"{sa}linear_q_proj.weight", (f"{a}q_proj.weight",))]
        else:
            out = [Weight(f"{sa}linear_q_down_proj.weight", (f"{a}q_a_proj.weight",)),
                   Weight(f"{sa}q_layernorm.weight", (f"{a}q_a_layernorm.weight",)),
                   Weight(f"{sa}linear_q_up_proj.weight", (f"{a}q_b_proj.weight",))]
        return out + [Weight(f"{sa}linear_kv_down_proj.weight", (f"{a}kv_a_proj_with_mqa.weight",)),
                      Weight(f"{sa}kv_layernorm.weight", (f"{a}kv_a_layernorm.weight",)),
                      Weight(f"{sa}linear_kv_up_proj.weight", (f"{a}kv_b_proj.weight",)),
                      Weight(f"{sa}linear_proj.weight", (f"{a}o_proj.weight",))]

    def moe_weights(self, hf_config: Any, hf: str, mc: str) -> list[Weight]:
        return super().moe_weights(hf_config, hf, mc) + [expert_bias_weight(self, hf, mc)]

    # ---- the tiny builder --------------------------------------------------------------------------

    def tiny_config(self, shape: TinyShape) -> Any:
        """MLA with every size distinct (q latent hidden/2, kv latent hidden/4, per head: no-rope
        ``head_dim``, rope ``head_dim/2``, value ``3*head_dim/4``), one query group per head (MLA has
        no grouped keys), expert groups that restrict the choice where the shape allows
        (``tiny_expert_groups``), DeepSeek-V3's routed scaling factor 2.5."""
        import transformers

        if list(shape.dense_layers) != list(range(len(shape.dense_layers))):
            raise ValueError("deepseek_v3 makes its first k layers dense: dense_layers must be 0..k-1")
        if shape.head_dim % 4:
            raise ValueError(f"deepseek_v3's tiny MLA splits the head size {shape.head_dim} in quarters: "
                             "hidden / attention heads must be a multiple of 4")
        groups, topk_group = tiny_expert_groups(shape.experts, shape.top_k)
        fields = {**shape.common_hf_fields(), "num_key_value_heads": shape.attention_heads}
        return transformers.DeepseekV3Config(
            **fields, intermediate_size=2 * shape.hidden, moe_intermediate_size=shape.moe_intermediate_size,
            n_routed_experts=shape.experts, n_shared_experts=1, n_group=groups, topk_group=topk_group,
            norm_topk_prob=shape.top_k > 1, routed_scaling_factor=2.5, first_k_dense_replace=len(shape.dense_layers),
            q_lora_rank=shape.hidden // 2, kv_lora_rank=shape.hidden // 4, qk_nope_head_dim=shape.head_dim,
            qk_rope_head_dim=shape.head_dim // 2, v_head_dim=3 * shape.head_dim // 4)

    def hf_model_class(self) -> type:
        import transformers

        return transformers.DeepseekV3ForCausalLM


FAMILY = DeepseekV3()


def tiny_expert_groups(experts: int, top_k: int) -> tuple[int, int]:
    """``(n_group, topk_group)`` for a tiny model: the fewest groups (at least two experts each) that
    make group-limited routing choose among them with ``top_k // topk_group == 2``; ``(1, 1)`` (no
    groups) where the shape allows none."""
    topk_group = top_k // 2
    if top_k % 2 == 0 and topk_group >= 1:
        for groups in range(topk_group + 1, experts // 2 + 1):
            if experts % groups == 0 and (experts // groups) * topk_group >= top_k:
                return groups, topk_group
    return 1, 1


# ---- multi-head latent attention -------------------------------------------------------------------


def mla_config(hf_config: Any) -> dict[str, Any]:
    """MLATransformerConfig fields of HF's ``DeepseekV3Attention``. Raises ``UnsupportedModel`` for
    what megatron-core's MLA computes differently."""
    if getattr(hf_config, "attention_bias", False):
        raise UnsupportedModel("deepseek_v3: attention_bias=True; megatron-core's MLA projections have no biases")
    if not getattr(hf_config, "rope_interleave", True):
        raise UnsupportedModel("deepseek_v3: rope_interleave=False; megatron-core's MLA always rotates interleaved "
                               "pairs of the rope dims (HF's rope_interleave=True)")
    heads, v_head_dim = int(hf_config.num_attention_heads), int(hf_config.v_head_dim)
    fields = dict(
        multi_latent_attention=True,
        qk_layernorm=True,  # MLA's latent norms (q_a_layernorm, kv_a_layernorm) exist only with it
        add_qkv_bias=False, num_query_groups=heads,
        q_lora_rank=getattr(hf_config, "q_lora_rank", None), kv_lora_rank=int(hf_config.kv_lora_rank),
        qk_head_dim=int(hf_config.qk_nope_head_dim), qk_pos_emb_head_dim=int(hf_config.qk_rope_head_dim),
        v_head_dim=v_head_dim,
        # megatron-core's local attention sizes its output as kv_channels per head: the value head here
        # (HF's head_dim is the rope size).
        kv_channels=v_head_dim,
    )
    return {**fields, **_mla_rope(rope_parameters(hf_config), hf_config)}


def _mla_rope(rope: dict[str, Any], hf_config: Any) -> dict[str, Any]:
    """MLA's own rotary embedding (megatron builds it from the config, not from GPTModel's arguments)."""
    base = float(rope["rope_theta"])
    kind = rope["rope_type"]
    if kind == "default":
        return dict(rope_type="rope", rotary_base=base, rotary_scaling_factor=1.0, mscale=1.0, mscale_all_dim=0.0)
    if kind != "yarn":
        raise UnsupportedModel(f"deepseek_v3: rope type {kind!r}; megatron-core's MLA has default rope and yarn")
    if rope.get("attention_factor") is not None or rope.get("truncate", True) is False:
        raise UnsupportedModel("deepseek_v3: yarn with attention_factor or truncate=False, which megatron-core's MLA "
                               "cannot take")
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    if mscale_all_dim and not mscale:
        raise UnsupportedModel("deepseek_v3: yarn mscale_all_dim without mscale; megatron-core's MLA would scale "
                               "the rotary embedding by a ratio HF does not use")
    original = int(rope["original_max_position_embeddings"])
    factor = float(rope.get("factor") or int(hf_config.max_position_embeddings) / original)
    return dict(rope_type="yarn", rotary_base=base, rotary_scaling_factor=factor,
                original_max_position_embeddings=original, beta_fast=float(rope.get("beta_fast") or 32),
                beta_slow=float(rope.get("beta_slow") or 1),
                # HF scales by mscale / mscale_all_dim when both are set and ignores mscale otherwise.
                mscale=float(mscale) if mscale_all_dim else 1.0, mscale_all_dim=float(mscale_all_dim or 0.0))
