"""Train-step cost of routing replay in megatron-core on CPU, side by side in one run.

A CPU-sized MoE (Qwen3-MoE architecture, 4 layers, hidden 256, 32 experts, top-4) takes a train
step (forward + backward of the token log-prob loss) on a batch of 4 x 256 tokens three ways,
alternating: without replay, with R2 (replaying the routing recorded in the old-policy forward)
and with R3 (replaying rollout routing given per token: the model's own routing with 10% of the
decisions changed, as engines differ). The old-policy forward with recording
is timed against one without. Each repetition runs the phases in a shuffled order; medians are reported with overheads; goal <= 3%.

    python benchmarks/replay_bench.py [--reps 7] [--out benchmarks/results/replay-cpu.md]
    python benchmarks/replay_bench.py --smoke
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from machine import describe
from routing_replay.megatron.hf_checkpoint import build_model
from routing_replay.megatron.logprobs import Batch, score
from routing_replay.megatron.parallel import ParallelConfig, initialize
from routing_replay.megatron.replay import ModelReplay
from routing_replay.tiny_models import build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model and batch, two repetitions (CI)")
    parser.add_argument("--reps", type=int, default=7, help="alternated repetitions (median reported)")
    parser.add_argument("--out", type=Path, help="also write the markdown report to this file")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a small shared VM two threads make timings far noisier)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = dict(layers=2, hidden=64, experts=8, top_k=2) if args.smoke else dict(layers=4, hidden=256, experts=32, top_k=4)
    batch_size, seq, reps = (2, 32, 2) if args.smoke else (4, 256, args.reps)
    initialize(ParallelConfig())
    path = build("qwen3_moe", Path(tempfile.mkdtemp()) / "model", **shape)
    model = build_model(path)
    replay = ModelReplay(model)
    gen = torch.Generator().manual_seed(0)
    batch = Batch.from_sequences(torch.randint(5, 200, (batch_size, seq), generator=gen).tolist())
    tokens = batch.tokens.numel()
    def old_forward(record: bool) -> list[torch.Tensor]:
        with torch.no_grad():
            if not record:
                score(model, batch)
                return []
            with replay.recording() as recorded:
                score(model, batch)
            return recorded

    def train_step(plan: list[torch.Tensor] | None) -> None:
        model.zero_grad(set_to_none=True)
        if plan is None:
            (-score(model, batch).logprobs.mean()).backward()
            return
        with replay.replaying(plan):
            (-score(model, batch).logprobs.mean()).backward()

    recorded = old_forward(True)
    # Rollout routing as an inference engine returns it: the trainer's own routing with ~10% of the
    # decisions different (what the R3 paper measured between SGLang and Megatron).
    rollout = []
    for own in recorded:
        other = torch.rand(tokens, shape["experts"], generator=gen).argsort(1)[:, : shape["top_k"]]
        flip = torch.rand(tokens, generator=gen) < 0.1
        rollout.append(torch.where(flip[:, None], other, own))

    runs = {"old forward": lambda: old_forward(False), "old forward + R2 record": lambda: old_forward(True),
            "step, no replay": lambda: train_step(None), "step, R2 replay": lambda: train_step(recorded),
            "step, R3 replay": lambda: train_step(rollout)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    order = random.Random(0)
    for rep in range(reps + 1):
        names = list(runs)
        order.shuffle(names)  # a fixed order would bias whichever phase follows which
        for name in names:
            start = time.perf_counter()
            runs[name]()
            if rep:  # repetition 0 is a warm-up
                times[name].append(time.perf_counter() - start)
    text = report(shape, batch_size, seq, {k: statistics.median(v) for k, v in times.items()}, args.smoke, reps)
    print(text)
    if args.out:
        args.out.write_text(text)


def report(shape, batch_size, seq, med, smoke, reps) -> str:
    def overhead(name, base):
        return f"{100 * (med[name] / med[base] - 1):+.1f}%"
    lines = [f"# Routing replay benchmark ({'smoke' if smoke else 'full'} run)", "",
             f"- machine: {describe()}",
             f"- model: Qwen3-MoE architecture, {shape['layers']} layers, hidden {shape['hidden']}, {shape['experts']} experts,"
             f" top-{shape['top_k']}, float32, megatron-core local spec; batch {batch_size} x {seq} tokens",
             f"- medians of {reps} alternated repetitions after a warm-up", "",
             "| phase | seconds | overhead |", "|---|---|---|",
             f"| old forward | {med['old forward']:.3f} | |",
             f"| old forward + R2 record | {med['old forward + R2 record']:.3f} | {overhead('old forward + R2 record', 'old forward')} |",
             f"| train step, no replay | {med['step, no replay']:.3f} | |",
             f"| train step, R2 replay | {med['step, R2 replay']:.3f} | {overhead('step, R2 replay', 'step, no replay')} |",
             f"| train step, R3 replay | {med['step, R3 replay']:.3f} | {overhead('step, R3 replay', 'step, no replay')} |",
             "", "Goal: <= 3% overhead for replay (verification included)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
