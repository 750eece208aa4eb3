"""The RL job's configuration: a typed schema, loaded strictly from YAML.

Each component reads its own section. The trainer's sections are its components' settings
dataclasses, each defined once beside its component in a module without torch or megatron-core
(``rl.settings``, ``megatron.settings``, ``orchestration.trainer_settings``; validation rules in
``routing_replay.settings``): ``train`` is the trainer's ``TrainerSettings`` (plus ``steps``),
``train.parallel`` megatron's ``ParallelConfig``, ``train.optimizer`` the learner's
``OptimizerSettings``, ``train.clip`` and ``train.correction`` the objective's ``Clip`` and
``Correction``; the driver passes them through. Unknown keys and bad values
are errors that name the field (``train.mini_batches: must be >= 1``; a key of an earlier schema
names its new place, ``MOVED_KEYS``); the YAML loader also refuses what PyYAML would silently drop
or change (duplicate keys, keys that are not strings, tags without a JSON equivalent), so that every
problem with a file is one ``ConfigError`` naming the file and the field or the line.
A file may name a base file (``extends: BASE.yaml``) and ``load`` takes ``KEY=VALUE`` overrides (``--set``), merged
before validation; errors then name the base file or the override a value came from.
``validate_job`` adds the cross-field checks a dry run makes (parallel sizes against the
architecture and the GPUs, batch divisibility, sampling parameters that keep the mismatch metric
about numerics) and ``memory_estimate`` the per-GPU memory of training and of routing capture.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Literal, TypeVar, get_args

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)
from pydantic.dataclasses import dataclass as pydantic_dataclass, is_pydantic_dataclass
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails
from yaml.constructor import ConstructorError

from routing_replay.models import FAMILIES

from routing_replay.orchestration.trainer_settings import TrainerSettings
from routing_replay.settings import SETTINGS


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


TinyKind = Literal[tuple(FAMILIES)]  # type: ignore[valid-type]
"""A tiny model's kind: a model family's ``model_type`` (``routing_replay.models.FAMILIES``)."""


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
    """Each expert's intermediate size (default: the family's, e.g. hidden/2 for Qwen, hidden for Mixtral)."""
    shared_expert: int | None = Field(default=None, ge=1)
    """The shared expert's intermediate size, for families whose shared expert takes a size
    (qwen2_moe; default: hidden)."""
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
    def _shared_expert_sized_by_family(cls, size: int | None, info: ValidationInfo) -> int | None:
        kind = info.data.get("kind")
        if size is not None and kind is not None and not FAMILIES[kind].sized_shared_expert:
            sized = [name for name, family in FAMILIES.items() if family.sized_shared_expert]
            raise ValueError(f"only {', '.join(sized)} has a sized shared expert, not {kind}")
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
    """Build a tiny random checkpoint at start-up (CPU default, no hub): a kind (a family of
    ``routing_replay.models``: qwen3_moe, qwen2_moe, mixtral, glm4_moe, deepseek_v3) with the default
    shape, or a ``TinyModel`` mapping (kind, layers, hidden, experts, ...)."""
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
    max_prompt_tokens: int = Field(default=512, ge=1)
    """The longest prompt, in tokens, the job plans for: with ``max_new_tokens`` it is the sequence
    length of the memory estimate (``memory_estimate``)."""
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


@pydantic_dataclass(frozen=True, config=SETTINGS)
class TrainSection(TrainerSettings):
    """The trainer's settings (``TrainerSettings``: parallel sizes, optimizer, clipping, correction,
    replay, ...), as each rank takes them, and the job's length."""

    steps: int = Field(default=10, ge=1, strict=True)
    """RL steps of the job."""

    @model_validator(mode="before")
    @classmethod
    def _total_steps_not_written(cls, data: object) -> object:
        if isinstance(data, dict) and isinstance(data.get("optimizer"), dict) and "total_steps" in data["optimizer"]:
            raise ValueError("optimizer.total_steps is the job's optimizer steps, train.steps x train.mini_batches: "
                             "leave it out")
        return data

    def __post_init__(self) -> None:
        # The schedule spans the job's optimizer steps (one per mini-batch), however the section was
        # built (a file, --set, or dataclasses.replace of steps or mini_batches).
        object.__setattr__(self, "optimizer", replace(self.optimizer, total_steps=self.steps * self.mini_batches))


