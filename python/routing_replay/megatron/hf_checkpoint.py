"""Hugging Face MoE checkpoints <-> megatron-core GPTModel (Qwen3-MoE, Qwen2-MoE, Mixtral).

``build_model(path)`` reads the checkpoint's config, builds a GPTModel with MoE layers (megatron-core's
local spec; TransformerEngine's is not mapped yet) and loads the weights; ``export_hf``
returns the weights under Hugging Face names, ``save_hf`` writes them as safetensors (what a
weight sync into SGLang loads). Each weight is described once, by a ``Rule``: its Megatron name, its
Hugging Face name(s), and how to pack them into one tensor and back. Loading and exporting both
walk the same rules, so the round trip is exact.

Routing semantics carried over: Qwen3-MoE and Mixtral renormalise the top-k softmax
(``moe_router_pre_softmax=False``: softmax over the top-k logits); Qwen2-MoE does not
(``norm_topk_prob=False`` -> softmax over all experts, then top-k). Qwen2-MoE's shared expert keeps
its sigmoid gate (``moe_shared_expert_gate``). Qwen ``mlp_only_layers`` become dense layers
(``moe_layer_freq``), so there are fewer routers than layers.

Tensor- and expert-parallel ranks load their own shard: each parameter is cut from the full
tensor according to how megatron-core marks it (``tensor_model_parallel``, ``partition_dim``;
GLU ``linear_fc1`` halves are cut separately; experts are renumbered per expert-parallel rank).
Export is the inverse: every rank gathers the full tensors back (``full_state``), collectively.
Pipeline stages build only their layers (numbered from 0 per stage, global in the checkpoint);
export from pipeline stages is not implemented yet.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from routing_replay.capture.layout import moe_layer_ids
from routing_replay.megatron import cpu_workarounds
from routing_replay.megatron.parallel import ParallelConfig

Tensors = list[torch.Tensor]


@dataclass(frozen=True)
class Family:
    moe_prefix: str
    expert_names: tuple[str, str, str]  # gate, up, down
    qk_norm: bool
    qkv_bias: bool
    shared_expert: bool


FAMILIES = {
    "qwen3_moe": Family("mlp.", ("gate_proj", "up_proj", "down_proj"), qk_norm=True, qkv_bias=False, shared_expert=False),
    "qwen2_moe": Family("mlp.", ("gate_proj", "up_proj", "down_proj"), qk_norm=False, qkv_bias=True, shared_expert=True),
    "mixtral": Family("block_sparse_moe.", ("w1", "w3", "w2"), qk_norm=False, qkv_bias=False, shared_expert=False),
}


@dataclass(frozen=True)
class Rule:
    """One Megatron tensor and the Hugging Face tensors it is made of."""

    mcore: str
    hf: tuple[str, ...]
    pack: Callable[[Tensors], torch.Tensor] = lambda ts: ts[0]
    unpack: Callable[[torch.Tensor], Tensors] = lambda t: [t]


def _concat_rows(ts: Tensors) -> torch.Tensor:
    return torch.cat(ts, dim=0)


def _split_rows(parts: int) -> Callable[[torch.Tensor], Tensors]:
    return lambda t: list(t.chunk(parts, dim=0))


def _qkv_rules(mcore: str, hf: tuple[str, str, str], heads: int, groups: int, head_dim: int) -> Rule:
    """Megatron keeps q, k, v interleaved per query group: [group][q heads of the group, k, v]."""
    per_group = heads // groups * head_dim

    def pack(ts: Tensors) -> torch.Tensor:
        q, k, v = (t.reshape(groups, -1, *t.shape[1:]) for t in ts)
        return torch.cat([q, k, v], dim=1).reshape(-1, *ts[0].shape[1:])

    def unpack(t: torch.Tensor) -> Tensors:
        grouped = t.reshape(groups, per_group + 2 * head_dim, *t.shape[1:])
        q, k, v = grouped.split([per_group, head_dim, head_dim], dim=1)
        return [x.reshape(-1, *t.shape[1:]).contiguous() for x in (q, k, v)]

    return Rule(mcore, hf, pack, unpack)


def family_of(hf_config) -> Family:
    family = FAMILIES.get(hf_config.model_type)
    if family is None:
        raise ValueError(f"unsupported model type {hf_config.model_type!r}; supported: {sorted(FAMILIES)}")
    return family


def rules(hf_config) -> list[Rule]:
    """Every weight of the model, as Megatron name <- Hugging Face name(s)."""
    family = family_of(hf_config)
    heads, groups = hf_config.num_attention_heads, hf_config.num_key_value_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    moe_layers = set(moe_layer_ids(hf_config))
    out = [Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
           Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
           Rule("output_layer.weight", ("lm_head.weight",))]
    gate, up, down = family.expert_names
    for i in range(hf_config.num_hidden_layers):
        hf, mc = f"model.layers.{i}.", f"decoder.layers.{i}."
        attn = tuple(f"{hf}self_attn.{p}_proj" for p in "qkv")
        out += [_qkv_rules(f"{mc}self_attention.linear_qkv.weight", tuple(f"{a}.weight" for a in attn), heads, groups, head_dim),
                Rule(f"{mc}self_attention.linear_proj.weight", (f"{hf}self_attn.o_proj.weight",)),
                Rule(f"{mc}input_layernorm.weight", (f"{hf}input_layernorm.weight",)),
                Rule(f"{mc}pre_mlp_layernorm.weight", (f"{hf}post_attention_layernorm.weight",))]
        if family.qkv_bias:
            out.append(_qkv_rules(f"{mc}self_attention.linear_qkv.bias", tuple(f"{a}.bias" for a in attn), heads, groups, head_dim))
        if family.qk_norm:
            out += [Rule(f"{mc}self_attention.q_layernorm.weight", (f"{hf}self_attn.q_norm.weight",)),
                    Rule(f"{mc}self_attention.k_layernorm.weight", (f"{hf}self_attn.k_norm.weight",))]
        if i not in moe_layers:
            out += _mlp_rules(f"{mc}mlp.", f"{hf}mlp.", ("gate_proj", "up_proj", "down_proj"))
            continue
        moe = f"{hf}{family.moe_prefix}"
        out.append(Rule(f"{mc}mlp.router.weight", (f"{moe}gate.weight",)))
        for e in range(_num_experts(hf_config)):
            out += _mlp_rules(f"{mc}mlp.experts.local_experts.{e}.", f"{moe}experts.{e}.", (gate, up, down))
        if family.shared_expert:
            out += _mlp_rules(f"{mc}mlp.shared_experts.", f"{moe}shared_expert.", ("gate_proj", "up_proj", "down_proj"))
            out.append(Rule(f"{mc}mlp.shared_experts.gate_weight", (f"{moe}shared_expert_gate.weight",)))
    return out


def _mlp_rules(mcore_prefix: str, hf_prefix: str, names: Sequence[str]) -> list[Rule]:
    gate, up, down = (f"{hf_prefix}{n}.weight" for n in names)
    return [Rule(f"{mcore_prefix}linear_fc1.weight", (gate, up), _concat_rows, _split_rows(2)),
            Rule(f"{mcore_prefix}linear_fc2.weight", (down,))]


def _num_experts(hf_config) -> int:
    return int(getattr(hf_config, "num_experts", None) or hf_config.num_local_experts)


def _rope_base(hf_config) -> float:
    params = getattr(hf_config, "rope_parameters", None) or {}
    return float(params.get("rope_theta") or getattr(hf_config, "rope_theta", 10000.0))


def transformer_config(hf_config, parallel: ParallelConfig = ParallelConfig(), *, routing_replay: bool = True,
                       dtype: torch.dtype = torch.float32, dispatcher: str = "alltoall",
                       aux_loss_coeff: float = 0.0, **overrides):
    """The TransformerConfig that reproduces ``hf_config``'s forward; ``overrides`` are further
    TransformerConfig fields (e.g. activation recompute)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    family = family_of(hf_config)
    moe_layers = set(moe_layer_ids(hf_config))
    layers = hf_config.num_hidden_layers
    shared = getattr(hf_config, "shared_expert_intermediate_size", None) if family.shared_expert else None
    fields = dict(
        num_layers=layers, hidden_size=hf_config.hidden_size, num_attention_heads=hf_config.num_attention_heads,
        num_query_groups=hf_config.num_key_value_heads,
        kv_channels=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads,
        ffn_hidden_size=hf_config.intermediate_size, num_moe_experts=_num_experts(hf_config),
        moe_router_topk=hf_config.num_experts_per_tok,
        moe_ffn_hidden_size=getattr(hf_config, "moe_intermediate_size", None) or hf_config.intermediate_size,
        moe_layer_freq=[1 if i in moe_layers else 0 for i in range(layers)],
        # Renormalised top-k (Qwen3, Mixtral) == softmax over the top-k logits; Qwen2 keeps softmax(all)[top-k].
        moe_router_pre_softmax=not getattr(hf_config, "norm_topk_prob", True),
        moe_shared_expert_intermediate_size=shared, moe_shared_expert_gate=shared is not None,
        moe_aux_loss_coeff=aux_loss_coeff, moe_token_dispatcher_type=dispatcher, moe_grouped_gemm=False,
        moe_enable_routing_replay=routing_replay,
        gated_linear_unit=True, activation_func=F.silu, normalization="RMSNorm",
        layernorm_epsilon=hf_config.rms_norm_eps, qk_layernorm=family.qk_norm, add_bias_linear=False,
        add_qkv_bias=family.qkv_bias, tensor_model_parallel_size=parallel.tensor,
        expert_model_parallel_size=parallel.expert, pipeline_model_parallel_size=parallel.pipeline,
        context_parallel_size=parallel.context,
        sequence_parallel=parallel.sequence_parallel, use_cpu_initialization=True, params_dtype=dtype,
        gradient_accumulation_fusion=False, bias_activation_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, bias_dropout_fusion=False, apply_rope_fusion=False,
        attention_dropout=0.0, hidden_dropout=0.0,
    )
    return TransformerConfig(**{**fields, **overrides})


