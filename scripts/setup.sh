#!/usr/bin/env bash
# Creates the project's virtual environment with the pinned, tested stack (torch, sglang,
# megatron-core, ray, pyzmq, pybind11, ...) and installs the project into it with its extras,
# the stack's lock as pip constraints, building the native extension:
#
#   gpu  pip install --no-deps --only-binary=:all: -r requirements/lock-gpu.txt; pip check
#        pip install --no-build-isolation -e ".[all,test]" -c requirements/lock-gpu.txt
#   cpu  pip install -r requirements/torch.txt
#        pip install --no-deps -r requirements/lock-cpu.txt      (sglang: its metadata asks for CUDA)
#        python cpu_workarounds/apply.py                          (where no GPU is found)
#        pip install --no-build-isolation -e ".[train,wandb,test]" -c requirements/lock-cpu.txt
#
# (the last command with --config-settings=cmake.args=-DROUTING_REPLAY_REQUIRE_CUDA=ON|OFF); then it
# checks that this last install added nothing outside the lock and that every package imports.
#
# Two stacks (requirements/README.md):
#   cpu  torch.txt + lock-cpu.txt (CPU torch, a stub sgl_kernel; cpu_workarounds/ applied where
#        nvidia-smi finds no GPU). The default where `nvidia-smi -L` lists no GPU.
#   gpu  lock-gpu.txt (SGLang with its real CUDA dependencies: the torch it pins, sgl-kernel,
#        flashinfer, nvidia-* CUDA 13 wheels; needs glibc >= 2.34 and an NVIDIA driver for CUDA
#        13.0, R580 or newer). The default where `nvidia-smi -L` lists a GPU; checks that torch
#        sees CUDA and that sgl_kernel imports. Never applies cpu_workarounds/.
# A venv holds one stack: switching needs a new venv (remove it, or set ROUTING_REPLAY_VENV).
#
# Idempotent: each stage records a hash of its inputs in the venv and is skipped when they have
# not changed, so a second run takes a second or two.
#
#   scripts/setup.sh            # venv at .venv (or $ROUTING_REPLAY_VENV)
#
# Environment: PYTHON (default python3.11), ROUTING_REPLAY_VENV, ROUTING_REPLAY_REQUIRE_CUDA=1 to
# fail when the CUDA module cannot be built (CI sets it: nvcc is installed there),
# ROUTING_REPLAY_STACK=cpu|gpu to choose the stack instead of detecting it, and
# ROUTING_REPLAY_SETUP_DRY_RUN=1 to print the stack chosen and what would be installed, changing
# nothing.
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

GPU_PRESENT=0
has_gpu && GPU_PRESENT=1
STACK=${ROUTING_REPLAY_STACK:-}
if [ -z "$STACK" ]; then
  if [ $GPU_PRESENT = 1 ]; then STACK=gpu; else STACK=cpu; fi
  STACK_WHY="detected: nvidia-smi -L $( [ $GPU_PRESENT = 1 ] && echo lists a GPU || echo finds no GPU)"
else
  STACK_WHY="ROUTING_REPLAY_STACK=$STACK"
fi
# What each stack installs: its hash covers these files, the stack's name, whether the CPU
# workarounds apply, and STACK_RECIPE (bump it when the install steps below change).
# EXTRAS: what the project is installed with, against LOCK as constraints (on CPU, not [serve]:
# sglang 0.5.23's metadata pins torch 2.14.1 and CUDA-only packages, so the CPU lock holds sglang
# installed --no-deps instead; requirements/README.md).
STACK_RECIPE=3
case "$STACK" in
  cpu)
    STACK_FILES="requirements/torch.txt requirements/lock-cpu.txt cpu_workarounds/apply.py cpu_workarounds/sgl_kernel/__init__.py"
    LOCK=requirements/lock-cpu.txt
    EXTRAS=train,wandb,test
    WORKAROUNDS=$([ $GPU_PRESENT = 1 ] && echo no || echo yes) ;;
  gpu)
    STACK_FILES="requirements/lock-gpu.txt"
    LOCK=requirements/lock-gpu.txt
    EXTRAS=all,test
    WORKAROUNDS=no ;;
  *) echo "[setup] ROUTING_REPLAY_STACK must be cpu or gpu, not '$STACK'" >&2; exit 2 ;;
esac
# shellcheck disable=SC2086  # STACK_FILES is a list of paths without spaces
STACK_HASH=$( { printf 'recipe %s stack %s cpu-workarounds %s\n' "$STACK_RECIPE" "$STACK" "$WORKAROUNDS"
                (cd "$ROOT" && cat $STACK_FILES); } | sha256sum | cut -d' ' -f1)

