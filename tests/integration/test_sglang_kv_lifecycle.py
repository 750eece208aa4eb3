"""Routing rows over SGLang's KV-slot lifecycle, on a real recording server on CPU with a pool of
256 tokens and no default sink: slots freed (finished, evicted, retracted requests) never deliver
their old rows, retracted requests still deliver correct routing, a request without a destination
is refused, and a server that cannot record refuses to start.

A reset is only visible when a slot is reused by a forward that records nothing (else the new rows
overwrite the old): the server's processes load a test-only ``sitecustomize`` through which a test
makes our recording skip forwards (as when preparing one fails) while a switch file exists; a
second switch hands the capture an id of no expert in prefill forwards (an engine bug), whose
requests must be delivered as failed while the server keeps serving.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
from contextlib import contextmanager

import pytest
import requests

from routing_replay.sglang.client import routing_descriptor, routing_params
from routing_replay.sglang.server import SGLangServer
from tests.integration.sglang_support import (
    LAYERS,
    SERVER_ARGS,
    check_against_references,
    generate,
    hf_tokenizer,
    inline_routing,
    start_server,
)
from tests.polling import wait_until

POOL = 256  # KV slots
SITECUSTOMIZE = '''
import os

from routing_replay.sglang.recording import SchedulerRecording

_begin_forward = SchedulerRecording._begin_forward


def begin_forward(self, forward_batch):
    if os.path.exists(os.environ["ROUTING_REPLAY_TEST_UNRECORDED"]):
        return None  # this forward records nothing, as when preparing it fails
    return _begin_forward(self, forward_batch)


SchedulerRecording._begin_forward = begin_forward
_capture = SchedulerRecording.capture


def capture(self, layer_id, topk_ids):
    if os.path.exists(os.environ["ROUTING_REPLAY_TEST_BAD_IDS"]) and topk_ids.shape[0] > 1:
        topk_ids = topk_ids.clone()
        topk_ids[-1, -1] = 1000  # what an engine bug would hand the capture: no such expert
    return _capture(self, layer_id, topk_ids)


SchedulerRecording.capture = capture
'''


@pytest.fixture(scope="module")
def small_pool_server(tiny_models, tmp_path_factory):
    """Qwen3-MoE recording with SGLang's own capture, no --routing-sink, 256 KV slots, and admission
    that counts 8 new tokens per request, so concurrent long requests outgrow the pool and SGLang
    retracts some while decoding."""
    root = tmp_path_factory.mktemp("small_pool")
    (root / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, (str(root), os.environ.get("PYTHONPATH")))),
           "ROUTING_REPLAY_TEST_UNRECORDED": str(root / "unrecorded"),
           "ROUTING_REPLAY_TEST_BAD_IDS": str(root / "bad_ids"),
           "SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION": "8"}
    server = start_server(tiny_models["qwen3_moe"], root / "server.log", "--record-routing",
                          "--enable-return-routed-experts", "--max-total-tokens", str(POOL), env=env)
    yield server
    server.stop()


@contextmanager
def switched_on(server: SGLangServer, name: str):
    """While inside, the server's test-only sitecustomize sees the switch file ``name``."""
    switch = server.log_path.parent / name
    switch.touch()
    try:
        yield
    finally:
        switch.unlink()


def flush_cache(server: SGLangServer) -> None:
    # SGLang flushes only an idle scheduler (else 400): the request's answer may precede its batch's end
    wait_until(lambda: requests.post(f"{server.url}/flush_cache", timeout=30).status_code == 200,
               "the server idle and its cache flushed", timeout=60, every=0.1)


def token_sequence(server: SGLangServer, length: int, first: int) -> list[int]:
    """``length`` ordinary token ids starting with ``first``: no cached prefix of another sequence."""
    vocab = len(hf_tokenizer(str(server.model_path)))
    return [first] + [16 + (first * 31 + 7 * i) % (vocab - 16) for i in range(1, length)]


def check_reused_slots_hold_no_rows(server: SGLangServer) -> None:
    """A request of nearly the whole pool, whose forwards record nothing, reuses the slots earlier
    requests left (SGLang evicts their radix-cache entries for it): every one of its rows must be
    missing, none an earlier owner's. The cache is flushed after, so later requests match no
    unrecorded prefix."""
    prompt = token_sequence(server, POOL - 24, first=10)
    with switched_on(server, "unrecorded"):
        response = generate(server, prompt, max_new_tokens=4, routing=routing_params(inline=True), own=False)
    flush_cache(server)
    descriptor = routing_descriptor(response)
    assert response["meta_info"]["cached_tokens"] == 0
    assert descriptor["rows"] == len(prompt) + 4 - 1
    assert descriptor["missing"] == descriptor["rows"] * LAYERS, \
        f"{descriptor['rows'] * LAYERS - descriptor['missing']} (row, layer) positions of freed slots kept old rows"