MOVED_KEYS = {f"train.{old}": f"train.{new}" for old, new in (
    ("learning_rate", "optimizer.learning_rate"), ("min_learning_rate", "optimizer.min_learning_rate"),
    ("lr_warmup_steps", "optimizer.warmup_steps"), ("lr_decay", "optimizer.decay"),
    ("weight_decay", "optimizer.weight_decay"), ("adam_beta1", "optimizer.adam_beta1"),
    ("adam_beta2", "optimizer.adam_beta2"), ("adam_eps", "optimizer.adam_eps"), ("grad_clip", "optimizer.grad_clip"),
    ("distributed_optimizer", "optimizer.distributed"), ("clip_low", "clip.low"), ("clip_high", "clip.high"))}
"""Keys of earlier versions of the schema and where they are now: an error names the new key."""


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
    """Local prompts: a JSONL or Parquet file, or a directory of them (a ``datasets``-style local
    dataset); built-in tasks generate theirs."""
    prompt_key: str = "prompt"
    """The record's prompt: a string, or with ``chat`` a list of ``{role, content}`` messages."""
    answer_key: str = "answer"
    """The record's reference answer (given to the reward function)."""
    metadata_keys: list[str] = []
    """Further record fields passed to the reward function with the sample."""
    chat: bool = False
    """Render prompts with the tokenizer's chat template (the prompt is a message list, or a string
    taken as one user message)."""
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


class WandbSection(_Section):
    project: str
    name: str | None = None
    """The run's name (default: the output directory's name)."""
    mode: Literal["online", "offline", "disabled"] = "online"
    """``offline`` writes the run files locally (``wandb sync`` uploads them later), no network."""


class RunSection(_Section):
    output_dir: str = "runs/default"
    seed: int = 0
    """Seeds the prompts, the tiny model's weights, the trainer and SGLang's sampling (engine i:
    ``--random-seed seed + i``, unless ``rollout.sglang_args`` sets one)."""
    checkpoint_every: int = Field(default=0, ge=0)
    gpus: int = Field(default=0, ge=0)
    """GPUs the job may use (0: CPU)."""
    gpu_memory_gib: float = Field(default=80.0, gt=0)
    max_engine_restarts: int = Field(default=3, ge=0)
    """Restarts of one crashed engine within one rollout before the job gives up."""
    keep_checkpoints: int = Field(default=2, ge=1)
    placement: Literal["colocate", "separate"] = "colocate"
    """Where Ray places the GPUs' actors: ``colocate`` packs engines and trainer ranks onto as few
    nodes as possible, ``separate`` puts the engines on other nodes than the trainer's where the
    cluster allows. Each trainer expert-parallel group always stays inside one node."""
    wandb: WandbSection | None = None
    """Also log every metric to Weights & Biases (beside JSONL and TensorBoard, same names)."""


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
        except (ValueError, KeyError):  # an explicit tag on a value it cannot hold: ``!!int abc``
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


def _parse_yaml(path: Path | str, text: str) -> tuple[object, yaml.Node | None]:
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


EXTENDS = "extends"
"""The top-level key naming a configuration's base file (relative to the file); not a field of any schema."""


@dataclass(frozen=True)
class _Origin:
    """Where a value of the resolved configuration was written: ``source`` is a file's path (``node``
    the value's YAML node in it, ``line`` the line of its key) or an override (``--set KEY=VALUE``).
    ``keys`` holds each key's origin of a mapping merged from several sources."""

    source: str
    node: yaml.Node | None = None
    line: int | None = None
    override: bool = False
    keys: dict[str, _Origin] | None = None

    def child(self, part: int | str) -> _Origin:
        """The origin of the key or item ``part``; where it was not written, a copy of this one."""
        if self.keys is not None:
            if part in self.keys:
                return self.keys[part]
        elif isinstance(self.node, yaml.MappingNode):
            # reversed: explicit keys come after those a ``<<`` merge key put in front of them
            for key_node, value_node in reversed(self.node.value):
                if key_node.value == part:
                    return _Origin(self.source, value_node, key_node.start_mark.line + 1, self.override)
        elif isinstance(self.node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(self.node.value):
            item = self.node.value[part]
            return _Origin(self.source, item, item.start_mark.line + 1, self.override)
        return _Origin(self.source, None, self.line, self.override)

    def locate(self, loc: tuple[int | str, ...]) -> _Origin:
        """Where the value at ``loc``, or its nearest written ancestor, came from."""
        origin = self
        for part in loc:
            origin = origin.child(part)
        return origin


def _merge(base: dict, base_origin: _Origin, over: dict, over_origin: _Origin, own: _Origin) -> tuple[dict, _Origin]:
    """``over`` on top of ``base``: mappings merge key by key, anything else replaces; ``own`` is the
    merged mapping's own origin. The inputs are not changed."""
    merged = dict(base)
    keys = {key: base_origin.child(key) for key in base}
    for key, value in over.items():
        origin = over_origin.child(key)
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key], keys[key] = _merge(merged[key], keys[key], value, origin, own=origin)
        else:
            merged[key], keys[key] = value, origin
    return merged, replace(own, keys=keys)


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except (OSError, RuntimeError):  # a symlink loop: reading it fails, naming the file
        return False


