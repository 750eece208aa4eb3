#!/usr/bin/env bash
# Checks, without a GPU and without installing anything, that requirements/lock-gpu.txt is a
# complete, consistent GPU stack for Linux x86_64 (manylinux_2_34) / CPython 3.11, i.e. that
# `scripts/setup.sh` on a GPU node (pip install --no-deps -r lock-gpu.txt) gets a working set:
#
#   1. wheels: every pin exists on the package registry with a wheel for that platform
#      (uv pip compile --no-deps --only-binary :all:, the lock as input);
#   2. closure: resolving requirements/top-level-gpu.txt with all dependencies, constrained to the
#      lock (-c), needs exactly the lock: no package outside it, none in it unused, no conflict;
#   3. the lock's sglang is the CPU lock's (the two stacks run the same SGLang);
#   4. the project's extras: resolving pyproject.toml's ".[all,test]" with all dependencies,
#      constrained to the lock, needs nothing outside it, i.e. what setup.sh runs on a GPU node,
#      `pip install --no-build-isolation -e ".[all,test]" -c requirements/lock-gpu.txt`, installs
#      nothing the lock does not pin (the lock's only other pins are the build tools).
#
# Reads only the index and wheel metadata (uv's range requests: no wheel is downloaded), with a
# fresh cache each run; a few seconds. Needs the package registry and fails loudly when it cannot
# be reached. uv (requirements/uv.txt) is installed on first use into a cache venv
# (~/.cache/routing-replay/uv-VERSION), never into the project venv.
#
# Environment: PYTHON (default python3.11; only to install uv), ROUTING_REPLAY_LOCK_CHECK_TIMEOUT
# (seconds each step may take, default 120), ROUTING_REPLAY_GPU_LOCK (the lock to check, default
# requirements/lock-gpu.txt).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python3.11}
T=${ROUTING_REPLAY_LOCK_CHECK_TIMEOUT:-120}
LOCK=${ROUTING_REPLAY_GPU_LOCK:-requirements/lock-gpu.txt}
TOP=requirements/top-level-gpu.txt
PLATFORM=x86_64-manylinux_2_34
START=$SECONDS

say() { printf '[check-gpu-lock] %s\n' "$*"; }
fail() { printf '[check-gpu-lock] FAIL: %s\n' "$*" >&2; exit 1; }
[ -f "$LOCK" ] || fail "$LOCK does not exist (scripts/lock.sh gpu writes it)"

