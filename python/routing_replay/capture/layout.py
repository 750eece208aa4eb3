"""RoutingLayout: the shape of one model's routing and the dtype that stores it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from routing_replay.capture.errors import InvalidRoutingInput
from routing_replay.models import family_of, moe_layer_ids

# uint8 holds ids 0..255: every expert of a 256-expert model (DeepSeek-V3) fits in one byte.
_UINT8_MAX_EXPERTS = 256
_INT16_MAX_EXPERTS = 32768


def storage_dtype(num_experts: int) -> torch.dtype:
    """The dtype that stores ``num_experts``' ids: uint8 up to 256 experts, else int16. The one
    place this rule lives: the recorder, the wire format and the memory estimate read it here."""
    return torch.uint8 if num_experts <= _UINT8_MAX_EXPERTS else torch.int16


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRoutingInput(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise InvalidRoutingInput(f"{name} must be positive, got {value}")
    return value


@dataclass(frozen=True)
class RoutingLayout:
    """Routing of one model: ``num_layers`` routed layers, each choosing ``top_k`` of ``num_experts``.

    ``num_layers`` counts the layers that have a router (MoE layers), in model order.
    """

    num_layers: int
    top_k: int
    num_experts: int

    def __post_init__(self) -> None:
        _positive_int("num_layers", self.num_layers)
        _positive_int("top_k", self.top_k)
        _positive_int("num_experts", self.num_experts)
        if self.top_k > self.num_experts:
            raise InvalidRoutingInput(f"top_k ({self.top_k}) exceeds num_experts ({self.num_experts})")
        if self.num_experts > _INT16_MAX_EXPERTS:
            raise InvalidRoutingInput(
                f"num_experts ({self.num_experts}) exceeds {_INT16_MAX_EXPERTS}, the most int16 storage holds"
            )

    @classmethod
    def from_hf_config(cls, config: object) -> RoutingLayout:
        """The routing layout of a Hugging Face MoE config of a supported family
        (``routing_replay.models.FAMILIES``; ``models.UnsupportedModel`` otherwise)."""
        family = family_of(config)
        return cls(len(moe_layer_ids(config)), int(config.num_experts_per_tok), family.num_experts(config))

    @property
    def dtype(self) -> torch.dtype:
        """Storage dtype: uint8 up to 256 experts, else int16."""
        return storage_dtype(self.num_experts)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def ids_per_token(self) -> int:
        return self.num_layers * self.top_k

    @property
    def bytes_per_token(self) -> int:
        """Bytes of routing per token: num_layers * top_k * itemsize."""
        return self.ids_per_token * self.itemsize

    @property
    def valid_words(self) -> int:
        """int32 words of the per-slot validity bitmask (one bit per layer)."""
        return (self.num_layers + 31) // 32
