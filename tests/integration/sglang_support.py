"""Shared pieces of the SGLang integration tests: servers, requests, the Hugging Face reference."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import requests
import torch

from routing_replay.sglang.client import decode_inline, routing_descriptor, routing_params
from routing_replay.sglang.server import SGLangServer

SERVER_ARGS = ("--dtype", "float32", "--max-total-tokens", "4096", "--skip-server-warmup", "--mem-fraction-static", "0.5")


def start_server(model: Path, log: Path, *args: str, env: dict | None = None) -> SGLangServer:
    return SGLangServer(model, [*SERVER_ARGS, *args], log_path=log, env=env).wait_healthy()


def generate(server: SGLangServer, prompt: str | list[int], *, max_new_tokens: int = 8, temperature: float = 0.0,
             routing: dict | None = None, own: bool = True, timeout: float = 120) -> dict:
    body = {"sampling_params": {"max_new_tokens": max_new_tokens, "temperature": temperature, "ignore_eos": True},
            "return_routed_experts": own}
    body["input_ids" if isinstance(prompt, list) else "text"] = prompt
    if routing is not None:
        body["sampling_params"]["custom_params"] = routing
    response = requests.post(f"{server.url}/generate", json=body, timeout=timeout)
    response.raise_for_status()
    return response.json()


def inline_routing(server: SGLangServer, prompt, **kwargs) -> tuple[dict, torch.Tensor, dict]:
    """(response, our rows as int64 [rows, L, K], descriptor)"""
    response = generate(server, prompt, routing=routing_params(inline=True), **kwargs)
    descriptor = routing_descriptor(response)
    ids, valid = decode_inline(descriptor)
    assert valid is None, f"{descriptor['missing']} positions missing"
    return response, ids.long(), descriptor


def sglang_own_routing(response: dict, layers: int, top_k: int) -> torch.Tensor:
    """SGLang's own --enable-return-routed-experts rows: base64 int32 [rows, layers, top_k]."""
    import pybase64

    flat = np.frombuffer(pybase64.b64decode(response["meta_info"]["routed_experts"]), dtype=np.int32)
    return torch.from_numpy(flat.copy()).view(len(response["output_ids"]) + response["meta_info"]["prompt_tokens"] - 1,
                                              layers, top_k).long()


def token_ids(server: SGLangServer, response: dict, prompt) -> list[int]:
    """The full sequence SGLang processed: prompt ids then output ids."""
    if isinstance(prompt, list):
        prompt_ids = prompt
    else:
        prompt_ids = hf_tokenizer(str(server.model_path))(prompt).input_ids
    return list(prompt_ids) + list(response["output_ids"])


@functools.lru_cache(maxsize=4)
def hf_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@functools.lru_cache(maxsize=4)
def hf_model(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_routing(path: str, tokens: list[int], top_k: int) -> torch.Tensor:
    """Hugging Face transformers' router top-k for every token of one uncached forward: [T, L, K]."""
    model = hf_model(path)
    with torch.no_grad():
        out = model(torch.tensor([tokens]), output_router_logits=True)
    return torch.stack([logits.view(len(tokens), -1).topk(top_k, dim=-1).indices for logits in out.router_logits], dim=1)


def same_sets(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per (token, layer): do the two top-k rows hold the same set of experts?"""
    return (a.sort(-1).values == b.sort(-1).values).all(-1)
