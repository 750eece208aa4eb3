"""The RL job's configuration: a typed schema, loaded strictly from YAML.

Each component reads its own section. Unknown keys and bad values are errors that name the field
(``train.mini_batches: must be >= 1``); the YAML loader also refuses what PyYAML would silently drop
or change (duplicate keys, keys that are not strings, tags without a JSON equivalent), so that every
problem with a file is one ``ConfigError`` naming the file and the field or the line.
``validate_job`` adds the cross-field checks a dry run makes (parallel sizes against the
architecture and the GPUs, batch divisibility, sampling parameters that keep the mismatch metric
about numerics) and ``memory_estimate`` the per-GPU memory of training and of routing capture.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Literal, TypeVar, get_args

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)
from pydantic_core import ErrorDetails
from yaml.constructor import ConstructorError


class _Section(BaseModel):
    # strict: no silent conversions (``steps: true`` is not 1, ``lr: "0.1"`` is not 0.1); ints are
    # still accepted where a float is expected. NaN and infinity are never a meaningful setting.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


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
    moe_layers: int | None = Field(default=None, ge=1)
    """Layers with a router (default: all)."""


TinyKind = Literal["qwen3_moe", "qwen2_moe", "mixtral"]


class TinyModel(_Section):
    """The shape of a tiny random checkpoint built at start-up (``tiny_models.build_from_config``).
    Attention is fixed: 4 heads, 2 key-value heads, head size hidden/4; a 512-token vocabulary."""

    kind: TinyKind
    layers: int = Field(default=2, ge=1)
    hidden: int = Field(default=64, ge=8, multiple_of=8)
    """Hidden size; a multiple of 8 so that the 4 heads have an even size (rotary embeddings)."""
    experts: int = Field(default=8, ge=1)
    top_k: int = Field(default=2, ge=1)
    """Experts per token; at most ``experts``."""
    moe_intermediate_size: int | None = Field(default=None, ge=1)
    """Each expert's intermediate size (default: hidden/2 for Qwen, hidden for Mixtral)."""
    shared_expert: int | None = Field(default=None, ge=1)
    """qwen2_moe only: its shared expert's intermediate size (default: hidden). Qwen2-MoE always has
    one; the other kinds have none."""
    seed: int | None = None
    """Seed of the random weights (default: run.seed)."""

    @field_validator("top_k")
    @classmethod
    def _top_k_within_experts(cls, top_k: int, info: ValidationInfo) -> int:
        experts = info.data.get("experts")
        if experts is not None and top_k > experts:
            raise ValueError(f"top_k={top_k} must be at most experts={experts}")
        return top_k

    @field_validator("shared_expert")
    @classmethod
    def _shared_expert_of_qwen2(cls, size: int | None, info: ValidationInfo) -> int | None:
        kind = info.data.get("kind")
        if size is not None and kind is not None and kind != "qwen2_moe":
            raise ValueError(f"only qwen2_moe has a shared expert, not {kind}")
        return size

    def architecture(self) -> Architecture:
        from routing_replay import tiny_models

        return Architecture(**tiny_models.architecture_fields(
            self.kind, layers=self.layers, hidden=self.hidden, experts=self.experts, top_k=self.top_k,
            moe_intermediate_size=self.moe_intermediate_size))


def _tiny_kind_or_shape(value: object) -> object:
    # ``tiny: qwen3_moe`` is the kind with its default shape; one error for anything else.
    if isinstance(value, str):
        return {"kind": value}
    if value is None or isinstance(value, dict):
        return value
    raise ValueError(f"must be a kind ({', '.join(get_args(TinyKind))}) or a mapping, got {_yaml_kind(value)}")


