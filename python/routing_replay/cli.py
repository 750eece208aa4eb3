"""The ``routing-replay`` command line. Each subcommand imports only what it needs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _capture_demo(args: argparse.Namespace) -> int:
    from routing_replay.demos import capture_demo

    cfg = capture_demo.DemoConfig(requests=args.requests, new_tokens=args.new_tokens, seed=args.seed)
    return capture_demo.main(cfg, args.json)


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