UV_SPEC=$(grep -m1 -E '^uv==' requirements/uv.txt)
TOOLS=${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/routing-replay/${UV_SPEC/==/-}
UV=$TOOLS/bin/uv
if ! [ -x "$UV" ] || [ "$("$UV" --version 2>/dev/null | cut -d' ' -f2)" != "${UV_SPEC#uv==}" ]; then
  say "installing $UV_SPEC into $TOOLS"
  command -v "$PYTHON" >/dev/null || fail "$PYTHON not found (set PYTHON to a Python 3.11 with pip)"
  rm -rf "$TOOLS"
  "$PYTHON" -m venv "$TOOLS" || fail "could not create $TOOLS"
  out=$(timeout "$T" "$TOOLS/bin/pip" install -q --disable-pip-version-check -r requirements/uv.txt 2>&1) || {
    printf '%s\n' "$out" | grep -v "is ignored: it is neither" >&2
    rm -rf "$TOOLS"
    fail "could not install $UV_SPEC from the package registry (unreachable?)"
  }
fi

# Canonical names of every package the lock or the top-level inputs name.
known_names() { cat "$LOCK" "$TOP" requirements/top-level.txt | grep -oE '^[A-Za-z0-9][A-Za-z0-9._-]*' \
                | awk '{ n = tolower($0); gsub(/[-_.]+/, "-", n); print n }' | sort -u | tr '\n' ' '; }

# uv pip compile for the GPU target; fresh cache (nothing stale), wheels only. Prints the pins.
# On failure: the package uv names, uv's own explanation, and whether the registry was reachable.
compile() {  # STEP-NAME ARGS...
  local step=$1 out err status=0
  shift
  err=$(mktemp)
  out=$(timeout "$T" "$UV" pip compile "$@" --python-version 3.11 --python-platform "$PLATFORM" \
        --only-binary :all: --no-cache --no-header --no-annotate 2>"$err") || status=$?
  if [ $status -ne 0 ]; then
    local msg
    msg=$(cat "$err"); rm -f "$err"
    [ $status -eq 124 ] && fail "$step: uv did not finish within ${T}s (registry slow or unreachable; set ROUTING_REPLAY_LOCK_CHECK_TIMEOUT)"
    if grep -qiE 'error sending request|dns error|failed to lookup|connection refused|connect error|network is unreachable|timed out|certificate|proxy error' <<<"$msg"; then
      printf '%s\n' "$msg" >&2
      fail "$step: the package registry cannot be reached (uv's error above); this check needs it"
    fi
    # The packages uv's explanation names, in its order: those the lock or the inputs mention.
    local pkg
    pkg=$(grep -oE '[A-Za-z0-9][A-Za-z0-9._-]*' <<<"$msg" | awk -v known="$(known_names)" '
          BEGIN { n = split(known, k, " "); for (i = 1; i <= n; i++) ok[k[i]] = 1 }
          { c = tolower($0); gsub(/[-_.]+/, "-", c); if ((c in ok) && !(c in seen)) { seen[c] = 1; out = out (out ? ", " : "") c } }
          END { print out }')
    printf '%s\n' "$msg" >&2
    fail "$step: ${pkg:+package(s) $pkg: }$LOCK does not resolve for Linux x86_64 / CPython 3.11 (uv's explanation above)"
  fi
  rm -f "$err"
  [ -n "$out" ] || fail "$step: uv printed no pins"
  printf '%s\n' "$out"
}

# Canonical "name==version" lines of a requirements file or of uv's output, sorted.
pins() { grep -E '^[A-Za-z0-9]' | sed -E 's/[[:space:]]*(;|#).*//' \
         | awk -F'==' '{ n=tolower($1); gsub(/[-_.]+/, "-", n); print n "==" $2 }' | sort -u; }

locked=$(pins < "$LOCK")
[ -n "$locked" ] || fail "$LOCK holds no pins"
not_pins=$(grep -E '^[A-Za-z0-9]' "$LOCK" | grep -vE '^[A-Za-z0-9][A-Za-z0-9._-]*(\[[^]]*\])?==[^ ;#]+' || true)
[ -z "$not_pins" ] || fail "$LOCK: not exact pins (name==version): $(tr '\n' ' ' <<<"$not_pins")"

say "1/4 every pin of $LOCK ($(wc -l <<<"$locked") packages) has a wheel for $PLATFORM / cp311"
wheels=$(compile "wheels" --no-deps "$LOCK" | pins)
changed=$(comm -13 <(printf '%s\n' "$locked") <(printf '%s\n' "$wheels"))
[ -z "$changed" ] || fail "wheels: uv resolved pins that differ from the lock: $(tr '\n' ' ' <<<"$changed")"

say "2/4 resolving $TOP with all dependencies, constrained to the lock, needs exactly the lock"
closure=$(compile "closure" "$TOP" -c "$LOCK" | pins)
missing=$(comm -13 <(printf '%s\n' "$locked") <(printf '%s\n' "$closure"))
unused=$(comm -23 <(printf '%s\n' "$locked") <(printf '%s\n' "$closure"))
[ -z "$missing" ] || fail "closure: needed but not pinned in $LOCK: $(tr '\n' ' ' <<<"$missing")(re-run scripts/lock.sh gpu)"
[ -z "$unused" ] || fail "closure: pinned in $LOCK but required by nothing: $(tr '\n' ' ' <<<"$unused")(re-run scripts/lock.sh gpu)"

say "3/4 the same sglang as requirements/lock-cpu.txt"
gpu_sglang=$(grep -m1 '^sglang==' <<<"$locked" || true)
cpu_sglang=$(pins < requirements/lock-cpu.txt | grep -m1 '^sglang==' || true)
[ -n "$gpu_sglang" ] && [ "$gpu_sglang" = "$cpu_sglang" ] \
  || fail "package sglang: $LOCK has '${gpu_sglang:-none}', lock-cpu.txt has '${cpu_sglang:-none}'"

say "4/4 pyproject.toml's .[all,test] resolves inside the lock"
extras=$(compile "extras" pyproject.toml --extra all --extra test -c "$LOCK" | pins)
outside=$(comm -13 <(printf '%s\n' "$locked") <(printf '%s\n' "$extras"))
[ -z "$outside" ] || fail "extras: .[all,test] needs packages (or versions) not pinned in $LOCK: $(tr '\n' ' ' <<<"$outside")(add them to requirements/top-level.txt and re-run scripts/lock.sh)"
not_used=$(comm -23 <(printf '%s\n' "$locked") <(printf '%s\n' "$extras") | tr '\n' ' ')

say "ok: $(wc -l <<<"$locked") pins ($(grep -E '^(sglang|torch|sglang-kernel|flashinfer-python|megatron-core)==' <<<"$locked" | tr '\n' ' '| sed 's/ $//')) in $((SECONDS - START))s; .[all,test] needs all but: ${not_used% }"
