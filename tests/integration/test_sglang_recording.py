"""A real SGLang server on CPU with --record-routing: routing delivered equals routing used.

The independent references are Hugging Face transformers' router (an uncached forward over the
same tokens) and SGLang's own --enable-return-routed-experts capture of the same request.
"""

from __future__ import annotations

import concurrent.futures

import msgspec
import pytest
import requests
import torch

from routing_replay.sglang.client import (RoutingNotReturned, decode_inline, routing_descriptor, routing_params,
                                          routing_record)
from routing_replay.wire import token_hash
from tests.integration.sglang_support import (
    MALFORMED_CUSTOM_PARAMS,
    LAYERS,
    TOP_K,
    check_against_references,
    check_rows_against_references,
    decode_sglang_routed_experts,
    generate,
    hf_routing,
    hf_tokenizer,
    inline_routing,
    running_requests,
    same_sets,
    sglang_own_routing,
    sglang_processes,
    start_server,
    token_ids,
)
from tests.polling import wait_until

PROMPTS = ["The quick brown fox", "Hello world! Mixture of experts models route every token.",
           "What is 3 + 4? The answer is", "0123456789 abcdefghij"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_routing_equals_hf_router_and_sglang_own_capture(qwen3_server, prompt):
    response, ours, descriptor = inline_routing(qwen3_server, prompt, max_new_tokens=10)
    check_against_references(qwen3_server, response, ours, prompt)
    record = routing_record(descriptor)
    assert (record.num_layers, record.top_k, record.num_experts, record.dtype) == (LAYERS, TOP_K, 8, "uint8")
    assert record.payload_bytes == ours.numel()  # one byte per id, against four for SGLang's int32


def test_we_hold_sglangs_capturer_slot_and_sglangs_own_capturer_still_works(qwen3_server):
    """Every MoE path that captures (top-k, fused gates, models that call the capturer directly)
    calls the object in SGLang's capturer slot: the scheduler reports ours there, wrapping SGLang's
    own (on in this server), whose rows equal ours (the greedy test above compares them)."""
    log = qwen3_server.log_path.read_text(errors="replace")
    assert "RoutedExpertsRecorder(SGLang's own capturer: RoutedExpertsCapturer)" in log


def test_long_prompt_across_small_prefill_chunks(qwen3_server):
    prompt = " ".join(PROMPTS * 3)  # far beyond --chunked-prefill-size 16
    response, ours, _ = inline_routing(qwen3_server, prompt, max_new_tokens=4)
    assert response["meta_info"]["prompt_tokens"] > 48
    check_against_references(qwen3_server, response, ours, prompt)


def test_32_concurrent_sink_only_requests_are_each_delivered_their_own_rows(qwen3_server, routing_collector):
    """Sink-only requests are answered without waiting for their routing (the descriptor says
    ``queued``; the record is made off the scheduler thread). 32 at once, sampled, of different
    lengths: each record the collector receives is for that response's tokens and equals SGLang's
    own capture of it, row for row: none lost, none swapped."""
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(32)]
    keys = [f"burst-{i}" for i in range(32)]

    def one(i: int) -> dict:
        return generate(qwen3_server, prompts[i], max_new_tokens=3 + i % 7, temperature=1.0,
                        routing=routing_params(key=keys[i]))

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(one, range(32)))
    for key, response in zip(keys, responses):
        descriptor = routing_descriptor(response)
        assert (descriptor["delivery"], descriptor["key"]) == ("queued", key) and "checksum" not in descriptor
    tokens = {key: token_ids(qwen3_server, response, prompt) for key, response, prompt in zip(keys, responses, prompts)}
    samples = routing_collector.take(keys, timeout=60, token_ids=tokens)  # refused unless each token hash matches
    for key, response in zip(keys, responses):
        assert samples[key].valid is None and samples[key].record.rows == len(tokens[key]) - 1
        assert torch.equal(samples[key].routing.long(), sglang_own_routing(response, -1, TOP_K)[:, [0, 1]]), key


def test_delivered_over_the_wire_to_the_sink(qwen3_server, routing_collector):
    prompt = PROMPTS[1]
    response = generate(qwen3_server, prompt, max_new_tokens=6,
                        routing={"routing_replay": {"key": "wire-1", "inline": True}})
    descriptor = routing_descriptor(response)
    assert descriptor["delivery"] == "queued" and descriptor["sink"] == routing_collector.address
    tokens = token_ids(qwen3_server, response, prompt)
    sample = routing_collector.get("wire-1", timeout=30, token_ids=tokens)
    # The record made in the scheduler, as received (shm fields are the sender's, none for small rows).
    assert msgspec.structs.replace(sample.record, shm=None, shm_offset=0) == routing_record(descriptor)
    assert sample.record.token_hash == token_hash(tokens)
    assert torch.equal(sample.routing, decode_inline(descriptor)[0])
    check_against_references(qwen3_server, response, sample.routing.long(), prompt)


