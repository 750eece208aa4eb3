#!/usr/bin/env bash
# Re-resolves requirements/top-level.txt (+ SGLang's CPU dependency list) in a scratch venv and
# writes the frozen result to requirements/lock-cpu.txt. Run by hand when changing a pin.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
"${PYTHON:-python3.11}" -m venv "$SCRATCH/venv"
PIP="$SCRATCH/venv/bin/pip install -q"
$PIP -r "$ROOT/requirements/torch.txt"
$PIP --no-deps sglang==0.5.23 torchvision==0.28.0
$PIP -r "$ROOT/requirements/sglang-cpu-deps.txt" -r "$ROOT/requirements/top-level.txt" \
  -r "$ROOT/requirements/torch.txt"
"$SCRATCH/venv/bin/pip" freeze | grep -v '^torch==' > "$ROOT/requirements/lock-cpu.txt"
echo "wrote requirements/lock-cpu.txt ($(wc -l < "$ROOT/requirements/lock-cpu.txt") packages)"
