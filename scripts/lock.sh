#!/usr/bin/env bash
# Regenerates the pinned stacks in requirements/. Run by hand when changing a pin; then run
# scripts/check_gpu_lock.sh and the tests, and commit the inputs and the locks together.
#
#   scripts/lock.sh         # both: lock-cpu.txt, then lock-gpu.txt (which prefers lock-cpu's versions)
#   scripts/lock.sh cpu     # only lock-cpu.txt
#   scripts/lock.sh gpu     # only lock-gpu.txt
#
# CPU: re-resolves requirements/top-level.txt (+ SGLang's CPU dependency list) by installing it in
#      a scratch venv, and freezes the result (sglang and torchvision with --no-deps: see README).
# GPU: resolves requirements/top-level-gpu.txt WITH all of SGLang's dependencies for Linux x86_64
#      (manylinux_2_34, the tag SGLang's own wheels carry) / CPython 3.11, wheels only, without
#      installing anything, with uv (the version in requirements/uv.txt, installed into the scratch
#      venv from the registry). Versions that top-level-gpu.txt does not pin prefer those in lock-cpu.txt.
#
# Environment: PYTHON (default python3.11).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WHAT=${1:-all}
case "$WHAT" in cpu|gpu|all) ;; *) echo "usage: scripts/lock.sh [cpu|gpu|all]" >&2; exit 2 ;; esac
GPU_PLATFORM=x86_64-manylinux_2_34
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
"${PYTHON:-python3.11}" -m venv "$SCRATCH/venv"
PIP="$SCRATCH/venv/bin/pip install -q"

if [ "$WHAT" != gpu ]; then
  $PIP -r "$ROOT/requirements/torch.txt"
  $PIP --no-deps sglang==0.5.23 torchvision==0.28.0
  $PIP -r "$ROOT/requirements/sglang-cpu-deps.txt" -r "$ROOT/requirements/top-level.txt" \
    -r "$ROOT/requirements/torch.txt"
  # --all: setuptools too (tensorboard requires it; plain freeze leaves it out); not pip itself.
  "$SCRATCH/venv/bin/pip" freeze --all | grep -v -E '^(torch|pip)==' > "$ROOT/requirements/lock-cpu.txt"
  echo "wrote requirements/lock-cpu.txt ($(wc -l < "$ROOT/requirements/lock-cpu.txt") packages)"
fi

if [ "$WHAT" != cpu ]; then
  $PIP -r "$ROOT/requirements/uv.txt"
  # uv takes the pins already in its output file as preferences: seed it with the CPU lock.
  cp "$ROOT/requirements/lock-cpu.txt" "$SCRATCH/lock-gpu.txt"
  (cd "$ROOT" && "$SCRATCH/venv/bin/uv" pip compile requirements/top-level-gpu.txt \
    --python-version 3.11 --python-platform "$GPU_PLATFORM" --only-binary :all: \
    --custom-compile-command "scripts/lock.sh gpu" --quiet -o "$SCRATCH/lock-gpu.txt")
  mv "$SCRATCH/lock-gpu.txt" "$ROOT/requirements/lock-gpu.txt"
  echo "wrote requirements/lock-gpu.txt ($(grep -c '^[A-Za-z0-9]' "$ROOT/requirements/lock-gpu.txt") packages)"
fi
