"""Capture cost: RoutingRecorder against the int32 buffer written with torch indexing.

The baseline is what SGLang's own capture (and most users' first attempt) does: an int32
``[num_slots, L, K]`` buffer, ``buffer[slots, layer] = topk_ids`` per MoE layer, ``buffer[slots]``
per finished request. Both run side by side in one process, interleaved call by call in a shuffled
order; the script prints medians and ratios (time and bytes) for Qwen3-30B-A3B routing (48 layers,
128 experts, top-8).

On a GPU, device time per call is measured with CUDA events, apart from the host-side call
overhead (wall time of the Python call, no sync).

Before and after the timed rounds both gathers must return the recorded routing: ours complete
and equal to the baseline's ``buffer[slots]``, which must equal the ids written; otherwise the
run stops naming the batch and the first differing value.

    python benchmarks/capture_bench.py                 # full run, prints a table
    python benchmarks/capture_bench.py --smoke         # a few iterations (CI)
    python benchmarks/capture_bench.py --out benchmarks/results/capture-cpu.md
    python benchmarks/capture_bench.py --threads 1      # torch indexing on one thread, as ours
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from checks import BenchmarkCheckFailed, require_equal
from machine import describe
from routing_replay.capture import MissingRoutingError, RoutingLayout, RoutingRecorder

LAYOUT = RoutingLayout(num_layers=48, top_k=8, num_experts=128)  # Qwen3-30B-A3B
BATCHES = (1, 64, 4096)


class Int32Baseline:
    """The int32 buffer written with torch indexing."""

    def __init__(self, num_slots: int, device: torch.device) -> None:
        self.buffer = torch.zeros((num_slots, LAYOUT.num_layers, LAYOUT.top_k), dtype=torch.int32, device=device)

    def record(self, layer: int, slots: torch.Tensor, topk_ids: torch.Tensor) -> None:
        self.buffer[slots, layer] = topk_ids.to(torch.int32)

    def gather(self, slots: torch.Tensor) -> torch.Tensor:
        return self.buffer[slots].cpu()

    @property
    def bytes_per_token(self) -> int:
        return LAYOUT.num_layers * LAYOUT.top_k * 4


def time_host_interleaved(calls: dict[str, Callable[[], object]], steps: int, order: random.Random) -> dict[str, float]:
    """Median microseconds of wall time per call of each of ``calls`` (the call returns; on CUDA,
    nothing waits). Each step runs every call once, in a fresh random order, so the calls compared
    share the machine's state within microseconds: on a busy machine, the slow and fast spells
    (preemption, a neighbour's cache traffic) hit all of them alike, which per-call blocks of
    timing do not guarantee."""
    samples: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for _ in range(steps):
        order.shuffle(names)
        for name in names:
            fn = calls[name]
            t0 = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t0) * 1e6)
    return {name: statistics.median(values) for name, values in samples.items()}


def time_device(fn: Callable[[], object], iters: int) -> float:
    """Median microseconds per call of GPU time between CUDA events around each call."""
    samples = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3)
    return statistics.median(samples)


def bench_batch(n: int, device: torch.device, rounds: int, iters: int) -> dict[str, float]:
    num_slots = max(2 * n, 1024)
    gen = torch.Generator().manual_seed(n)
    ours, base = RoutingRecorder(LAYOUT, num_slots, device), Int32Baseline(num_slots, device)
    slots = torch.randperm(num_slots, generator=gen)[:n].to(device)
    ids = torch.rand((n, LAYOUT.num_experts), generator=gen).topk(LAYOUT.top_k, dim=-1).indices.to(device)
    for layer in range(LAYOUT.num_layers):  # fill every layer so gathers return complete rows
        ours.record(layer, slots, ids)
        base.record(layer, slots, ids)
    check_gathers(n, ours, base, slots, ids, "before timing")

    calls = {
        "record ours": lambda: ours.record(7, slots, ids),
        "record int32": lambda: base.record(7, slots, ids),
        "gather ours": lambda: ours.gather(slots).wait(),
        "gather int32": lambda: base.gather(slots),
    }
    order = random.Random(n)
    results = {f"{name} host_us": us for name, us in time_host_interleaved(calls, rounds * iters, order).items()}
    if device.type == "cuda":
        device_us: dict[str, list[float]] = {}
        for _ in range(rounds):  # shuffled each round so drift hits both sides alike
            names = ["record ours", "record int32"]
            order.shuffle(names)
            for name in names:
                device_us.setdefault(f"{name} device_us", []).append(time_device(calls[name], iters))
        results.update({key: statistics.median(values) for key, values in device_us.items()})
    check_gathers(n, ours, base, slots, ids, "after timing")
    return results


def check_gathers(n: int, ours: RoutingRecorder, base: Int32Baseline, slots: torch.Tensor, ids: torch.Tensor,
                  when: str) -> None:
    """Both gathers return the ids recorded at every layer of ``slots``: what the timings compare."""
    try:
        got = ours.gather(slots).wait().require_complete()
    except MissingRoutingError as exc:
        raise BenchmarkCheckFailed(f"{n} tokens, {when}: our gather is incomplete: {exc}") from exc
    want = base.gather(slots)
    require_equal(f"{n} tokens, {when}: int32 baseline buffer[slots]", want,
                  ids.cpu()[:, None, :].expand(n, LAYOUT.num_layers, LAYOUT.top_k))
    require_equal(f"{n} tokens, {when}: our gather against the baseline's buffer[slots]", got, want)


def report(device: torch.device, rows: dict[int, dict[str, float]], smoke: bool,
           load: tuple[tuple[float, ...], tuple[float, ...]]) -> str:
    ours_bytes = LAYOUT.bytes_per_token
    with_bits = ours_bytes + 4 * LAYOUT.valid_words
    int32_bytes = LAYOUT.num_layers * LAYOUT.top_k * 4
    lines = [
        f"# Capture benchmark ({'smoke' if smoke else 'full'} run)",
        "",
        f"- machine: {describe(device)}",
        f"- device: {device}",
        f"- load average (1, 5, 15 min) at start {', '.join(f'{x:.2f}' for x in load[0])},"
        f" at end {', '.join(f'{x:.2f}' for x in load[1])}: other processes may share the CPU, hence"
        " the calls interleaved one by one in shuffled order",
        f"- layout: 48 layers, 128 experts, top-8 (Qwen3-30B-A3B); storage {LAYOUT.dtype}",
        f"- bytes per token: ours {ours_bytes} B routing + {with_bits - ours_bytes} B validity bitmask = {with_bits} B;"
        f" int32 baseline {int32_bytes} B -> {int32_bytes / ours_bytes:.2f}x fewer routing bytes,"
        f" {int32_bytes / with_bits:.2f}x fewer including the bitmask",
        "- times: median microseconds per call; ratio = int32 / ours (above 1 means ours is faster)",
        "",
    ]
    header = "| tokens | record ours | record int32 | ratio | gather ours | gather int32 | ratio |"
    if device.type == "cuda":
        header += " record ours (GPU us) | record int32 (GPU us) | ratio |"
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for n, r in rows.items():
        line = (
            f"| {n} | {r['record ours host_us']:.1f} | {r['record int32 host_us']:.1f} |"
            f" {r['record int32 host_us'] / r['record ours host_us']:.2f} |"
            f" {r['gather ours host_us']:.1f} | {r['gather int32 host_us']:.1f} |"
            f" {r['gather int32 host_us'] / r['gather ours host_us']:.2f} |"
        )
        if device.type == "cuda":
            line += (
                f" {r['record ours device_us']:.2f} | {r['record int32 device_us']:.2f} |"
                f" {r['record int32 device_us'] / r['record ours device_us']:.2f} |"
            )
        lines.append(line)
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where both buffers live (default: cuda when available, else cpu)")
    parser.add_argument("--smoke", action="store_true", help="a few iterations only, to prove the script runs (CI)")
    parser.add_argument("--rounds", type=int, default=7,
                        help="rounds of --iters interleaved steps (each step calls everything once, shuffled); "
                             "on a GPU, also the rounds of --iters device-timed record calls")
    parser.add_argument("--iters", type=int, default=200, help="steps per round")
    parser.add_argument("--out", type=Path, help="also write the markdown table to this file")
    parser.add_argument("--threads", type=int,
                        help="torch intra-op threads (default: torch's); 1 keeps the baseline's indexing off a "
                             "thread pool that other processes on a busy machine preempt")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rounds, iters = (1, 3) if args.smoke else (args.rounds, args.iters)
    device = torch.device(args.device)
    load_start = os.getloadavg()
    rows = {n: bench_batch(n, device, rounds, iters) for n in BATCHES}
    text = report(device, rows, args.smoke, (load_start, os.getloadavg()))
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
