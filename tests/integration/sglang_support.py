"""Shared pieces of the SGLang integration tests: servers, requests, the Hugging Face reference."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import requests
import torch

from routing_replay.sglang.client import decode_inline, routing_descriptor, routing_params
from routing_replay.sglang.server import SGLangServer

# custom_params that every endpoint must refuse with HTTP 400, as JSON can carry them, and words the
# refusal must contain. Values Python alone can build (non-string field names) are in the unit tests.
MALFORMED_CUSTOM_PARAMS: list[tuple[object, str]] = [
    *[(value, "custom_params must be an object") for value in ([], [1], "routing", 3, 1.5, True)],
    *[({"routing_replay": value}, "must be true, false or an object")
      for value in (0, 1, 1.0, 0.0, -1, "true", "", [], [{"key": "k"}])],
    *[({"routing_replay": {name: 1}}, "unknown field") for name in ("colour", "Key", "start", "", "x" * 5000)],
    ({"routing_replay": {"key": "k", "extra": {"nested": [1, 2]}}}, "unknown field"),
    *[({"routing_replay": {"key": value}}, "key must be a string") for value in (1, 1.5, True, [], ["k"], {"k": 1})],
    ({"routing_replay": {"key": ""}}, "key must not be empty"),
    ({"routing_replay": {"key": "k" * 1025}}, "more than the wire's limit"),
    ({"routing_replay": {"key": "é" * 600}}, "more than the wire's limit"),  # 600 characters, 1200 bytes
    ({"routing_replay": {"key": "x\ud800y"}}, "surrogate"),  # over HTTP, SGLang's JSON decoder refuses it first
    *[({"routing_replay": {"start_len": value}}, "start_len must be an integer from 0 to")
      for value in (-1, -(2**40), 2**31, 2**63, 10**30, 1.5, 3.0, "3", True, False, [], {"n": 1})],
    *[({"routing_replay": {"sink": value}}, "sink must be a string") for value in (5, 5.5, True, [], {"a": 1})],
    *[({"routing_replay": {"sink": value}}, "is not a collector address")
      for value in ("nowhere", "localhost:5555", "tcp://", "tcp://host", "tcp://host:0", "tcp://host:65536",
                    "tcp://host:-1", "tcp://host:port", "http://host:80", "inproc://x", "ipc://", "tcp://h o:1",
                    "tcp://[::1:5", "ipc://" + "p" * 200, "tcp://" + "h" * 100_000 + ":1")],
    *[({"routing_replay": {"inline": value}}, "inline must be true or false")
      for value in (1, 0, "yes", "true", [], {"v": True}, 1.0)],
]

LAYERS, TOP_K = 2, 2  # of the tiny checkpoints
# --random-seed: SGLang seeds its sampling from it (random otherwise), so sampled requests reproduce.
SERVER_ARGS = ("--dtype", "float32", "--max-total-tokens", "4096", "--skip-server-warmup", "--mem-fraction-static", "0.5",
               "--random-seed", "0")


def start_server(model: Path, log: Path, *args: str, env: dict | None = None) -> SGLangServer:
    return SGLangServer(model, [*SERVER_ARGS, *args], log_path=log, env=env).wait_healthy()


def generate(server: SGLangServer, prompt: str | list[int], *, max_new_tokens: int = 8, temperature: float = 0.0,
             routing: dict | None = None, own: bool = True, timeout: float = 120) -> dict:
    """A sampled request draws from the server's generator, seeded by SERVER_ARGS' --random-seed (SGLang
    honours a per-request ``sampling_seed`` only with --enable-deterministic-inference)."""
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
    """SGLang's own --enable-return-routed-experts rows of a ``/generate`` response: [rows, layers, top_k]."""
    return decode_sglang_routed_experts(response["meta_info"]["routed_experts"],
                                        len(response["output_ids"]) + response["meta_info"]["prompt_tokens"] - 1,
                                        layers, top_k)


def decode_sglang_routed_experts(encoded: str, rows: int, layers: int, top_k: int) -> torch.Tensor:
    """SGLang's own capture as it sends it (base64 int32) as int64 [rows, layers, top_k]."""
    import pybase64

    flat = np.frombuffer(pybase64.b64decode(encoded), dtype=np.int32)
    return torch.from_numpy(flat.copy()).view(rows, layers, top_k).long()


def check_rows_against_references(server: SGLangServer, tokens: list[int], ours: torch.Tensor,
                             own: torch.Tensor | None = None, moe_layers: tuple[int, ...] = (0, 1)) -> None:
    """``ours`` (the rows of ``tokens``) equals SGLang's own capture ``own`` (rows of every decoder
    layer) exactly, and Hugging Face's router top-k sets for at least 99% of (token, layer)."""
    assert ours.shape == (len(tokens) - 1, len(moe_layers), TOP_K)  # the last token has no row
    if own is not None:
        assert torch.equal(ours, own[:, list(moe_layers)])
    agreement = same_sets(ours, hf_routing(str(server.model_path), tokens[:-1], TOP_K)).float().mean().item()
    assert agreement >= 0.99, f"only {agreement:.3f} of (token, layer) routing sets agree with Hugging Face"


def check_against_references(server: SGLangServer, response: dict, ours: torch.Tensor, prompt,
                             own: bool = True, moe_layers: tuple[int, ...] = (0, 1)) -> None:
    """``check_rows_against_references`` for a ``/generate`` response to ``prompt``."""
    check_rows_against_references(server, token_ids(server, response, prompt), ours,
                                  sglang_own_routing(response, -1, TOP_K) if own else None, moe_layers)


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


def running_requests(server: SGLangServer) -> int:
    loads = requests.get(f"{server.url}/v1/loads", params={"include": "core"}, timeout=10).json()["loads"]
    return sum(load["num_running_reqs"] for load in loads)


def sglang_processes(server: SGLangServer) -> dict[str, int]:
    """PIDs of the server's processes: ``main`` (HTTP server and tokenizer), and each child by its
    SGLang process title (``sglang::scheduler``, ``sglang::detokenizer``)."""
    import psutil

    processes = {"main": server.process.pid}
    for child in psutil.Process(server.process.pid).children(recursive=True):
        title = " ".join(child.cmdline())
        if title.startswith("sglang::"):
            processes[title.split()[0]] = child.pid
    return processes
