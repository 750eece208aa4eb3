"""SGLang serving cost of recording routing, side by side in one run.

Three servers of the same CPU-sized MoE (Qwen3-MoE architecture: 8 layers, hidden 256, 64 experts,
top-8; bfloat16): recording off, with ``--record-routing`` (every request asks for its routing,
delivered to a collector in this process), and with SGLang's own ``--enable-return-routed-experts``
(every request asks ``return_routed_experts``). Repetitions alternate between the servers; medians
of prefill and decode throughput are reported, with

- the capture's own cost measured inside the recording server (time in our per-layer hook, the
  per-forward scatter, the per-request gather start and the delivery thread's work, against the
  forwards' time; and the scheduler thread's time in our hooks per finished request): CPU
  throughput swings +-25% run to run here, so this share is the figure to trust;
- bytes per token delivered by each path (ours: uint8 on the wire; SGLang: int32, and its base64
  JSON as measured in the responses).

Checks (the run stops naming what differed): every HTTP response is a 200; every request of the
recording paths delivers routing of its full shape (prompt + output - 1 rows); and before timing,
the same prompts sent one at a time to the recording server and to SGLang's own capture give the
same outputs and the same routing, ours as received by the collector.

    python benchmarks/sglang_bench.py [--reps 3] [--out benchmarks/results/sglang-cpu.md]
    python benchmarks/sglang_bench.py --smoke      # tiny model, one repetition (CI)
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
import torch

from checks import require, require_equal
from machine import describe
from routing_replay.sglang.client import routing_params
from routing_replay.sglang.recording import PROFILE_ENV
from routing_replay.sglang.server import SGLangServer
from routing_replay.tiny_models import build
from routing_replay.wire import RoutingCollector

SERVER_ARGS = ("--dtype", "bfloat16", "--max-total-tokens", "16384", "--skip-server-warmup",
               "--disable-radix-cache", "--max-running-requests", "32")


def run_batch(server: SGLangServer, mode: str, prompts: list[list[int]], new_tokens: int, tag: str) -> tuple[float, list]:
    def one(i_prompt):
        i, prompt = i_prompt
        params = {"max_new_tokens": new_tokens, "temperature": 0.0, "ignore_eos": True}
        body = {"input_ids": prompt, "sampling_params": params}
        if mode == "ours":
            params["custom_params"] = routing_params(key=f"{tag}-{i}")
        elif mode == "own":
            body["return_routed_experts"] = True
        response = requests.post(f"{server.url}/generate", json=body, timeout=600)
        require(response.status_code == 200, f"{mode} server answered HTTP {response.status_code} to request {i}"
                                             f" ({tag}): {response.text[:500]}")
        return response.json()

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        responses = list(pool.map(one, enumerate(prompts)))
    return time.perf_counter() - start, responses


def routing_rows(response: dict) -> int:
    """Rows of routing a request produces: every processed token but the last (it has no forward)."""
    return response["meta_info"]["prompt_tokens"] + len(response["output_ids"]) - 1


def own_routing(response: dict, shape: dict) -> np.ndarray:
    """SGLang's own ``routed_experts`` of one response: base64 of int32 ``[rows, layers, top_k]``."""
    require("routed_experts" in response.get("meta_info", {}), "own server: a response has no meta_info.routed_experts")
    flat = np.frombuffer(base64.b64decode(response["meta_info"]["routed_experts"]), dtype=np.int32)
    want = (routing_rows(response), shape["layers"], shape["top_k"])
    require(flat.size == np.prod(want), f"own server: routed_experts holds {flat.size} ids, expected {want}")
    return flat.reshape(want)


def take_delivered(collector: RoutingCollector, responses: dict[str, dict], shape: dict) -> None:
    """The collector received each request's routing (key -> its response), of the request's full shape."""
    got = collector.take(list(responses), timeout=120)
    for key, response in responses.items():
        want = (routing_rows(response), shape["layers"], shape["top_k"])
        require(tuple(got[key].routing.shape) == want,
                f"ours: routing of {key} has shape {tuple(got[key].routing.shape)}, expected {want}")


