"""Routing transport, process to process, side by side in one run.

Moves the routing of a batch of 64 samples x 4096 tokens of Qwen3-30B-A3B (48 layers, top-8;
~100 MB as uint8) from a producer process to the consumer, four ways:

  ours-socket  RoutingRecord.of (the producer's checksum pass) + RoutingSender -> RoutingCollector over
               TCP loopback (the cross-host path), views handed over
  ours-socket (no checksum check)  the same, the collector configured not to verify checksums
  ours-shm     the same with the same-host shared-memory fast path (socket carries headers only)
  raw-tcp      one TCP socket carrying the same uint8 bytes (the physical limit of a socket here)
  peers        what peers run: int32 rows base64-encoded (pybase64) into JSON (orjson) over HTTP,
               decoded with np.frombuffer, then ray.put / ray.get into the trainer actor
  ray          the Ray object store alone: ray.put in the producer, ray.get in the trainer actor

Each repetition runs the paths in a shuffled order; medians are reported with ratios. Goals: ours-socket
>= 80% of raw-tcp; ours end to end >= 20x faster than peers; ours-shm at least as fast as ray.

After each transfer (outside its timing) the consumer checks that what arrived equals what was sent,
sample by sample and byte by byte (the trainer actor keeps what it received until the check reads
hashes of it; the peers' path also needs HTTP 200s); a difference stops the run before any ratio
is printed.

    python benchmarks/transport_bench.py [--reps 5] [--out benchmarks/results/transport-cpu.md]
    python benchmarks/transport_bench.py --smoke      # tiny batch, one repetition (CI)
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import http.server
import multiprocessing as mp
import os
import random
import socket
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import orjson
import pybase64
import torch

from checks import BenchmarkCheckFailed, require, require_equal
from machine import describe
from routing_replay.wire import CollectorConfig, RoutingCollector, RoutingRecord, RoutingSender, SenderConfig

LAYERS, TOP_K, EXPERTS = 48, 8, 128
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # with _node_ip_address: Ray stays on loopback


def make_batch(samples: int, tokens: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, EXPERTS, (tokens, LAYERS, TOP_K), dtype=np.uint8) for _ in range(samples)]


def digest(array: np.ndarray) -> str:
    """What an array holds, comparable across processes: dtype, shape and a hash of its bytes."""
    return f"{array.dtype}{array.shape}:{hashlib.blake2b(np.ascontiguousarray(array).data).hexdigest()}"


def require_same_digests(path: str, got: list[str], want: list[str]) -> None:
    require(len(got) == len(want), f"{path}: the trainer received {len(got)} arrays, {len(want)} were sent")
    differing = [i for i, (a, b) in enumerate(zip(got, want)) if a != b]
    if differing:
        first = differing[0]
        raise BenchmarkCheckFailed(f"{path}: the trainer received other content than was sent for sample(s)"
                                   f" {differing}; sample {first} arrived as {got[first]}, was sent as {want[first]}")


# ---- producer process -----------------------------------------------------------------------


def producer_main(conn, samples: int, tokens: int) -> None:
    batch = make_batch(samples, tokens)
    tensors = [torch.from_numpy(b) for b in batch]
    http_port = serve_http(batch)
    conn.send(http_port)
    senders = {shm: RoutingSender(SenderConfig(shared_memory=shm, max_queued_bytes=4 << 30)) for shm in (False, True)}
    while True:
        command = conn.recv()
        if command[0] == "stop":
            break
        if command[0] == "ours":
            _, address, use_shm, rep = command
            sender = senders[use_shm]
            for i, t in enumerate(tensors):  # the record (its checksum pass) is part of the timed path
                record = RoutingRecord.of(f"r{rep}-s{i}", t, None, num_experts=EXPERTS, num_tokens=tokens + 1,
                                          token_hash=0)
                sender.send(record, t, address)
            sender.flush(timeout=600)
        elif command[0] == "raw-tcp":
            with socket.create_connection(("127.0.0.1", command[1])) as s:
                for b in batch:
                    s.sendall(memoryview(b).cast("B"))
        elif command[0] == "ray-connect":
            import ray

            ray.init(address=command[1], namespace="transport-bench", logging_level="ERROR")
            trainer = ray.get_actor("trainer")
        elif command[0] == "ray":
            refs = [ray.put(b) for b in batch]
            ray.get(trainer.receive.remote(refs))
            del refs
        conn.send("done")
    for sender in senders.values():
        sender.close()


def serve_http(batch: list[np.ndarray]) -> int:
    """SGLang-style responses: meta_info.routed_experts = base64 of int32 rows, as orjson."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            rows = batch[int(self.path.rsplit("/", 1)[1])].astype(np.int32)
            body = orjson.dumps({"meta_info": {"routed_experts": pybase64.b64encode(rows.tobytes()).decode()}})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.server_address[1]