class _ExtendsCycle(ConfigError):
    """Already names every file of the chain: not wrapped again by the files that extend it."""


def _resolve(path: Path, schema: type[BaseModel], chain: tuple[Path, ...] = ()) -> tuple[dict, _Origin]:
    """The file's top-level mapping with its ``extends`` chain merged under it. ``chain``: the files
    extending this one, outermost first."""
    raw, root = _parse_yaml(path, _read_text(path))
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections ({', '.join(schema.model_fields)}),"
                          f" got {'an empty document' if raw is None else _yaml_kind(raw)}")
    origin = _Origin(str(path), root)
    if EXTENDS not in raw:
        return raw, origin
    line = origin.child(EXTENDS).line
    written = raw.pop(EXTENDS)
    if not isinstance(written, str) or not written.strip() or "\x00" in written:
        got = "an empty string" if written == "" else "a NUL character" if "\x00" in str(written) else \
            _yaml_kind(written)
        raise ConfigError(f"{path}: {EXTENDS}: must be the path of a YAML file (relative to this one), got {got} "
                          f"(line {line})")
    base = path.parent / written
    trail = (*chain, path)
    if any(_same_path(base, p) for p in trail):
        raise _ExtendsCycle(f"{trail[0]}: {EXTENDS} cycle: {' -> '.join(map(str, (*trail, base)))}")
    try:
        base_raw, base_origin = _resolve(base, schema, trail)
    except _ExtendsCycle:
        raise
    except ConfigError as exc:  # names the base file (and the line); prefixed with the file extending it
        raise ConfigError(f"{path}: {EXTENDS} (line {line}): {exc}") from None
    return _merge(base_raw, base_origin, raw, origin, own=origin)


def _override(text: str, flag: str) -> tuple[dict, _Origin]:
    """A ``KEY=VALUE`` override (``train.parallel.expert=2``) as a one-key-path mapping; VALUE is read
    as YAML by the strict loader (``[a, b]``, ``{x: 1}``, ``1.0e-6``, ``true``; empty: null).
    ``flag`` is the command-line option it came with, for messages."""
    # escaped where not printable, so that every message stays on one line
    label = f"{flag} {text if text.isprintable() else text.encode('unicode_escape').decode()}"
    key, equals, value_text = text.partition("=")
    key = key.strip()
    if not equals:
        raise ConfigError(f"{label}: expected KEY=VALUE with a dotted KEY, e.g. {flag} train.replay=R2")
    parts = key.split(".")
    if not all(part.strip() for part in parts):
        raise ConfigError(f"{label}: the key {key!r} must be names joined by dots, e.g. train.parallel.expert")
    value, node = _parse_yaml(label, value_text)
    origin = _Origin(label, node, override=True)
    for part in reversed(parts):
        value, origin = {part: value}, _Origin(label, override=True, keys={part: origin})
    return value, origin


def _section_fields(section: type) -> dict[str, FieldInfo]:
    """A section's fields: a model's, or a settings dataclass's (``routing_replay.settings``)."""
    return section.model_fields if issubclass(section, BaseModel) else section.__pydantic_fields__