class ModelSection(_Section):
    path: str | None = None
    """Hugging Face checkpoint directory (local). Exactly one of path and tiny."""
    tiny: Annotated[TinyModel | None, BeforeValidator(_tiny_kind_or_shape)] = None
    """Build a tiny random checkpoint at start-up (CPU default, no hub): a kind (qwen3_moe, qwen2_moe,
    mixtral) with the default shape, or a ``TinyModel`` mapping (kind, layers, hidden, experts, ...)."""
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
    """After each weight sync, the largest mean |engine - trainer| log-prob per token of a probe
    sequence allowed (per engine); beyond it the job stops. Raise it for bfloat16 rollouts of a
    float32 trainer (an engine on other weights differs by nats on every token)."""


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
    min_replay_coverage: float = Field(default=1.0, ge=0.0, le=1.0)
    """R3: the least share of a batch's loss tokens whose rollout routing arrived; a batch below it is
    refused (a token without its routing would be trained on the trainer's own routing)."""
    paired_diagnostics: bool = True
    """Score pi_old twice, under the trainer's own routing and under the rollout's, in every replay mode
    (the ``paired/*`` metrics: what routing flips contribute to the mismatch). SGLang then records
    routing even without R3; turn off for speed."""


def _scalar(value: object) -> object:
    # One error for a list or mapping, not one per member of the union below.
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"must be a number or a string, got {_yaml_kind(value)}")
    return value


TaskArgument = Annotated[int | float | str, BeforeValidator(_scalar)]


class TaskSection(_Section):
    name: str = "addition"
    """Built-in task (addition) or a name for the run's records."""
    prompts: str | None = None
    """Local JSONL of prompts (built-in tasks generate theirs)."""
    reward: str = "routing_replay.tasks.addition:reward"
    """Import path ``module:function`` of the reward function."""
    args: dict[str, TaskArgument] = {}
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
    """A configuration file is malformed or inconsistent; the message names the file and the
    field(s) or the line."""


def _yaml_kind(value: object) -> str:
    """How a YAML author would call the type of ``value``."""
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "a mapping", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def _short_tag(tag: str) -> str:
    return tag.replace("tag:yaml.org,2002:", "!!")


def _refuse_tag(loader: yaml.SafeLoader, node: yaml.Node) -> None:
    raise ConstructorError(None, None, f"{_short_tag(node.tag)} has no place in a job configuration", node.start_mark)


class _StrictLoader(yaml.SafeLoader):
    """A SafeLoader that refuses what PyYAML would otherwise lose or change silently: a duplicate
    key (PyYAML keeps the last), a key that is not a string (``on:`` is the boolean true), sets,
    binary and ordered-pair tags; it reads ``1e-5`` as a number (YAML 1.1 wants ``1.0e-5``) and a
    date as the text written."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_line: dict[str, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<: *anchor``; explicit keys override it
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                raise ConstructorError(None, None, "a key must be a string, not a list or mapping", key_node.start_mark)
            key = self.construct_object(key_node)
            if not isinstance(key, str):
                raise ConstructorError(None, None, f"the key {key_node.value!r} reads as {_yaml_kind(key)}, not a "
                                       "string: quote it", key_node.start_mark)
            if key in first_line:
                raise ConstructorError(None, None, f"duplicate key {key!r} (first at line {first_line[key]})",
                                       key_node.start_mark)
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> object:
        try:
            return super().construct_object(node, deep)
        except (ValueError, KeyError) as exc:  # an explicit tag on a value it cannot hold: ``!!int abc``
            raise ConstructorError(None, None, f"{node.value!r} is not a valid {_short_tag(node.tag)}",
                                   node.start_mark) from None


for _tag in ("binary", "set", "omap", "pairs"):
    _StrictLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _refuse_tag)
_StrictLoader.add_constructor("tag:yaml.org,2002:timestamp", yaml.SafeLoader.construct_yaml_str)
_EXPONENT_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789"))


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{path}: line {line}: not UTF-8: byte 0x{data[exc.start]:02x} at byte offset "
                          f"{exc.start}") from None


def _construct(text: str) -> tuple[object, yaml.Node | None]:
    """The document's data and its node tree (for the line of a field)."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        return (None if node is None else loader.construct_document(node)), node
    finally:
        loader.dispose()


def _parse_yaml(path: Path, text: str) -> tuple[object, yaml.Node | None]:
    try:
        return _construct(text)
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        raise ConfigError(f"{path}: line {line}: the character U+{exc.character:04X} is not allowed in YAML") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        context = f"{exc.context}: " if exc.context else ""
        raise ConfigError(f"{path}: {where}{context}{exc.problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply") from None


