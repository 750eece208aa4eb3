"""Peak memory of one trainer rank on the megatron-core learner: measured for the CPU default
configuration next to ``config.memory_estimate``, with the estimate for Qwen3-30B-A3B beside it.

Each measurement runs in a fresh process, so its RSS is only the trainer rank's. That process
imports what a trainer rank imports (torch, transformers, megatron-core, Ray, the trainer) and
records its peak RSS: the import baseline. Then it runs the trainer rank's own code in-process
(``TrainerRank.setup`` on the config's tiny checkpoint: the model, ``ModelReplay`` and the
``Learner`` with the job's optimizer settings; then ``old_logprobs`` and ``update`` for a few
steps) on a rollout batch of the config's size (``prompts_per_step`` x ``group_size`` samples,
``mini_batches`` x micro-batches of ``micro_batch_size``) at the estimate's sequence length,
``max_prompt_tokens`` + ``max_new_tokens`` tokens per sample: the shape ``memory_estimate``
plans for. Replay R2 without the paired diagnostics (R3 and the diagnostics need an engine's
routing; the update replays either way). Reported: the import baseline, peak RSS, their
difference, and the trainer state counted tensor by tensor (parameters, DDP grad buffers, fp32
main params, Adam moments) next to the estimate's parts; in the train dtype of the config and
in bfloat16 (where the fp32 main params appear). The full run also splits one micro-batch's peak
(fresh processes again, the bare model): its forward with the graph held (what the estimate's
activations and logits count) and its forward + backward.

Before the report: every measurement and every estimate it compares must be present and positive
(peak RSS above the import baseline, the state allocated, a finite gradient norm per step, the
estimate's total and parts), or the run stops naming the missing or non-positive figure.

    python benchmarks/learner_bench.py [--steps 3] [--out benchmarks/results/learner-cpu.md]
    python benchmarks/learner_bench.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/tiny-moe-cpu.yaml"
LARGE = ROOT / "configs/qwen3-30b-a3b-r3.yaml"
MIB, GIB = 2**20, 2**30
STATE_PARTS = ("params", "grads", "main_params", "adam")
ESTIMATE_PARTS = ("trainer_total_gib", *(f"{part}_gib" for part in (*STATE_PARTS, "activations", "logits")))


def peak_rss() -> int:
    """Bytes: the peak resident set of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(cfg_path: str, model_path: str, dtype: str, steps: int, mini_batches: int) -> dict:
    """One trainer rank in this process; what it measured. ``mini_batches`` of the job's (all of them,
    or fewer for a shorter run: the peak is one micro-batch's either way)."""
    import random
    import warnings
    from dataclasses import replace

    import torch  # noqa: F401 - what setup imports, in the baseline
    from transformers import AutoConfig, AutoTokenizer  # noqa: F401 - what setup imports, in the baseline

    import routing_replay.megatron.hf_checkpoint  # noqa: F401
    import routing_replay.megatron.learner  # noqa: F401
    import routing_replay.megatron.replay  # noqa: F401
    import routing_replay.wire  # noqa: F401
    from routing_replay import config
    from routing_replay.orchestration.driver import trainer_spec
    from routing_replay.orchestration.trainer import TrainerRank
    from routing_replay.ports import free_port
    from routing_replay.rl.rollout_batch import Sample

    warnings.filterwarnings("ignore")
    cfg = config.load(cfg_path)
    r, t = cfg.rollout, cfg.train
    rng = random.Random(0)
    vocab = AutoConfig.from_pretrained(model_path).vocab_size
    # The estimate's shape: every sample max_prompt_tokens + max_new_tokens long.
    samples = [Sample(key=f"s{i}", prompt_ids=tuple(rng.randrange(5, vocab) for _ in range(r.max_prompt_tokens)),
                      response_ids=tuple(rng.randrange(5, vocab) for _ in range(r.max_new_tokens)),
                      rollout_logprobs=tuple(-6.0 for _ in range(r.max_new_tokens)), advantage=rng.choice((-1.0, 1.0)))
               for i in range(r.prompts_per_step * r.group_size * mini_batches // t.mini_batches)]
    baseline, baseline_now = peak_rss(), current_rss()
    spec = replace(trainer_spec(cfg, rank=0, world_size=1, master_port=free_port(), model_path=model_path,
                                routing_bind="tcp://127.0.0.1:*"),
                   replay="R2", mini_batches=mini_batches, train_dtype=dtype, paired_diagnostics=False)
    rank = TrainerRank()
    rank.setup(spec, "127.0.0.1")
    after_setup = current_rss()
    norms, after_steps = [], []
    for _ in range(steps):
        rank.old_logprobs(samples, "init")  # R2 without paired diagnostics reads no rollout routing
        stats = rank.update(samples)
        norms.append(stats.maxima.get("grad_norm/mb0"))
        after_steps.append(current_rss())
    state = state_bytes(rank.learner)
    peak = peak_rss()
    rank.close()
    return {"baseline": baseline, "baseline_now": baseline_now, "after_setup": after_setup, "peak": peak,
            "after_steps": after_steps, "state": state, "grad_norms": norms}


def micro_child(cfg_path: str, model_path: str, dtype: str, backward: bool) -> dict:
    """One micro-batch of the estimate's shape through the bare model: the peak with the forward's
    graph held (what ``memory_estimate`` counts as activations and logits), or through backward."""
    import warnings

    import torch

    from routing_replay import config
    from routing_replay.megatron.hf_checkpoint import build_model
    from routing_replay.megatron.logprobs import Batch, score
    from routing_replay.megatron.parallel import ParallelConfig, initialize

    warnings.filterwarnings("ignore")
    cfg = config.load(cfg_path)
    initialize(ParallelConfig())
    model = build_model(model_path, dtype=getattr(torch, dtype)).to(getattr(torch, dtype))
    seq = cfg.rollout.max_prompt_tokens + cfg.rollout.max_new_tokens
    tokens = torch.randint(5, model.vocab_size, (cfg.train.micro_batch_size, seq), generator=torch.Generator().manual_seed(0))
    batch = Batch.from_sequences(tokens.tolist())
    baseline = peak_rss()
    loss = -score(model, batch).logprobs.mean()
    if backward:
        loss.backward()
    return {"baseline": baseline, "peak": peak_rss()}


def state_bytes(learner) -> dict[str, int]:
    """The trainer state as allocated, tensor by tensor."""
    params = sum(p.numel() * p.element_size() for p in learner.model.parameters())
    grads = sum(b.grad_data.numel() * b.grad_data.element_size()
                for b in learner.ddp.buffers + learner.ddp.expert_parallel_buffers)
    inner = getattr(learner.optimizer, "chained_optimizers", [learner.optimizer])
    model_params = {id(p) for p in learner.model.parameters()}
    main = moments = 0
    for optimizer in inner:
        for group in optimizer.optimizer.param_groups:
            for param in group["params"]:
                if id(param) not in model_params:  # an fp32 main copy (bf16 training)
                    main += param.numel() * param.element_size()
                state = optimizer.optimizer.state.get(param, {})
                moments += sum(state[k].numel() * state[k].element_size() for k in ("exp_avg", "exp_avg_sq") if k in state)
    return {"params": params, "grads": grads, "main_params": main, "adam": moments}


def measure(*args) -> dict:
    """What a fresh process measured: ``child`` (``--child CONFIG MODEL DTYPE STEPS``) or
    ``micro_child`` (``--micro CONFIG MODEL DTYPE BACKWARD``)."""
    out = subprocess.run([sys.executable, __file__, *map(str, args)], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise SystemExit(f"the measuring process failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def estimate(cfg_path: Path, dtype: str | None = None, vocab: int | None = None) -> dict[str, float]:
    """``memory_estimate`` of the config (in ``dtype``; at ``vocab`` instead of its architecture's)."""
    from routing_replay import config

    cfg = config.load(cfg_path)
    if dtype is not None and dtype != cfg.model.train_dtype:
        raw = cfg.model_dump(mode="json")
        raw["model"]["train_dtype"] = dtype
        cfg = config.JobConfig.model_validate(raw)
    arch = config.architecture_of(cfg)
    if vocab is not None:
        arch = arch.model_copy(update={"vocab_size": vocab})
    return config.memory_estimate(cfg, arch)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        cfg_path, model_path, dtype, steps, mini_batches = sys.argv[2:7]
        print(json.dumps(child(cfg_path, model_path, dtype, int(steps), int(mini_batches))))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--micro":
        cfg_path, model_path, dtype, backward = sys.argv[2:6]
        print(json.dumps(micro_child(cfg_path, model_path, dtype, backward == "True")))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="one step of one mini-batch, the config's train dtype only (CI)")
    parser.add_argument("--steps", type=int, default=3, help="RL steps (old_logprobs + update) per measurement")
    parser.add_argument("--out", type=Path, help="also write the markdown report to this file")
    args = parser.parse_args()
    from machine import describe
    from routing_replay import config
    from routing_replay.tiny_models import build_from_config

    cfg = config.load(TINY)
    work = Path(tempfile.mkdtemp(prefix="learner-bench-"))
    model_path = work / "model"
    dtypes = [cfg.model.train_dtype] if args.smoke else [cfg.model.train_dtype, "bfloat16"]
    steps = 1 if args.smoke else args.steps
    mini_batches = 1 if args.smoke else cfg.train.mini_batches  # smoke: one mini-batch of the job's four
    try:
        build_from_config(cfg.model.tiny, model_path, seed=cfg.run.seed)  # as the driver does, outside the rank
        measured = {dtype: measure("--child", TINY, model_path, dtype, steps, mini_batches) for dtype in dtypes}
        micro = {} if args.smoke else {(dtype, backward): measure("--micro", TINY, model_path, dtype, backward)
                                       for dtype in dtypes for backward in (False, True)}
        vocab = json.loads((model_path / "config.json").read_text())["vocab_size"]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    estimates = {dtype: estimate(TINY, dtype) for dtype in dtypes}
    exact = {dtype: estimate(TINY, dtype, vocab) for dtype in dtypes}
    large = estimate(LARGE)
    check_measured(measured, micro, steps)
    check_estimates({**{f"tiny {d}": estimates[d] for d in dtypes},
                     **{f"tiny {d} at vocab {vocab}": exact[d] for d in dtypes}, "Qwen3-30B-A3B": large})
    text = report(cfg, measured, micro, estimates, exact, vocab, large, steps, mini_batches, args.smoke, describe())
    print(text)
    if args.out:
        args.out.write_text(text)


def check_measured(measured: dict, micro: dict, steps: int) -> None:
    """What each fresh process measured is there and positive: the report's figures mean something."""
    from checks import require, require_keys, require_positive  # here: the measuring processes import none of it

    for dtype, m in measured.items():
        what = f"measured ({dtype})"
        require_keys(what, m, ("baseline", "baseline_now", "after_setup", "peak"))
        require_positive(f"{what}: import baseline RSS", m["baseline"])
        require_positive(f"{what}: peak RSS - import baseline", m["peak"] - m["baseline"])
        require(len(m["after_steps"]) == steps, f"{what}: RSS after {len(m['after_steps'])} steps, ran {steps}")
        require(len(m["grad_norms"]) == steps, f"{what}: {len(m['grad_norms'])} gradient norms for {steps} steps")
        for step, norm in enumerate(m["grad_norms"]):
            require_positive(f"{what}: gradient norm of step {step}", norm)
        require_keys(f"{what}: trainer state bytes", m["state"], STATE_PARTS)
        for part in ("params", "grads", "adam"):
            require_positive(f"{what}: {part} bytes allocated", m["state"][part])
    for (dtype, backward), m in micro.items():
        require_positive(f"one micro-batch ({dtype}, {'forward + backward' if backward else 'forward'}): peak RSS"
                         " - baseline", m["peak"] - m["baseline"])


def check_estimates(estimates: dict[str, dict[str, float]]) -> None:
    """Every estimate the report divides by or shows is there: the total positive, no part negative."""
    from checks import require_keys, require_positive

    for name, parts in estimates.items():
        require_keys(f"memory_estimate of {name}", parts, ESTIMATE_PARTS)
        require_positive(f"memory_estimate of {name}: trainer_total_gib", parts["trainer_total_gib"])


def report(cfg, measured, micro, estimates, exact, vocab, large, steps, mini_batches, smoke, machine) -> str:
    from routing_replay import config

    r, t, tiny = cfg.rollout, cfg.train, cfg.model.tiny
    seq = r.max_prompt_tokens + r.max_new_tokens
    arch = config.architecture_of(cfg)
    lines = [f"# Trainer rank peak memory on the megatron-core learner ({'smoke' if smoke else 'full'} run)", "",
             f"- machine: {machine}",
             f"- measured: {TINY.name} (tiny {tiny.kind}: {tiny.layers} layers, hidden {tiny.hidden}, {tiny.experts} experts,"
             f" top-{tiny.top_k}), one trainer rank (`TrainerRank` in a fresh process: model, `ModelReplay`,"
             f" `Learner`; replay R2), {steps} RL step(s) of {r.prompts_per_step * r.group_size * mini_batches // t.mini_batches}"
             f" samples of {seq} tokens ({mini_batches} mini-batches, micro-batch {t.micro_batch_size}): the shape"
             " `memory_estimate` plans for",
             "- RSS on CPU: the import baseline (torch, transformers, megatron-core, Ray, the trainer) is taken before"
             " the model is built and subtracted", ""]
    m = measured
    lines += ["| | " + " | ".join(f"tiny, {d}" for d in m) + " | Qwen3-30B-A3B (estimate) |",
              "|---" * (len(m) + 2) + "|"]

    def row(label, values, large_value=""):
        lines.append(f"| {label} | " + " | ".join(values) + f" | {large_value} |")

    def delta(d):
        return (m[d]["peak"] - m[d]["baseline"]) / GIB

    row("RSS after imports (baseline), MiB", [f"{m[d]['baseline'] / MIB:.0f}" for d in m])
    row("peak RSS, MiB", [f"{m[d]['peak'] / MIB:.0f}" for d in m])
    row("**peak RSS - baseline, MiB**", [f"**{delta(d) * 1024:.0f}**" for d in m])
    row("**estimate `trainer_total_gib`, MiB**", [f"**{estimates[d]['trainer_total_gib'] * 1024:.0f}**" for d in m],
        f"**{large['trainer_total_gib']:.2f} GiB**")
    row("(peak - baseline) / estimate", [f"{delta(d) / estimates[d]['trainer_total_gib']:.2f}" for d in m])
    row("RSS after setup (model + learner) - baseline, MiB",
        [f"{(m[d]['after_setup'] - m[d]['baseline_now']) / MIB:.1f}" for d in m])
    row("RSS after each step - baseline, MiB",
        [", ".join(f"{(x - m[d]['baseline_now']) / MIB:.0f}" for x in m[d]["after_steps"]) for d in m])
    for part in ("params", "grads", "main_params", "adam"):
        row(f"{part}: allocated / estimate, MiB", [f"{m[d]['state'][part] / MIB:.3f} / {estimates[d][f'{part}_gib'] * 1024:.3f}"
                                                  for d in m], f"{large[f'{part}_gib']:.2f} GiB")
    for part in ("activations", "logits"):
        row(f"{part}: estimate, MiB", [f"{estimates[d][f'{part}_gib'] * 1024:.1f}" for d in m],
            f"{large[f'{part}_gib']:.2f} GiB")
    if micro:
        row("one micro-batch, forward (graph held): peak - baseline, MiB",
            [f"{(micro[d, False]['peak'] - micro[d, False]['baseline']) / MIB:.0f}" for d in m])
        row("one micro-batch, forward + backward: peak - baseline, MiB",
            [f"{(micro[d, True]['peak'] - micro[d, True]['baseline']) / MIB:.0f}" for d in m])
        row("estimate activations + logits, MiB",
            [f"{(estimates[d]['activations_gib'] + estimates[d]['logits_gib']) * 1024:.0f}" for d in m],
            f"{large['activations_gib'] + large['logits_gib']:.2f} GiB")
    lines.append("")
    worst = max(abs(m[d]["state"][p] / GIB / exact[d][f"{p}_gib"] - 1) for d in m
                for p in ("params", "grads", "main_params", "adam") if exact[d][f"{p}_gib"])
    lines.append(f"- State: the parameters, DDP grad buffer, fp32 main params and Adam moments counted tensor by tensor"
                 f" are within {worst:.1%} of the estimate's parts at the checkpoint's vocabulary ({vocab} tokens;"
                 f" the tiny architecture the estimate reads says {arch.vocab_size}, hence the small gap in the table;"
                 " `parameter_count` also leaves out the norm weights).")
    for d in m:
        ratio = delta(d) / estimates[d]["trainer_total_gib"]
        verdict = "within" if ratio <= 1 / 0.9 else "ABOVE"
        lines.append(f"- {d}: peak RSS over the import baseline is {ratio:.2f} x `trainer_total_gib` ({verdict} the"
                     " 1/0.9 headroom `validate_job` leaves).")
    if micro:
        d = next(iter(m))
        fwd = (micro[d, False]["peak"] - micro[d, False]["baseline"]) / GIB
        both = (micro[d, True]["peak"] - micro[d, True]["baseline"]) / GIB
        act = estimates[d]["activations_gib"] + estimates[d]["logits_gib"]
        lines.append(f"- Where the rest is ({d}): one micro-batch's forward with its graph held peaks at {fwd / act:.2f} x"
                     f" the estimate's activations + logits; its backward adds {(both - fwd) * 1024:.0f} MiB more"
                     f" ({(both - fwd) / act:.2f} x): backward temporaries, which the estimate leaves out.")
    arch_large = config.architecture_of(config.load(LARGE))
    lines.append(f"- Qwen3-30B-A3B: {LARGE.name} ({config.parameter_count(arch_large)[0] / 1e9:.1f} B parameters, its"
                 " parallel layout, bf16, distributed optimizer, full recompute): the estimate per trainer GPU only;"
                 " not measured (no GPU here).")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