def _allowed_keys(schema: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """The keys of the section of ``schema`` that holds ``loc`` (an unknown key's location)."""
    section: type = schema
    for part in loc[:-1]:
        annotation = _section_fields(section)[str(part)].annotation
        section = next(t for t in (annotation, *get_args(annotation))
                       if isinstance(t, type) and (issubclass(t, BaseModel) or is_pydantic_dataclass(t)))
    return list(_section_fields(section))


def _describe(schema: type[BaseModel], error: ErrorDetails, origin: _Origin | None, top: str | None = None) -> str:
    """One error: the field, the problem and where the value came from: ``(line L)`` in the file
    loaded (``top``), ``(FILE, line L)`` in a base file, a ``--set KEY=VALUE: `` prefix for an override."""
    # An unknown key may hold a newline: quote it so that the message stays on one line.
    where = ".".join(str(part) if str(part).isprintable() else repr(part) for part in error["loc"])
    if where in MOVED_KEYS:
        message = f"unknown key: now {MOVED_KEYS[where]}"
    elif error["type"] in ("extra_forbidden", "unexpected_keyword_argument"):  # a model's, a dataclass's
        message = f"unknown key; allowed: {', '.join(_allowed_keys(schema, error['loc']))}"
    elif error["type"] in ("model_type", "dict_type", "dataclass_type"):
        message = f"must be a mapping, got {_yaml_kind(error['input'])}"
    elif error["type"].endswith("_type"):
        message = f"{error['msg']}, got {_yaml_kind(error['input'])}"
    else:
        message = error["msg"]
    found = origin.locate(error["loc"]) if origin is not None else None
    if found is None:
        return f"{where}: {message}"
    if found.override:
        return f"{found.source}: {where}: {message}"
    if found.source == top:
        return f"{where}: {message}" + (f" (line {found.line})" if found.line else "")
    return f"{where}: {message} ({found.source}" + (f", line {found.line})" if found.line else ")")


Schema = TypeVar("Schema", bound=BaseModel)


def load(path: str | Path, schema: type[Schema] = JobConfig, overrides: Sequence[str] = (),
         flag: str = "--set") -> Schema:
    """The configuration in a YAML file (a job's, or another ``schema``'s such as an experiment's);
    every way the file can be wrong is a ConfigError naming the file and the field or the line.

    A top-level ``extends: BASE.yaml`` (relative to the file; chains allowed) merges the file over
    its base: mappings key by key, the file's keys winning; lists and scalars replace. Then each
    override ``KEY=VALUE`` (``train.parallel.expert=2``, as ``--set`` gives them), in order, is merged
    the same way, its VALUE read as YAML; the result is validated as if it had been written in one
    file. An error names the field and where its value came from: a line of the file, a base file
    and line, or the override as given with ``flag`` (``--set train.replay=R9: train.replay: ...``)."""
    if isinstance(overrides, str):
        raise TypeError("overrides is a sequence of KEY=VALUE strings, not one string")
    path = Path(path)
    layers = [_override(text, flag) for text in overrides]
    raw, origin = _resolve(path, schema)
    for over, over_origin in layers:
        raw, origin = _merge(raw, origin, over, over_origin, own=origin)
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: " + "; ".join(_describe(schema, error, origin, str(path))
                                                  for error in exc.errors())) from None


def to_yaml(cfg: BaseModel) -> str:
    """Every field of ``cfg`` with its value, defaults included, in schema order (but those derived,
    excluded from dumps: ``train.optimizer.total_steps``): YAML that ``load`` reads back to an equal
    configuration (``routing-replay train --print-config``)."""
    return yaml.safe_dump(cfg.model_dump(), sort_keys=False, allow_unicode=True, default_flow_style=False, width=100)