def check_paths_agree(servers: dict, collector: RoutingCollector, prompts: list[list[int]], new_tokens: int,
                      shape: dict) -> None:
    """One request at a time (no batching differences), the same prompts to the recording server and to
    SGLang's own capture: the same output ids, and the routing our collector receives equals SGLang's."""
    for i, prompt in enumerate(prompts):
        _, (ours,) = run_batch(servers["ours"], "ours", [prompt], new_tokens, f"check{i}")
        _, (own,) = run_batch(servers["own"], "own", [prompt], new_tokens, f"check{i}")
        require(ours["output_ids"] == own["output_ids"],
                f"prompt {i}: the recording server generated {ours['output_ids']},"
                f" SGLang's own capture {own['output_ids']}")
        delivered = collector.take([f"check{i}-0"], timeout=120)[f"check{i}-0"].routing
        require_equal(f"prompt {i}: routing received by our collector against SGLang's own routed_experts",
                      delivered, own_routing(own, shape))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model, small batches, one repetition (CI)")
    parser.add_argument("--reps", type=int, default=3, help="alternated repetitions (median reported)")
    parser.add_argument("--out", type=Path, help="also write the markdown report to this file")
    args = parser.parse_args()
    if args.smoke:
        shape, reps = dict(layers=2, hidden=64, experts=8, top_k=2), 1
        prefill, decode = (2, 32), (2, 4, 8)
    else:
        shape, reps = dict(layers=8, hidden=256, experts=64, top_k=8), args.reps
        prefill, decode = (8, 256), (8, 16, 64)  # (requests, prompt tokens) / (requests, prompt tokens, new tokens)
    work = Path(tempfile.mkdtemp(prefix="sglang-bench-"))
    model = build("qwen3_moe", work / "model", **shape)
    profile_path = work / "profile.json"
    gen = torch.Generator().manual_seed(0)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]

    def prompts(n: int, length: int) -> list[list[int]]:  # fresh random ids: no prefix-cache hits
        return torch.randint(10, vocab, (n, length), generator=gen).tolist()

    with RoutingCollector() as collector:
        servers = {
            "off": SGLangServer(model, SERVER_ARGS, log_path=work / "off.log"),
            "ours": SGLangServer(model, [*SERVER_ARGS, "--record-routing", "--routing-sink", collector.address],
                                 log_path=work / "ours.log", env={PROFILE_ENV: str(profile_path)}),
            "own": SGLangServer(model, [*SERVER_ARGS, "--enable-return-routed-experts"], log_path=work / "own.log"),
        }
        try:
            for server in servers.values():
                server.wait_healthy(300)
            check_gen = torch.Generator().manual_seed(1)  # its own prompts: the timed ones stay as they were
            check_prompts = torch.randint(10, vocab, (2, decode[1]), generator=check_gen).tolist()
            check_paths_agree(servers, collector, check_prompts, decode[2], shape)
            results: dict[str, dict[str, list[float]]] = {m: {"prefill": [], "decode": []} for m in servers}
            base64_bytes, rows_seen = 0, 0
            order = list(servers)
            for rep in range(reps + 1):  # repetition 0 warms every server up and is discarded
                for mode in order[rep % 3:] + order[: rep % 3]:
                    server = servers[mode]
                    seconds, prefilled = run_batch(server, mode, prompts(*prefill), 1, f"p{rep}")
                    if rep:
                        results[mode]["prefill"].append(prefill[0] * prefill[1] / seconds)
                    seconds, responses = run_batch(server, mode, prompts(*decode[:2]), decode[2], f"d{rep}")
                    if rep:
                        results[mode]["decode"].append(decode[0] * decode[2] / seconds)
                    if mode == "ours":
                        take_delivered(collector, {**{f"p{rep}-{i}": r for i, r in enumerate(prefilled)},
                                                   **{f"d{rep}-{i}": r for i, r in enumerate(responses)}}, shape)
                    if mode == "own":
                        for r in prefilled:
                            own_routing(r, shape)
                        for r in responses:
                            base64_bytes += len(r["meta_info"]["routed_experts"])
                            rows_seen += len(own_routing(r, shape))
        finally:
            for server in servers.values():
                server.stop()
    profile = json.loads(profile_path.read_text()) if profile_path.exists() else None
    text = report(shape, results, profile, base64_bytes / max(rows_seen, 1), args.smoke, reps)
    print(text)
    if args.out:
        args.out.write_text(text)


