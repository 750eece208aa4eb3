#!/usr/bin/env bash
# Creates the project's virtual environment with the pinned, tested stack (torch, sglang,
# megatron-core, ray, pyzmq, pybind11, ...) and builds the native extension into it.
#
# Idempotent: each stage records a hash of its inputs in the venv and is skipped when they have
# not changed, so a second run takes a second or two.
#
#   scripts/setup.sh            # venv at .venv (or $ROUTING_REPLAY_VENV)
#
# Environment: PYTHON (default python3.11), ROUTING_REPLAY_VENV, ROUTING_REPLAY_REQUIRE_CUDA=1 to
# fail when the CUDA module cannot be built (CI sets it: nvcc is installed there).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${ROUTING_REPLAY_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3.11}
STAMPS=$VENV/.routing-replay

log() { printf '[setup] %s\n' "$*"; }

hash_of() { (cd "$ROOT" && cat "$@" | sha256sum | cut -d' ' -f1); }

stage_done() { [ -f "$STAMPS/$1" ] && [ "$(cat "$STAMPS/$1")" = "$2" ]; }

mark_done() { mkdir -p "$STAMPS" && echo "$2" > "$STAMPS/$1"; }

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

# pip install, quiet; its notes about this machine's extra local indexes are dropped. Fails when pip does.
pip_quiet() {
  local out status=0
  out=$("$VENV/bin/pip" install -q --disable-pip-version-check "$@" 2>&1) || status=$?
  printf '%s\n' "$out" | grep -v -e "is ignored: it is neither" -e '^$' >&2 || true
  return $status
}

if [ ! -x "$VENV/bin/python" ]; then
  command -v "$PYTHON" >/dev/null || { echo "[setup] $PYTHON not found; set PYTHON to a Python 3.11" >&2; exit 1; }
  log "creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi

STACK_HASH=$(hash_of requirements/torch.txt requirements/lock-cpu.txt scripts/setup.sh cpu_workarounds/apply.py cpu_workarounds/sgl_kernel/__init__.py)
if ! stage_done stack "$STACK_HASH"; then
  log "installing the pinned stack (first run: a few minutes)"
  pip_quiet -r "$ROOT/requirements/torch.txt"
  # --no-deps: the lock is complete; sglang's own metadata asks for CUDA-only packages.
  pip_quiet --no-deps -r "$ROOT/requirements/lock-cpu.txt"
  if has_gpu; then
    log "GPU found: no CPU workarounds applied"
  else
    log "no GPU: applying cpu_workarounds"
    "$VENV/bin/python" "$ROOT/cpu_workarounds/apply.py"
  fi
  "$VENV/bin/python" -c "import torch, sglang, megatron.core, ray, zmq, pybind11" \
    || { echo "[setup] the stack does not import" >&2; exit 1; }
  mark_done stack "$STACK_HASH"
  rm -f "$STAMPS/build"  # a new torch or toolchain means a fresh build
fi

BUILD_HASH=$(hash_of CMakeLists.txt pyproject.toml $(cd "$ROOT" && find cpp -type f | sort))${ROUTING_REPLAY_REQUIRE_CUDA:-0}
if ! stage_done build "$BUILD_HASH" || ! "$VENV/bin/python" -c "import routing_replay.capture" 2>/dev/null; then
  log "building the native extension"
  cmake_args="-DROUTING_REPLAY_REQUIRE_CUDA=${ROUTING_REPLAY_REQUIRE_CUDA:-OFF}"
  [ "${ROUTING_REPLAY_REQUIRE_CUDA:-0}" = "1" ] && cmake_args="-DROUTING_REPLAY_REQUIRE_CUDA=ON"
  # nvcc may sit outside PATH in the usual toolkit location.
  if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then export PATH="/usr/local/cuda/bin:$PATH"; fi
  (cd "$ROOT" && pip_quiet --no-deps --no-build-isolation --config-settings=cmake.args="$cmake_args" -e .)
  "$VENV/bin/python" -c "import routing_replay.capture" \
    || { echo "[setup] routing_replay.capture does not import after the build" >&2; exit 1; }
  mark_done build "$BUILD_HASH"
fi

"$VENV/bin/python" - <<'PY'
import routing_replay.capture as c
from routing_replay.capture import native
print(f"[setup] ready: routing_replay.capture (CUDA module built: {native._capture_cuda is not None})")
PY
