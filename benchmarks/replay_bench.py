"""Train-step cost of routing replay on the megatron-core learner, on CPU, side by side in one run.

A CPU-sized MoE (Qwen3-MoE architecture, 4 layers, hidden 256, 32 experts, top-4) takes a train
step on a batch of 4 x 256 tokens the way the trainer takes one: ``Learner.zero_grad()``, forward
+ backward of the token log-prob loss (a mean over the batch's tokens: the global token count at
one rank), ``Learner.step()`` (megatron-core DDP's fp32 grad buffer, its Adam, clipping to 1.0 and
the schedule). Replay phases, float32 (the CPU default's train dtype):

- without replay, with R2 (replaying the routing recorded in the old-policy forward, kept in
  ``RecordedRouting``) and with R3 (replaying rollout routing given per sample as the wire delivers
  it: uint8 rows, the model's own routing with 10% of the decisions changed, as engines differ);
  each replayed step places its routing (``RouterIndices``) inside the timed step, as the trainer
  does per micro-batch; the old-policy forward with recording is timed against one without.
  Goal: <= 3% overhead for replay.

Host bytes per replayed micro-batch: every tensor with storage of its own that placing the R3
routing creates (counted by a ``TorchDispatchMode`` over the call), for the placement as it was
(the whole batch widened to int64 on the host, then copied per layer) and as it is now (compact
ids placed where the model lives; on the CPU that is the host), and the time of each.

Optimisation phases, float32 and bfloat16: the same step (same batch, no replay) on the
``megatron-core learner`` against the ``hand-written loop`` the trainer used before, on a second
identical model: ``torch.optim.AdamW`` over the model's parameters (in the train dtype: no fp32
main params), gradients clipped by hand with ``torch.nn.utils.clip_grad_norm_``. The ratio is
learner step time / hand-written step time; the optimizer part of each step (zero_grad + clip +
update, i.e. everything but forward and backward) is reported too. The float32 learner step is the
"no replay" phase itself. Checks before timing: on equal weights both report the same gradient
norm (float32); a forward replaying the recorded routing (R2) replays every token and chooses what
the model chose itself (agreement 1.0 on every layer), and one replaying the rollout routing (R3)
replays every token and differs from the model's own routing on some (``ModelReplay`` verifies in
every replayed forward that the routing used is the routing given).

Each repetition runs all phases in a shuffled order; medians are reported.

    python benchmarks/replay_bench.py [--reps 21] [--out benchmarks/results/replay-cpu.md]
    python benchmarks/replay_bench.py --smoke
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from checks import require
from machine import describe
from routing_replay.megatron.hf_checkpoint import build_model
from routing_replay.megatron.learner import Learner, OptimizerSettings
from routing_replay.megatron.logprobs import Batch, score
from routing_replay.megatron.parallel import ParallelConfig, initialize
from routing_replay.megatron.replay import ModelReplay, RecordedRouting, RouterIndices, rollout_to_router_indices
from routing_replay.tiny_models import build

LEARNING_RATE, GRAD_CLIP = 1e-5, 1.0  # the trainer's default rate: the weights barely drift over the run
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class Timer:
    """Seconds of the whole step and of its optimizer part (all but forward + backward)."""

    def __init__(self) -> None:
        self.optimizer = 0.0

    def part(self, fn):
        start = time.perf_counter()
        out = fn()
        self.optimizer += time.perf_counter() - start
        return out


class HostAllocations(TorchDispatchMode):
    """Bytes of every CPU tensor an op creates with storage of its own (views and in-place writes
    create none), by dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes: dict[torch.dtype, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.untyped_storage().data_ptr() not in given:
                self.bytes[t.dtype] = self.bytes.get(t.dtype, 0) + t.untyped_storage().nbytes()
        return out


def int64_host_placement(rows: list[torch.Tensor], seq_len: int) -> list[torch.Tensor]:
    """The placement before ids stayed compact, for comparison: the batch widened to an int64
    ``[S, B, L, K]`` host tensor, copied out per layer (then moved to the device per forward)."""
    batch, layers, top_k = len(rows), rows[0].shape[1], rows[0].shape[2]
    indices = torch.zeros(seq_len, batch, layers, top_k, dtype=torch.int64)
    mask = torch.zeros(seq_len, batch, layers, dtype=torch.bool)
    for b, sample in enumerate(rows):
        indices[: sample.shape[0], b] = sample.long()
        mask[: sample.shape[0], b] = torch.ones(sample.shape[:2], dtype=torch.bool)
    flat_ids, flat_mask = indices.reshape(seq_len * batch, layers, top_k), mask.reshape(seq_len * batch, layers)
    return [flat_ids[:, l].contiguous() for l in range(layers)] + [flat_mask[:, l].contiguous() for l in range(layers)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model and batch, two repetitions (CI)")
    parser.add_argument("--reps", type=int, default=21, help="alternated repetitions (median reported)")
    parser.add_argument("--out", type=Path, help="also write the markdown report to this file")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a small shared VM two threads make timings far noisier)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).*not installed")
    torch.set_num_threads(args.threads)
    shape = dict(layers=2, hidden=64, experts=8, top_k=2) if args.smoke else dict(layers=4, hidden=256, experts=32, top_k=4)
    batch_size, seq, reps = (2, 32, 2) if args.smoke else (4, 256, args.reps)
    initialize(ParallelConfig())
    path = build("qwen3_moe", Path(tempfile.mkdtemp()) / "model", **shape)
    settings = OptimizerSettings(learning_rate=LEARNING_RATE, grad_clip=GRAD_CLIP)
    learners, hand = {}, {}
    for name, dtype in DTYPES.items():
        model = build_model(path, dtype=dtype)
        replay = ModelReplay(model) if name == "float32" else None
        learners[name] = (model, replay, Learner(model, settings))  # casts a bf16 model's norms to bf16 too
        plain = build_model(path, dtype=dtype).to(dtype)  # identical weights and dtypes: the same forward
        hand[name] = (plain, torch.optim.AdamW(plain.parameters(), lr=LEARNING_RATE, weight_decay=0.0))
    model, replay, _ = learners["float32"]
    gen = torch.Generator().manual_seed(0)
    batch = Batch.from_sequences(torch.randint(5, 200, (batch_size, seq), generator=gen).tolist())
    tokens = batch.tokens.numel()

    def loss_of(net: torch.nn.Module) -> torch.Tensor:
        return -score(net, batch).logprobs.mean()  # the global token mean at one data-parallel rank

    def old_forward(record: bool) -> list[torch.Tensor]:
        with torch.no_grad():
            if not record:
                score(model, batch)
                return []
            with replay.recording() as recorded:
                score(model, batch)
            return recorded

    def learner_step(dtype: str, plan: Callable[[], RouterIndices] | None, timer: Timer) -> float:
        """One train step; ``plan`` places the micro-batch's routing (inside the timed step)."""
        net, replayer, learner = learners[dtype]
        timer.part(learner.zero_grad)
        if plan is None:
            loss_of(net).backward()
        else:
            with replayer.replaying(plan()):
                loss_of(net).backward()
        result = timer.part(learner.step)
        assert result.updated
        return result.grad_norm

    def hand_step(dtype: str, timer: Timer) -> float:
        net, optimizer = hand[dtype]
        timer.part(lambda: optimizer.zero_grad(set_to_none=True))
        loss_of(net).backward()

        def update() -> float:
            norm = float(torch.nn.utils.clip_grad_norm_(net.parameters(), GRAD_CLIP))
            optimizer.step()
            return norm
        return timer.part(update)

    # Equal weights, equal batch: the two recipes see the same gradient (float32), so the timings
    # below compare the optimisation, not different work.
    norms = {"megatron-core learner": learner_step("float32", None, Timer()), "hand-written loop": hand_step("float32", Timer())}
    check = f"{norms['megatron-core learner']:.6g} (learner) vs {norms['hand-written loop']:.6g} (hand-written)"
    require(abs(norms["megatron-core learner"] / norms["hand-written loop"] - 1) <= 1e-4,
            f"float32 gradient norms differ on equal weights: {check}")

    recorded = old_forward(True)
    # Rollout routing as an inference engine returns it: the trainer's own routing with ~10% of the
    # decisions different (what the R3 paper measured between SGLang and Megatron).
    rollout = []
    for own in recorded:
        other = torch.rand(tokens, shape["experts"], generator=gen).argsort(1)[:, : shape["top_k"]]
        flip = torch.rand(tokens, generator=gen) < 0.1
        rollout.append(torch.where(flip[:, None], other, own))
    # Per sample [S, L, K] uint8 rows, as the collector delivers them (row s * B + b of layer l).
    rows = [torch.stack([r.view(seq, batch_size, -1)[:, b] for r in rollout], 1).to(torch.uint8).contiguous()
            for b in range(batch_size)]
    keys = [f"s{b}" for b in range(batch_size)]
    store = RecordedRouting(shape["experts"])
    store.add(keys, recorded, batch.lengths.tolist())

    def r2_plan() -> RouterIndices:
        return store.indices_for(keys, seq)

    def r3_plan() -> RouterIndices:
        return rollout_to_router_indices(rows, [0] * batch_size, seq)

    def replayed_forward(plan: RouterIndices, name: str):
        """The report of one replayed forward (no update): every token of every layer replayed."""
        with torch.no_grad(), replay.replaying(plan):
            score(model, batch)
        result = replay.report()
        require(result.replayed == [tokens] * replay.num_layers,
                f"{name}: replayed tokens per layer {result.replayed}, expected {tokens} on each")
        return result

    r2 = replayed_forward(r2_plan(), "R2")
    require(r2.agreement == [1.0] * replay.num_layers, "R2: replaying the routing just recorded must choose what"
            f" the model chose; agreement per layer {r2.agreement}")
    r3 = replayed_forward(r3_plan(), "R3")
    require(r3.tokens_differing > 0,
            "R3: the rollout routing equals the model's own: the R3 phase would replay nothing new")
    replay_check = (f"R2 agreement {min(r2.agreement):.3f} (every layer, {tokens} tokens each); R3 agreement"
                    f" {min(r3.agreement):.3f} to {max(r3.agreement):.3f} per layer, {r3.tokens_differing} of {tokens}"
                    " tokens routed differently from the model's own in some layer")

    host_bytes = {}
    for name, place in (("before", lambda: int64_host_placement(rows, seq)), ("now", r3_plan)):
        with HostAllocations() as counted:
            place()
        host_bytes[name] = counted.bytes
    require(torch.int64 not in host_bytes["now"], f"the placement built int64 host tensors: {host_bytes['now']}")
    compact = r3_plan()
    require(all(torch.equal(a.long(), b) for a, b in zip(compact.indices, int64_host_placement(rows, seq)))
            and compact.ids.dtype == torch.uint8, "the compact placement differs from the int64 one")

    runs = {"old forward": lambda t: old_forward(False), "old forward + R2 record": lambda t: old_forward(True),
            "step, no replay": lambda t: learner_step("float32", None, t),
            "step, R2 replay": lambda t: learner_step("float32", r2_plan, t),
            "step, R3 replay": lambda t: learner_step("float32", r3_plan, t),
            "placement, int64 host (before)": lambda t: int64_host_placement(rows, seq),
            "placement, compact (now)": lambda t: r3_plan(),
            "hand-written, float32": lambda t: hand_step("float32", t),
            "learner, bfloat16": lambda t: learner_step("bfloat16", None, t),
            "hand-written, bfloat16": lambda t: hand_step("bfloat16", t)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    optimizer_times: dict[str, list[float]] = {name: [] for name in runs}
    order = random.Random(0)
    for rep in range(reps + 1):
        names = list(runs)
        order.shuffle(names)  # a fixed order would bias whichever phase follows which
        for name in names:
            timer = Timer()
            start = time.perf_counter()
            runs[name](timer)
            if rep:  # repetition 0 is a warm-up
                times[name].append(time.perf_counter() - start)
                optimizer_times[name].append(timer.optimizer)
    med = {k: statistics.median(v) for k, v in times.items()}
    opt = {k: statistics.median(v) for k, v in optimizer_times.items()}
    # Paired: each repetition's ratio to its own baseline, then the median; load that drifts between
    # repetitions (other processes on a shared VM) cancels within one.
    pairs = {("old forward + R2 record", "old forward"), ("step, R2 replay", "step, no replay"),
             ("step, R3 replay", "step, no replay"), ("step, no replay", "hand-written, float32"),
             ("learner, bfloat16", "hand-written, bfloat16")}
    paired = {pair: statistics.median(a / b for a, b in zip(times[pair[0]], times[pair[1]], strict=True)) for pair in pairs}
    text = report(shape, batch_size, seq, med, opt, paired, check, replay_check, host_bytes, args.smoke, reps)
    print(text)
    if args.out:
        args.out.write_text(text)


def report(shape, batch_size, seq, med, opt, paired, check, replay_check, host_bytes, smoke, reps) -> str:
    def overhead(name, base):
        return f"{100 * (med[name] / med[base] - 1):+.1f}% | {100 * (paired[name, base] - 1):+.1f}%"

    def goal(name):
        return "met" if paired[name, "step, no replay"] - 1 <= 0.03 else "MISSED"

    lines = [f"# Routing replay on the megatron-core learner ({'smoke' if smoke else 'full'} run)", "",
             f"- machine: {describe()}",
             f"- model: Qwen3-MoE architecture, {shape['layers']} layers, hidden {shape['hidden']}, {shape['experts']} experts,"
             f" top-{shape['top_k']}, megatron-core local spec; batch {batch_size} x {seq} tokens",
             f"- train step: `Learner.zero_grad()`, forward + backward, `Learner.step()` (megatron-core DDP,"
             f" fp32 grad buffer, Adam, clip {GRAD_CLIP}, lr {LEARNING_RATE:g})",
             f"- {reps} repetitions after a warm-up, all phases in a shuffled order each repetition; seconds are"
             " medians, overheads both the ratio of medians and the paired median (each repetition's ratio to its"
             " own baseline, then the median: drift in the machine's load between repetitions cancels)", "",
             "## Replay overhead (float32)", "",
             "| phase | seconds | overhead (medians) | overhead (paired) |", "|---|---|---|---|",
             f"| old forward | {med['old forward']:.3f} | | |",
             f"| old forward + R2 record | {med['old forward + R2 record']:.3f} | {overhead('old forward + R2 record', 'old forward')} |",
             f"| train step, no replay | {med['step, no replay']:.3f} | | |",
             f"| train step, R2 replay | {med['step, R2 replay']:.3f} | {overhead('step, R2 replay', 'step, no replay')} |",
             f"| train step, R3 replay | {med['step, R3 replay']:.3f} | {overhead('step, R3 replay', 'step, no replay')} |",
             "", f"Goal: <= 3% overhead for replay (verification included), paired: R2 {goal('step, R2 replay')}, "
             f"R3 {goal('step, R3 replay')}.", "",
             f"Replay check before timing (one replayed forward each): {replay_check}.", "",
             "## Host bytes per replayed micro-batch (R3 placement)", "",
             "| placement | host bytes built | of which int64 | seconds |", "|---|---|---|---|"]
    for name, phase in (("before", "placement, int64 host (before)"), ("now", "placement, compact (now)")):
        built = host_bytes[name]
        lines.append(f"| {phase.split(', ', 1)[1]} | {sum(built.values()):,} | {built.get(torch.int64, 0):,} |"
                     f" {med[phase]:.5f} |")
    lines += ["", f"Received rows: {batch_size} x [{seq}, {shape['layers']}, {shape['top_k']}] uint8 ="
              f" {batch_size * seq * shape['layers'] * shape['top_k']:,} bytes. Now the placement builds the"
              " compact ids and a bool mask where the model lives (here the CPU: on a GPU those bytes are device"
              " memory and the host only stages the received rows in one pinned buffer); each router widens its"
              " own layer to int64 on the device during the forward.", "",
             "## megatron-core learner vs the hand-written loop (same batch, no replay)", "",
             "| dtype | hand-written step s | learner step s | learner / hand-written (medians) | (paired) |"
             " hand-written optimizer part s | learner optimizer part s |", "|---|---|---|---|---|---|---|"]
    for dtype, learner in (("float32", "step, no replay"), ("bfloat16", "learner, bfloat16")):
        hand = f"hand-written, {dtype}"
        lines.append(f"| {dtype} | {med[hand]:.3f} | {med[learner]:.3f} | {med[learner] / med[hand]:.3f} | "
                     f"{paired[learner, hand]:.3f} | {opt[hand]:.4f} | {opt[learner]:.4f} |")
    lines += ["", "Hand-written: `torch.optim.AdamW` on the model's parameters in the train dtype (bfloat16 moments"
              " and weights under bfloat16), `clip_grad_norm_`. Learner: fp32 grad buffer; under bfloat16 also fp32"
              " main params and moments, copied back to the bfloat16 weights each step. Optimizer part: zero_grad +"
              " clip + update (the rest of the step is forward + backward). The float32 learner step is the"
              " \"train step, no replay\" phase above.",
              f"Gradient norm on equal weights before timing (float32): {check}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