def build_model(path: str | Path, parallel: ParallelConfig = ParallelConfig(), *, load_weights: bool = True,
                **config_overrides):
    """A GPTModel for the checkpoint at ``path`` with its weights loaded (parallel state must be up).

    With ``load_weights=False`` the weights are initialised from the current seed instead (the
    same on every rank when every rank seeds alike). The vocabulary is padded to a multiple of the
    tensor-parallel size; ``model.vocab_size`` keeps the checkpoint's, and scoring ignores the rest.
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from transformers import AutoConfig

    cpu_workarounds.apply()
    from megatron.core import parallel_state as ps

    hf_config = AutoConfig.from_pretrained(path)
    if parallel.pipeline > 1:  # megatron needs the dtype of the activations it passes between stages
        config_overrides.setdefault("pipeline_dtype", config_overrides.get("dtype", torch.float32))
    config = transformer_config(hf_config, parallel, **config_overrides)
    pp_rank = ps.get_pipeline_model_parallel_rank()
    # The local spec everywhere for now: TransformerEngine's fuses norms into linear layers under
    # other parameter names, which the rules do not map yet (and no GPU stack was at hand to test).
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm", pp_rank=pp_rank)
    padded_vocab = -(-hf_config.vocab_size // parallel.tensor) * parallel.tensor
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=padded_vocab,
                     max_sequence_length=hf_config.max_position_embeddings, position_embedding_type="rope",
                     rotary_base=_rope_base(hf_config),
                     share_embeddings_and_output_weights=bool(getattr(hf_config, "tie_word_embeddings", False)),
                     # Full logits on every tensor-parallel rank; a vocab-parallel log-softmax would save memory.
                     parallel_output=False, pre_process=ps.is_pipeline_first_stage(),
                     post_process=ps.is_pipeline_last_stage())
    model.vocab_size = hf_config.vocab_size
    if load_weights:
        load_hf(model, hf_config, _read_safetensors(Path(path)))
    return model


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        weights.update(load_file(file))
    return weights


def load_hf(model, hf_config, hf_weights: dict[str, torch.Tensor]) -> None:
    """Copies Hugging Face weights into ``model``; every weight must be used and every parameter set."""
    state = {}
    weight_rules = rules(hf_config)
    for rule in weight_rules:
        missing = [n for n in rule.hf if n not in hf_weights]
        if missing:
            raise KeyError(f"checkpoint lacks {missing} (needed for {rule.mcore})")
        state[rule.mcore] = rule.pack([hf_weights[n] for n in rule.hf])
    used = {n for rule in weight_rules for n in rule.hf}
    unused = sorted(set(hf_weights) - used)
    if unused:
        raise KeyError(f"checkpoint weights not mapped to the Megatron model: {unused[:10]}")
    result = model.load_state_dict(_this_ranks_shard(model, state), strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise KeyError(f"Megatron model mismatch: missing {missing[:10]}, unexpected {result.unexpected_keys[:10]}")


def _this_ranks_shard(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cuts the full Megatron-named tensors down to what this rank's parameters hold."""
    from megatron.core import parallel_state as ps

    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    etp, etp_rank = ps.get_expert_tensor_parallel_world_size(), ps.get_expert_tensor_parallel_rank()
    experts_per_rank = model.config.num_moe_experts // ps.get_expert_model_parallel_world_size()
    first_expert = ps.get_expert_model_parallel_rank() * experts_per_rank
    first_layer = _first_layer_of_stage(model)
    out = {}
    for name, param in model.state_dict(keep_vars=True).items():
        if name.endswith("_extra_state"):
            continue
        full = state[_global_layer_name(_global_expert_name(name, first_expert), first_layer)]
        if name in ("embedding.word_embeddings.weight", "output_layer.weight") and full.shape[0] < param.shape[0] * tp:
            full = torch.cat([full, full.new_zeros(param.shape[0] * tp - full.shape[0], *full.shape[1:])])
        size, rank = (etp, etp_rank) if ".local_experts." in name else (tp, tp_rank)
        if getattr(param, "tensor_model_parallel", False) and size > 1:
            full = _shard(name, full, param.partition_dim, size, rank)
        if full.shape != param.shape:
            raise ValueError(f"{name}: shard of shape {tuple(full.shape)} for a parameter of {tuple(param.shape)}")
        out[name] = full
    return out


