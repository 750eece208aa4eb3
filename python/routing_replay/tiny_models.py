"""Tiny random MoE checkpoints with a locally trained tokenizer: no model hub needed.

Used by the tests, the demos and the RL job's tiny models. ``build(kind, out_dir)`` writes a
Hugging Face checkpoint (config, safetensors, tokenizer) that SGLang and transformers load;
``build_from_config`` does so for a job's ``model.tiny`` section. A kind is a model family of
``routing_replay.models`` (its ``model_type``), which holds the tiny HF config and model class:
``qwen3_moe``, ``qwen2_moe`` (with its shared expert), ``mixtral``, and ``glm4_moe`` (its first
``dense_layers`` layers are plain MLPs, ``first_k_dense_replace``: a model with fewer routers than
layers that SGLang serves; SGLang's Qwen MoE models ignore ``mlp_only_layers``).

torch is imported where a model is made, so that a configuration's dry run can read the shapes
(``architecture_fields``) without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from routing_replay.models import FAMILIES, ModelFamily, TinyShape

if TYPE_CHECKING:
    import torch

    from routing_replay.config import TinyModel

KINDS = tuple(FAMILIES)
ATTENTION_HEADS = 4
KEY_VALUE_HEADS = 2
TOKENIZER_VOCAB_SIZE = 512
"""What the tokenizer's training asks for: an upper bound (the small corpus yields fewer tokens)."""
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. ",
    "Hello world! Mixture of experts models route every token to a few experts.",
    "0123456789 + - * = ? abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "What is 3 + 4? The answer is 7. What is 12 + 5? The answer is 17.",
]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(out_dir: Path, vocab_size: int = TOKENIZER_VOCAB_SIZE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 50, trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    hf_tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    hf_tok.save_pretrained(out_dir)
    return hf_tok


def family(kind: str) -> ModelFamily:
    """The model family a tiny ``kind`` names."""
    if kind not in FAMILIES:
        raise ValueError(f"unknown tiny model kind {kind!r}; choose from {KINDS}")
    return FAMILIES[kind]


def architecture_fields(kind: str, *, layers: int = 2, hidden: int = 64, experts: int = 8, top_k: int = 2,
                        moe_intermediate_size: int | None = None) -> dict[str, int]:
    """``config.Architecture``'s fields for a model ``make_model`` builds with these arguments."""
    return dict(num_layers=layers, hidden_size=hidden, num_attention_heads=ATTENTION_HEADS,
                num_key_value_heads=KEY_VALUE_HEADS, head_dim=hidden // ATTENTION_HEADS, num_experts=experts,
                top_k=top_k,
                moe_intermediate_size=moe_intermediate_size or family(kind).default_moe_intermediate_size(hidden),
                vocab_size=TOKENIZER_VOCAB_SIZE)


def build_from_config(tiny: TinyModel, out_dir: str | Path, seed: int) -> Path:
    """Writes the checkpoint of a job's ``model.tiny`` section; ``seed`` (run.seed) unless it sets one."""
    return build(tiny.kind, out_dir, layers=tiny.layers, hidden=tiny.hidden, experts=tiny.experts, top_k=tiny.top_k,
                 moe_intermediate_size=tiny.moe_intermediate_size, shared_expert_size=tiny.shared_expert,
                 seed=seed if tiny.seed is None else tiny.seed)


def build(kind: str, out_dir: str | Path, *, layers: int = 2, hidden: int = 64, experts: int = 8, top_k: int = 2,
          moe_intermediate_size: int | None = None, shared_expert_size: int | None = None,
          dense_layers: Sequence[int] = (), seed: int = 0, dtype: torch.dtype | None = None) -> Path:
    """Writes a random ``kind`` checkpoint with a locally trained tokenizer to ``out_dir`` (weights in
    ``dtype``, default float32)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model = make_model(kind, len(tokenizer), eos_id=eos, layers=layers, hidden=hidden, experts=experts, top_k=top_k,
                       moe_intermediate_size=moe_intermediate_size, shared_expert_size=shared_expert_size,
                       dense_layers=dense_layers, seed=seed)
    if dtype is not None:
        model.to(dtype)
    model.save_pretrained(out)
    return out


def make_model(kind: str, vocab_size: int, *, eos_id: int = 0, layers: int = 2, hidden: int = 64, experts: int = 8,
               top_k: int = 2, moe_intermediate_size: int | None = None, shared_expert_size: int | None = None,
               dense_layers: Sequence[int] = (), seed: int = 0):
    """A random ``kind`` model in memory (float32), for callers that need no checkpoint on disk.

    ``moe_intermediate_size``: each expert's (default: the family's ``default_moe_intermediate_size``);
    ``shared_expert_size``: the shared expert's intermediate size, for families with a sized one
    (qwen2_moe; default ``hidden``).
    """
    import torch

    model_family = family(kind)
    if shared_expert_size is not None and not model_family.sized_shared_expert:
        sized = [name for name, f in FAMILIES.items() if f.sized_shared_expert]
        raise ValueError(f"only {', '.join(sized)} has a sized shared expert, not {kind}")
    shape = TinyShape(vocab_size=vocab_size, hidden=hidden, layers=layers, experts=experts, top_k=top_k,
                      moe_intermediate_size=moe_intermediate_size or model_family.default_moe_intermediate_size(hidden),
                      shared_expert_size=shared_expert_size, dense_layers=tuple(dense_layers),
                      attention_heads=ATTENTION_HEADS, key_value_heads=KEY_VALUE_HEADS, eos_id=eos_id)
    config = model_family.tiny_config(shape)
    torch.manual_seed(seed)
    return model_family.hf_model_class()(config).float()