def validate_job(cfg: JobConfig, arch: Architecture) -> list[str]:
    """Cross-field problems, each naming its fields; empty when the job can run."""
    problems = []
    p, r, t = cfg.train.parallel, cfg.rollout, cfg.train
    if r.top_p != 1.0 or r.top_k != -1:
        problems.append("rollout.top_p must be 1 and rollout.top_k -1: mu_old would measure sampling, not numerics")
    task = cfg.task
    if task.prompts is None and (task.prompt_key, task.answer_key, task.metadata_keys) != ("prompt", "answer", []):
        problems.append("task.prompt_key, task.answer_key and task.metadata_keys apply to task.prompts: a built-in "
                        f"task ({task.name}) generates its own records")
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
    stage_layers = arch.num_layers // p.pipeline
    if t.recompute == "full" and not arch.num_layers % p.pipeline and stage_layers % t.recompute_layers:
        problems.append(f"train.recompute_layers={t.recompute_layers} must divide the {stage_layers} layers per "
                        "pipeline stage (train.recompute: full)")
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
        memory = memory_estimate(cfg, arch)
        if memory["trainer_total_gib"] > 0.9 * cfg.run.gpu_memory_gib:
            parts = " + ".join(f"{part} {memory[f'{part}_gib']:.1f}" for part in TRAINER_MEMORY_PARTS)
            problems.append(f"trainer memory per GPU: about {memory['trainer_total_gib']:.1f} GiB ({parts}) exceeds "
                            f"90% of run.gpu_memory_gib={cfg.run.gpu_memory_gib}: raise train.parallel.data or "
                            ".expert, set train.optimizer.distributed or train.recompute, or lower "
                            "train.micro_batch_size, rollout.max_prompt_tokens or rollout.max_new_tokens")
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


TRAINER_MEMORY_PARTS = ("params", "grads", "main_params", "adam", "activations", "logits", "backward")
"""The parts of a trainer GPU's memory, each a ``{part}_gib`` key of ``memory_estimate``."""


