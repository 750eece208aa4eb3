"""Hugging Face MoE checkpoints <-> megatron-core GPTModel, for the families of ``routing_replay.models``.

``build_model(path)`` reads the checkpoint's config, builds a GPTModel with MoE layers (megatron-core's
local spec; TransformerEngine's is not mapped yet; multi-head latent attention where the family says
``multi_latent_attention``) and loads the weights. Each weight is described
once, by a ``Rule``: its Megatron name, its Hugging Face name(s), and how to pack them into one
tensor and back. Loading and exporting both walk the same rules, so the round trip is exact.

The family facts live in ``routing_replay.models`` as plain data: its TransformerConfig fields
(router score function and pre-softmax, shared expert, qk norm, qkv bias, dense layers as
``moe_layer_freq``), extra GPTModel arguments, and its weights as ``Weight``s (names and a packing
kind) that ``rules`` turns into ``Rule``s; the persistent buffers of the state dict are weights too
(the sigmoid router's float32 ``expert_bias``). This module holds the generic machinery: the generic
config fields, the packing, loading and export, and megatron-core's local spec made to build
multi-head latent attention without TransformerEngine (``_mla_local_core_attention``,
``without_transformer_engine``).

Loading reads only what this rank holds, straight from the safetensors files (the index's weight
map, or every ``*.safetensors``): the experts of its expert-parallel rank, the layers of its
pipeline stage, and of a tensor-parallel parameter only its slice of each Hugging Face tensor. A
rank's slice of a packed parameter is the pack of the same slice of each source (GLU ``[gate; up]``
is ``[gate slice; up slice]``, q/k/v keep whole query groups), which is how megatron-core shards
them. ``model.hf_bytes_read`` tells how much a rank read. Names are checked before any data is
read: every checkpoint tensor must be mapped, every parameter set (a checkpoint's multi-token-prediction
layers, ``num_nextn_predict_layers`` past ``num_hidden_layers``, which transformers ignores, are refused
as such).

Export is the inverse and streams: ``iter_hf_buckets`` walks the rules in order; each parameter's
slices (tensor- or expert-tensor-parallel ranks, the owning expert-parallel rank, the owning
pipeline stage) travel point to point to one destination rank, which unpacks them to Hugging Face
names and yields size-bounded buckets. Only the destination ever holds more than its own shards.
``save_hf`` writes the buckets as safetensors shards plus the transformers index (what SGLang and
transformers load); ``hf_tensor_meta`` names what an export sends without any collective (for the
weight broadcast to SGLang); ``export_hf`` gives every rank the whole model (tests, small models).
"""

from __future__ import annotations

import functools
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import astuple, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from routing_replay.megatron import without_transformer_engine
from routing_replay.megatron.parallel import ParallelConfig
from routing_replay.models import UnsupportedModel, family_of
from routing_replay.models.base import rope_parameters

Tensors = list[torch.Tensor]


@dataclass(frozen=True)
class Rule:
    """One Megatron tensor and the Hugging Face tensors it is made of."""

    mcore: str
    hf: tuple[str, ...]
    pack: Callable[[Tensors], torch.Tensor] = lambda ts: ts[0]
    """Also packs slices: a tensor-parallel rank's parameter is the pack of its slice of each source."""
    unpack: Callable[[torch.Tensor], Tensors] = lambda t: [t]
    vocab: bool = False
    """Rows are the vocabulary, which megatron pads to a multiple of the tensor-parallel size."""


def _concat_rows(ts: Tensors) -> torch.Tensor:
    return torch.cat(ts, dim=0)


def _split_rows(parts: int) -> Callable[[torch.Tensor], Tensors]:
    return lambda t: list(t.chunk(parts, dim=0))