def _first_layer_of_stage(model) -> int:
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    return get_transformer_layer_offset(model.config)


def _global_layer_name(name: str, first_layer: int) -> str:
    """A pipeline stage numbers its layers from 0; the checkpoint numbers them globally."""
    prefix = "decoder.layers."
    if not name.startswith(prefix) or first_layer == 0:
        return name
    local, rest = name[len(prefix):].split(".", 1)
    return f"{prefix}{first_layer + int(local)}.{rest}"


def _global_expert_name(name: str, first_expert: int) -> str:
    marker = ".local_experts."
    if marker not in name:
        return name
    head, tail = name.split(marker)
    local, rest = tail.split(".", 1)
    return f"{head}{marker}{first_expert + int(local)}.{rest}"


def _shard(name: str, full: torch.Tensor, dim: int, size: int, rank: int) -> torch.Tensor:
    if name.endswith("linear_fc1.weight"):  # [gate; up]: each rank holds [gate shard; up shard]
        return torch.cat([half.chunk(size, dim=dim)[rank] for half in full.chunk(2, dim=0)], dim=0)
    return full.chunk(size, dim=dim)[rank]  # qkv rows are grouped by query group: a contiguous cut


def full_state(model) -> dict[str, torch.Tensor]:
    """The unsharded Megatron-named weights (layers numbered globally), on every rank (collective
    over the TP, EP and PP groups)."""
    from megatron.core import parallel_state as ps

    groups = {False: (ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_group()),
              True: (ps.get_expert_tensor_parallel_world_size(), ps.get_expert_tensor_parallel_group())}
    ep_size, ep_group = ps.get_expert_model_parallel_world_size(), ps.get_expert_model_parallel_group()
    experts_per_rank = model.config.num_moe_experts // ep_size
    out: dict[str, torch.Tensor] = {}
    for name, param in model.state_dict(keep_vars=True).items():
        if name.endswith("_extra_state"):
            continue
        tensor = param.detach().contiguous()
        expert = ".local_experts." in name
        size, group = groups[expert]
        if getattr(param, "tensor_model_parallel", False) and size > 1:
            tensor = _unshard(name, _gather(tensor, size, group), param.partition_dim)
        if not expert or ep_size == 1:
            out[name] = tensor
            continue
        for ep_rank, part in enumerate(_gather(tensor, ep_size, ep_group)):
            out[_global_expert_name(name, ep_rank * experts_per_rank)] = part
    vocab = getattr(model, "vocab_size", None)
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if vocab is not None and name in out:
            out[name] = out[name][:vocab]
    if ps.get_pipeline_model_parallel_world_size() > 1:
        first_layer = _first_layer_of_stage(model)
        out = _gather_stages({_global_layer_name(name, first_layer): t for name, t in out.items()})
    return out


