"""The RL job's configuration: a typed schema, loaded strictly from YAML.

Each component reads its own section. Unknown keys and bad values are errors that name the field
(``train.mini_batches: must be >= 1``). ``validate_job`` adds the cross-field checks a dry run
makes (parallel sizes against the architecture and the GPUs, batch divisibility, sampling
parameters that keep the mismatch metric about numerics) and ``memory_estimate`` the per-GPU
memory of training and of routing capture.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Architecture(_Section):
    """The model's shape, for validation and memory estimates without reading the checkpoint."""

    num_layers: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    num_attention_heads: int = Field(ge=1)
    num_key_value_heads: int = Field(ge=1)
    head_dim: int = Field(ge=1)
    num_experts: int = Field(ge=1)
    top_k: int = Field(ge=1)
    moe_intermediate_size: int = Field(ge=1)
    vocab_size: int = Field(ge=1)
    moe_layers: int | None = None
    """Layers with a router (default: all)."""


class ModelSection(_Section):
    path: str | None = None
    """Hugging Face checkpoint directory (local). Exactly one of path and tiny."""
    tiny: Literal["qwen3_moe", "qwen2_moe", "mixtral"] | None = None
    """Build a tiny random checkpoint of this kind at start-up (CPU default, no hub)."""
    architecture: Architecture | None = None
    """Required with path for the dry run when the checkpoint is not on this machine."""
    rollout_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    train_dtype: Literal["bfloat16", "float32"] = "float32"

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        if (self.path is None) == (self.tiny is None):
            raise ValueError("set exactly one of model.path and model.tiny")
        return self


class RolloutSection(_Section):
    engines: int = Field(default=1, ge=1)
    """SGLang servers (Ray actors)."""
    gpus_per_engine: int = Field(default=1, ge=0)
    prompts_per_step: int = Field(default=8, ge=1)
    group_size: int = Field(default=4, ge=2)
    """Responses per prompt (GRPO group)."""
    max_new_tokens: int = Field(default=32, ge=1)
    temperature: float = Field(default=1.0, gt=0)
    top_p: float = 1.0
    top_k: int = -1
    sglang_args: list[str] = []
    """Passed through to every SGLang server unchanged."""
    weight_sync: Literal["distributed", "disk"] = "distributed"
    """How the trainer's weights reach the engines after each step: ``distributed`` broadcasts them
    (SGLang's update_weights_from_distributed; gloo on CPU, NCCL on GPU), ``disk`` writes safetensors
    that every engine loads (update_weights_from_disk; needs a file system shared with the engines)."""
    sync_tolerance: float = Field(default=1e-3, gt=0)
    """After each weight sync, the largest |engine - trainer| log-prob on a probe sequence allowed;
    beyond it the job stops (raise it for bfloat16 rollouts of a float32 trainer)."""


class ParallelSection(_Section):
    tensor: int = Field(default=1, ge=1)
    pipeline: int = Field(default=1, ge=1)
    expert: int = Field(default=1, ge=1)
    context: int = Field(default=1, ge=1)
    data: int = Field(default=1, ge=1)
    sequence_parallel: bool = False


class CorrectionSection(_Section):
    mode: Literal["none", "truncate", "mask"] = "truncate"
    level: Literal["token", "sequence", "geometric"] = "token"
    upper: float = Field(default=2.0, ge=1.0)
    lower: float = Field(default=0.5, gt=0.0, le=1.0)


class TrainSection(_Section):
    parallel: ParallelSection = ParallelSection()
    steps: int = Field(default=10, ge=1)
    mini_batches: int = Field(default=1, ge=1)
    """Optimizer steps per rollout batch (1 = on-policy)."""
    micro_batch_size: int = Field(default=4, ge=1)
    learning_rate: float = Field(default=1e-5, gt=0)
    clip_low: float = Field(default=0.2, ge=0)
    clip_high: float = Field(default=0.28, ge=0)
    grad_clip: float = Field(default=1.0, gt=0)
    replay: Literal["none", "R2", "R3"] = "R3"
    correction: CorrectionSection = CorrectionSection()