def _qkv_rules(mcore: str, hf: tuple[str, str, str], heads: int, groups: int, head_dim: int) -> Rule:
    """Megatron keeps q, k, v interleaved per query group: [group][q heads of the group, k, v]. Pack
    and unpack work on any whole number of groups, so on a tensor-parallel rank's slice too."""
    rows = (heads // groups * head_dim, head_dim, head_dim)

    def pack(ts: Tensors) -> torch.Tensor:
        rest = ts[0].shape[1:]
        return torch.cat([t.reshape(-1, n, *rest) for t, n in zip(ts, rows)], dim=1).reshape(-1, *rest)

    def unpack(t: torch.Tensor) -> Tensors:
        grouped = t.reshape(-1, sum(rows), *t.shape[1:]).split(list(rows), dim=1)
        return [x.reshape(-1, *t.shape[1:]) for x in grouped]

    return Rule(mcore, hf, pack, unpack)


def rules(hf_config) -> list[Rule]:
    """Every weight of the model, as Megatron name <- Hugging Face name(s): the family's ``Weight``s
    (``routing_replay.models``) with their packing made concrete."""
    weights = family_of(hf_config).weights(hf_config)
    heads, groups = hf_config.num_attention_heads, hf_config.num_key_value_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    out = []
    for weight in weights:
        if weight.pack == "copy":
            out.append(Rule(weight.mcore, weight.hf, vocab=weight.vocab))
        elif weight.pack == "concat_rows":
            out.append(Rule(weight.mcore, weight.hf, _concat_rows, _split_rows(len(weight.hf)), vocab=weight.vocab))
        elif weight.pack == "qkv":
            out.append(_qkv_rules(weight.mcore, weight.hf, heads, groups, head_dim))
        else:
            raise ValueError(f"{weight.mcore}: unknown packing {weight.pack!r}")
    return out


def transformer_config(hf_config, parallel: ParallelConfig = ParallelConfig(), *, routing_replay: bool = True,
                       dtype: torch.dtype = torch.float32, dispatcher: str = "alltoall",
                       aux_loss_coeff: float = 0.0, **overrides):
    """The TransformerConfig that reproduces ``hf_config``'s forward; ``overrides`` are further
    TransformerConfig fields (e.g. activation recompute)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    family = family_of(hf_config)
    fields = dict(
        num_layers=hf_config.num_hidden_layers, hidden_size=hf_config.hidden_size,
        num_attention_heads=hf_config.num_attention_heads,
        num_query_groups=hf_config.num_key_value_heads,
        kv_channels=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads,
        ffn_hidden_size=hf_config.intermediate_size, num_moe_experts=family.num_experts(hf_config),
        moe_router_topk=hf_config.num_experts_per_tok,
        moe_ffn_hidden_size=family.expert_intermediate_size(hf_config),
        moe_aux_loss_coeff=aux_loss_coeff, moe_token_dispatcher_type=dispatcher, moe_grouped_gemm=False,
        moe_enable_routing_replay=routing_replay,
        gated_linear_unit=True, activation_func=F.silu, normalization="RMSNorm",
        layernorm_epsilon=hf_config.rms_norm_eps, add_bias_linear=False, tensor_model_parallel_size=parallel.tensor,
        expert_model_parallel_size=parallel.expert, pipeline_model_parallel_size=parallel.pipeline,
        context_parallel_size=parallel.context,
        sequence_parallel=parallel.sequence_parallel, use_cpu_initialization=True, params_dtype=dtype,
        gradient_accumulation_fusion=False, bias_activation_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, bias_dropout_fusion=False, apply_rope_fusion=False,
        attention_dropout=0.0, hidden_dropout=0.0,
    )
    # The family's own (router score function and pre-softmax, shared expert, qk norm, qkv bias, dense
    # layers, ...) refine the generic fields; the caller's overrides come last.
    fields = {**fields, **family.megatron_config(hf_config), **overrides}
    if fields.get("multi_latent_attention"):
        from megatron.core.transformer.transformer_config import MLATransformerConfig

        return MLATransformerConfig(**fields)
    return TransformerConfig(**fields)


def build_model(path: str | Path, parallel: ParallelConfig = ParallelConfig(), *, load_weights: bool = True,
                **config_overrides):
    """A GPTModel for the checkpoint at ``path`` with this rank's weights loaded (parallel state must be up).

    With ``load_weights=False`` the weights are initialised from the current seed instead (the
    same on every rank when every rank seeds alike). The vocabulary is padded to a multiple of the
    tensor-parallel size; ``model.vocab_size`` keeps the checkpoint's, and scoring ignores the rest.
    ``model.hf_bytes_read`` is how many bytes of checkpoint tensors this rank read (0 without weights).
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from transformers import AutoConfig

    from megatron.core import parallel_state as ps

    hf_config = AutoConfig.from_pretrained(path)
    if parallel.pipeline > 1:  # megatron needs the dtype of the activations it passes between stages
        config_overrides.setdefault("pipeline_dtype", config_overrides.get("dtype", torch.float32))
    config = transformer_config(hf_config, parallel, **config_overrides)
    pp_rank = ps.get_pipeline_model_parallel_rank()
    # The local spec everywhere for now: TransformerEngine's fuses norms into linear layers under
    # other parameter names, which the rules do not map yet (and no GPU stack was at hand to test).
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm", pp_rank=pp_rank)
    if config.multi_latent_attention:
        without_transformer_engine.multi_latent_attention_knows_te_is_absent()
        for layer in spec.layer_specs:
            layer.submodules.self_attention.submodules.core_attention = _mla_local_core_attention()
    padded_vocab = -(-hf_config.vocab_size // parallel.tensor) * parallel.tensor
    model_args = dict(vocab_size=padded_vocab, max_sequence_length=hf_config.max_position_embeddings,
                      position_embedding_type="rope", rotary_base=rope_parameters(hf_config)["rope_theta"],
                      share_embeddings_and_output_weights=bool(getattr(hf_config, "tie_word_embeddings", False)),
                      **family_of(hf_config).gpt_model_args(hf_config))  # the family's additions
    model = GPTModel(config=config, transformer_layer_spec=spec, **model_args,
                     # Full logits on every tensor-parallel rank; a vocab-parallel log-softmax would save memory.
                     parallel_output=False, pre_process=ps.is_pipeline_first_stage(),
                     post_process=ps.is_pipeline_last_stage())
    model.vocab_size = hf_config.vocab_size
    model.hf_bytes_read = _load(model, hf_config, _SafetensorsFiles(Path(path))) if load_weights else 0
    return model


@functools.cache
def _mla_local_core_attention() -> type:
    """megatron-core's local ``DotProductAttention`` as multi-head latent attention builds it.

    ``MLASelfAttention`` passes ``k_channels`` (q/k head size) and ``v_channels`` (value head size),
    which only TransformerEngine's attention accepts. The local one already computes q/k heads of
    another size than the value heads (it reshapes by -1); only its output is sized as
    ``kv_channels`` per head, which the family sets to ``v_head_dim``: this checks that and drops
    the two arguments."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class MLALocalCoreAttention(DotProductAttention):
        def __init__(self, config, *args, k_channels: int | None = None, v_channels: int | None = None, **kwargs):
            if v_channels is not None and v_channels != config.kv_channels:
                raise ValueError(f"the local attention gives kv_channels={config.kv_channels} channels per head, "
                                 f"not the {v_channels} of the value heads: set kv_channels to v_head_dim")
            super().__init__(config, *args, **kwargs)

    return MLALocalCoreAttention


# ---- reading Hugging Face tensors -------------------------------------------------------------------

_Index = tuple[slice, ...] | None
"""Which part of a tensor to read: one slice per leading dimension, None for all of it."""

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


class _HFWeights(ABC):
    """Hugging Face tensors by name, read whole or in part; counts the bytes it hands out."""

    def __init__(self) -> None:
        self.bytes_read = 0

    @abstractmethod
    def names(self) -> Collection[str]: ...

    @abstractmethod
    def shape(self, name: str) -> tuple[int, ...]: ...

    @abstractmethod
    def _read(self, name: str, index: _Index) -> torch.Tensor: ...

    def read(self, name: str, index: _Index = None) -> torch.Tensor:
        tensor = self._read(name, index)
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor


class _InMemory(_HFWeights):
    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.tensors = tensors

    def names(self) -> Collection[str]:
        return self.tensors.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def _read(self, name: str, index: _Index) -> torch.Tensor:
        return self.tensors[name] if index is None else self.tensors[name][index]


class _SafetensorsFiles(_HFWeights):
    """A checkpoint directory's safetensors: the files its index maps, or every ``*.safetensors``.
    Files are memory-mapped on first use and only the requested slices are copied out."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._handles: dict[Path, object] = {}
        index = path / INDEX_NAME
        if index.exists():
            self.files = {name: path / file for name, file in json.loads(index.read_text())["weight_map"].items()}
            absent = sorted({file.name for file in self.files.values() if not file.exists()})
            if absent:
                raise FileNotFoundError(f"{index} maps tensors to shard files that are missing: {absent}")
        else:
            paths = sorted(path.glob("*.safetensors"))
            if not paths:
                raise FileNotFoundError(f"no {INDEX_NAME} and no *.safetensors in {path}")
            self.files = {}
            for file in paths:
                for name in self._open(file).keys():
                    if name in self.files:
                        raise ValueError(f"{name} is in both {self.files[name].name} and {file.name}")
                    self.files[name] = file

    def _open(self, file: Path):
        from safetensors import safe_open

        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt")
        return self._handles[file]

    def names(self) -> Collection[str]:
        return self.files.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._found(name, lambda handle: handle.get_slice(name).get_shape()))

    def _read(self, name: str, index: _Index) -> torch.Tensor:
        return self._found(name, lambda handle: handle.get_tensor(name) if index is None
                           else handle.get_slice(name)[index])

    def _found(self, name: str, get: Callable):
        from safetensors import SafetensorError

        file = self.files[name]
        try:
            return get(self._open(file))
        except SafetensorError as exc:
            raise KeyError(f"{name}: {file.name}, where the index places it, cannot give it: {exc}") from None


def load_hf(model, hf_config, hf_weights: Mapping[str, torch.Tensor]) -> int:
    """Copies this rank's part of in-memory Hugging Face weights into ``model``; returns the bytes used."""
    return _load(model, hf_config, _InMemory(hf_weights))


def _load(model, hf_config, weights: _HFWeights) -> int:
    """Sets every parameter from the slices of its sources this rank holds; returns the bytes read.
    Names are checked first (every checkpoint tensor mapped, every rule's sources present)."""
    weight_rules = rules(hf_config)
    layers, mtp = int(hf_config.num_hidden_layers), int(getattr(hf_config, "num_nextn_predict_layers", None) or 0)
    _check_names(weight_rules, weights.names(), mtp_layers=range(layers, layers + mtp))
    by_mcore = {rule.mcore: rule for rule in weight_rules}
    place = _Place.of(model)
    for local, param in _parameters(model).items():
        name = place.global_name(local)
        rule = by_mcore.get(name)
        if rule is None:
            raise KeyError(f"Megatron parameter {local} ({name}) has no Hugging Face rule")
        cut = place.cut(local, param)
        sources = [_read_cut(weights, source, cut, rule.vocab) for source in rule.hf]
        try:
            tensor = rule.pack(sources)
        except RuntimeError as exc:
            raise ValueError(f"{name}: cannot pack {list(rule.hf)} of shapes "
                             f"{[tuple(s.shape) for s in sources]}: {exc}") from None
        if tensor.shape != param.shape:
            raise ValueError(f"{name}: {list(rule.hf)} give a shard of shape {tuple(tensor.shape)} for a parameter "
                             f"of {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(tensor)
    return weights.bytes_read


def _check_names(weight_rules: list[Rule], names: Collection[str], mtp_layers: range) -> None:
    present = sorted({layer for name in names if (layer := _number_after(name, "model.layers.")) in mtp_layers})
    if present:
        raise UnsupportedModel(
            f"checkpoint has multi-token-prediction layers {present} (num_nextn_predict_layers={len(mtp_layers)}, "
            f"past num_hidden_layers={mtp_layers.start}), which transformers ignores and the Megatron side does "
            "not build: remove them from the checkpoint")
    for rule in weight_rules:
        missing = [n for n in rule.hf if n not in names]
        if missing:
            raise KeyError(f"checkpoint lacks {missing} (needed for {rule.mcore})")
    unused = sorted(set(names) - {n for rule in weight_rules for n in rule.hf})
    if unused:
        raise KeyError(f"checkpoint weights not mapped to the Megatron model: {unused[:10]}")


def _read_cut(weights: _HFWeights, name: str, cut: _Cut | None, vocab: bool) -> torch.Tensor:
    """Rank ``cut.rank``'s equal part of ``name`` along ``cut.dim``; vocabulary rows past the
    checkpoint's (megatron's padding) are zeros."""
    if cut is None:
        return weights.read(name)
    length = weights.shape(name)[cut.dim]
    chunk = -(-length // cut.size)
    start = min(cut.rank * chunk, length)
    stop = min(start + chunk, length)
    tensor = weights.read(name, (slice(None),) * cut.dim + (slice(start, stop),))
    if vocab and stop - start < chunk:
        padding = list(tensor.shape)
        padding[cut.dim] = chunk - (stop - start)
        tensor = torch.cat([tensor, tensor.new_zeros(padding)], dim=cut.dim)
    return tensor


# ---- where each parameter lives ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Cut:
    """A tensor-parallel parameter: rank ``rank`` of ``size`` equal parts along ``dim``."""

    dim: int
    size: int
    rank: int


_LAYERS, _EXPERTS = "decoder.layers.", ".local_experts."


@dataclass(frozen=True)
class _Place:
    """What this rank holds: its pipeline stage's layers, its expert-parallel rank's experts, and
    its tensor- and expert-tensor-parallel slices. Plain integers, so ranks can exchange them."""

    pp_rank: int
    tp: int
    tp_rank: int
    etp: int
    etp_rank: int
    ep_rank: int
    experts_per_rank: int
    first_layer: int
    layers: int

    @classmethod
    def of(cls, model) -> _Place:
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

        return cls(ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_world_size(),
                   ps.get_tensor_model_parallel_rank(), ps.get_expert_tensor_parallel_world_size(),
                   ps.get_expert_tensor_parallel_rank(), ps.get_expert_model_parallel_rank(),
                   model.config.num_moe_experts // ps.get_expert_model_parallel_world_size(),
                   get_transformer_layer_offset(model.config), len(model.decoder.layers))

    def global_name(self, local: str) -> str:
        """A stage numbers its layers from 0 and a rank its experts; the checkpoint numbers both globally."""
        name = _renumber(local, _EXPERTS, lambda e: e + self.ep_rank * self.experts_per_rank)
        return _renumber(name, _LAYERS, lambda i: i + self.first_layer)

    def local_name(self, name: str, *, any_expert: bool = False) -> str | None:
        """This rank's name for a global one; None when another stage or expert-parallel rank holds
        it. ``any_expert``: another rank's expert maps to the local expert in the same slot (same shape)."""

        def layer(i: int) -> int | None:
            return i - self.first_layer if 0 <= i - self.first_layer < self.layers else None

        def expert(e: int) -> int | None:
            mine = e // self.experts_per_rank == self.ep_rank
            return e % self.experts_per_rank if mine or any_expert else None

        return _renumber(_renumber(name, _LAYERS, layer), _EXPERTS, expert)

    def cut(self, local: str, param) -> _Cut | None:
        expert = _EXPERTS in local
        size, rank = (self.etp, self.etp_rank) if expert else (self.tp, self.tp_rank)
        if not getattr(param, "tensor_model_parallel", False) or size == 1:
            return None
        return _Cut(param.partition_dim, size, rank)


def _renumber(name: str | None, marker: str, change: Callable[[int], int | None]) -> str | None:
    """``name`` with the number after ``marker`` changed; None when ``change`` gives None."""
    if name is None or marker not in name:
        return name
    head, tail = name.split(marker, 1)
    number, rest = tail.split(".", 1)
    new = change(int(number))
    return None if new is None else f"{head}{marker}{new}.{rest}"


def _number_after(name: str, marker: str) -> int | None:
    return int(name.split(marker, 1)[1].split(".", 1)[0]) if marker in name else None


def _parameters(model) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.state_dict(keep_vars=True).items() if not name.endswith("_extra_state")}


class _Holders:
    """Which global rank sends each slice of each parameter in an export: the lowest of the ranks
    holding it (data-parallel replicas hold equal copies)."""

    def __init__(self, places: list[_Place]) -> None:
        self.last_stage = max(p.pp_rank for p in places)
        self.experts_per_rank = places[0].experts_per_rank
        self.stage_of_layer = {layer: p.pp_rank for p in places
                               for layer in range(p.first_layer, p.first_layer + p.layers)}
        self.ranks: dict[tuple[int, int | None, int], int] = {}
        for rank in reversed(range(len(places))):
            p = places[rank]
            self.ranks[(p.pp_rank, None, p.tp_rank)] = rank
            self.ranks[(p.pp_rank, p.ep_rank, p.etp_rank)] = rank

    def of(self, name: str, part: int) -> int:
        layer, expert = _number_after(name, _LAYERS), _number_after(name, _EXPERTS)
        if layer is not None:
            stage = self.stage_of_layer[layer]
        else:
            stage = 0 if name.startswith("embedding.") else self.last_stage
        key = (stage, None if expert is None else expert // self.experts_per_rank, part)
        if key not in self.ranks:
            raise KeyError(f"no rank holds slice {part} of {name} (pipeline stage {stage})")
        return self.ranks[key]


# ---- export -------------------------------------------------------------------------------------------

MAX_SHARD_BYTES = 4 << 30
"""``save_hf``'s default bound on one safetensors file."""

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_MAX_DIMS = 4


def hf_tensor_meta(model, hf_config) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """Name, dtype and shape of every Hugging Face tensor an export sends, in the order it sends
    them; from the rules and this rank's parameters (other ranks' experts have the shape of its own),
    no collective. Runs the export's own unpacking on meta tensors, so the two cannot disagree."""
    place = _Place.of(model)
    if place.layers != model.config.num_layers:
        raise NotImplementedError("hf_tensor_meta needs every layer on this rank; pipeline stages hold only theirs")
    params = _parameters(model)
    out = []
    for rule in rules(hf_config):
        local = place.local_name(rule.mcore, any_expert=True)
        param = params[local]
        cut = place.cut(local, param)
        part = torch.empty(param.shape, dtype=param.dtype, device="meta")
        tensors = _unshard(rule, [part] * (cut.size if cut else 1), cut.dim if cut else 0, hf_config.vocab_size)
        out += [(name, t.dtype, tuple(t.shape)) for name, t in zip(rule.hf, tensors)]
    return out


def iter_hf_buckets(model, hf_config, bucket_bytes: int, dst: int | None = 0) -> Iterator[dict[str, torch.Tensor]]:
    """The model's weights under Hugging Face names on global rank ``dst``, in buckets of at most
    ``bucket_bytes`` (one tensor alone may be larger), in ``hf_tensor_meta`` order. Collective: every
    rank iterates to the end, which sends its slices; only ``dst`` gets buckets (every rank when
    ``dst`` is None). Tensors are fresh copies, on the model's device."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, not {bucket_bytes}")
    bucket: dict[str, torch.Tensor] = {}
    size = 0
    for name, tensor in _stream(model, hf_config, dst):
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = {}, 0
        bucket[name] = tensor
        size += nbytes
    if bucket:
        yield bucket


def export_hf(model, hf_config) -> dict[str, torch.Tensor]:
    """The whole model under Hugging Face names on every rank (collective; for tests and small
    models: large ones stream with ``iter_hf_buckets`` or ``save_hf``)."""
    return dict(_stream(model, hf_config, dst=None))


def _stream(model, hf_config, dst: int | None) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, tensor) in rule order on ``dst`` (every rank when None). Per parameter,
    the holder of slice 0 sends a header (dtype, slice count, dim, shape) and the slices follow from
    their holders, point to point (broadcast when ``dst`` is None)."""
    device = next(model.parameters()).device
    link = _Link.of(device)
    if dst is not None and not 0 <= dst < link.world:
        raise ValueError(f"destination rank {dst} is not in the world of {link.world}")
    place = _Place.of(model)
    holders = _Holders(link.all_places(place))
    params = _parameters(model)
    for rule in rules(hf_config):
        local = place.local_name(rule.mcore)
        param = params.get(local) if local is not None else None
        cut = place.cut(local, param) if param is not None else None
        first = holders.of(rule.mcore, 0)
        header = None
        if link.rank == first:
            if param is None:
                raise KeyError(f"rank {link.rank} should send {rule.mcore} but has no such parameter")
            header = _header(param, cut)
        header = link.move(header, first, dst, torch.empty(4 + _MAX_DIMS, dtype=torch.int64, device=device))
        receiving = header is not None
        if receiving:
            dtype, parts, dim, ndim, *shape = header.tolist()
            like = torch.empty(shape[:ndim], dtype=_DTYPES[dtype], device=device)
        else:
            parts, dim, like = (cut.size if cut else 1), 0, None
        received = []
        for part in range(parts):
            holder = first if part == 0 else holders.of(rule.mcore, part)
            mine = param.detach() if link.rank == holder else None
            tensor = link.move(mine, holder, dst, like)
            if receiving:
                received.append(tensor)
        if receiving:
            yield from zip(rule.hf, _unshard(rule, received, dim, hf_config.vocab_size))


def _header(param: torch.Tensor, cut: _Cut | None) -> torch.Tensor:
    """What a receiver needs before a parameter's slices: dtype, slice count, cut dim, slice shape."""
    if param.dtype not in _DTYPES or param.dim() > _MAX_DIMS:
        raise ValueError(f"cannot export a {param.dtype} parameter of {param.dim()} dimensions")
    parts, dim = (cut.size, cut.dim) if cut else (1, 0)
    shape = [*param.shape, *[0] * (_MAX_DIMS - param.dim())]
    return torch.tensor([_DTYPES.index(param.dtype), parts, dim, param.dim(), *shape], dtype=torch.int64,
                        device=param.device)


def _unshard(rule: Rule, parts: Tensors, dim: int, vocab: int) -> Tensors:
    """A parameter's Hugging Face tensors from its slices in rank order: each source is its pieces
    of every slice side by side along the cut (fresh tensors); megatron's vocabulary padding dropped."""
    tensors = [torch.cat(pieces, dim=dim) for pieces in zip(*(rule.unpack(p) for p in parts))]
    return [t[:vocab].clone() if rule.vocab and t.shape[0] > vocab else t for t in tensors]


@dataclass(frozen=True)
class _Link:
    """Moves one tensor between global ranks of the default process group (nothing to move in a
    single process)."""

    rank: int
    world: int
    device: torch.device

    @classmethod
    def of(cls, device: torch.device) -> _Link:
        import torch.distributed as dist

        if not dist.is_initialized():
            return cls(0, 1, device)
        return cls(dist.get_rank(), dist.get_world_size(), device)

    def all_places(self, place: _Place) -> list[_Place]:
        import torch.distributed as dist

        if self.world == 1:
            return [place]
        mine = torch.tensor(astuple(place), dtype=torch.int64, device=self.device)
        every = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(every, mine)
        return [_Place(*t.tolist()) for t in every]

    def writer(self, write: bool) -> int | None:
        """The one rank that passed ``write=True`` (None when none did)."""
        import torch.distributed as dist

        if self.world == 1:
            return 0 if write else None
        flags = [torch.empty(1, dtype=torch.int64, device=self.device) for _ in range(self.world)]
        dist.all_gather(flags, torch.tensor([int(write)], dtype=torch.int64, device=self.device))
        writers = [rank for rank, flag in enumerate(flags) if flag.item()]
        if len(writers) > 1:
            raise ValueError(f"ranks {writers} all passed write=True; exactly one rank writes")
        return writers[0] if writers else None

    def move(self, tensor: torch.Tensor | None, source: int, dst: int | None,
             like: torch.Tensor | None) -> torch.Tensor | None:
        """``tensor`` (given on ``source``) arrives on ``dst`` (every rank when None), shaped like
        ``like``; None on the other ranks."""
        import torch.distributed as dist

        if self.world == 1:
            return tensor
        if dst is None:
            buffer = tensor.contiguous() if self.rank == source else torch.empty_like(like)
            dist.broadcast(buffer, source)
            return buffer
        if self.rank == source:
            if dst == source:
                return tensor
            dist.send(tensor.contiguous(), dst)
        elif self.rank == dst:
            buffer = torch.empty_like(like)
            dist.recv(buffer, source)
            return buffer
        return None


def save_hf(model, hf_config, out_dir: str | Path, *, write: bool = True,
            max_shard_bytes: int = MAX_SHARD_BYTES) -> Path | None:
    """Writes the model as Hugging Face safetensors plus config.json in ``out_dir``: one
    ``model.safetensors``, or ``model-0000i-of-0000N.safetensors`` files of at most
    ``max_shard_bytes`` (a larger tensor gets a file alone) and ``model.safetensors.index.json``.

    Collective: every rank calls it; the one with ``write=True`` receives the stream and writes
    shard by shard (it holds one shard at a time) and gets the directory, the others send their
    slices and get None. The directory is complete once the index (one file: ``model.safetensors``)
    is in place: shards are written under temporary names, a previous export's weight files are
    removed (its index first), and the index comes last."""
    from safetensors.torch import save_file

    link = _Link.of(next(model.parameters()).device)
    writer = link.writer(write)
    if writer is None:
        return None
    out = Path(out_dir)
    if link.rank == writer:
        out.mkdir(parents=True, exist_ok=True)
    shards: list[tuple[Path, list[str]]] = []
    total = 0
    for bucket in iter_hf_buckets(model, hf_config, max_shard_bytes, dst=writer):
        partial = out / f".model-{len(shards) + 1:05d}.safetensors.partial"
        save_file({name: t.cpu() for name, t in bucket.items()}, str(partial), metadata={"format": "pt"})
        shards.append((partial, list(bucket)))
        total += sum(t.numel() * t.element_size() for t in bucket.values())
    if link.rank != writer:
        return None
    hf_config.save_pretrained(out)
    _publish(out, shards, total)
    return out


def _publish(out: Path, shards: list[tuple[Path, list[str]]], total: int) -> None:
    """Final names for the written shards; the index last."""
    count = len(shards)
    names = [WEIGHTS_NAME] if count == 1 else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    (out / INDEX_NAME).unlink(missing_ok=True)
    for stale in out.glob("model*.safetensors"):
        if stale.name not in names:
            stale.unlink()
    for (partial, _), name in zip(shards, names):
        partial.replace(out / name)
    if count > 1:
        weight_map = {tensor: name for (_, tensors), name in zip(shards, names) for tensor in tensors}
        partial = out / f".{INDEX_NAME}.partial"
        partial.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        partial.replace(out / INDEX_NAME)
