"""The ``routing-replay`` command line. Each subcommand imports only what it needs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _capture_demo(args: argparse.Namespace) -> int:
    from routing_replay.demos import capture_demo

    cfg = capture_demo.DemoConfig(requests=args.requests, new_tokens=args.new_tokens, seed=args.seed)
    return capture_demo.main(cfg, args.json)


def _train(args: argparse.Namespace) -> int:
    from routing_replay import config

    try:
        cfg = config.load(args.config, overrides=getattr(args, "overrides", None) or ())
        if getattr(args, "output_dir", None) is not None:
            cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"output_dir": str(args.output_dir)})})
        if getattr(args, "print_config", False):
            overrides = getattr(args, "overrides", None) or ()
            command = " ".join([str(args.config), *(f"--set {text}" for text in overrides)])
            # escaped: a newline in a path or a value would end the comment
            print(f"# {command.encode('unicode_escape').decode()}: the resolved configuration (extends and --set "
                  "applied, defaults included)")
            print(config.to_yaml(cfg), end="")
            return 0
        arch = config.architecture_of(cfg)
    except config.ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    problems = config.validate_job(cfg, arch)
    total, active = config.parameter_count(arch)
    memory = config.memory_estimate(cfg, arch)
    p = cfg.train.parallel
    print(f"{args.config}: {total / 1e9:.2f}B parameters ({active / 1e9:.2f}B active), replay {cfg.train.replay}, "
          f"{cfg.train.mini_batches} mini-batch(es) per rollout batch")
    print(f"  trainer: TP {p.tensor} x PP {p.pipeline} x CP {p.context} x DP {p.data}, EP {p.expert}; "
          f"{cfg.model.train_dtype}, distributed optimizer {'on' if cfg.train.optimizer.distributed else 'off'}, "
          f"recompute {cfg.train.recompute}")
    parts = ", ".join(f"{part} {memory[f'{part}_gib']:.2f}" for part in config.TRAINER_MEMORY_PARTS)
    print(f"  trainer memory per GPU (estimate, GiB): {parts}")
    limit = (f"of run.gpu_memory_gib={cfg.run.gpu_memory_gib:g} (limit 90%: {0.9 * cfg.run.gpu_memory_gib:.1f})"
             if cfg.run.gpus else "(run.gpus: 0, not checked)")
    print(f"    total {memory['trainer_total_gib']:.2f} GiB {limit}; micro-batch of {cfg.train.micro_batch_size} x "
          f"{cfg.rollout.max_prompt_tokens + cfg.rollout.max_new_tokens} tokens")
    print(f"  rollout: {cfg.rollout.engines} SGLang engine(s) x {cfg.rollout.gpus_per_engine} GPU(s); routing recorder "
          f"~{memory['routing_recorder_gib_per_engine']:.2f} GiB per engine at 1M KV slots")
    for problem in problems:
        print(f"  problem: {problem}", file=sys.stderr)
    if problems:
        return 2
    if args.dry_run:
        print("  dry run: the configuration is valid")
        return 0
    import logging

    from routing_replay.orchestration import driver

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    options = driver.Options(resume=args.resume, fresh=args.fresh, progress=not args.no_progress)
    try:
        run_dir = driver.train(cfg, options)
    except driver.JobError as exc:
        print(f"routing-replay train: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("routing-replay train: interrupted; every engine, trainer and worker was stopped", file=sys.stderr)
        return 130
    print(f"run finished: metrics in {run_dir}/metrics.jsonl (TensorBoard: {run_dir}/tensorboard); "
          f"`routing-replay plot {run_dir}` draws them")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from routing_replay import run_log

    try:
        paths = run_log.plot(args.runs, args.out)
    except run_log.MetricsError as exc:
        print(f"routing-replay plot: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. --out names a file
        print(f"routing-replay plot: cannot write the plots: {exc}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


def _experiment(args: argparse.Namespace) -> int:
    from routing_replay import config
    from routing_replay.orchestration import experiment

    try:
        spec, base = experiment.load(args.config, args.overrides, args.job_overrides)
    except config.ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    import logging

    from routing_replay.orchestration.driver import JobError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        out = experiment.run(spec, base, quick=args.quick, output_dir=args.output_dir, progress=not args.no_progress)
    except JobError as exc:
        print(f"routing-replay experiment: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("routing-replay experiment: interrupted", file=sys.stderr)
        return 130
    print(f"experiment finished: {out}/summary.md, {out}/summary.csv and the comparison plots in {out}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import os

    from routing_replay.sglang import cpu_workarounds

    argv = list(args.sglang_args)
    if "--record-routing" not in argv:
        argv.append("--record-routing")
    if "--device" not in argv:
        argv += cpu_workarounds.server_flags()
    os.environ.update(cpu_workarounds.server_env())
    os.execv(sys.executable, [sys.executable, "-m", "sglang.launch_server", *argv])
    return 0  # not reached


def _positive_int(text: str) -> int:
    """An argparse type: a count of at least 1 (argparse reports the error and exits 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="routing-replay",
        description="Routing replay for Mixture-of-Experts RL: the trainer sees exactly the experts the engine used.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser(
        "capture-demo",
        help="record a toy KV-cached engine's routing, deliver it per request and verify it",
        description="Runs a tiny random Qwen3-MoE as a KV-cached engine with a shared prompt prefix, records "
        "its routing with RoutingRecorder, and checks each request's rows against the routing used and "
        "against an uncached Hugging Face forward. Exits 1 if any delivered row differs from the one used.",
    )
    demo.add_argument("--requests", type=_positive_int, default=4,
                      help="requests sharing the cached prefix, at least 1 (default: 4)")
    demo.add_argument("--new-tokens", type=_positive_int, default=12,
                      help="tokens each request decodes, at least 1 (default: 12)")
    demo.add_argument("--seed", type=int, default=0, help="seed for the model and the prompts (default: 0)")
    demo.add_argument("--json", type=Path, default=None, help="also write the per-request report to this JSON file")
    demo.set_defaults(run=_capture_demo)

    serve = sub.add_parser(
        "serve",
        help="start an SGLang server that records routing (python -m sglang.launch_server --record-routing ...)",
        description="Runs `python -m sglang.launch_server` with the given SGLang arguments plus --record-routing\n"
        "(and, on a machine without a GPU, the CPU engine flags unless --device is given).\n"
        "Every SGLang flag works. The routing-replay flags:\n"
        "  --record-routing            record routed experts per token and MoE layer\n"
        "  --routing-sink ADDRESS      default collector, e.g. tcp://127.0.0.1:5555\n"
        "  --routing-max-queued-mb N   MiB of routing held until its consumers take it\n"
        "  --no-routing-shm            never use the same-host shared-memory path\n"
        "See `python -m sglang.launch_server --help` for all SGLang flags.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("sglang_args", nargs=argparse.REMAINDER, help="arguments passed to sglang.launch_server")
    serve.set_defaults(run=_serve)

    train = sub.add_parser(
        "train",
        help="run the RL job of a YAML configuration (locally, or inside `ray job submit`)",
        description="Validates the configuration (schema, parallel sizes, batch divisibility, sampling parameters, "
        "reward import path, memory estimate), then runs the job: joins the Ray cluster of RAY_ADDRESS (as under "
        "`ray job submit`) or starts a local Ray on 127.0.0.1, starts the SGLang engines (--record-routing), the "
        "Megatron trainer ranks with their routing collectors and the reward workers, warm-starts with SFT if "
        "configured, and runs train.steps RL steps. Metrics go to RUN_DIR/metrics.jsonl and TensorBoard, "
        "checkpoints to RUN_DIR/checkpoints (run.checkpoint_every). Exit codes: 0 done, 1 job error, 2 bad "
        "configuration (one line naming the file and the field or line), 130 interrupted. A configuration may "
        "start with `extends: BASE.yaml` (relative to it; chains allowed): it is merged over its base, mappings key "
        "by key, lists and scalars replaced. --set overrides are merged the same way after that, in order, and "
        "validated as if written in the file.",
    )
    train.add_argument("--config", required=True, type=Path, help="YAML job configuration (see configs/)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one setting, repeatable: a dotted KEY and a YAML VALUE, typed and validated "
                       "like the file's (train.replay=R2, train.parallel.expert=2, "
                       "train.optimizer.learning_rate=1.0e-6, 'rollout.sglang_args=[--tp-size, \"2\"]', "
                       "'task.args={max_operand: 9}'); a mapping merges "
                       "into the configured one, anything else replaces it")
    train.add_argument("--print-config", action="store_true",
                       help="print the resolved configuration (extends, --set and --output-dir applied, every field "
                       "with its default) as YAML and exit")
    train.add_argument("--dry-run", action="store_true", help="validate and print the plan, then exit")
    train.add_argument("--resume", action="store_true",
                       help="continue run.output_dir from its latest checkpoint (train.steps may be raised)")
    train.add_argument("--fresh", action="store_true", help="delete run.output_dir first (default: refuse to "
                       "overwrite an existing run)")
    train.add_argument("--output-dir", type=Path, default=None, help="run directory (overrides run.output_dir)")
    train.add_argument("--no-progress", action="store_true", help="no progress bars (logs and metrics only)")
    train.set_defaults(run=_train)

    plot = sub.add_parser(
        "plot", help="draw PNG curves of the metrics of one run, or of several runs overlaid",
        description="Draws one PNG per metric family of each RUN's metrics.jsonl: reward, mismatch, paired "
        "(own vs rollout routing), staleness, ratio, replay, clipping, update, routing, rollout, time (and other, "
        "for metrics no family knows). Each PNG has a panel per statistic; one run gets a line per mini-batch "
        "index (mb0..mbN) or layer, several runs a line per run (named by its directory) of the last mini-batch. "
        "Panels whose values span more than two decades use a logarithmic axis; families without data are "
        "skipped. Exit codes: 0 done, 1 the plots cannot be written, 2 no metrics.jsonl or a malformed line "
        "(named).")
    plot.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="a run directory holding metrics.jsonl")
    plot.add_argument("--out", type=Path, default=None, help="where to write the PNGs (default: RUN/plots for one "
                      "run, plots-A-vs-B in the runs' common directory for several)")
    plot.set_defaults(run=_plot)

    experiment = sub.add_parser(
        "experiment", help="run the seed's experiment: replay none / R2 / R3 x mini-batches x seeds",
        description="Runs the grid of an experiment configuration (configs/experiments/seed-claims.yaml): per "
        "seed one supervised warm start, then every (replay mode, mini-batches) cell from those weights on the "
        "same prompts, in a shuffled order, each an ordinary run directory. Writes summary.csv, summary.md and "
        "comparison plots into the output directory. Exit codes: 0 done, 1 job error, 2 bad configuration, "
        "130 interrupted.")
    experiment.add_argument("--config", required=True, type=Path, help="YAML experiment configuration")
    experiment.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                            help="override one setting of the experiment configuration, repeatable, typed and "
                            "validated like `train --set` (grid.steps=2, 'grid.seeds=[0, 1]', 'quick.replay=[R3]')")
    experiment.add_argument("--set-job", dest="job_overrides", action="append", default=[], metavar="KEY=VALUE",
                            help="override one setting of the base job every cell derives from, repeatable, like "
                            "`train --set` (rollout.max_new_tokens=16, train.optimizer.learning_rate=1.0e-6); the "
                            "cells then set replay, mini-batches, seed and steps over it")
    experiment.add_argument("--quick", action="store_true", help="run the configuration's small `quick` grid (CI)")
    experiment.add_argument("--output-dir", default=None, help="where to write (overrides output_dir)")
    experiment.add_argument("--no-progress", action="store_true", help="no progress bar")
    experiment.set_defaults(run=_experiment)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
