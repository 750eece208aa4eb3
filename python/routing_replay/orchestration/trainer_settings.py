"""The trainer's settings, without torch, Ray or megatron-core: the job configuration's ``train``
section is these plus ``steps`` (``config.TrainSection``), and each trainer rank's
``trainer.TrainerSpec`` is these plus its place in the job."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic.dataclasses import dataclass

from routing_replay.megatron.settings import OptimizerSettings, ParallelConfig
from routing_replay.rl.settings import Clip, Correction
from routing_replay.settings import SETTINGS

ReplayMode = Literal["none", "R2", "R3"]
Recompute = Literal["none", "selective", "full"]


@dataclass(frozen=True, config=SETTINGS)
class TrainerSettings:
    """What a trainer rank does with its samples: parallel sizes, optimizer, batch splitting,
    recompute, the objective's clipping and correction, and routing replay."""

    parallel: ParallelConfig = ParallelConfig()
    mini_batches: int = Field(default=1, ge=1, strict=True)
    """Optimizer steps per rollout batch (1 = on-policy)."""
    micro_batch_size: int = Field(default=4, ge=1, strict=True)
    optimizer: OptimizerSettings = OptimizerSettings()
    recompute: Recompute = "none"
    """Activation recompute (megatron-core's recompute_granularity): ``selective`` recomputes the core
    attention in backward, ``full`` whole transformer layers (only their inputs are kept)."""
    recompute_layers: int = Field(default=1, ge=1, strict=True)
    """With ``recompute: full``: layers per recomputed chunk (recompute_method uniform,
    recompute_num_layers); must divide the layers per pipeline stage."""
    clip: Clip = Clip()
    replay: ReplayMode = "R3"
    """none | R2 (replay the trainer's own pi_old routing) | R3 (replay the rollout's routing)"""
    correction: Correction = Correction()
    min_replay_coverage: float = Field(default=1.0, ge=0.0, le=1.0, strict=True)
    """R3: the least share of a batch's loss tokens whose rollout routing arrived; a batch below it is
    refused (a token without its routing would be trained on the trainer's own routing)."""
    paired_diagnostics: bool = Field(default=True, strict=True)
    """Score pi_old twice, under the trainer's own routing and under the rollout's, in every replay mode
    (the ``paired/*`` metrics: what routing flips contribute to the mismatch). SGLang then records
    routing even without R3; turn off for speed."""