STACK_IMPORTS="torch, sglang, megatron.core, ray, zmq, pybind11, wandb, pyarrow, math_verify"
CMAKE_ARGS="-DROUTING_REPLAY_REQUIRE_CUDA=OFF"
[ "${ROUTING_REPLAY_REQUIRE_CUDA:-0}" = "1" ] && CMAKE_ARGS="-DROUTING_REPLAY_REQUIRE_CUDA=ON"
# The project install's inputs: the build's, the stack (its hash), the extras and CMAKE_ARGS.
BUILD_HASH=$( { hash_of CMakeLists.txt pyproject.toml $(cd "$ROOT" && find cpp -type f | sort)
                printf 'stack %s extras %s cmake %s\n' "$STACK_HASH" "$EXTRAS" "$CMAKE_ARGS"; } | sha256sum | cut -d' ' -f1)

if [ "${ROUTING_REPLAY_SETUP_DRY_RUN:-0}" = "1" ]; then
  log "dry run: nothing is changed"
  log "stack: $STACK ($STACK_WHY); venv: $VENV"
  [ -x "$VENV/bin/python" ] || log "would create the virtual environment with $PYTHON"
  if [ -f "$STAMPS/stack-kind" ] && [ "$(cat "$STAMPS/stack-kind")" != "$STACK" ]; then
    log "would refuse: the venv holds the $(cat "$STAMPS/stack-kind") stack"
  elif stage_done stack "$STACK_HASH"; then
    log "stack up to date (inputs: $STACK_FILES)"
  else
    log "would install (inputs: $STACK_FILES):"
    if [ "$STACK" = cpu ]; then
      log "  pip install -r requirements/torch.txt   # $(grep -E '^[A-Za-z]' "$ROOT/requirements/torch.txt" | tr '\n' ' ')"
      log "  pip install --no-deps -r requirements/lock-cpu.txt   # $(grep -cE '^[A-Za-z]' "$ROOT/requirements/lock-cpu.txt") pins"
      log "  cpu_workarounds/apply.py: $WORKAROUNDS"
      log "  check: import $STACK_IMPORTS"
    else
      log "  pip install --no-deps --only-binary=:all: -r requirements/lock-gpu.txt   # $(grep -cE '^[A-Za-z]' "$ROOT/requirements/lock-gpu.txt") pins, then pip check"
      for p in sglang torch sglang-kernel flashinfer-python megatron-core ray; do
        log "    $(grep -m1 -E "^$p==" "$ROOT/requirements/lock-gpu.txt")"
      done
      log "  cpu_workarounds/apply.py: no"
      log "  check: import $STACK_IMPORTS; torch.cuda.is_available(); import sgl_kernel"
    fi
  fi
  if stage_done build "$BUILD_HASH"; then
    log "project install up to date"
  else
    log "would install the project (building the native extension):"
    log "  pip install --no-build-isolation -e \".[$EXTRAS]\" -c $LOCK   # cmake.args=$CMAKE_ARGS"
    log "  check: nothing installed outside the lock; import every routing_replay package"
  fi
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  command -v "$PYTHON" >/dev/null || { echo "[setup] $PYTHON not found; set PYTHON to a Python 3.11" >&2; exit 1; }
  log "creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi

if [ -f "$STAMPS/stack-kind" ] && [ "$(cat "$STAMPS/stack-kind")" != "$STACK" ]; then
  echo "[setup] $VENV holds the $(cat "$STAMPS/stack-kind") stack, but the $STACK stack was chosen ($STACK_WHY)." >&2
  echo "[setup] A venv holds one stack: remove it (rm -rf $VENV), set ROUTING_REPLAY_VENV to another path, or set ROUTING_REPLAY_STACK=$(cat "$STAMPS/stack-kind")." >&2
  exit 1
fi

