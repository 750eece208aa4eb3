#!/usr/bin/env bash
# The README's test command: sets up the environment if needed, then runs the test suite and the
# benchmarks' smoke modes. Extra arguments go to pytest (e.g. scripts/test.sh tests/unit -x).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

# Where a CUDA toolkit exists the CUDA module must build (compile only; running needs a GPU).
if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then
  export ROUTING_REPLAY_REQUIRE_CUDA=1
fi
# The GPU stack's lock resolves and is complete (registry metadata only; no GPU, no venv needed).
bash scripts/check_gpu_lock.sh
bash scripts/setup.sh
VENV=${ROUTING_REPLAY_VENV:-$ROOT/.venv}
PY="$VENV/bin/python"

echo "[test] pytest"
"$PY" -m pytest "${@:-tests}"

echo "[test] benchmark smoke runs"
for bench in benchmarks/*_bench.py; do
  echo "[test] $bench --smoke"
  "$PY" "$bench" --smoke
done
echo "[test] all green"