class TaskSection(_Section):
    name: str = "addition"
    """Built-in task (addition) or a name for the run's records."""
    prompts: str | None = None
    """Local JSONL of prompts (built-in tasks generate theirs)."""
    reward: str = "routing_replay.tasks.addition:reward"
    """Import path ``module:function`` of the reward function."""
    args: dict[str, int | float | str] = {}
    """Keyword arguments of a built-in task's prompt generator (addition: ``max_operand``)."""
    reward_workers: int = Field(default=1, ge=1)
    """Ray actors computing rewards."""
    sft_warmup_steps: int = Field(default=0, ge=0)
    """Supervised batches on (prompt, " " + answer) before RL: the cold start of a tiny model."""
    sft_batch_size: int = Field(default=32, ge=1)
    sft_learning_rate: float = Field(default=1e-3, gt=0)


class RunSection(_Section):
    output_dir: str = "runs/default"
    seed: int = 0
    checkpoint_every: int = Field(default=0, ge=0)
    gpus: int = Field(default=0, ge=0)
    """GPUs the job may use (0: CPU)."""
    gpu_memory_gib: float = Field(default=80.0, gt=0)
    max_engine_restarts: int = Field(default=3, ge=0)
    """Restarts of one crashed engine within one rollout before the job gives up."""
    keep_checkpoints: int = Field(default=2, ge=1)


class JobConfig(_Section):
    model: ModelSection
    rollout: RolloutSection = RolloutSection()
    train: TrainSection = TrainSection()
    task: TaskSection = TaskSection()
    run: RunSection = RunSection()


class ConfigError(ValueError):
    """A configuration file is malformed or inconsistent; the message names the field(s)."""


def load(path: str | Path) -> JobConfig:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{path}: {problems}") from None


def validate_job(cfg: JobConfig, arch: Architecture) -> list[str]:
    """Cross-field problems, each naming its fields; empty when the job can run."""
    problems = []
    p, r, t = cfg.train.parallel, cfg.rollout, cfg.train
    if r.top_p != 1.0 or r.top_k != -1:
        problems.append("rollout.top_p must be 1 and rollout.top_k -1: mu_old would measure sampling, not numerics")
    if arch.num_attention_heads % p.tensor or arch.num_key_value_heads % p.tensor:
        problems.append(f"train.parallel.tensor={p.tensor} must divide the {arch.num_attention_heads} attention "
                        f"and {arch.num_key_value_heads} key-value heads")
    if arch.num_experts % p.expert:
        problems.append(f"train.parallel.expert={p.expert} must divide the {arch.num_experts} experts")
    if arch.num_layers % p.pipeline:
        problems.append(f"train.parallel.pipeline={p.pipeline} must divide the {arch.num_layers} layers")
    if p.sequence_parallel and p.tensor == 1:
        problems.append("train.parallel.sequence_parallel needs train.parallel.tensor > 1")
    if (p.data * p.tensor * p.context) % p.expert:
        problems.append("train.parallel.expert must divide data x tensor x context ranks")
    for name, size in (("tensor", p.tensor), ("pipeline", p.pipeline), ("context", p.context)):
        if size != 1:
            problems.append(f"train.parallel.{name}={size}: the RL trainer supports data and expert parallelism only "
                            "(tensor, pipeline and context parallel RL steps are not implemented yet)")
    samples = r.prompts_per_step * r.group_size
    if samples % (t.mini_batches * p.data):
        problems.append(f"rollout.prompts_per_step x rollout.group_size = {samples} samples must split into "
                        f"train.mini_batches={t.mini_batches} x train.parallel.data={p.data}")
    from routing_replay.tasks import load_reward

    try:
        load_reward(cfg.task.reward)
    except ValueError as exc:
        problems.append(f"task.reward: {exc}")
    if cfg.run.gpus:
        estimate = memory_estimate(cfg, arch)["trainer_state_gib"]
        if estimate > 0.9 * cfg.run.gpu_memory_gib:
            problems.append(f"train.parallel: about {estimate:.0f} GiB of weights, gradients and optimizer state per "
                            f"GPU exceed 90% of run.gpu_memory_gib={cfg.run.gpu_memory_gib}")
        trainer = p.tensor * p.pipeline * p.context * p.data
        engines = r.engines * r.gpus_per_engine
        if trainer + engines > cfg.run.gpus:
            problems.append(f"trainer ({trainer}) + rollout ({engines}) GPUs exceed run.gpus={cfg.run.gpus}")
    return problems