if ! stage_done stack "$STACK_HASH"; then
  log "installing the pinned stack (first run: a few minutes)"
  if [ "$STACK" = cpu ]; then
    pip_quiet -r "$ROOT/requirements/torch.txt"
    # --no-deps: the lock is complete; sglang's own metadata asks for CUDA-only packages.
    pip_quiet --no-deps -r "$ROOT/requirements/lock-cpu.txt"
    if [ "$WORKAROUNDS" = no ]; then
      log "GPU found: no CPU workarounds applied"
    else
      log "no GPU: applying cpu_workarounds"
      "$VENV/bin/python" "$ROOT/cpu_workarounds/apply.py"
    fi
  else
    log "GPU stack ($STACK_WHY): requirements/lock-gpu.txt (several GB of CUDA wheels on a first run)"
    # --no-deps: the lock is SGLang's full dependency closure (scripts/check_gpu_lock.sh proves it);
    # pip check then confirms every installed requirement is met.
    # --only-binary: the lock was resolved for wheels (manylinux_2_34): never build from source.
    pip_quiet --no-deps --only-binary=:all: -r "$ROOT/requirements/lock-gpu.txt"
    check_out=$("$VENV/bin/python" -m pip check --disable-pip-version-check 2>&1) \
      || { printf '%s\n' "$check_out" >&2; echo "[setup] the GPU stack's requirements are not all met (pip check above)" >&2; exit 1; }
  fi
  "$VENV/bin/python" -c "import $STACK_IMPORTS" \
    || { echo "[setup] the stack does not import" >&2; exit 1; }
  if [ "$STACK" = gpu ]; then
    "$VENV/bin/python" - <<'PY' || { echo "[setup] the GPU stack cannot use the GPU (see above)" >&2; exit 1; }
import torch
if not torch.version.cuda:
    raise SystemExit(f"[setup] torch {torch.__version__} is not a CUDA build")
if not torch.cuda.is_available():
    raise SystemExit(f"[setup] torch {torch.__version__} (CUDA {torch.version.cuda}): torch.cuda.is_available() is False (driver too old for this CUDA, or no GPU visible)")
import sgl_kernel  # noqa: F401  SGLang's CUDA kernels
print(f"[setup] torch {torch.__version__} sees {torch.cuda.device_count()} GPU(s): {torch.cuda.get_device_name(0)}; sgl_kernel imports")
PY
  fi
  mark_done stack "$STACK_HASH"
  mark_done stack-kind "$STACK"
  rm -f "$STAMPS/build"  # a new torch or toolchain means a fresh build
fi

if ! stage_done build "$BUILD_HASH" || ! "$VENV/bin/python" -c "import routing_replay.capture" 2>/dev/null; then
  log "installing the project: -e .[$EXTRAS] -c $LOCK (building the native extension)"
  # nvcc may sit outside PATH in the usual toolkit location.
  if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then export PATH="/usr/local/cuda/bin:$PATH"; fi
  # Everything the extras need is already installed from the lock: pip resolves them against it
  # (the lock as constraints) and installs nothing more, which the freeze comparison checks.
  # --no-build-isolation: the build uses the locked torch, pybind11, scikit-build-core, cmake, ninja.
  freeze() { "$VENV/bin/python" -m pip freeze --all --disable-pip-version-check --exclude routing-replay 2>/dev/null | LC_ALL=C sort; }
  before=$(freeze)
  [ -n "$before" ] || { echo "[setup] pip freeze listed nothing in $VENV" >&2; exit 1; }
  (cd "$ROOT" && pip_quiet --no-build-isolation --config-settings=cmake.args="$CMAKE_ARGS" \
     -e ".[$EXTRAS]" -c "$LOCK")
  added=$(comm -13 <(printf '%s\n' "$before") <(freeze))
  if [ -n "$added" ]; then
    echo "[setup] pip install -e \".[$EXTRAS]\" -c $LOCK installed what the lock install had not:" >&2
    printf '  %s\n' $added >&2
    echo "[setup] every requirement of the extras must be in $LOCK (add it to requirements/top-level.txt," >&2
    echo "[setup] re-run scripts/lock.sh); or the venv lacks a locked package (rm -rf $VENV and set up anew)" >&2
    exit 1
  fi
  "$VENV/bin/python" - <<'PY' || { echo "[setup] the project does not import after its install (above)" >&2; exit 1; }
# Every module of the project imports (its extras are installed); not the native modules themselves.
import importlib, pkgutil, time
import routing_replay
start = time.monotonic()
names = [m.name for m in pkgutil.walk_packages(routing_replay.__path__, "routing_replay.")
         if not m.name.rsplit(".", 1)[-1].startswith("_")]
for name in names:
    importlib.import_module(name)
print(f"[setup] all {len(names)} routing_replay modules import ({time.monotonic() - start:.1f}s)")
PY
  mark_done build "$BUILD_HASH"
fi

"$VENV/bin/python" - <<'PY'
import routing_replay.capture as c
from routing_replay.capture import native
built = native.built_cuda_module is not None
usable = "" if not built else f", usable here: {native.cuda_unavailable_reason or 'yes'}"
print(f"[setup] ready: routing_replay.capture (CUDA module built: {built}{usable}; CUDA versions: {native.cuda_versions()})")
PY
