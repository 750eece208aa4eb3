"""Optimisation of a megatron-core model with megatron-core's own components.

``Learner`` owns what a training step needs besides the loss: ``DistributedDataParallel``
(gradients accumulate in fp32 ``main_grad`` buffers and are reduced over the data-parallel group,
expert gradients over the expert-data-parallel group), ``get_megatron_optimizer`` (Adam; under bf16
it keeps fp32 main params and moments, without which a 1e-6 update rounds away in bf16; optionally
the distributed optimizer, which shards those over data-parallel ranks), gradient clipping and the
global grad norm from that optimizer, megatron-core's learning-rate schedule with warm-up, and
checkpoints through ``dist_checkpointing`` (model, optimizer, schedule and each rank's RNG; every
rank writes its own shards, and a checkpoint loads at another data-parallel size).

The loss the caller backpropagates must already be normalised by the global token count
(``calculate_per_token_loss``: DDP sums gradients over ranks instead of averaging them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from routing_replay.megatron.settings import OptimizerSettings

_DISTRIBUTED_OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "dp_reshardable"}


@dataclass(frozen=True)
class StepResult:
    grad_norm: float
    """The global norm before clipping (all ranks, dense and expert parameters)."""
    learning_rate: float
    """The rate this step used."""
    updated: bool
    """False when the optimizer skipped the step (a non-finite gradient)."""


class Learner:
    """DDP + megatron optimizer + schedule around one model chunk (no pipeline interleaving)."""

    def __init__(self, model: torch.nn.Module, settings: OptimizerSettings) -> None:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        self.bf16 = next(model.parameters()).dtype == torch.bfloat16
        if self.bf16:  # norms are built in fp32 otherwise; the engines serve them in bf16 too
            model.to(torch.bfloat16)
        model.config.calculate_per_token_loss = True
        self.model = model
        self.ddp = DistributedDataParallel(
            config=model.config, module=model,
            ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                     use_distributed_optimizer=settings.distributed))
        self.reset(settings)

    def reset(self, settings: OptimizerSettings) -> None:
        """A fresh optimizer (main params copied from the current weights, zero moments) and
        schedule: the supervised warm start and the RL run each get their own."""
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        self.settings = settings
        self.optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=settings.learning_rate, min_lr=settings.min_learning_rate,
            weight_decay=settings.weight_decay, adam_beta1=settings.adam_beta1, adam_beta2=settings.adam_beta2,
            adam_eps=settings.adam_eps, clip_grad=settings.grad_clip, bf16=self.bf16,
            params_dtype=torch.bfloat16 if self.bf16 else torch.float32,
            use_distributed_optimizer=settings.distributed), [self.ddp])
        total = max(settings.total_steps, settings.warmup_steps + 1)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if settings.warmup_steps else settings.learning_rate,
            max_lr=settings.learning_rate, min_lr=settings.min_learning_rate, lr_warmup_steps=settings.warmup_steps,
            lr_decay_steps=total, lr_decay_style=settings.decay, start_wd=settings.weight_decay,
            end_wd=settings.weight_decay, wd_incr_steps=total, wd_incr_style="constant")

    @property
    def steps_taken(self) -> int:
        return self.scheduler.num_steps

    def zero_grad(self) -> None:
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()

    def step(self) -> StepResult:
        """Reduces the accumulated gradients, clips, updates (fp32 main params, then the model's
        weights) and advances the schedule."""
        from megatron.core.distributed import finalize_model_grads

        learning_rate = self.learning_rate
        finalize_model_grads([self.ddp])
        updated, grad_norm, _ = self.optimizer.step()
        if updated:
            self.scheduler.step(1)
        return StepResult(float(grad_norm) if grad_norm is not None else math.nan, learning_rate, bool(updated))

    @property
    def learning_rate(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def main_params(self) -> dict[str, torch.Tensor]:
        """This rank's fp32 main copy of every parameter it optimises, by name (bf16 training
        with the non-distributed optimizer; the model's own parameters otherwise)."""
        named = {}
        for name, param in self.model.named_parameters():
            main = getattr(param, "main_param", None)
            named[name] = main if main is not None else param
        return named

    # ---- checkpoints ---------------------------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        """Model, optimizer, schedule and RNG into ``directory`` (collective: every rank calls it
        with the same directory and writes its own shards)."""
        from megatron.core import dist_checkpointing

        Path(directory).mkdir(parents=True, exist_ok=True)
        dist_checkpointing.save(self._sharded_state(is_loading=False), str(directory))

    def load(self, directory: str | Path) -> None:
        """The inverse of ``save``, at this run's data-parallel size (which may differ from the
        saving run's); RNG states come back only at the saving run's world size."""
        from megatron.core import dist_checkpointing

        same_world = dist_checkpointing.load_common_state_dict(str(directory))["world_size"] == \
            torch.distributed.get_world_size()
        request = self._sharded_state(is_loading=True)
        if not same_world:
            del request["rng"]
        state = dist_checkpointing.load(request, str(directory))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if same_world:
            _set_rng_state(state["rng"])

    def _sharded_state(self, is_loading: bool) -> dict:
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        model_state = self.model.sharded_state_dict()
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        metadata = _DISTRIBUTED_OPTIMIZER_FORMAT if self.settings.distributed else None
        return {
            "model": model_state,
            "optimizer": self.optimizer.sharded_state_dict(model_state, is_loading=is_loading, metadata=metadata),
            "scheduler": self.scheduler.state_dict(),
            "world_size": world,
            # One object per rank; a run at another world size does not restore them.
            "rng": ShardedObject("rng_state", _rng_state(), (world,), (rank,), replica_id=0),
        }


def _rng_state() -> dict:
    from megatron.core.tensor_parallel import random as mp_random

    state = {"torch": torch.get_rng_state(), "tracker": mp_random.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import random as mp_random

    torch.set_rng_state(state["torch"])
    mp_random.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def recompute_overrides(mode: str, layers: int = 1) -> dict:
    """TransformerConfig fields for activation recompute: ``selective`` recomputes the core
    attention, ``full`` whole layers in chunks of ``layers`` (megatron-core's uniform method)."""
    if mode == "none":
        return {}
    if mode == "selective":
        return {"recompute_granularity": "selective"}
    if mode == "full":
        return {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": layers}
    raise ValueError(f"recompute must be none, selective or full, got {mode!r}")


def state_digest(learner: Learner) -> dict[str, str]:
    """SHA-256 per part of this rank's training state (weights, fp32 main params, Adam moments,
    optimizer and schedule step): equal digests mean a bit-exact resume."""
    import hashlib

    def digest(tensors) -> str:
        sha = hashlib.sha256()
        for tensor in tensors:
            sha.update(tensor.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
        return sha.hexdigest()

    inner = getattr(learner.optimizer, "chained_optimizers", [learner.optimizer])
    groups = [group for optimizer in inner for group in optimizer.optimizer.param_groups]
    mains = [param for group in groups for param in group["params"]]
    states = [optimizer.optimizer.state[param] for optimizer in inner for group in optimizer.optimizer.param_groups
              for param in group["params"]]
    return {
        "weights": digest(p for _, p in sorted(learner.model.state_dict().items()) if torch.is_tensor(p)),
        "main_params": digest(mains),
        "adam_moments": digest(t for state in states for key in ("exp_avg", "exp_avg_sq") if key in state
                               for t in (state[key],)),
        "optimizer_steps": digest(torch.as_tensor(state.get("step", 0.0)).float() for state in states),
        "schedule_steps": str(learner.steps_taken),
    }
