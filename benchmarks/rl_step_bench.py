"""Wall time of an RL step by phase, for routing replay none / R2 / R3, side by side in one run.

Three jobs of the CPU default configuration (no SFT warm start) run at once on one local Ray, each
with its own SGLang engine and Megatron trainer rank (megatron-core DDP + optimizer: the
``Learner``); every repetition steps them in a shuffled order. Reported per mode: median seconds
of rollout, routing transfer (the trainer's wait for the routing of the batch, after the rollout),
old-logprob, update and weight sync. The cost of R3 is its routing transfer plus the replay's
extra old-logprob + update time over ``none``; goal: <= 3% of the step.

The R3 rollout (SGLang recording each request's routing and sending it to the trainer) is compared
with ``none``'s paired: each repetition's ratio to the ``none`` step of the same repetition, then
the median and the spread (min .. max) over repetitions; goal: at most +3%. ``R2``'s engine records
nothing (``paired_diagnostics`` is off here), so R2 / none is the same comparison between two
engines doing identical work: its spread is the noise floor. Also per step: the CPU seconds of each
job's SGLang processes (server and children: the scheduler, where the recording and its sender
thread run). ``--profile-capture`` makes the recording time its own work (the per-layer hook, the
per-forward scatter, the scheduler thread's per-request part and the delivery thread's; it writes
its totals to a file after every request, which costs time itself: use it to attribute, not to time
the goal). After the repetitions each
job's trainer rank reports its peak RSS (the Ray worker process: imports included;
``benchmarks/learner_bench.py`` measures it net of imports at the shape ``memory_estimate`` plans
for).

Every timed step must report every phase (a finite number of seconds, the step's above 0) and no
missing routing; otherwise the run stops naming the mode, the step and what was missing.

    python benchmarks/rl_step_bench.py [--reps 8] [--out benchmarks/results/rl-step-cpu.md]
    python benchmarks/rl_step_bench.py --smoke
    python benchmarks/rl_step_bench.py --reps 8 --profile-capture
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import statistics
import tempfile
from pathlib import Path

import psutil

from checks import require, require_keys, require_positive
from machine import describe
from routing_replay import config
from routing_replay.orchestration import driver
from routing_replay.sglang.recording import PROFILE_ENV

PHASES = ("time/rollout", "time/routing_take", "time/old_logprob", "time/update", "time/weight_sync", "time/step")
MODES = ("none", "R2", "R3")


def job_config(path: Path, mode: str, run_dir: Path, smoke: bool) -> config.JobConfig:
    """The job of ``path`` in replay ``mode``, as ``--set`` overrides would make it."""
    overrides = [f"train.replay={mode}", "train.paired_diagnostics=false",  # what replay costs, not the diagnostics
                 "task.sft_warmup_steps=0", f"run.output_dir={run_dir / mode}", "run.checkpoint_every=0"]
    if smoke:
        overrides += ["rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=2"]
    return config.load(path, overrides=overrides)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path(__file__).parents[1] / "configs/tiny-moe-cpu.yaml",
                        help="the job configuration to time (default: the CPU default)")
    parser.add_argument("--smoke", action="store_true", help="tiny batches, one timed repetition (CI)")
    parser.add_argument("--reps", type=int, default=8, help="timed repetitions per mode (median reported)")
    parser.add_argument("--out", type=Path, help="also write the markdown report to this file")
    parser.add_argument("--profile-capture", action="store_true",
                        help="the R3 engine times its recording (hook, scatter, gather + delivery) and reports it")
    args = parser.parse_args()
    import ray
    from transformers import AutoConfig, AutoTokenizer  # noqa: F401 - before the threads: lazy imports race

    base = config.load(args.config)
    reps = 1 if args.smoke else args.reps
    run_dir = Path(tempfile.mkdtemp(prefix="rl-step-bench-"))
    profile_path = run_dir / "capture-profile.json"
    if args.profile_capture:  # Ray's workers and the SGLang servers they start inherit the environment
        os.environ[PROFILE_ENV] = str(profile_path)
    ray.init(num_cpus=2, object_store_memory=256 << 20, include_dashboard=False, _node_ip_address="127.0.0.1",
             logging_level="ERROR")
    # Full runs overlap the three start-ups; the smoke run (CI) starts them one by one, since three
    # SGLang servers starting at once on 2 busy cores can miss SGLang's own start-up timeouts.
    with concurrent.futures.ThreadPoolExecutor(1 if args.smoke else len(MODES)) as pool:
        started = {mode: pool.submit(driver.Job, job_config(args.config, mode, run_dir, args.smoke),
                                     driver.Options(progress=False)) for mode in MODES}
    jobs = {mode: future.result() for mode, future in started.items()}
    times: dict[str, dict[str, list[float]]] = {m: {p: [] for p in PHASES} for m in MODES}
    engine_cpu: dict[str, list[float]] = {m: [] for m in MODES}
    r3_rollouts = 0.0  # every R3 rollout, warm-up included: what the capture profile covers
    peaks: dict[str, list[int]] = {}
    try:
        order = random.Random(0)
        for rep in range(reps + 1):  # the first repetition warms up and is not counted
            for mode in order.sample(MODES, len(MODES)):
                cpu_before = engine_cpu_seconds(ray, jobs[mode])
                metrics = jobs[mode].step(rep + 1)
                cpu = engine_cpu_seconds(ray, jobs[mode]) - cpu_before
                check_step(metrics, mode, rep + 1)
                r3_rollouts += metrics["time/rollout"] if mode == "R3" else 0.0
                if rep:
                    for phase in PHASES:
                        times[mode][phase].append(metrics[phase])
                    engine_cpu[mode].append(cpu)
        for mode, job in jobs.items():  # each trainer rank's own process (Linux reports KiB)
            peaks[mode] = ray.get([rank.__ray_call__.remote(
                lambda _rank: __import__("resource").getrusage(__import__("resource").RUSAGE_SELF).ru_maxrss * 1024)
                for rank in job.trainers])
            require(peaks[mode], f"mode {mode}: no trainer rank reported its peak RSS")
            for rank, peak in enumerate(peaks[mode]):
                require_positive(f"mode {mode}: trainer rank {rank} peak RSS", peak)
    finally:
        for job in jobs.values():
            job.close()
        ray.shutdown()
    profile = None
    if args.profile_capture:
        require(profile_path.exists(), f"--profile-capture: the R3 engine wrote no profile to {profile_path}")
        profile = {**json.loads(profile_path.read_text()), "rollout_s": r3_rollouts}
    report = render(times, engine_cpu, profile, peaks, base, args)
    print(report)
    if args.out:
        args.out.write_text(report)


def engine_cpu_seconds(ray, job: driver.Job) -> float:
    """User + system CPU seconds so far of the job's SGLang servers and their child processes."""
    total = 0.0
    for pid in ray.get([engine.server_pid.remote() for engine in job.engines.engines]):
        server = psutil.Process(pid)
        for process in (server, *server.children(recursive=True)):
            try:
                cpu = process.cpu_times()
            except psutil.NoSuchProcess:  # a short-lived helper that exited in between
                continue
            total += cpu.user + cpu.system
    return total


