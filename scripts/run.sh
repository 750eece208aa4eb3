#!/usr/bin/env bash
# The README's main-job command: sets up the environment if needed, then runs the main job on the
# embedded CPU default. Until the RL job lands this is the capture demo. Extra arguments are
# passed to it (see: scripts/run.sh --help).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/setup.sh"
exec "${ROUTING_REPLAY_VENV:-$ROOT/.venv}/bin/routing-replay" capture-demo "$@"