def _line_of(node: yaml.Node | None, loc: tuple[int | str, ...]) -> int | None:
    """The line of the key or item at ``loc``, or of its nearest ancestor in the file."""
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            key_node, node = next(((k, v) for k, v in node.value if k.value == part), (None, None))
            if key_node is None:
                break
            line = key_node.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _allowed_keys(schema: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """The keys of the section of ``schema`` that holds ``loc`` (an unknown key's location)."""
    section = schema
    for part in loc[:-1]:
        annotation = section.model_fields[str(part)].annotation
        section = next(t for t in (annotation, *get_args(annotation))
                       if isinstance(t, type) and issubclass(t, BaseModel))
    return list(section.model_fields)


def _describe(schema: type[BaseModel], error: ErrorDetails, root: yaml.Node | None) -> str:
    # An unknown key may hold a newline: quote it so that the message stays on one line.
    where = ".".join(str(part) if str(part).isprintable() else repr(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        message = f"unknown key; allowed: {', '.join(_allowed_keys(schema, error['loc']))}"
    elif error["type"] in ("model_type", "dict_type"):
        message = f"must be a mapping, got {_yaml_kind(error['input'])}"
    elif error["type"].endswith("_type"):
        message = f"{error['msg']}, got {_yaml_kind(error['input'])}"
    else:
        message = error["msg"]
    line = _line_of(root, error["loc"])
    return f"{where}: {message}" + (f" (line {line})" if line else "")


Schema = TypeVar("Schema", bound=BaseModel)


def load(path: str | Path, schema: type[Schema] = JobConfig) -> Schema:
    """The configuration in a YAML file (a job's, or another ``schema``'s such as an experiment's);
    every way the file can be wrong is a ConfigError naming the file and the field or the line."""
    path = Path(path)
    raw, root = _parse_yaml(path, _read_text(path))
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections ({', '.join(schema.model_fields)}),"
                          f" got {'an empty document' if raw is None else _yaml_kind(raw)}")
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: " + "; ".join(_describe(schema, error, root) for error in exc.errors())) from None


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
    else:
        share = samples // (t.mini_batches * p.data)
        if share % t.micro_batch_size and t.micro_batch_size < share:
            problems.append(f"train.micro_batch_size={t.micro_batch_size} must divide the {share} samples of a "
                            "mini-batch per data-parallel rank (rollout.prompts_per_step x rollout.group_size / "
                            "(train.mini_batches x train.parallel.data)) or be at least that many")
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


def architecture_of(cfg: JobConfig) -> Architecture:
    """From the config's architecture block, the tiny model's shape, or the local checkpoint."""
    if cfg.model.architecture is not None:
        return cfg.model.architecture
    if cfg.model.tiny is not None:
        return cfg.model.tiny.architecture()
    config_json = Path(cfg.model.path) / "config.json"
    try:
        hf = json.loads(config_json.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"model.architecture is required: {config_json} is not on this machine") from None
    except (OSError, ValueError) as exc:  # ValueError: not UTF-8, not JSON, or a NUL byte in model.path
        raise ConfigError(f"{config_json}: cannot read as JSON: {exc}") from None
    if not isinstance(hf, dict):
        raise ConfigError(f"{config_json}: the top level must be a JSON object")
    try:
        return _architecture_of_hf(hf)
    except KeyError as exc:
        raise ConfigError(f"{config_json}: no {exc} (set model.architecture instead)") from None
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{config_json}: {problems} (set model.architecture instead)") from None
    except (TypeError, ValueError, ArithmeticError) as exc:
        raise ConfigError(f"{config_json}: not a Hugging Face MoE config ({exc}); set model.architecture instead") \
            from None


def _architecture_of_hf(hf: dict) -> Architecture:
    from routing_replay.capture.layout import moe_layer_ids

    ns = type("HFConfig", (), hf)
    return Architecture(
        num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"], num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf["num_key_value_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        num_experts=hf.get("num_experts") or hf["num_local_experts"], top_k=hf["num_experts_per_tok"],
        moe_intermediate_size=hf.get("moe_intermediate_size") or hf["intermediate_size"], vocab_size=hf["vocab_size"],
        moe_layers=len(moe_layer_ids(ns)),
    )
