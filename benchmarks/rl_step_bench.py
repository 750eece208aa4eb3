"""Wall time of an RL step by phase, for routing replay none / R2 / R3, side by side in one run.

Three jobs of the CPU default configuration (no SFT warm start) run at once on one local Ray, each
with its own SGLang engine and Megatron trainer rank (megatron-core DDP + optimizer: the
``Learner``); every repetition steps them in a shuffled order. Reported per mode: median seconds
of rollout, routing transfer (the trainer's wait for the routing of the batch, after the rollout),
old-logprob, update and weight sync. The cost of R3 is its routing transfer plus the replay's
extra old-logprob + update time over ``none``; goal: <= 3% of the step. After the repetitions each
job's trainer rank reports its peak RSS (the Ray worker process: imports included;
``benchmarks/learner_bench.py`` measures it net of imports at the shape ``memory_estimate`` plans
for).

Every timed step must report every phase (a finite number of seconds, the step's above 0) and no
missing routing; otherwise the run stops naming the mode, the step and what was missing.

    python benchmarks/rl_step_bench.py [--reps 8] [--out benchmarks/results/rl-step-cpu.md]
    python benchmarks/rl_step_bench.py --smoke
"""

from __future__ import annotations

import argparse
import concurrent.futures
import random
import statistics
import tempfile
from pathlib import Path

from checks import require, require_keys, require_positive
from machine import describe
from routing_replay import config
from routing_replay.orchestration import driver

PHASES = ("time/rollout", "time/routing_take", "time/old_logprob", "time/update", "time/weight_sync", "time/step")
MODES = ("none", "R2", "R3")


def job_config(base: config.JobConfig, mode: str, run_dir: Path, smoke: bool) -> config.JobConfig:
    raw = base.model_dump(mode="json")
    raw["train"]["replay"] = mode
    raw["train"]["paired_diagnostics"] = False  # what replay costs, not the diagnostics (an extra forward)
    raw["task"]["sft_warmup_steps"] = 0
    raw["run"].update(output_dir=str(run_dir / mode), checkpoint_every=0)
    if smoke:
        raw["rollout"].update(prompts_per_step=2, group_size=2, max_new_tokens=2)
    return config.JobConfig.model_validate(raw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path(__file__).parents[1] / "configs/tiny-moe-cpu.yaml",
                        help="the job configuration to time (default: the CPU default)")
    parser.add_argument("--smoke", action="store_true", help="tiny batches, one timed repetition (CI)")
    parser.add_argument("--reps", type=int, default=8, help="timed repetitions per mode (median reported)")
    parser.add_argument("--out", type=Path, help="also write the markdown report to this file")
    args = parser.parse_args()
    import ray
    from transformers import AutoConfig, AutoTokenizer  # noqa: F401 - before the threads: lazy imports race

    base = config.load(args.config)
    reps = 1 if args.smoke else args.reps
    ray.init(num_cpus=2, object_store_memory=256 << 20, include_dashboard=False, _node_ip_address="127.0.0.1",
             logging_level="ERROR")
    run_dir = Path(tempfile.mkdtemp(prefix="rl-step-bench-"))
    # Full runs overlap the three start-ups; the smoke run (CI) starts them one by one, since three
    # SGLang servers starting at once on 2 busy cores can miss SGLang's own start-up timeouts.
    with concurrent.futures.ThreadPoolExecutor(1 if args.smoke else len(MODES)) as pool:
        started = {mode: pool.submit(driver.Job, job_config(base, mode, run_dir, args.smoke),
                                     driver.Options(progress=False)) for mode in MODES}
    jobs = {mode: future.result() for mode, future in started.items()}
    times: dict[str, dict[str, list[float]]] = {m: {p: [] for p in PHASES} for m in MODES}
    peaks: dict[str, list[int]] = {}
    try:
        order = random.Random(0)
        for rep in range(reps + 1):  # the first repetition warms up and is not counted
            for mode in order.sample(MODES, len(MODES)):
                metrics = jobs[mode].step(rep + 1)
                check_step(metrics, mode, rep + 1)
                if rep:
                    for phase in PHASES:
                        times[mode][phase].append(metrics[phase])
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
    report = render(times, peaks, base, args)
    print(report)
    if args.out:
        args.out.write_text(report)


def check_step(metrics: dict[str, float], mode: str, step: int) -> None:
    """The step's metrics carry every phase timed here, and the rollout's routing all arrived."""
    what = f"mode {mode}, step {step}"
    require_keys(f"{what}: phase times", metrics, PHASES)
    for phase in ("time/rollout", "time/step"):  # the report divides by these
        require_positive(f"{what}: {phase}", metrics[phase])
    require(metrics.get("routing/missing") == 0, f"{what}: routing/missing is {metrics.get('routing/missing')!r},"
                                                 " expected 0 (every rollout's routing delivered)")


def render(times, peaks, base: config.JobConfig, args) -> str:
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
        "| mode | rollout s | routing transfer s | old-logprob s | update s | weight sync s | step s | trainer rank peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in MODES:
        row = [f"{median[m][p]:.4f}" for p in PHASES] + [" / ".join(f"{b / 2**20:.0f}" for b in peaks.get(m, []))]
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    lines.append("")
    for m in ("R2", "R3"):
        replay = compute[m] - compute["none"]
        transfer = median[m]["time/routing_take"]
        share = (replay + transfer) / median[m]["time/step"]
        verdict = "met" if share <= 0.03 else "MISSED"
        lines.append(f"- {m}: replay {replay * 1e3:+.1f} ms (old-logprob + update vs none), routing transfer "
                     f"{transfer * 1e3:.1f} ms -> {share:.1%} of the step (goal <= 3%: {verdict})")
    recording = median["R3"]["time/rollout"] / median["none"]["time/rollout"] - 1
    lines.append(f"- R3 rollout (SGLang recording and sending routing) vs none: {recording:+.1%} of rollout time "
                 "(not part of the 3% goal above; recorded so it is not hidden)")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