_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32)
_MAX_DIMS = 4


def _gather_stages(local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every pipeline stage's tensors on every stage: each stage in turn broadcasts its names (as
    UTF-8 bytes), dtypes and shapes (as integer tensors), then the tensors; no pickle."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    group = ps.get_pipeline_model_parallel_group()
    out: dict[str, torch.Tensor] = {}
    for stage in range(ps.get_pipeline_model_parallel_world_size()):
        source = dist.get_global_rank(group, stage)
        mine = stage == ps.get_pipeline_model_parallel_rank()
        names = sorted(local) if mine else []
        encoded = torch.frombuffer(bytearray("\n".join(names).encode()), dtype=torch.uint8) if mine else None
        header = torch.tensor([len(names), encoded.numel() if mine else 0])
        dist.broadcast(header, source, group=group)
        count, nbytes = int(header[0]), int(header[1])
        if not mine:
            encoded = torch.empty(nbytes, dtype=torch.uint8)
        dist.broadcast(encoded, source, group=group)
        names = bytes(encoded.tolist()).decode().split("\n") if count else []
        layout = torch.zeros(count, 1 + _MAX_DIMS + 1, dtype=torch.int64)
        if mine:
            for row, name in enumerate(names):
                tensor = local[name]
                layout[row, 0] = _DTYPES.index(tensor.dtype)
                layout[row, 1] = tensor.dim()
                layout[row, 2 : 2 + tensor.dim()] = torch.tensor(tensor.shape)
        dist.broadcast(layout, source, group=group)
        for name, (dtype, dims, *shape) in zip(names, layout.tolist()):
            tensor = local[name] if mine else torch.empty(shape[:dims], dtype=_DTYPES[dtype])
            dist.broadcast(tensor, source, group=group)
            out[name] = tensor
    return out