def test_slots_freed_by_sglang_never_deliver_their_old_rows(small_pool_server):
    """Rows are reset when SGLang's allocator frees slots: after a recorded request filled most of
    the pool, the request reusing its slots finds none of its rows."""
    inline_routing(small_pool_server, token_sequence(small_pool_server, POOL - 40, first=11), max_new_tokens=8)
    check_reused_slots_hold_no_rows(small_pool_server)


def test_retracted_requests_deliver_correct_routing_and_free_their_rows(small_pool_server):
    """Four requests needing 400 slots of 256: SGLang retracts some while decoding (its meta_info and
    log say so), re-runs them later, and each delivers complete routing equal to SGLang's own capture
    and Hugging Face's router; the slots the retracted runs freed hold no rows afterwards."""
    prompts = [f"Request {i} of four, each long enough to fill the pool" for i in range(4)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda p: inline_routing(small_pool_server, p, max_new_tokens=90), prompts))
    assert sum(response["meta_info"]["num_retractions"] for response, _, _ in results) > 0
    assert "KV cache pool is full. Retract requests." in small_pool_server.log_path.read_text()
    for prompt, (response, ours, descriptor) in zip(prompts, results):
        assert descriptor["missing"] == 0
        check_against_references(small_pool_server, response, ours, prompt)
    check_reused_slots_hold_no_rows(small_pool_server)


def test_bad_ids_from_the_engine_fail_the_delivery_of_the_requests_over_them_and_serving_goes_on(
        small_pool_server):
    """An id of no expert reaches the capture in the prompt's prefill: that request is answered and
    its routing delivered as failed, naming the bad id, with every row missing; a request that
    reuses the cached prefix is failed too (its slots' rows were lost); once SGLang frees those
    slots (cache flush) the same prompt's routing is delivered and equals both references."""
    server = small_pool_server
    prompt = token_sequence(server, 40, first=12)
    with switched_on(server, "bad_ids"):
        response = generate(server, prompt, max_new_tokens=4, routing=routing_params(inline=True), own=False)
    [descriptor] = response["meta_info"]["routing_replay"]
    assert len(response["output_ids"]) == 4 and descriptor["delivery"] == "failed"
    assert "= 1000 is not an expert id" in descriptor["error"]
    assert descriptor["missing"] == descriptor["rows"] * LAYERS == (len(prompt) + 3) * LAYERS
    reused = generate(server, prompt + [20, 21], max_new_tokens=2, routing=routing_params(inline=True), own=False)
    assert reused["meta_info"]["cached_tokens"] > 0
    assert reused["meta_info"]["routing_replay"][0]["delivery"] == "failed"
    flush_cache(server)
    response, ours, descriptor = inline_routing(server, prompt, max_new_tokens=4)
    assert descriptor["missing"] == 0
    check_against_references(server, response, ours, prompt)


def test_routing_without_a_destination_is_refused_with_400(small_pool_server):
    """No sink in the request, no --routing-sink on the server and not inline: every endpoint answers
    HTTP 400 naming the problem; the same request with inline=true is served."""
    custom = routing_params(key="nowhere")
    attempts = [("/generate", {"text": "x", "stream": stream, "sampling_params": {"max_new_tokens": 1,
                                                                                 "custom_params": custom}})
                for stream in (False, True)]
    attempts += [("/v1/completions", {"model": "default", "prompt": "x", "max_tokens": 1, "custom_params": custom}),
                 ("/v1/chat/completions", {"model": "default", "max_tokens": 1, "custom_params": custom,
                                           "messages": [{"role": "user", "content": "x"}]})]
    for path, body in attempts:
        response = requests.post(f"{small_pool_server.url}{path}", json=body, timeout=60)
        assert response.status_code == 400, (path, response.status_code, response.text[:300])
        assert "routing requested without a destination" in response.text, (path, response.text[:300])
    _, _, descriptor = inline_routing(small_pool_server, "x", max_new_tokens=1)
    assert descriptor["delivery"] == "inline"


def test_a_server_that_cannot_record_refuses_to_start(tiny_models, tmp_path):
    """SGLang's Qwen3-MoE ignores mlp_only_layers, so with it in the config SGLang routes layer 0 that
    the trainer builds no router for: rows could not be matched, so the server exits naming the
    layers and never serves."""
    model = shutil.copytree(tiny_models["qwen3_moe"], tmp_path / "qwen3_dense_first")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "mlp_only_layers": [0]}))
    server = SGLangServer(model, [*SERVER_ARGS, "--record-routing"], log_path=tmp_path / "refused.log")
    try:
        with pytest.raises(RuntimeError, match="SGLang server exited"):
            server.wait_healthy(timeout=240)
    finally:
        server.stop()
    assert server.process.returncode != 0
    assert "SGLang routes layers [0, 1] but the checkpoint's config has MoE layers [1]" in server.log_path.read_text()
