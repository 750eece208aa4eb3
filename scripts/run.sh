#!/usr/bin/env bash
# The README's main-job command: sets up the environment if needed, then runs the RL job on the
# embedded CPU default (configs/tiny-moe-cpu.yaml: local Ray on 127.0.0.1, one SGLang engine
# recording routing, one megatron-core trainer rank, R3) and draws its curves. Extra arguments go
# to `routing-replay train` (see: routing-replay train --help); the default replaces an earlier run.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/setup.sh"
BIN=${ROUTING_REPLAY_VENV:-$ROOT/.venv}/bin
cd "$ROOT"
if [ "$#" -eq 0 ]; then set -- --fresh; fi
"$BIN/routing-replay" train --config configs/tiny-moe-cpu.yaml "$@"
"$BIN/routing-replay" plot runs/tiny-moe-cpu
