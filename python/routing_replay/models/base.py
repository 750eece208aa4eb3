"""The interface of a model family: what the project knows about one Hugging Face ``model_type``.

A family is a ``ModelFamily`` subclass in its own module of ``routing_replay.models``, instantiated
once as the module's ``FAMILY`` and listed in the registry (``models/__init__.py``). It holds:

- the MoE-layer map (``moe_layer_ids``): which decoder layers have a router, from the HF config;
- the Hugging Face names: the config attribute that counts experts, and the checkpoint's tensor
  names (safetensors, what SGLang and the Megatron loader read) of the MoE block, the router, the
  expert projections, the shared expert and its gate. transformers >= 5 may hold other module
  paths in memory (fused experts; Mixtral's ``block_sparse_moe`` is its ``mlp``): the checkpoint's
  names are the ones that count;
- the Megatron facts as plain data: the TransformerConfig keyword arguments specific to the family
  (``megatron_config``), extra GPTModel arguments (``gpt_model_args``) and every weight as a
  ``Weight`` (``weights``: Megatron name <- HF names, and how they pack), which
  ``routing_replay.megatron.hf_checkpoint`` turns into its loading/export rules;
- the tiny builder: a tiny HF config (``tiny_config``) and its model class (``hf_model_class``).

This package is the lowest layer: it imports no engine (SGLang, megatron-core, Ray) and no torch or
transformers at import time (only inside the builder functions), so capture, the configuration's
dry run and the SGLang and Megatron sides can all read it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

Pack = Literal["copy", "concat_rows", "qkv"]
"""How a Megatron parameter is made of its HF tensors:

- ``copy``: one HF tensor, as is;
- ``concat_rows``: the HF tensors stacked along dim 0 (GLU ``[gate; up]``), split back in equal parts;
- ``qkv``: HF ``(q, k, v)`` interleaved per query group, as megatron-core's fused ``linear_qkv`` keeps them
  (the head counts and head size come from the HF config).
"""


class UnsupportedModel(ValueError):
    """A Hugging Face config of a model type, or a use of it, that the project does not support."""


@dataclass(frozen=True)
class Weight:
    """One Megatron parameter and the Hugging Face tensor(s) it is made of, as data."""

    mcore: str
    hf: tuple[str, ...]
    pack: Pack = "copy"
    vocab: bool = False
    """Rows are the vocabulary, which megatron pads to a multiple of the tensor-parallel size."""


@dataclass(frozen=True)
class TinyShape:
    """The shape of a tiny random model, every size resolved (``routing_replay.tiny_models`` fills it)."""

    vocab_size: int
    hidden: int
    layers: int
    experts: int
    top_k: int
    moe_intermediate_size: int
    shared_expert_size: int | None
    """None: the family's default (only families with ``sized_shared_expert`` accept a size)."""
    dense_layers: tuple[int, ...]
    attention_heads: int
    key_value_heads: int
    eos_id: int
    max_position_embeddings: int = 2048

    @property
    def head_dim(self) -> int:
        return self.hidden // self.attention_heads

    def common_hf_fields(self) -> dict[str, Any]:
        """The HF config fields every family's tiny config shares."""
        return dict(vocab_size=self.vocab_size, hidden_size=self.hidden, num_hidden_layers=self.layers,
                    num_attention_heads=self.attention_heads, num_key_value_heads=self.key_value_heads,
                    max_position_embeddings=self.max_position_embeddings, tie_word_embeddings=False,
                    bos_token_id=self.eos_id, eos_token_id=self.eos_id, pad_token_id=self.eos_id,
                    num_experts_per_tok=self.top_k)


GLU_NAMES = ("gate_proj", "up_proj", "down_proj")
"""The HF projection names of a gated MLP (dense layers, Qwen and GLM experts, shared experts)."""