def test_shared_prefix_reuses_cached_rows(qwen3_server):
    prefix = "Shared system prompt for every sample of one group: solve the task. "
    first, _, _ = inline_routing(qwen3_server, prefix + "First question?", max_new_tokens=4)
    second, ours, _ = inline_routing(qwen3_server, prefix + "Second, different question?", max_new_tokens=4)
    assert second["meta_info"]["cached_tokens"] > 8  # a radix-cache hit: those rows were not recomputed
    check_against_references(qwen3_server, second, ours, prefix + "Second, different question?")


def test_32_concurrent_sampled_requests(qwen3_server):
    prompts = [f"{PROMPTS[i % 4]} #{i}" for i in range(32)]

    def sampled(i):
        return inline_routing(qwen3_server, prompts[i], max_new_tokens=12, temperature=1.0)

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(sampled, range(32)))
    for prompt, (response, ours, _) in zip(prompts, results):
        check_against_references(qwen3_server, response, ours, prompt)


def test_multi_turn_rows_start_at_start_len(qwen3_server):
    first, full_first, _ = inline_routing(qwen3_server, PROMPTS[0], max_new_tokens=6)
    turn_one = token_ids(qwen3_server, first, PROMPTS[0])
    follow_up = hf_tokenizer(str(qwen3_server.model_path))(" And then?").input_ids
    second_prompt = turn_one + follow_up
    response = generate(qwen3_server, second_prompt, max_new_tokens=5,
                        routing=routing_params(start_len=len(turn_one), inline=True))
    descriptor = routing_descriptor(response)
    ours = decode_inline(descriptor)[0].long()
    tokens = second_prompt + response["output_ids"]
    assert descriptor["start"] == len(turn_one) and ours.shape[0] == len(tokens) - 1 - len(turn_one)
    reference = hf_routing(str(qwen3_server.model_path), tokens[:-1], TOP_K)[len(turn_one):]
    assert same_sets(ours, reference).float().mean() >= 0.99
    # the first turn's rows, recorded again for the second request, match what the first returned
    whole = generate(qwen3_server, second_prompt, max_new_tokens=1, routing=routing_params(inline=True))
    assert torch.equal(decode_inline(routing_descriptor(whole))[0].long()[: len(turn_one) - 1], full_first[: len(turn_one) - 1])