# ---- consumer side (this process) -----------------------------------------------------------


def run_ours(conn, collector: RoutingCollector, batch: list[np.ndarray], use_shm: bool, rep: int, path: str) -> float:
    keys = [f"r{rep}-s{i}" for i in range(len(batch))]
    start = time.perf_counter()
    conn.send(("ours", collector.address, use_shm, rep))
    got = collector.take(keys, timeout=600)
    elapsed = time.perf_counter() - start
    for i, key in enumerate(keys):
        require_equal(f"{path}: routing of sample {i} ({key}) as received", got[key].routing, batch[i])
    del got
    conn.recv()
    return elapsed


def run_raw_tcp(conn, sent: np.ndarray) -> float:
    listener = socket.create_server(("127.0.0.1", 0))
    total_bytes = sent.nbytes
    buffer = bytearray(total_bytes)
    view = memoryview(buffer)
    start = time.perf_counter()
    conn.send(("raw-tcp", listener.getsockname()[1]))
    peer, _ = listener.accept()
    received = 0
    while received < total_bytes:
        received += peer.recv_into(view[received:])
    elapsed = time.perf_counter() - start
    peer.close()
    listener.close()
    conn.recv()
    require_equal("raw-tcp: bytes received", buffer, sent)
    return elapsed


def run_peers(http_port: int, samples: int, trainer, sent: list[str]) -> float:
    import ray

    start = time.perf_counter()
    client = http.client.HTTPConnection("127.0.0.1", http_port)
    refs, statuses = [], []
    for i in range(samples):
        client.request("GET", f"/sample/{i}")
        response = client.getresponse()
        statuses.append(response.status)
        payload = orjson.loads(response.read())
        rows = np.frombuffer(pybase64.b64decode(payload["meta_info"]["routed_experts"]), dtype=np.int32)
        refs.append(ray.put(rows))
    ray.get(trainer.receive.remote(refs))
    client.close()
    elapsed = time.perf_counter() - start
    require(statuses == [200] * samples, f"peers: HTTP statuses {statuses}, expected 200 for every sample")
    require_same_digests("peers", ray.get(trainer.digests.remote()), sent)
    return elapsed


def run_ray(conn, trainer, sent: list[str]) -> float:
    import ray

    start = time.perf_counter()
    conn.send(("ray",))
    conn.recv()
    elapsed = time.perf_counter() - start
    require_same_digests("ray", ray.get(trainer.digests.remote()), sent)
    return elapsed