def _gather(tensor: torch.Tensor, size: int, group) -> list[torch.Tensor]:
    import torch.distributed as dist

    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor, group=group)
    return parts


def _unshard(name: str, parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    if name.endswith("linear_fc1.weight"):  # each part is [gate shard; up shard]
        halves = [p.chunk(2, dim=0) for p in parts]
        return torch.cat([torch.cat([h[0] for h in halves], dim=dim), torch.cat([h[1] for h in halves], dim=dim)])
    return torch.cat(parts, dim=dim)


def export_hf(model, hf_config) -> dict[str, torch.Tensor]:
    """The model's weights under Hugging Face names (inverse of ``load_hf``); collective when the
    model is sharded, every rank gets the full set."""
    state = full_state(model)
    out: dict[str, torch.Tensor] = {}
    for rule in rules(hf_config):
        for name, tensor in zip(rule.hf, rule.unpack(state[rule.mcore])):
            out[name] = tensor.detach().contiguous().clone()
    return out


def save_hf(model, hf_config, out_dir: str | Path, *, write: bool = True) -> Path | None:
    """Writes ``export_hf`` as model.safetensors plus config.json in ``out_dir``. Collective when the
    model is sharded: every rank calls it, and ranks with ``write=False`` only take part (None)."""
    from safetensors.torch import save_file

    weights = export_hf(model, hf_config)
    if not write:
        return None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / "model.safetensors"))
    hf_config.save_pretrained(out)
    return out
