#!/usr/bin/env bash
# The GPU check: one prepared script for a lent GPU machine (no registry access there, a Python and
# torch of its own, at most 64 MiB carried with the working tree). About 10 minutes:
#
#   1. prints the machine: GPU, driver, nvcc, Python, torch and the CUDA torch was built for;
#   2. installs the Python packages the image lacks from wheels carried in .whl/ (made here by
#      `scripts/gpu_check.sh wheels`), into a private folder on PYTHONPATH;
#   3. builds routing_replay (the CUDA module required) for that Python and torch, and prints the
#      module's CUDA runtime and the driver's versions, or why the module is refused;
#   4. runs tests/gpu (the CUDA recorder and one CUDA trainer step);
#   5. runs benchmarks/capture_bench.py on CUDA;
#   6. runs compute-sanitizer (memcheck, racecheck) over the recorder's GPU tests where it works;
#
# writing everything under $RESULTS_DIR (default benchmarks/results): gpu-check-<device>.md (the
# summary with every version and the tests' outcome), capture-<device>.md (the benchmark table) and
# the full logs. Each step runs even when an earlier one failed (except after a failed build); the
# exit status is that of the first failed step.
#
# Here (a machine with the registry):   bash scripts/gpu_check.sh wheels
# There (through the device tool):      bash scripts/gpu_check.sh run
#   e.g. run(command="RESULTS_DIR=$OUT bash scripts/gpu_check.sh run", carry=[".whl"], timeout_s=600)
#
# Environment: PYTHON (default python3), RESULTS_DIR, GPU_CHECK_PYTHON_VERSION (the lent image's
# Python for `wheels`, default 3.12), GPU_CHECK_BENCH_ROUNDS (capture_bench rounds, default 3).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python3}
WHEELS=$ROOT/.whl
# What the lent image lacks of what routing_replay.capture, its tests and the CUDA trainer test
# import (the image has torch, transformers, safetensors, numpy, PyYAML, xxhash, pytest, cmake,
# ninja, pybind11 and scikit-build-core). Versions as in requirements/lock-cpu.txt.
CARRIED="msgspec pyzmq pydantic pydantic-core annotated-types typing-inspection megatron-core pytest-randomly"

log() { printf '[gpu-check] %s\n' "$*"; }

pinned() {  # NAME==VERSION of one package, as the CPU lock pins it
  grep -i -E "^${1//-/[-_]}==" requirements/lock-cpu.txt | head -1
}

download_wheels() {
  local version=${GPU_CHECK_PYTHON_VERSION:-3.12} specs=() name
  for name in $CARRIED; do
    local spec
    spec=$(pinned "$name") || true
    [ -n "$spec" ] || { log "no pin for $name in requirements/lock-cpu.txt"; return 1; }
    specs+=("$spec")
  done
  mkdir -p "$WHEELS"
  grep -qxF "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
  "$ROOT/.venv/bin/python" -m pip download -q --no-deps --only-binary=:all: --python-version "$version" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$WHEELS" "${specs[@]}" || return 1
  log "wheels for Python $version in .whl/ ($(du -sh "$WHEELS" | cut -f1)): carry it, carry=[\".whl\"]"
}

device_slug() {
  "$PYTHON" -c "import torch; print(torch.cuda.get_device_name(0).lower().replace('nvidia ', '').replace(' ', '-'))" \
    2>/dev/null || echo "no-gpu"
}

run_checks() {
  local results=${RESULTS_DIR:-$ROOT/benchmarks/results} site=/tmp/routing-replay-site status=0 device
  mkdir -p "$results"
  device=$(device_slug)
  local summary=$results/gpu-check-$device.md rows versions
  rows=$(mktemp) versions=$(mktemp)
  step() {  # step NAME LOGFILE COMMAND...: runs, logs, adds a row (outcome and the log's last line)
    local name=$1 logfile=$2 rc
    shift 2
    log "$name ..."
    "$@" > "$results/$logfile" 2>&1
    rc=$?
    printf '| %s | %s | `%s` | %s |\n' "$name" "$([ $rc = 0 ] && echo passed || echo "FAILED (exit $rc)")" \
      "$logfile" "$(tail -1 "$results/$logfile" | tr -d '|' | cut -c1-160)" >> "$rows"
    [ $rc = 0 ] || { [ $status != 0 ] || status=$rc; tail -30 "$results/$logfile"; }
    return $rc
  }
  write_summary() {
    {
      echo "# GPU check on $device ($(date -u +%Y-%m-%dT%H:%MZ))"
      echo
      echo '```'
      nvidia-smi -L 2>&1
      nvidia-smi --query-gpu=driver_version,memory.total --format=csv,noheader 2>&1
      nvcc --version 2>&1 | tail -2
      "$PYTHON" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'| torch CUDA', torch.version.cuda, '| GPU seen', torch.cuda.is_available())" 2>&1
      cat "$versions"
      echo '```'
      echo
      echo '| step | outcome | log | last line |'
      echo '|---|---|---|---|'
      cat "$rows"
    } > "$summary"
    log "summary: $summary"
    cat "$summary"
  }

  rm -rf "$site" && mkdir -p "$site"
  if [ -d "$WHEELS" ]; then
    step "install carried wheels" wheels.log "$PYTHON" -m pip install --no-index --no-deps --no-compile \
      --no-cache-dir --target "$site" "$WHEELS"/*.whl
  fi
  # Non-editable, into the private folder: the build uses this machine's Python, torch, nvcc, cmake.
  if ! step "build (CUDA module required)" build.log "$PYTHON" -m pip install --no-index --no-deps \
      --no-build-isolation --target "$site" --config-settings=cmake.args=-DROUTING_REPLAY_REQUIRE_CUDA=ON \
      --config-settings=build-dir=/tmp/routing-replay-build .; then
    log "the build failed: nothing else can run"
    write_summary
    return $status
  fi
  export PYTHONPATH=$site
  "$PYTHON" -c "from routing_replay.capture import native; print('routing_replay CUDA versions:', \
native.cuda_versions(), '| CUDA module usable:', native.cuda_unavailable_reason or 'yes')" > "$versions" 2>&1
  if ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "| GPU steps | not run: torch sees no GPU here | | |" >> "$rows"
    write_summary
    return 1
  fi
  # -o addopts=: the project's addopts load pytest-randomly, which may be missing; the order is fixed.
  step "tests/gpu" tests-gpu.log "$PYTHON" -m pytest tests/gpu -o addopts= -p no:cacheprovider -ra -v --timeout 300
  step "capture_bench on CUDA" capture-bench.log "$PYTHON" benchmarks/capture_bench.py --device cuda \
    --rounds "${GPU_CHECK_BENCH_ROUNDS:-3}" --out "$results/capture-$device.md"
  if command -v compute-sanitizer >/dev/null 2>&1; then
    local tool
    for tool in memcheck racecheck; do
      step "compute-sanitizer $tool" "sanitizer-$tool.log" compute-sanitizer --tool "$tool" --error-exitcode 9 \
        "$PYTHON" -m pytest tests/gpu/test_recorder_cuda.py -o addopts= -p no:cacheprovider -q \
        -k "matches_cpu or sglang_staging or counted_and_reported or column_slice"
    done
  else
    echo "| compute-sanitizer | not installed | | |" >> "$rows"
  fi
  write_summary
  return $status
}

case "${1:-}" in
  wheels) download_wheels ;;
  run) run_checks ;;
  *) sed -n '2,24p' "${BASH_SOURCE[0]}"; exit 2 ;;
esac