def parameter_count(arch: Architecture) -> tuple[int, int]:
    """(total parameters, parameters active per token)."""
    attention = arch.hidden_size * arch.head_dim * (2 * arch.num_attention_heads + 2 * arch.num_key_value_heads)
    expert = 3 * arch.hidden_size * arch.moe_intermediate_size
    moe_layers = arch.moe_layers if arch.moe_layers is not None else arch.num_layers
    router = arch.hidden_size * arch.num_experts
    per_layer = attention + router
    embeddings = 2 * arch.vocab_size * arch.hidden_size
    total = arch.num_layers * per_layer + moe_layers * arch.num_experts * expert + embeddings
    active = arch.num_layers * per_layer + moe_layers * arch.top_k * expert + embeddings
    return total, active


def memory_estimate(cfg: JobConfig, arch: Architecture, kv_slots_per_engine: int = 1 << 20) -> dict[str, float]:
    """GiB per trainer GPU (weights, grads, Adam states in fp32, sharded over TP x PP and experts over
    EP) and the routing recorder per engine (uint8 up to 256 experts)."""
    p = cfg.train.parallel
    total, _ = parameter_count(arch)
    bytes_per_param = 2 + 4 + 8 if cfg.model.train_dtype == "bfloat16" else 4 + 4 + 8
    moe_layers = arch.moe_layers if arch.moe_layers is not None else arch.num_layers
    expert_params = moe_layers * arch.num_experts * 3 * arch.hidden_size * arch.moe_intermediate_size
    dense = (total - expert_params) / (p.tensor * p.pipeline)
    experts = expert_params / (p.expert * p.tensor * p.pipeline)
    itemsize = 1 if arch.num_experts <= 256 else 2
    recorder = kv_slots_per_engine * (moe_layers * arch.top_k * itemsize + 4 * -(-moe_layers // 32))
    return {"trainer_state_gib": (dense + experts) * bytes_per_param / 2**30,
            "routing_recorder_gib_per_engine": recorder / 2**30}


# The architecture tiny_models.build writes with its defaults (the CPU default job).
TINY_ARCHITECTURE = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         num_experts=8, top_k=2, moe_intermediate_size=32, vocab_size=512)


def architecture_of(cfg: JobConfig) -> Architecture:
    """From the config's architecture block, the tiny model's defaults, or the local checkpoint."""
    if cfg.model.architecture is not None:
        return cfg.model.architecture
    if cfg.model.tiny is not None:
        return Architecture(**TINY_ARCHITECTURE)
    config_json = Path(cfg.model.path) / "config.json"
    if not config_json.exists():
        raise ConfigError(f"model.architecture is required: {config_json} is not on this machine")
    import json

    from routing_replay.capture.layout import moe_layer_ids

    hf = json.loads(config_json.read_text())
    ns = type("HFConfig", (), hf)
    return Architecture(
        num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"], num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf["num_key_value_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        num_experts=hf.get("num_experts") or hf["num_local_experts"], top_k=hf["num_experts_per_tok"],
        moe_intermediate_size=hf.get("moe_intermediate_size") or hf["intermediate_size"], vocab_size=hf["vocab_size"],
        moe_layers=len(moe_layer_ids(ns)),
    )
