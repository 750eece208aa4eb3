"""The ``routing-replay`` command line. Each subcommand imports only what it needs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _capture_demo(args: argparse.Namespace) -> int:
    from routing_replay.demos import capture_demo

    cfg = capture_demo.DemoConfig(requests=args.requests, new_tokens=args.new_tokens, seed=args.seed)
    return capture_demo.main(cfg, args.json)


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
    demo.add_argument("--requests", type=int, default=4, help="requests sharing the cached prefix (default: 4)")
    demo.add_argument("--new-tokens", type=int, default=12, help="tokens each request decodes (default: 12)")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