def paired(times, mode: str, phase: str = "time/rollout") -> list[float]:
    """Per repetition: ``mode``'s ``phase`` over ``none``'s in the same repetition, minus 1."""
    return [a / b - 1 for a, b in zip(times[mode][phase], times["none"][phase], strict=True)]


def spread(values: list[float]) -> str:
    return f"median {statistics.median(values):+.1%} (min {min(values):+.1%} .. max {max(values):+.1%}, n={len(values)})"


def check_step(metrics: dict[str, float], mode: str, step: int) -> None:
    """The step's metrics carry every phase timed here, and the rollout's routing all arrived."""
    what = f"mode {mode}, step {step}"
    require_keys(f"{what}: phase times", metrics, PHASES)
    for phase in ("time/rollout", "time/step"):  # the report divides by these
        require_positive(f"{what}: {phase}", metrics[phase])
    require(metrics.get("routing/missing") == 0, f"{what}: routing/missing is {metrics.get('routing/missing')!r},"
                                                 " expected 0 (every rollout's routing delivered)")


def render(times, engine_cpu, profile, peaks, base: config.JobConfig, args) -> str:
    median = {m: {p: statistics.median(v) for p, v in times[m].items()} for m in MODES}
    compute = {m: median[m]["time/old_logprob"] + median[m]["time/update"] for m in MODES}
    r = base.rollout
    lines = [
        "# RL step by phase: routing replay none / R2 / R3",
        "",
        f"Machine: {describe()}",
        f"Config: {args.config.name} ({r.prompts_per_step if not args.smoke else 2} prompts x "
        f"{r.group_size if not args.smoke else 2} responses, {base.train.mini_batches} mini-batches), "
        f"{'smoke' if args.smoke else f'{args.reps} repetitions'}, modes in shuffled order each repetition.",
        f"Trainer: megatron-core DistributedDataParallel + `get_megatron_optimizer` (Adam), train dtype "
        f"{base.model.train_dtype}.",
        "",
        "| mode | rollout s | routing transfer s | old-logprob s | update s | weight sync s | step s | SGLang CPU s per step |"
        " trainer rank peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in MODES:
        row = [f"{median[m][p]:.4f}" for p in PHASES] + [f"{statistics.median(engine_cpu[m]):.3f}",
                                                          " / ".join(f"{b / 2**20:.0f}" for b in peaks.get(m, []))]
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    lines.append("")
    for m in ("R2", "R3"):
        replay = compute[m] - compute["none"]
        transfer = median[m]["time/routing_take"]
        share = (replay + transfer) / median[m]["time/step"]
        verdict = "met" if share <= 0.03 else "MISSED"
        lines.append(f"- {m}: replay {replay * 1e3:+.1f} ms (old-logprob + update vs none), routing transfer "
                     f"{transfer * 1e3:.1f} ms -> {share:.1%} of the step (goal <= 3%: {verdict})")
    r3_rollout = paired(times, "R3")
    verdict = "met" if statistics.median(r3_rollout) <= 0.03 else "MISSED"
    lines.append(f"- R3 rollout (SGLang recording and sending routing) vs none, paired per repetition: "
                 f"{spread(r3_rollout)} (goal: at most +3%: {verdict})")
    lines.append(f"- R2 rollout vs none (the same engine work: the noise floor), paired: {spread(paired(times, 'R2'))}")
    cpu_extra = [a - b for a, b in zip(engine_cpu["R3"], engine_cpu["none"], strict=True)]
    lines.append(f"- SGLang CPU per step, R3 - none, paired: median {statistics.median(cpu_extra) * 1e3:+.1f} ms "
                 f"(min {min(cpu_extra) * 1e3:+.1f} .. max {max(cpu_extra) * 1e3:+.1f})")
    if profile:
        ours = profile["capture_s"] + profile["scatter_s"] + profile["finish_s"] + profile["delivery_s"]
        per_request = 1e3 / max(profile["requests"], 1)
        lines.append(f"- R3 engine's recording, timed inside it over {profile['forwards']} forwards and "
                     f"{profile['requests']} requests (warm-up included): per-layer hook {profile['capture_s'] * 1e3:.1f} ms,"
                     f" per-forward scatter {profile['scatter_s'] * 1e3:.1f} ms, scheduler thread per finished request "
                     f"{profile['finish_s'] * per_request:.3f} ms (gather start + enqueue), delivery thread "
                     f"{profile['delivery_s'] * per_request:.3f} ms a request = "
                     f"{ours / profile['rollout_s']:.1%} of those rollouts' {profile['rollout_s']:.2f} s")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