def test_aborted_request_is_reported_and_leaves_the_server_correct(qwen3_server):
    """An aborted request gets the rows of every token it processed, equal to SGLang's own capture
    and Hugging Face's router; the next request on the same prompt is correct too."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(generate, qwen3_server, PROMPTS[2], max_new_tokens=400,
                              routing=routing_params(key="to-abort", inline=True))
        wait_until(lambda: running_requests(qwen3_server), "the request to abort is running", timeout=60, every=0.1)
        requests.post(f"{qwen3_server.url}/abort_request", json={"abort_all": True}, timeout=10)
        aborted = pending.result(timeout=60)
    assert aborted["meta_info"]["finish_reason"]["type"] == "abort"
    assert 0 < len(aborted["output_ids"]) < 400
    descriptor = routing_descriptor(aborted)
    tokens = token_ids(qwen3_server, aborted, PROMPTS[2])
    assert (descriptor["key"], descriptor["start"]) == ("to-abort", 0)
    assert descriptor["delivery"] == "queued" and "inline" in descriptor  # to the default sink, and inline
    assert (descriptor["num_tokens"], descriptor["rows"], descriptor["missing"]) == (len(tokens), len(tokens) - 1, 0)
    assert descriptor["token_hash"] == token_hash(tokens)
    ids, valid = decode_inline(descriptor)
    assert valid is None
    check_against_references(qwen3_server, aborted, ids.long(), PROMPTS[2])
    response, ours, _ = inline_routing(qwen3_server, PROMPTS[2], max_new_tokens=8)
    check_against_references(qwen3_server, response, ours, PROMPTS[2])


def test_unreachable_sink_completes_generation_and_says_so(qwen3_server):
    from routing_replay.ports import free_port

    dead = f"tcp://127.0.0.1:{free_port()}"

    def failed_delivery():
        response = generate(qwen3_server, PROMPTS[0], max_new_tokens=4, routing=routing_params(sink=dead))
        assert len(response["output_ids"]) == 4  # generation completes whatever becomes of the routing
        entry = response["meta_info"]["routing_replay"][0]
        assert entry["delivery"] in ("queued", "failed")  # queued until three heartbeats went unanswered
        return response if entry["delivery"] == "failed" else None

    # the first request makes the sink known to the sender
    response = wait_until(failed_delivery, "the dead sink is reported unreachable", timeout=30, every=0.5)
    entry = response["meta_info"]["routing_replay"][0]
    assert "unreachable" in entry["error"]
    with pytest.raises(RoutingNotReturned, match="unreachable"):
        routing_descriptor(response)


def malformed_requests() -> list[tuple[str, dict, str]]:
    """(path, body, words the HTTP 400 must contain): every malformed kind over /generate, streamed
    and not, and the OpenAI endpoints (whose schema itself refuses custom_params that are no object)."""
    attempts = []
    for custom, message in MALFORMED_CUSTOM_PARAMS:
        for stream in (False, True):
            attempts.append(("/generate", {"text": "x", "stream": stream,
                                           "sampling_params": {"max_new_tokens": 1, "custom_params": custom}}, message))
        if isinstance(custom, dict):
            attempts.append(("/v1/completions", {"model": "default", "prompt": "x", "max_tokens": 1,
                                                 "custom_params": custom}, message))
            attempts.append(("/v1/chat/completions", {"model": "default", "max_tokens": 1, "stream": True,
                                                      "messages": [{"role": "user", "content": "x"}],
                                                      "custom_params": custom}, message))
    batch = {"text": ["x", "y"], "sampling_params": [{"max_new_tokens": 1}, {"max_new_tokens": 1, "custom_params":
                                                                             {"routing_replay": {"inline": 1}}}]}
    attempts.append(("/generate", batch, "inline must be true or false"))
    keyless = {"max_new_tokens": 1, "custom_params": routing_params(inline=True)}  # so the rid is the key
    attempts.append(("/generate", {"text": "x", "rid": "r" * 2000, "stream": True, "sampling_params": keyless},
                     "request id (rid) is 2000 bytes"))
    return attempts


@pytest.mark.timeout(300)
def test_malformed_routing_requests_are_400s_and_the_server_keeps_serving(qwen3_server):
    before = sglang_processes(qwen3_server)
    assert {"sglang::scheduler", "sglang::detokenizer"} <= before.keys(), before
    attempts = malformed_requests()
    assert len(attempts) >= 200

    def post(attempt):
        path, body, message = attempt
        response = requests.post(f"{qwen3_server.url}{path}", json=body, timeout=60)
        return None if response.status_code == 400 and message in response.text else \
            (path, message, response.status_code, response.text[:300])

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        wrong = [answer for answer in pool.map(post, attempts) if answer is not None]
    assert not wrong, f"{len(wrong)} of {len(attempts)} not refused naming the problem, e.g. {wrong[:3]}"
    response, ours, _ = inline_routing(qwen3_server, PROMPTS[1], max_new_tokens=8)
    check_against_references(qwen3_server, response, ours, PROMPTS[1])
    assert sglang_processes(qwen3_server) == before  # the same server, scheduler and detokenizer processes


def test_openai_endpoints_keep_working_and_deliver_routing(qwen3_server, routing_collector):
    """Completions and chat completions deliver to the sink, under the given key, the rows of the
    tokens SGLang processed: equal to SGLang's own capture and Hugging Face's router."""
    import openai

    client = openai.OpenAI(base_url=f"{qwen3_server.url}/v1", api_key="none")
    plain = client.completions.create(model="default", prompt=PROMPTS[0], max_tokens=4, temperature=0)
    assert plain.choices[0].text is not None
    compare = {"return_token_ids": True, "return_routed_experts": True}  # the tokens, and SGLang's own capture
    completion = client.completions.create(
        model="default", prompt=PROMPTS[0], max_tokens=5, temperature=0,
        extra_body={"custom_params": routing_params(key="openai-completion"), **compare},
    )
    chat = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": PROMPTS[1]}], max_tokens=5, temperature=0,
        extra_body={"custom_params": routing_params(key="openai-chat"), "return_prompt_token_ids": True, **compare},
    )
    completion_tokens = completion.choices[0].prompt_token_ids + completion.choices[0].token_ids
    chat_tokens = chat.choices[0].prompt_token_ids + chat.choices[0].response_token_ids
    for key, tokens, response in (("openai-completion", completion_tokens, completion),
                                  ("openai-chat", chat_tokens, chat)):
        assert len(tokens) == response.usage.prompt_tokens + response.usage.completion_tokens
        sample = routing_collector.get(key, timeout=30, token_ids=tokens)  # refused unless the token hash matches
        own = decode_sglang_routed_experts(response.sglext["routed_experts"], len(tokens) - 1, -1, TOP_K)
        check_rows_against_references(qwen3_server, tokens, sample.routing.long(), own)


def test_weight_update_never_delivers_rows_of_old_weights(qwen3_server, tiny_models, tmp_path):
    from routing_replay.tiny_models import build

    prefix = "A long shared prefix that stays in the radix cache across the update. "
    new_weights = build("qwen3_moe", tmp_path / "new", seed=123)
    inline_routing(qwen3_server, prefix + "before", max_new_tokens=3)

    def update(path, version, flush):
        body = {"model_path": str(path), "weight_version": version, "flush_cache": flush}
        result = requests.post(f"{qwen3_server.url}/update_weights_from_disk", json=body, timeout=120).json()
        assert result["success"], result

    try:
        update(new_weights, "v2", flush=False)  # keep the old prefix KV cached: its rows must not survive
        response = generate(qwen3_server, prefix + "after", max_new_tokens=3, routing=routing_params(inline=True))
        descriptor = routing_descriptor(response)
        assert descriptor["weight_version"] == "v2"
        assert response["meta_info"]["cached_tokens"] > 0 and descriptor["missing"] > 0  # dropped, not stale
        update(new_weights, "v3", flush=True)
        response, ours, descriptor = inline_routing(qwen3_server, prefix + "after", max_new_tokens=3)
        tokens = token_ids(qwen3_server, response, prefix + "after")
        assert descriptor["weight_version"] == "v3" and descriptor["missing"] == 0
        assert same_sets(ours, hf_routing(str(new_weights), tokens[:-1], TOP_K)).float().mean() >= 0.99
    finally:
        update(tiny_models["qwen3_moe"], "restored", flush=True)


@pytest.mark.parametrize(("kind", "moe_layers"), [("qwen2_moe", (0, 1)), ("mixtral", (0, 1)), ("glm4_moe", (1, 2))])
def test_other_moe_families(kind, moe_layers, tiny_models, tmp_path):
    """Qwen2-MoE (shared expert), Mixtral, and GLM4-MoE whose first layer is dense: rows map to
    routers by layer index (router 0 is decoder layer 1 there)."""
    server = start_server(tiny_models[kind], tmp_path / f"{kind}.log", "--record-routing",
                          "--enable-return-routed-experts")
    try:
        for prompt in PROMPTS[:2]:
            response, ours, descriptor = inline_routing(server, prompt, max_new_tokens=8)
            assert routing_record(descriptor).num_layers == len(moe_layers)
            check_against_references(server, response, ours, prompt, moe_layers=moe_layers)
    finally:
        server.stop()


def test_server_without_record_routing_answers_400(tiny_models, tmp_path):
    server = start_server(tiny_models["qwen3_moe"], tmp_path / "plain.log")
    try:
        body = {"text": "x", "sampling_params": {"max_new_tokens": 1, "custom_params": routing_params(inline=True)}}
        response = requests.post(f"{server.url}/generate", json=body, timeout=30)
        assert response.status_code == 400
        assert "without --record-routing" in response.json()["error"]
        assert generate(server, "x", max_new_tokens=2, own=False)["output_ids"]  # ordinary requests still work
    finally:
        server.stop()


def test_plugin_not_loaded_is_detected_by_the_client(tiny_models, tmp_path):
    # SGLANG_PLUGINS names the plugins SGLang may load: ours is left out, as if it failed to load.
    server = start_server(tiny_models["qwen3_moe"], tmp_path / "noplugin.log", env={"SGLANG_PLUGINS": "none"})
    try:
        response = generate(server, "x", max_new_tokens=2, own=False, routing=routing_params(inline=True))
        with pytest.raises(RoutingNotReturned, match="plugin is not active"):
            routing_descriptor(response)
    finally:
        server.stop()


def test_launchers_document_the_routing_flags():
    import subprocess
    import sys

    for command in ([sys.executable, "-m", "sglang.launch_server", "--help"],
                    [sys.executable, "-m", "routing_replay.cli", "serve", "--help"]):
        out = subprocess.run(command, capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stderr[-2000:]
        for flag in ("--record-routing", "--routing-sink", "--routing-max-queued-mb", "--no-routing-shm"):
            assert flag in out.stdout, (command, flag)


def test_streaming_responses_carry_the_descriptor_at_the_end(qwen3_server):
    import json

    body = {"text": PROMPTS[0], "stream": True,
            "sampling_params": {"max_new_tokens": 6, "temperature": 0.0, "ignore_eos": True,
                                "custom_params": routing_params(inline=True)}}
    chunks = []
    with requests.post(f"{qwen3_server.url}/generate", json=body, stream=True, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                chunks.append(json.loads(line[len(b"data: "):]))
    assert len(chunks) > 1
    assert all(not c["meta_info"].get("routing_replay") for c in chunks[:-1])  # only once finished
    descriptor = routing_descriptor(chunks[-1])
    ids, _ = decode_inline(descriptor)
    assert ids.shape[0] == chunks[-1]["meta_info"]["prompt_tokens"] + 6 - 1