def memory_estimate(cfg: JobConfig, arch: Architecture, kv_slots_per_engine: int = 1 << 20) -> dict[str, float]:
    """GiB per trainer GPU, as the megatron-core trainer allocates it, and of the routing recorder
    per engine (uint8 ids up to 256 experts, at ``kv_slots_per_engine`` KV slots).

    State, per parameter held: dense parameters are sharded over TP x PP, expert parameters over
    EP x expert-TP x PP (expert-TP = TP, megatron's default). ``params_gib``: train_dtype bytes (2 or
    4); ``grads_gib``: 4 (fp32 grad buffer, grad_reduce_in_fp32); ``main_params_gib``: 4 with bfloat16
    training (fp32 master copy), 0 with float32 (the parameter is its own); ``adam_gib``: 8 (two fp32
    moments). With ``train.optimizer.distributed`` main params and moments are divided by the
    data-parallel size (DP x CP) for dense parameters and by megatron's expert-data-parallel size
    (world / (EP x expert-TP x PP)) for expert parameters. ``trainer_state_gib`` is their sum.

    Activations (``_activation_bytes``) and logits of one micro-batch at the longest sequence,
    ``micro_batch_size`` x (``max_prompt_tokens`` + ``max_new_tokens``), and ``backward_gib``: the
    unfused attention softmax's backward holds three fp32 score-sized tensors of the layer being
    differentiated (the probabilities' gradient, the scores' gradient and its scaled copy: a b s^2 x
    12 bytes; measured on CPU, benchmarks/results/learner-cpu.md: the backward of one micro-batch
    added 394 MiB where this gives 388). ``trainer_total_gib`` is the state plus these three. An
    estimate: allocator fragmentation, communication buffers and other backward temporaries are not
    counted (hence the 90% limit of ``validate_job``), and expert activations assume balanced routing.
    """
    p, t = cfg.train.parallel, cfg.train
    total, _ = parameter_count(arch)
    moe_layers = arch.moe_layers if arch.moe_layers is not None else arch.num_layers
    expert_params = moe_layers * arch.num_experts * 3 * arch.hidden_size * arch.moe_intermediate_size
    dense = (total - expert_params) / (p.tensor * p.pipeline)
    experts = expert_params / (p.expert * p.tensor * p.pipeline)
    world = p.tensor * p.pipeline * p.context * p.data
    if t.optimizer.distributed:
        optimizer_held = dense / (p.data * p.context) + experts / max(1, world // (p.expert * p.tensor * p.pipeline))
    else:
        optimizer_held = dense + experts
    bf16 = cfg.model.train_dtype == "bfloat16"
    activations, logits = _activation_bytes(cfg, arch)
    seq = cfg.rollout.max_prompt_tokens + cfg.rollout.max_new_tokens
    backward = 3 * arch.num_attention_heads * t.micro_batch_size * seq * seq * 4
    gib = {"params_gib": (dense + experts) * (2 if bf16 else 4) / 2**30,
           "grads_gib": (dense + experts) * 4 / 2**30,
           "main_params_gib": optimizer_held * 4 / 2**30 if bf16 else 0.0,
           "adam_gib": optimizer_held * 8 / 2**30,
           "activations_gib": activations / 2**30,
           "logits_gib": logits / 2**30,
           "backward_gib": backward / 2**30}
    gib["trainer_state_gib"] = sum(gib[f"{part}_gib"] for part in ("params", "grads", "main_params", "adam"))
    gib["trainer_total_gib"] = sum(gib[f"{part}_gib"] for part in TRAINER_MEMORY_PARTS)
    from routing_replay.capture.layout import RoutingLayout

    layout = RoutingLayout(moe_layers, arch.top_k, arch.num_experts)
    recorder = kv_slots_per_engine * (layout.bytes_per_token + 4 * layout.valid_words)
    gib["routing_recorder_gib_per_engine"] = recorder / 2**30
    return gib


def _activation_bytes(cfg: JobConfig, arch: Architecture) -> tuple[float, float]:
    """(activations, logits) in bytes of one micro-batch of b rows of s tokens (T = b x s), for the
    layouts the RL trainer runs (TP = CP = PP = 1), with megatron-core's local layer spec.

    e is the train_dtype's size (2 or 4), h hidden, A = heads x head_dim, k top_k, f the expert
    intermediate size, a the heads. Kept for backward, per layer (after Korthikanti et al., "Reducing
    Activation Recomputation in Large Transformer Models", with SwiGLU experts and no dropout):

    - attention linears: T e (3h + 8A): two norm inputs and the QKV input; Q, K, V around QK-norm
      and rotary and K, V repeated to the query heads, the output projection's input (~8A);
    - MoE MLP (layers with a router): T e (h + k (2h + 4f)): the router input; per routed copy the
      expert input, its output (for the weighted combine), gate and up (2f), silu and product (2f);
    - attention scores (unfused core attention): a b s^2 (4 + 2): the fp32 softmax and its bfloat16
      copy for the product with V (float32 training: one tensor, a b s^2 4).

    ``none`` keeps every layer's three; ``selective`` every layer's linears and MLP, and one layer's
    scores recomputed in backward; ``full`` each chunk of ``recompute_layers`` layers' input
    (T e h) and one chunk's activations recomputed in backward. Plus one score buffer, a b s^2 e
    (megatron's global memory buffer). Dense MLPs of layers without a router are not counted.

    Logits: T x vocab x (e + 12): the logits, the fp32 log-probabilities and their exponentials
    (entropy) kept for backward, and one fp32 gradient of that size in backward.
    """
    r, t = cfg.rollout, cfg.train
    e = 2 if cfg.model.train_dtype == "bfloat16" else 4
    b, s = t.micro_batch_size, r.max_prompt_tokens + r.max_new_tokens
    tokens = b * s
    h, width, k = arch.hidden_size, arch.num_attention_heads * arch.head_dim, arch.top_k
    layers = arch.num_layers
    moe_layers = arch.moe_layers if arch.moe_layers is not None else layers
    attention = tokens * e * (3 * h + 8 * width)
    mlp = tokens * e * (h + k * (2 * h + 4 * arch.moe_intermediate_size))
    score_elements = arch.num_attention_heads * b * s * s
    scores = score_elements * (6 if e == 2 else 4)
    if t.recompute == "none":
        kept = layers * (attention + scores) + moe_layers * mlp
    elif t.recompute == "selective":
        kept = layers * attention + moe_layers * mlp + scores
    else:
        chunk = t.recompute_layers
        kept = -(-layers // chunk) * tokens * e * h + chunk * (attention + mlp + scores)
    logits = tokens * arch.vocab_size * (e + 12)
    return kept + score_elements * e, logits


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
    from routing_replay.models import family_of

    ns = type("HFConfig", (), hf)  # the families read configs by attribute
    family = family_of(ns)
    try:
        return Architecture(
            num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
            num_attention_heads=hf["num_attention_heads"], num_key_value_heads=hf["num_key_value_heads"],
            head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
            num_experts=family.num_experts(ns), top_k=hf["num_experts_per_tok"],
            moe_intermediate_size=family.expert_intermediate_size(ns), vocab_size=hf["vocab_size"],
            moe_layers=len(family.moe_layer_ids(ns)),
        )
    except AttributeError as exc:  # a field a family rule reads is missing: report it as a missing key
        raise KeyError(exc.name) from None
