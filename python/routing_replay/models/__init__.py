"""Model families in one place: the registry of supported Hugging Face ``model_type``s.

Each family is one module holding everything the project knows about it (the MoE-layer map, the
HF names, the Megatron facts as data, the tiny builder) as a ``base.ModelFamily`` subclass
instantiated as ``FAMILY``; the interface is documented in ``base``. Adding a family is one new
module and one line in ``FAMILIES`` below (see docs/models.md).

This package is the lowest layer: capture, the configuration, the tiny models and the SGLang and
Megatron sides read it; it imports none of them, no engine, and no torch or transformers at import
time.
"""

from __future__ import annotations

from typing import Any

from routing_replay.models import deepseek_v3, glm4_moe, mixtral, qwen2_moe, qwen3_moe
from routing_replay.models.base import ModelFamily, TinyShape, UnsupportedModel, Weight

FAMILIES: dict[str, ModelFamily] = {family.model_type: family for family in (
    qwen3_moe.FAMILY,
    qwen2_moe.FAMILY,
    mixtral.FAMILY,
    glm4_moe.FAMILY,
    deepseek_v3.FAMILY,
)}
"""Every supported family by HF ``model_type``."""


def family_of(hf_config: Any) -> ModelFamily:
    """The family of a Hugging Face config (a transformers config or anything with ``model_type``)."""
    model_type = getattr(hf_config, "model_type", None)
    family = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        raise UnsupportedModel(f"unsupported model type {model_type!r}; supported: {', '.join(sorted(FAMILIES))}")
    return family


def moe_layer_ids(hf_config: Any) -> list[int]:
    """Indices of the decoder layers that have a router, in model order.

    Routing rows are stored for these layers only: row layer ``i`` belongs to decoder layer
    ``moe_layer_ids(hf_config)[i]``; the trainer's routers are the same layers.
    """
    return family_of(hf_config).moe_layer_ids(hf_config)


__all__ = ["FAMILIES", "ModelFamily", "TinyShape", "UnsupportedModel", "Weight", "family_of", "moe_layer_ids"]