class ModelFamily(ABC):
    """Everything about one HF ``model_type``. Subclasses set the class attributes and implement the
    abstract methods; the concrete methods are the common case a family may override."""

    model_type: ClassVar[str]
    """The HF config's ``model_type``: the registry key and the tiny model's kind."""
    experts_attrs: ClassVar[tuple[str, ...]]
    """The HF config attributes that count the routed experts; the first one set counts. More than
    one where transformers versions spell config.json differently (transformers >= 5 writes
    Qwen3-MoE's ``num_experts`` as ``num_local_experts``)."""
    moe_prefix: ClassVar[str]
    """The MoE block's name inside a decoder layer in the checkpoint, with a trailing dot (``"mlp."``)."""
    router_name: ClassVar[str] = "gate"
    """The router's module name inside the MoE block."""
    expert_names: ClassVar[tuple[str, str, str]] = GLU_NAMES
    """The routed experts' projections: gate, up, down."""
    shared_expert: ClassVar[str | None] = None
    """The shared expert's module name inside the MoE block (None: no shared expert)."""
    shared_expert_gate: ClassVar[str | None] = None
    """The shared expert's sigmoid gate's module name inside the MoE block (None: ungated)."""
    sized_shared_expert: ClassVar[bool] = False
    """Whether the tiny builder takes a shared expert size."""

    # ---- the MoE-layer map and HF facts ----------------------------------------------------------

    @abstractmethod
    def moe_layer_ids(self, hf_config: Any) -> list[int]:
        """Indices of the decoder layers that have a router, in model order."""

    def num_experts(self, hf_config: Any) -> int:
        for name in self.experts_attrs:
            value = getattr(hf_config, name, None)
            if value:
                return int(value)
        raise UnsupportedModel(f"{self.model_type} config has no {' or '.join(self.experts_attrs)}: "
                               "not a Mixture-of-Experts config")

    def expert_intermediate_size(self, hf_config: Any) -> int:
        """Each routed expert's intermediate size."""
        return int(hf_config.moe_intermediate_size)

    def shared_expert_intermediate_size(self, hf_config: Any) -> int | None:
        """The shared expert's intermediate size (None: no shared expert)."""
        return None

    @property
    def router_module(self) -> str:
        """The router's name inside a decoder layer in the checkpoint (``"mlp.gate"``)."""
        return f"{self.moe_prefix}{self.router_name}"

    # ---- Megatron facts (plain data: routing_replay.megatron turns them into a model) ------------

    @abstractmethod
    def megatron_config(self, hf_config: Any) -> dict[str, Any]:
        """The TransformerConfig keyword arguments specific to this family: router score function
        and pre-softmax, shared expert size and gate, qk norm, qkv bias, dense layers
        (``moe_layer_freq``), and any other (e.g. ``multi_latent_attention=True``, which makes it an
        MLATransformerConfig). The generic fields (layers, hidden, heads, experts, top-k,
        ``expert_intermediate_size``, norm epsilon, parallelism) are ``megatron.hf_checkpoint``'s; a
        key given here replaces the generic one. Raises ``UnsupportedModel`` for a config that
        megatron-core would compute differently from transformers."""

    def gpt_model_args(self, hf_config: Any) -> dict[str, Any]:
        """Extra GPTModel keyword arguments (e.g. ``rotary_percent``), added to the generic ones
        (vocabulary, positions, rotary base, tied embeddings), which they must not repeat."""
        return {}

    @abstractmethod
    def weights(self, hf_config: Any) -> list[Weight]:
        """Every Megatron parameter of the model and the HF tensors it is made of, in a fixed order
        (loading and export walk it). ``decoder_weights`` is the common layout to build on.
        Raises ``UnsupportedModel`` where ``megatron_config`` does."""

    def qk_norm(self, hf_config: Any) -> bool:
        """Whether attention normalises queries and keys (HF ``q_norm``/``k_norm``)."""
        return False

    def qkv_bias(self, hf_config: Any) -> bool:
        """Whether the q, k, v projections have biases."""
        return False

    def moe_layer_freq(self, hf_config: Any) -> list[int]:
        """Megatron's per-layer MoE pattern: 1 where a layer has a router, 0 where it is dense."""
        moe = set(self.moe_layer_ids(hf_config))
        return [1 if i in moe else 0 for i in range(int(hf_config.num_hidden_layers))]

    def decoder_weights(self, hf_config: Any) -> list[Weight]:
        """The common layout: embeddings, final norm and output layer, and per decoder layer
        ``attention_weights``, the two norms, and ``moe_weights`` or a dense GLU MLP."""
        out = [Weight("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), vocab=True),
               Weight("decoder.final_layernorm.weight", ("model.norm.weight",)),
               Weight("output_layer.weight", ("lm_head.weight",), vocab=True)]
        moe_layers = set(self.moe_layer_ids(hf_config))
        for i in range(int(hf_config.num_hidden_layers)):
            hf, mc = f"model.layers.{i}.", f"decoder.layers.{i}."
            out += self.attention_weights(hf_config, hf, mc)
            out += [Weight(f"{mc}input_layernorm.weight", (f"{hf}input_layernorm.weight",)),
                    Weight(f"{mc}pre_mlp_layernorm.weight", (f"{hf}post_attention_layernorm.weight",))]
            if i in moe_layers:
                out += self.moe_weights(hf_config, hf, mc)
            else:
                out += glu_weights(f"{mc}mlp.", f"{hf}mlp.", GLU_NAMES)
        return out

    def attention_weights(self, hf_config: Any, hf: str, mc: str) -> list[Weight]:
        """Grouped-query attention with fused q/k/v, optional biases and optional q/k norms."""
        attn = tuple(f"{hf}self_attn.{p}_proj" for p in "qkv")
        out = [Weight(f"{mc}self_attention.linear_qkv.weight", tuple(f"{a}.weight" for a in attn), "qkv"),
               Weight(f"{mc}self_attention.linear_proj.weight", (f"{hf}self_attn.o_proj.weight",))]
        if self.qkv_bias(hf_config):
            out.append(Weight(f"{mc}self_attention.linear_qkv.bias", tuple(f"{a}.bias" for a in attn), "qkv"))
        if self.qk_norm(hf_config):
            out += [Weight(f"{mc}self_attention.q_layernorm.weight", (f"{hf}self_attn.q_norm.weight",)),
                    Weight(f"{mc}self_attention.k_layernorm.weight", (f"{hf}self_attn.k_norm.weight",))]
        return out

    def moe_weights(self, hf_config: Any, hf: str, mc: str) -> list[Weight]:
        """Router, routed experts, and the shared expert and its gate where the family has them."""
        moe = f"{hf}{self.moe_prefix}"
        out = [Weight(f"{mc}mlp.router.weight", (f"{hf}{self.router_module}.weight",))]
        for e in range(self.num_experts(hf_config)):
            out += glu_weights(f"{mc}mlp.experts.local_experts.{e}.", f"{moe}experts.{e}.", self.expert_names)
        if self.shared_expert is not None:
            out += glu_weights(f"{mc}mlp.shared_experts.", f"{moe}{self.shared_expert}.", GLU_NAMES)
        if self.shared_expert_gate is not None:
            out.append(Weight(f"{mc}mlp.shared_experts.gate_weight", (f"{moe}{self.shared_expert_gate}.weight",)))
        return out

    # ---- the tiny builder (transformers is imported only here) ------------------------------------

    def default_moe_intermediate_size(self, hidden: int) -> int:
        """Each expert's intermediate size in a tiny model unless one is given."""
        return hidden // 2

    @abstractmethod
    def tiny_config(self, shape: TinyShape) -> Any:
        """A transformers config of a tiny random model of this family. Raises ValueError for a
        shape the family cannot have (e.g. dense layers it cannot place)."""

    @abstractmethod
    def hf_model_class(self) -> type:
        """The transformers causal-LM class of this family."""


def rope_parameters(hf_config: Any) -> dict[str, Any]:
    """The HF rope parameters with ``rope_theta`` and ``rope_type`` always set: transformers >= 5's
    ``rope_parameters``, or older configs' ``rope_scaling`` and ``rope_theta``/``partial_rotary_factor``
    attributes."""
    params = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    params["rope_theta"] = float(params.get("rope_theta") or getattr(hf_config, "rope_theta", None) or 10000.0)
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    partial = params.get("partial_rotary_factor") or getattr(hf_config, "partial_rotary_factor", None)
    if partial is not None:
        params["partial_rotary_factor"] = float(partial)
    return params


def glu_weights(mcore_prefix: str, hf_prefix: str, names: Sequence[str]) -> list[Weight]:
    """A gated MLP: Megatron's ``linear_fc1`` is HF ``[gate; up]``, ``linear_fc2`` is ``down``."""
    gate, up, down = (f"{hf_prefix}{n}.weight" for n in names)
    return [Weight(f"{mcore_prefix}linear_fc1.weight", (gate, up), "concat_rows"),
            Weight(f"{mcore_prefix}linear_fc2.weight", (down,))]
