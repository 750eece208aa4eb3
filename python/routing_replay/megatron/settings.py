"""The trainer's parallel and optimizer settings, without torch or megatron-core: the job
configuration (``config``) imports them for its dry run. ``parallel`` and ``learner`` take them."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator
from pydantic.dataclasses import dataclass

from routing_replay.settings import SETTINGS

Decay = Literal["constant", "linear", "cosine"]


@dataclass(frozen=True, config=SETTINGS)
class ParallelConfig:
    """Parallel sizes (``parallel.initialize``); the job's ``train.parallel``."""

    tensor: int = Field(default=1, ge=1, strict=True)
    """Tensor-parallel size."""
    pipeline: int = Field(default=1, ge=1, strict=True)
    """Pipeline-parallel size."""
    expert: int = Field(default=1, ge=1, strict=True)
    """Expert-parallel size."""
    context: int = Field(default=1, ge=1, strict=True)
    """Context-parallel size. megatron-core needs TransformerEngine attention for it (not on CPU);
    the job refuses it (``config.validate_job``)."""
    data: int = Field(default=1, ge=1, strict=True)
    """Data-parallel size: the job's ranks are data x tensor x context x pipeline (megatron-core
    derives it from the world size; the job places that many trainer ranks)."""
    sequence_parallel: bool = Field(default=False, strict=True)
    """Shard activations along the sequence across the tensor-parallel group (needs tensor > 1)."""


@dataclass(frozen=True, config=SETTINGS)
class OptimizerSettings:
    """Adam, gradient clipping and the learning-rate schedule (``learner.Learner``); the job's
    ``train.optimizer``."""

    learning_rate: float = Field(default=1e-5, gt=0, strict=True)
    min_learning_rate: float = Field(default=0.0, ge=0, strict=True)
    """Where ``decay`` ends; at most ``learning_rate``."""
    warmup_steps: int = Field(default=0, ge=0, strict=True)
    """Optimizer steps of linear warm-up from 0 to ``learning_rate``."""
    decay: Decay = "constant"
    """After warm-up, from ``learning_rate`` to ``min_learning_rate`` over ``total_steps``."""
    total_steps: int = Field(default=1, ge=1, strict=True, exclude=True)
    """Optimizer steps the schedule spans (the decay's length). A job derives it, train.steps x
    train.mini_batches (one optimizer step per mini-batch), so it is not written in (or dumped to)
    a configuration."""
    weight_decay: float = Field(default=0.0, ge=0, strict=True)
    adam_beta1: float = Field(default=0.9, ge=0, lt=1, strict=True)
    adam_beta2: float = Field(default=0.999, ge=0, lt=1, strict=True)
    adam_eps: float = Field(default=1e-8, gt=0, strict=True)
    grad_clip: float = Field(default=1.0, ge=0, strict=True)
    """Clip to this global gradient norm (0: no clipping)."""
    distributed: bool = Field(default=False, strict=True)
    """Shard the fp32 main parameters and Adam moments over the data-parallel ranks (megatron-core's
    DistributedOptimizer; expert parameters over the expert-data-parallel ranks). With one
    data-parallel rank it changes nothing."""

    @field_validator("min_learning_rate")
    @classmethod
    def _min_within_learning_rate(cls, minimum: float, info: ValidationInfo) -> float:
        learning_rate = info.data.get("learning_rate")
        if learning_rate is not None and minimum > learning_rate:
            raise ValueError(f"min_learning_rate={minimum} must be at most learning_rate={learning_rate}")
        return minimum