def start_ray():
    import ray

    @ray.remote(num_cpus=0)
    class Trainer:
        def __init__(self) -> None:
            self.held: list[np.ndarray] = []

        def receive(self, refs) -> int:
            self.held = ray.get(refs)  # the trainer holds every array (until the check reads them)
            return sum(a.nbytes for a in self.held)

        def digests(self) -> list[str]:
            """What the last ``receive`` got (outside the timing), then lets it go."""
            held, self.held = self.held, []
            return [digest(a) for a in held]

    context = ray.init(num_cpus=2, object_store_memory=2 << 30, include_dashboard=False, namespace="transport-bench",
                       _node_ip_address="127.0.0.1", logging_level="ERROR")
    trainer = Trainer.options(name="trainer").remote()
    ray.get(trainer.receive.remote([]))
    return context.address_info["gcs_address"], trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="4 samples x 256 tokens, one repetition (CI)")
    parser.add_argument("--reps", type=int, default=5, help="alternated repetitions per path (median reported)")
    parser.add_argument("--samples", type=int, default=64, help="samples in the batch (default 64)")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per sample (default 4096)")
    parser.add_argument("--out", type=Path, help="also write the markdown report to this file")
    args = parser.parse_args()
    samples, tokens, reps = (4, 256, 1) if args.smoke else (args.samples, args.tokens, args.reps)
    total = samples * tokens * LAYERS * TOP_K
    batch = make_batch(samples, tokens)  # what the producer sends (the same seed): the checks' reference
    sent_bytes = np.concatenate([b.ravel() for b in batch])
    sent_uint8, sent_int32 = [digest(b) for b in batch], [digest(b.astype(np.int32).ravel()) for b in batch]

    import ray

    gcs, trainer = start_ray()
    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    producer = ctx.Process(target=producer_main, args=(child_conn, samples, tokens), daemon=True)
    producer.start()
    http_port = conn.recv()
    conn.send(("ray-connect", gcs))
    conn.recv()
    collector = RoutingCollector(CollectorConfig(budget_bytes=4 << 30))
    trusting = RoutingCollector(CollectorConfig(budget_bytes=4 << 30, verify_checksum=False))
    times: dict[str, list[float]] = {}
    try:
        paths = {
            "ours-socket": lambda rep: run_ours(conn, collector, batch, False, 3 * rep, "ours-socket"),
            "ours-socket (no checksum check)": lambda rep: run_ours(conn, trusting, batch, False, 3 * rep + 1,
                                                                    "ours-socket (no checksum check)"),
            "ours-shm": lambda rep: run_ours(conn, collector, batch, True, 3 * rep + 2, "ours-shm"),
            "raw-tcp": lambda rep: run_raw_tcp(conn, sent_bytes),
            "peers": lambda rep: run_peers(http_port, samples, trainer, sent_int32),
            "ray": lambda rep: run_ray(conn, trainer, sent_uint8),
        }
        order = random.Random(0)
        for rep in range(reps + 1):  # repetition 0 warms every path up and is discarded
            names = list(paths)
            order.shuffle(names)  # a fixed order would bias whichever path follows which
            for name in names:
                seconds = paths[name](rep)
                if rep:
                    times.setdefault(name, []).append(seconds)
    finally:
        conn.send(("stop",))
        producer.join(timeout=30)
        collector.close()
        trusting.close()
        ray.shutdown()
    print(report(times, samples, tokens, total, args.smoke))
    if args.out:
        args.out.write_text(report(times, samples, tokens, total, args.smoke))


def report(times: dict[str, list[float]], samples: int, tokens: int, total: int, smoke: bool) -> str:
    med = {k: statistics.median(v) for k, v in times.items()}
    gib = {k: total / v / 2**30 for k, v in med.items()}
    lines = [
        f"# Transport benchmark ({'smoke' if smoke else 'full'} run)",
        "",
        f"- machine: {describe()}; loopback only",
        f"- batch: {samples} samples x {tokens} tokens x 48 layers x top-8 = {total / 1e6:.1f} MB as uint8"
        f" ({4 * total / 1e6:.0f} MB as int32 for the peers' path)",
        f"- medians of {len(next(iter(times.values())))} alternated repetitions (after one warm-up)",
        "",
        "| path | seconds | GiB/s (uint8 bytes) |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {med[k]:.3f} | {gib[k]:.2f} |" for k in med]
    lines += [
        "",
        f"- ours-socket / raw-tcp throughput: {gib['ours-socket'] / gib['raw-tcp']:.2f} (goal >= 0.80);"
        f" without the collector's checksum pass {gib['ours-socket (no checksum check)'] / gib['raw-tcp']:.2f}",
        f"- peers / ours (end to end speed-up): socket {med['peers'] / med['ours-socket']:.1f}x,"
        f" shm {med['peers'] / med['ours-shm']:.1f}x (goal >= 20x)",
        f"- ours-shm / ray throughput: {gib['ours-shm'] / gib['ray']:.2f} (goal >= 1.0)",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