def report(shape: dict, results: dict, profile: dict | None, base64_per_token: float, smoke: bool, reps: int) -> str:
    med = {m: {phase: statistics.median(v) for phase, v in r.items()} for m, r in results.items()}
    ours_bytes = shape["layers"] * shape["top_k"] * (1 if shape["experts"] <= 256 else 2)
    int32_bytes = shape["layers"] * shape["top_k"] * 4
    lines = [
        f"# SGLang recording benchmark ({'smoke' if smoke else 'full'} run)",
        "",
        f"- machine: {describe()}",
        f"- model: Qwen3-MoE architecture, {shape['layers']} layers, hidden {shape['hidden']}, {shape['experts']} experts,"
        f" top-{shape['top_k']}, bfloat16, CPU engine; medians of {reps} alternated repetitions after a warm-up",
        "",
        "| server | prefill tok/s | vs off | decode tok/s | vs off |",
        "|---|---|---|---|---|",
    ]
    for mode, label in (("off", "recording off"), ("ours", "--record-routing"), ("own", "--enable-return-routed-experts")):
        lines.append(f"| {label} | {med[mode]['prefill']:.0f} | {med[mode]['prefill'] / med['off']['prefill']:.2f} |"
                     f" {med[mode]['decode']:.0f} | {med[mode]['decode'] / med['off']['decode']:.2f} |")
    lines += ["", "Bytes per token delivered:", "",
              f"- ours (uint8 on the wire): {ours_bytes} B",
              f"- SGLang int32 rows: {int32_bytes} B ({int32_bytes / ours_bytes:.1f}x ours)",
              f"- SGLang base64 in JSON, measured: {base64_per_token:.0f} B ({base64_per_token / ours_bytes:.1f}x ours)"]
    if profile:
        model_s = profile["forward_s"] - profile["scatter_s"] - profile["capture_s"]
        ours_s = profile["capture_s"] + profile["scatter_s"] + profile["finish_s"] + profile["delivery_s"]
        requests_done = max(profile["requests"], 1)
        lines += ["", "Capture cost inside the recording server (all forwards of the run, warm-up included):", "",
                  f"- forwards: {profile['forwards']}, requests: {profile['requests']}",
                  f"- per-layer hook: {1e3 * profile['capture_s']:.1f} ms; per-forward scatter: {1e3 * profile['scatter_s']:.1f} ms;"
                  f" per-request gather start + enqueue: {1e3 * profile['finish_s']:.1f} ms; delivery thread (wait for"
                  f" the rows, record, send): {1e3 * profile['delivery_s']:.1f} ms",
                  f"- **scheduler thread in our hooks per finished request: "
                  f"{1e3 * profile['finish_s'] / requests_done:.3f} ms**, no wait (it starts the gather and "
                  "queues the delivery: on CPU the gather is a copy of the request's rows, on CUDA it is queued "
                  "on a stream of its own); the delivery thread then spends "
                  f"{1e3 * profile['delivery_s'] / requests_done:.3f} ms per request",
                  f"- model forward time: {1e3 * model_s:.0f} ms",
                  f"- **capture share: {100 * ours_s / (model_s + ours_s):.2f}% of forward time** (goal <= 2% on CPU)"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
